"""Command line shared by launchers/pretrain.py and launchers/finetune.py.

Works the same under ``python``, ``torchrun`` and ``deepspeed`` (which appends ``--local_rank``):
ranks come from the environment (see :mod:`usp_scale.runtime.env`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from ..cluster.slurm import EXIT_STOPPED, STOPPED_FILE

_IMPORTED_AT = time.time()

# Exit codes (docs/training.md, "Exit codes"); any other non-zero code is a crash (Python exits 1 on an
# uncaught error, e.g. a lost peer or a collective timeout).
EXIT_DONE = 0          # training finished; exports written (also after stop_after_steps, which is not finished)
EXIT_CONFIG = 2        # bad command line or config; nothing ran
EXIT_ERROR = 3         # stopped with an explained error: max_nonfinite non-finite steps in a row (a checkpoint
#                        was written first), or a config problem found at start-up
# EXIT_STOPPED (75): stopped on request (SIGUSR1/SIGTERM or STOP_AND_CHECKPOINT) after a checkpoint; not finished,
# resume continues; the SLURM scripts requeue on it. STOPPED_FILE: the marker rank 0 leaves then, the one sign of
# a requested stop that survives torchrun (which reports any failed worker as exit code 1).

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
        return EXIT_CONFIG
    if not finetune and cfg.task != "pretrain":
        print(f"config error: launchers/pretrain.py runs task=pretrain, the config says task={cfg.task!r}; "
              "use launchers/finetune.py --task ...", file=sys.stderr)
        return EXIT_CONFIG
    if finetune and cfg.task == "pretrain":
        print("config error: launchers/finetune.py needs --task dit|sit|cls|linprobe", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    from .. import runtime as D
    from .trainer import NonFiniteError, Trainer

    if D.detect(local_rank_arg=args.local_rank if args.local_rank >= 0 else None).rank == 0:
        clear_stale_stop_files(cfg.output_dir)
    try:
        # construction builds the run and resumes its checkpoint: its errors exit as the training loop's do
        trainer = Trainer(cfg, local_rank_arg=args.local_rank if args.local_rank >= 0 else None)
        result = trainer.train()
    except (ConfigError, NonFiniteError, OSError, ValueError, RuntimeError) as e:
        from ..checkpoint.safe_load import CheckpointFileError, DiskFullError
        from ..data.latents import LatentCacheError
        if not isinstance(e, (ConfigError, NonFiniteError, CheckpointFileError, DiskFullError, LatentCacheError,
                              FileNotFoundError)):
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


def run_started_at() -> float:
    """When this run started, in epoch seconds: ``$USP_SCALE_STARTED_AT`` (the SLURM scripts export the job's
    start) or this process's start (from /proc; the module's import time elsewhere)."""
    if os.environ.get("USP_SCALE_STARTED_AT"):
        return float(os.environ["USP_SCALE_STARTED_AT"])
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])   # field 22: start time in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_AT


def clear_stale_stop_files(output_dir: str) -> None:
    """Rank 0 at start-up: remove the previous run's STOPPED marker, and a STOP_AND_CHECKPOINT older than this
    run (left by a job killed before it could act on it), which would otherwise stop this run at its first
    log step. A stop file written after the run started (e.g. by the SLURM script's signal trap) is kept."""
    from .trainer import STOP_FILE

    started = run_started_at()
    for name in (STOPPED_FILE, STOP_FILE):
        path = os.path.join(output_dir, name)
        try:
            mtime = os.path.getmtime(path)
        except OSError:
            continue
        if name == STOPPED_FILE or mtime < started:
            os.remove(path)
            print(f"[usp_scale] removed {path} (written {time.ctime(mtime)}, before this run started "
                  f"{time.ctime(started)})", flush=True)


def stop_exit_code() -> int:
    """EXIT_STOPPED, except under a torchrun agent with restarts left: it would restart the workers on a non-zero
    exit (they would resume and train on, ignoring the stop), so there the stop exits 0 and STOPPED tells."""
    left = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(os.environ.get("TORCHELASTIC_RESTART_COUNT",
                                                                                       "0"))
    return EXIT_DONE if left > 0 else EXIT_STOPPED


def write_stopped(output_dir: str, result: dict, code: int) -> str:
    path = os.path.join(output_dir, STOPPED_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"step": result["step"], "checkpoint": result["checkpoint"], "exit_code": code,
                   "time": time.time()}, f)
        f.write("\n")
    os.replace(path + ".tmp", path)
    return path


def entry(finetune: bool, prog: str) -> None:
    try:
        rc = main(sys.argv[1:], finetune=finetune, prog=prog)
    except BaseException as e:  # noqa: BLE001 -- a crash: report it and exit now
        if isinstance(e, SystemExit):
            rc = e.code if isinstance(e.code, int) else 1
        else:
            import traceback

            traceback.print_exc()
            rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter shutdown: DeepSpeed on CPU occasionally aborts inside its exit handlers after a successful
    # run, and after a crash (e.g. a lost peer) process-group threads can keep the process alive, so the launcher
    # (torchrun, srun) would wait for it instead of restarting or ending the job.
    os._exit(rc)
