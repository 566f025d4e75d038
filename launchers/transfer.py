#!/usr/bin/env python3
"""Transfer a pretrained latent MAE into a DiT/SiT or a ViT classifier and export the result.

The config is the trainer's (docs/architecture.md, "Configuration"): the target is the model a finetuning recipe
trains (sections task, model, dit.use_pretrain_layer, seed) and transfer is this tool's own section (src, out, ...);
flags are aliases of those keys. Without a task (no recipe) it follows the model: dit, sit, or for a classifier cls
(model.global_pool=avg) or linprobe (token).

Examples:
  python launchers/transfer.py --config configs/finetune/dit_xl_256.yaml \\
      transfer.src=runs/pretrain/export/model.safetensors transfer.out=runs/transfer/dit_xl.safetensors
  python launchers/transfer.py --src runs/pretrain/export/model.safetensors \\
      --model DiT-XL/2-VAE-simple --input-size 32 --out runs/transfer/dit_xl.safetensors    # the same with flags

Writes the transferred model as safetensors plus ``<out>.report.json`` (what was copied,
resampled, dropped and newly initialised) and prints the report.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout first

from usp_scale.checkpoint.safe_load import CheckpointFileError  # noqa: E402
from usp_scale.config import ConfigError  # noqa: E402
from usp_scale.config.cli import Alias, help_config, parse_tool_args, tool_config, tool_parser  # noqa: E402
from usp_scale.config.schema import TransferJob  # noqa: E402
from usp_scale.config.validate import EXTRA_FAMILIES_OF_TASK, FAMILY_OF_TASK  # noqa: E402
from usp_scale.fileio import DiskFullError, remove_stale_temps, save_safetensors, write_text  # noqa: E402
from usp_scale.models import list_models, model_family  # noqa: E402
from usp_scale.runtime import init_runtime  # noqa: E402
from usp_scale.training.tasks import build_task  # noqa: E402
from usp_scale.transfer import TransferError, transfer  # noqa: E402

SECTIONS = ("task", "seed", "model", "dit.use_pretrain_layer", "transfer",
            "repa.encoder_depth", "repa.projector_dim", "repa.teacher")   # the shapes of a *-REPA target
ALIASES = (
    Alias(("--src",), "transfer.src", "FILE"),
    Alias(("--model",), "model.name", "NAME"),
    Alias(("--out",), "transfer.out", "FILE"),
    Alias(("--input-size",), "model.img_size", "SIDE"),
    Alias(("--in-chans",), "model.in_chans", "N"),
    Alias(("--num-classes",), "model.num_classes", "N"),
    Alias(("--global-pool",), "model.global_pool", "POOL"),
    Alias(("--use-pretrain-layer",), "dit.use_pretrain_layer", "K"),
    Alias(("--skip-patch-embed",), "transfer.skip_patch_embed", const=True),
    Alias(("--which",), "transfer.which", "WHICH"),
    Alias(("--seed",), "seed", "SEED"),
    Alias(("--task",), "task", "TASK"),
)


def target_task(model_name: str, global_pool: str) -> str:
    """The finetuning task of a transfer target: the task of its family (config.validate.FAMILY_OF_TASK; of the
    classifier's two, the probe with token pooling)."""
    family = model_family(model_name)
    tasks = [t for t, f in FAMILY_OF_TASK.items()
             if (f == family or family in EXTRA_FAMILIES_OF_TASK.get(t, ())) and t != "pretrain"]
    if not tasks:
        raise ConfigError(f"model.name={model_name} is a masked autoencoder; transfer targets are DiT/SiT or "
                          "classifiers")
    return tasks[0] if len(tasks) == 1 else ("linprobe" if global_pool == "token" else "cls")


def load_transfer_config(argv=None):
    args = parse_tool_args(tool_parser(__doc__, ALIASES, SECTIONS, schema=TransferJob), argv)
    if args.help_config:
        print(help_config(TransferJob, SECTIONS))
        raise SystemExit(0)
    if args.config is None and args.alias_task is None and args.alias_model in list_models():
        args.alias_task = target_task(args.alias_model, args.alias_global_pool or "avg")
    return tool_config(args, ALIASES, SECTIONS, schema=TransferJob)


def main(argv=None) -> int:
    cfg = load_transfer_config(argv)
    t = cfg.transfer
    cfg.checkpoint.init_from = ""  # the model is initialised here, by the transfer (a recipe's init_from is its output)
    rt = init_runtime(cfg)  # one process: the seed of the layers the MAE does not provide
    task = build_task(cfg)
    model = task.build_model(attn_backend=rt.attn_backend)
    report = transfer(model, t.src, use_pretrain_layer=cfg.dit.use_pretrain_layer,
                      skip_patch_embed=t.skip_patch_embed, which=t.which)
    print(report.summary())
    meta = {"source": os.path.abspath(t.src), "model": cfg.model.name, "task": cfg.task,
            "kwargs": json.dumps(task.model_kwargs())}
    out_dir, out_name = os.path.split(os.path.abspath(t.out))  # the temp files of a transfer killed mid-write
    for p in remove_stale_temps(out_dir, names=(out_name, out_name + ".report.json")):
        print(f"removed {p} (left by a transfer killed mid-write)")
    save_safetensors(model, t.out, metadata=meta)
    write_text(t.out + ".report.json", report.to_json())
    print(f"wrote {t.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception as e:  # a bad input file, argument or config value: its message (naming it), not a traceback
        errors = (ConfigError, CheckpointFileError, DiskFullError, FileNotFoundError, TransferError, KeyError,
                  ValueError)
        if not isinstance(e, errors):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
