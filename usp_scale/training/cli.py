"""Command line shared by launchers/pretrain.py and launchers/finetune.py.

Works the same under ``python``, ``torchrun`` and ``deepspeed`` (which appends ``--local_rank``):
ranks come from the environment (see :mod:`usp_scale.runtime.env`).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import Optional, Sequence

import yaml

from .. import runtime as D
from ..checkpoint.safe_load import CheckpointFileError
from ..fileio import DiskFullError
from ..config import ConfigError, JobConfig, format_help, load_config, to_dict
from ..checkpoint.manager import IncompatibleCheckpoint
from ..data.cache_reader import LatentCacheError
from ..data.datasets import DatasetError
from ..transfer.report import TransferError
from ..transfer.teachers import TeacherWeightsError
from ..vae.frozen import VAELoadError
from ..vae.latent_norm import LatentStatsError
from .nonfinite import NonFiniteError
from .stop import EXIT_DONE, clear_stale_stop_files, stop_exit_code, write_stopped
from .trainer import Trainer

# Exit codes (docs/training.md, "Exit codes"); any other non-zero code is a crash (Python exits 1 on an
# uncaught error, e.g. a lost peer or a collective timeout).
# EXIT_DONE (0): training finished; exports written (also after stop_after_steps, which is not finished)
EXIT_CONFIG = 2        # bad command line or config; nothing ran
EXIT_ERROR = 3         # stopped with an explained error: max_nonfinite non-finite steps in a row (a checkpoint
#                        was written first), or a config problem found at start-up
# EXIT_STOPPED (75): stopped on request (SIGUSR1/SIGTERM or STOP_AND_CHECKPOINT) after a checkpoint; not finished,
# resume continues; the SLURM scripts requeue on it. STOPPED_FILE: the marker rank 0 leaves then, the one sign of
# a requested stop that survives torchrun (which reports any failed worker as exit code 1).

# Errors that explain themselves (they name the file, key or value and the fix): one line and EXIT_ERROR, no
# traceback; anything else is a crash (traceback, exit 1).
EXPLAINED_ERRORS = (ConfigError, NonFiniteError, CheckpointFileError, DiskFullError, LatentCacheError,
                    FileNotFoundError, D.StartupError, DatasetError, VAELoadError, IncompatibleCheckpoint,
                    TeacherWeightsError, TransferError, LatentStatsError)

EXAMPLES = """
examples:
  python {prog} --config {first}
  torchrun --nproc_per_node 8 {prog} --config CONFIG engine.name=fsdp2
  deepspeed --hostfile hostfile {prog} --config CONFIG engine.name=deepspeed engine.zero_stage=2
  python {prog} --help-config          # every config key, its default and documentation
  python {prog} --config CONFIG key=value --print-config   # the resolved config as YAML, nothing run
"""
# the first example runs as written, in seconds, on random latents (no files): tests/test_docs_run.py runs it
FIRST_EXAMPLE = {False: "configs/debug/synthetic_pretrain.yaml      # MAE on random latents, seconds",
                 True: "configs/debug/synthetic_dit.yaml      # DiT on random latents, seconds"}


def build_parser(prog: str, finetune: bool) -> argparse.ArgumentParser:
    desc = ("Finetune a transferred/pretrained model: DiT (DDPM), SiT (flow), ViT classification or linear probe."
            if finetune else "Masked latent pretraining (MAE on frozen VAE latents).")
    ap = argparse.ArgumentParser(prog=prog, description=desc, epilog=EXAMPLES.format(prog=prog, first=FIRST_EXAMPLE[finetune]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None, help=f"YAML recipe (e.g. {FIRST_EXAMPLE[finetune].split()[0]}); "
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
        # the other ranks name this one instead of waiting for the collective timeout (the start-up agreement)
        D.report_startup_failure(D.detect(local_rank_arg=args.local_rank if args.local_rank >= 0 else None),
                                 JobConfig().engine.startup_timeout_s, f"config error: {e}")
        return EXIT_CONFIG
    if not finetune and cfg.task != "pretrain":
        print(f"config error: launchers/pretrain.py runs task=pretrain, the config says task={cfg.task!r}; "
              "use launchers/finetune.py --task ...", file=sys.stderr)
        return EXIT_CONFIG
    if finetune and cfg.task == "pretrain":
        print("config error: launchers/finetune.py needs --task dit|sit|cls|linprobe", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    if D.detect(local_rank_arg=args.local_rank if args.local_rank >= 0 else None).rank == 0:
        clear_stale_stop_files(cfg.output_dir)
    try:
        # construction builds the run and resumes its checkpoint: its errors exit as the training loop's do
        trainer = Trainer(cfg, local_rank_arg=args.local_rank if args.local_rank >= 0 else None)
        result = trainer.fit()
    except (ConfigError, NonFiniteError, OSError, ValueError, RuntimeError) as e:
        if not isinstance(e, EXPLAINED_ERRORS):
            raise
        print(f"[usp_scale] ERROR: {e}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    code = EXIT_DONE
    if result.get("stopped_by_request"):
        code = stop_exit_code()
        if trainer.is_main:
            write_stopped(cfg.output_dir, result, code)
            print(f"[usp_scale] stopped on request at step {result['step']} (not finished; checkpoint "
                  f"{result['checkpoint']}); exit code {code}: a resumed or requeued run continues", flush=True)
        D.barrier()  # the marker exists before any rank exits (launchers kill the others on a non-zero exit)
    elif trainer.is_main:
        finished = "exports" in result
        print(f"[usp_scale] {'done' if finished else 'stopped (stop_after_steps, not finished)'}: step "
              f"{result['step']}, {result['nonfinite_total']} non-finite step(s) skipped in the run, outputs in "
              f"{cfg.output_dir}", flush=True)
    D.cleanup()
    return code


def entry(finetune: bool, prog: str) -> None:
    try:
        rc = main(sys.argv[1:], finetune=finetune, prog=prog)
    except BaseException as e:  # noqa: BLE001 -- a crash: report it and exit now
        if isinstance(e, SystemExit):
            rc = e.code if isinstance(e.code, int) else 1
        else:
            traceback.print_exc()
            rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter shutdown: DeepSpeed on CPU occasionally aborts inside its exit handlers after a successful
    # run, and after a crash (e.g. a lost peer) process-group threads can keep the process alive, so the launcher
    # (torchrun, srun) would wait for it instead of restarting or ending the job.
    os._exit(rc)
