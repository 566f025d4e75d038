"""Command line shared by launchers/pretrain.py and launchers/finetune.py.

Works the same under ``python``, ``torchrun`` and ``deepspeed`` (which appends ``--local_rank``):
ranks come from the environment (see :mod:`usp_scale.engine.dist`).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

EXAMPLES = """
examples:
  python {prog} --config configs/debug/synthetic_pretrain.yaml
  torchrun --nproc_per_node 8 {prog} --config CONFIG engine.name=fsdp2
  deepspeed --hostfile hostfile {prog} --config CONFIG engine.name=deepspeed engine.zero_stage=2
  python {prog} --help-config          # every config key, its default and documentation
"""


def build_parser(prog: str, finetune: bool) -> argparse.ArgumentParser:
    desc = ("Finetune a transferred/pretrained model: DiT (DDPM), SiT (flow), ViT classification or linear probe."
            if finetune else "Masked latent pretraining (MAE on frozen VAE latents).")
    ap = argparse.ArgumentParser(prog=prog, description=desc, epilog=EXAMPLES.format(prog=prog),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help="YAML recipe (e.g. configs/debug/synthetic_pretrain.yaml); "
                    "trailing key=value arguments override it")
    if finetune:
        ap.add_argument("--task", choices=["dit", "sit", "cls", "linprobe"], default=None,
                        help="what to train (overrides the recipe's 'task')")
    ap.add_argument("--help-config", action="store_true",
                    help="print every config key with its default and documentation, then exit")
    ap.add_argument("--deepspeed_config", "--deepspeed-config", default="",
                    help="DeepSpeed JSON merged over the generated one; keys that conflict with the usp_scale "
                         "config are an error (sets engine.deepspeed_config)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                    help="passed by the deepspeed launcher; LOCAL_RANK from the environment takes precedence")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    ap.add_argument("overrides", nargs="*", metavar="key=value",
                    help="dotted config overrides, e.g. optim.blr=1.5e-4 engine.name=ddp data.batch_size=64")
    return ap


def main(argv: Optional[Sequence[str]] = None, *, finetune: bool = False, prog: str = "launcher") -> int:
    ap = build_parser(prog, finetune)
    args = ap.parse_intermixed_args(argv)
    from ..config import ConfigError, format_help, load_config, to_dict

    if args.help_config:
        print(format_help())
        return 0
    overrides = list(args.overrides)
    if finetune and args.task:
        overrides.append(f"task={args.task}")
    if args.deepspeed_config:
        overrides.append(f"engine.deepspeed_config={args.deepspeed_config}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if not finetune and cfg.task != "pretrain":
        print(f"config error: launchers/pretrain.py runs task=pretrain, the config says task={cfg.task!r}; "
              "use launchers/finetune.py --task ...", file=sys.stderr)
        return 2
    if finetune and cfg.task == "pretrain":
        print("config error: launchers/finetune.py needs --task dit|sit|cls|linprobe", file=sys.stderr)
        return 2
    if cfg.engine.deepspeed_config and cfg.engine.name != "deepspeed":
        print("config error: --deepspeed_config needs engine.name=deepspeed", file=sys.stderr)
        return 2
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from .trainer import NonFiniteError, Trainer

    trainer = Trainer(cfg, local_rank_arg=args.local_rank if args.local_rank >= 0 else None)
    try:
        result = trainer.fit()
    except (ConfigError, NonFiniteError, OSError, ValueError, RuntimeError) as e:
        from ..checkpoint.safe_load import CheckpointFileError, DiskFullError
        from ..data.latents import LatentCacheError
        if not isinstance(e, (ConfigError, NonFiniteError, CheckpointFileError, DiskFullError, LatentCacheError,
                              FileNotFoundError)):
            raise
        print(f"[usp_scale] ERROR: {e}", file=sys.stderr, flush=True)
        return 3
    if trainer.is_main:
        print(f"[usp_scale] done: step {result['step']}, {result['nonfinite_total']} non-finite step(s) skipped in "
              f"the run, outputs in {cfg.output_dir}", flush=True)
    from ..engine import dist as D

    D.cleanup()
    return 0


def entry(finetune: bool, prog: str) -> None:
    rc = main(sys.argv[1:], finetune=finetune, prog=prog)
    sys.stdout.flush()
    sys.stderr.flush()
    # DeepSpeed on CPU occasionally aborts inside its exit handlers after a successful run.
    os._exit(rc)
