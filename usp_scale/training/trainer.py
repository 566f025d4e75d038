"""The one trainer behind every task and engine.

Order of setup: process group -> seeds -> model (same seed on every rank, then seed + rank) ->
loader -> engine (AC, compile, wrap, optimizer) -> EMA -> LR schedule -> resume -> loop.
Each optimizer step: set lr (per iteration), accumulate ``accum_iter`` micro-batches, step
(clip, skip if non-finite), EMA update, log, checkpoint. Checkpoints land on optimizer-step
boundaries, so resuming after N steps reproduces the per-step losses of an uninterrupted run.
"""
from __future__ import annotations

import collections
import math
import os
import random
import resource
import signal
import sys
import time
from typing import Callable, Optional

import numpy as np
import torch

from ..checkpoint import (CheckpointManager, model_signature, save_official, save_safetensors, set_rng_state)
from ..config import ConfigError, save_config, to_dict
from ..engine import build_engine
from ..engine import dist as D
from .ema import EMA
from .logging import MetricsLogger
from .optim import build_optimizer
from .schedule import LRSchedule
from .startup import resolve_startup
from .stepstats import DeferredStepStats
from .tasks import Task, build_task


# Touching <output_dir>/STOP_AND_CHECKPOINT (the SLURM scripts do it on SIGUSR1) makes the trainer
# checkpoint at its next log step and exit; SIGUSR1/SIGTERM delivered to the workers do the same.
STOP_FILE = "STOP_AND_CHECKPOINT"


class NonFiniteError(RuntimeError):
    """Too many non-finite steps (in a row, or as a rate over a window); a checkpoint was written first."""


def default_loader(cfg, *, rank: int, world_size: int, device, train: bool = True):
    """:func:`usp_scale.data.build_loader`; ``data.format=synthetic`` draws latents of the model's shape."""
    from ..data import build_loader

    m = cfg.model
    return build_loader(cfg.data, cfg.vae, rank=rank, world_size=world_size, seed=cfg.seed, train=train,
                        device=device, latent_shape=(m.in_chans, m.img_size, m.img_size), num_classes=m.num_classes)


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _max_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is KiB on Linux


class Trainer:
    def __init__(self, cfg, *, task: Optional[Task] = None, loader_factory: Optional[Callable] = None,
                 local_rank_arg: Optional[int] = None):
        self.cfg = cfg
        from ..config.validate import validate_runtime

        validate_runtime(cfg, D.detect(local_rank_arg=local_rank_arg).world_size)  # the rules needing the world size
        self.info = D.init_distributed(cfg.engine.backend, cfg.engine.timeout_min, local_rank_arg) \
            if cfg.engine.name != "local" else D.detect(local_rank_arg=local_rank_arg)
        self.rank, self.world = D.get_rank(), D.get_world_size()
        self.is_main = self.rank == 0
        self.device = D.device_for(self.info)
        self.batch_plan = resolve_startup(cfg, self.world)  # global batch -> per rank + accumulation; precision
        self.task = task or build_task(cfg)
        self.loader_factory = loader_factory or default_loader
        self._last_eval, self._last_eval_step = {}, -1
        self._signal_raw = False  # set by the signal handler (this rank only)
        self._signal = False  # agreed by all ranks: checkpoint and stop

    # ------------------------------------------------------------------ helpers
    def _print(self, *a):
        if self.is_main:
            print(*a, flush=True)

    def _install_signals(self):
        def handler(signum, frame):
            self._signal_raw = True

        for s in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(s, handler)
            except ValueError:  # not in the main thread
                pass

    def _meta(self, step, epoch):
        return {"step": step, "epoch": epoch, "engine": self.cfg.engine.name, "world_size": self.world,
                "task": self.cfg.task, "signature": self.signature, "config": to_dict(self.cfg),
                "deepspeed_config": getattr(self.engine, "ds_config", None)}

    def _save(self, step, epoch, micro_in_epoch):
        trainer_state = {"step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch,
                         "nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak,
                         "nonfinite_recent": list(self.nonfinite_recent),
                         "schedule": self.schedule.state_dict()}
        rank_state = {"loader": self.loader.state_dict()}
        with D.long_timeout():  # a slow filesystem must not trip engine.train_timeout_s
            path = self.ckpt.save(step, self.engine, ema=self.ema, trainer_state=trainer_state,
                                  rank_state=rank_state, meta=self._meta(step, epoch))
        self._print(f"[usp_scale] checkpoint: {path}")
        return path

    def _account(self, entries, win, check: bool = True):
        """Fold step results read back from the device into the counters and the log window. Returns
        (step, reason, lr, grad norm) of the first step at which the non-finite streak reached ``max_nonfinite``
        or the non-finite steps among the last ``nonfinite_window`` exceeded ``max_nonfinite_rate`` (when
        ``check``), else None."""
        cfg = self.cfg
        hit = None
        for s_done, (ok_f, norm_f), lr_f in entries:
            self._last_norm = norm_f
            while self.nonfinite_recent and self.nonfinite_recent[0] <= s_done - cfg.nonfinite_window:
                self.nonfinite_recent.popleft()
            if ok_f and math.isfinite(norm_f):
                win["gnorm"] += norm_f
                win["gnorm_n"] += 1
            if ok_f:
                self.nonfinite_streak = 0
                continue
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
            self.nonfinite_recent.append(s_done)
            win["nonfinite"] += 1
            win["nonfinite_steps"].append(s_done)
            if hit is not None or not check:
                continue
            rate_hit = cfg.max_nonfinite_rate > 0 and \
                len(self.nonfinite_recent) > cfg.max_nonfinite_rate * cfg.nonfinite_window
            if self.nonfinite_streak >= cfg.max_nonfinite > 0:
                hit = (s_done, f"{self.nonfinite_streak} consecutive non-finite steps (max_nonfinite="
                               f"{cfg.max_nonfinite})", lr_f, norm_f)
            elif rate_hit:
                hit = (s_done, f"{len(self.nonfinite_recent)} non-finite steps among the last {cfg.nonfinite_window} "
                               f"(more than max_nonfinite_rate={cfg.max_nonfinite_rate:g} of nonfinite_window="
                               f"{cfg.nonfinite_window})", lr_f, norm_f)
        return hit

    def _truncate_records(self, step: int) -> None:
        """On resume at ``step``: drop the records past ``step`` from every JSON-lines file the run appends to
        (metrics.jsonl, the FID hook's eval.metrics_file and its .txt), written after the checkpoint by the run
        that stopped (or by a later run, when resuming an earlier checkpoint). Rank 0 edits the files; collective
        (a failure there, e.g. a corrupt line, stops every rank with its message)."""
        from ..eval import agree_on_success  # lazy: needs no torch-fidelity (the optional eval extra)
        from .evaluation import truncate_eval_records

        err = None
        if self.is_main:
            try:
                eval_file = os.path.join(self.cfg.output_dir, self.cfg.eval.metrics_file)
                for path, n in ((self.logger.path, self.logger.truncate_after(step)),
                                (eval_file, truncate_eval_records(eval_file, step))):
                    if n:
                        self._print(f"[usp_scale] {os.path.basename(path)}: dropped {n} record(s) past step {step} "
                                    "(written after the checkpoint)")
            except Exception as e:  # noqa: BLE001 -- agreed over ranks, re-raised below
                err = e
        agree_on_success(err, f"resume at step {step}: truncating the metrics files")

    # ------------------------------------------------------------------ main
    def fit(self) -> dict:
        cfg = self.cfg
        out = cfg.output_dir
        if self.is_main:
            os.makedirs(out, exist_ok=True)
            save_config(cfg, os.path.join(out, "config.yaml"))
        self._print(f"[usp_scale] {self.batch_plan.describe()}; precision {cfg.engine.precision}, gradients reduced "
                    f"in {cfg.engine.reduce_dtype}")
        self._install_signals()

        from ..layers.attention import configure_attention

        configure_attention(cfg.model.attn_backend, self.device)
        # Model: the same initialisation on every rank, then per-rank randomness.
        _seed_all(cfg.seed)
        model = self.task.build_model()
        self.signature = model_signature(model)
        train_flops = self.task.train_flops_per_sample(model)  # before any engine partitions the parameters
        _seed_all(cfg.seed + self.rank)

        self.loader = self.loader_factory(cfg, rank=self.rank, world_size=self.world, device=self.device, train=True)
        accum = cfg.schedule.accum_iter
        steps_per_epoch = len(self.loader) // accum
        if steps_per_epoch == 0:
            raise ConfigError(f"the loader has {len(self.loader)} batches per epoch, fewer than "
                              f"schedule.accum_iter={accum}")
        global_batch = cfg.data.batch_size * accum * self.world
        # In-training FID (dit/sit, eval.fid_every > 0): checks its settings now; keeps an unwrapped model copy.
        from .evaluation import build_fid_hook  # imports usp_scale.eval only when eval.fid_every > 0

        self.fid_hook = build_fid_hook(cfg, self.task, model, self.loader, self.device)

        task = self.task
        self.engine = engine = build_engine(
            cfg.engine, model, lambda m: build_optimizer(cfg.optim, task.param_groups(m), self.device),
            accum_iter=accum, clip_grad=cfg.optim.clip_grad, device=self.device, micro_batch=cfg.data.batch_size)
        self.ema = EMA(engine.ema_sources(), cfg.ema.decay) if cfg.ema.decay > 0 else None
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optim, global_batch=global_batch,
                                               steps_per_epoch=steps_per_epoch)
        total = self.schedule.total_steps

        self.ckpt = CheckpointManager(os.path.join(out, "checkpoints"), cfg.checkpoint.keep_last)
        step, epoch, micro_in_epoch = 0, 0, 0
        self.nonfinite_total = self.nonfinite_streak = 0
        self.nonfinite_recent = collections.deque()  # optimizer steps of the non-finite steps in the rate window
        resume = self.ckpt.resolve(cfg.checkpoint.resume)
        rank_state = None
        if resume:
            strict = [s.strip() for s in cfg.checkpoint.strict_keys.split(",") if s.strip()]
            other = self.ckpt.check(resume, signature=self.signature, config=to_dict(cfg), world_size=self.world,
                                    engine_name=cfg.engine.name, strict_prefixes=strict,
                                    deepspeed_config=getattr(engine, "ds_config", None),
                                    deepspeed_source=cfg.engine.deepspeed_config)
            if other:
                self._print(f"[usp_scale] resuming from {resume} with changed settings:\n" + "\n".join(other))
            ts, rank_state = self.ckpt.load(resume, engine, ema=self.ema)
            step, epoch, micro_in_epoch = ts["step"], ts["epoch"], ts["micro_in_epoch"]
            self.nonfinite_total, self.nonfinite_streak = ts["nonfinite_total"], ts["nonfinite_streak"]
            self.nonfinite_recent = collections.deque(ts.get("nonfinite_recent", []))
            self.loader.load_state_dict(rank_state["loader"])
            self._print(f"[usp_scale] resumed from {resume} at step {step} (epoch {epoch})")

        logger = MetricsLogger(out, self.is_main, cfg.tensorboard)
        self.logger = logger
        if resume:
            self._truncate_records(step)
        val_loader = None
        if cfg.task in ("cls", "linprobe"):
            val_loader = self.loader_factory(cfg, rank=self.rank, world_size=self.world, device=self.device,
                                             train=False)
        if resume and self.fid_hook is not None:  # an evaluation interrupted after its checkpoint: run it now
            self.fid_hook.catch_up(engine, self.ema, step, epoch, total, logger, progress=cfg.progress)
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, disable=not (self.is_main and cfg.progress), desc=cfg.task,
                   dynamic_ncols=True)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])  # last: nothing after this may draw random numbers before the loop
        else:
            _seed_all(cfg.seed + self.rank)

        engine.model.train()
        start_step = step
        last_ckpt = None
        loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        win = dict(steps=0, loss=torch.zeros((), dtype=torch.float64, device=self.device), data=0.0,
                   samples=0, t0=time.perf_counter(), gnorm=0.0, gnorm_n=0, nonfinite=0, nonfinite_steps=[])
        stop = False
        result_stopped = False
        last_norm = self._last_norm = float("nan")
        stats = DeferredStepStats(self.device)
        while step < total and not stop:
            self.loader.set_epoch(epoch)
            it = iter(self.loader)
            while micro_in_epoch < steps_per_epoch * accum:
                t_data = time.perf_counter()
                try:
                    # The loader must not shift the training random stream (e.g. torch's DataLoader draws its
                    # worker base seed from the global CPU generator when an epoch iterator starts, which
                    # happens at a different point after a resume): isolate it.
                    with torch.random.fork_rng(devices=[]):
                        batch = next(it)
                except StopIteration:
                    break
                t_comp = time.perf_counter()
                win["data"] += t_comp - t_data
                if engine.micro_step == 0:
                    lr = self.schedule.apply(engine.param_groups, step)
                with engine.sync_context(), engine.autocast():
                    loss = task.loss(engine, batch)
                engine.backward(loss)
                loss_acc += loss.detach().double()
                micro_in_epoch += 1
                res = engine.step()
                if res is None:
                    continue
                step += 1
                win["steps"] += 1
                win["loss"] += loss_acc / accum
                win["samples"] += global_batch
                loss_acc.zero_()
                if self.ema is not None:
                    self.ema.update(engine.ema_sources(), gate=res.ok)   # skipped steps leave it unchanged
                bar.update(1)
                # Applied?/grad norm reach the host one step late (no device sync per step).
                stats.push(step, res.ok, res.norm, meta=lr)
                if step == start_step + 1:  # past compilation and warm-up: a hung peer now fails fast
                    D.use_train_timeout(cfg.engine.train_timeout_s)

                log_now = step % max(cfg.log_every, 1) == 0 or step == total
                every = cfg.checkpoint.every_steps
                reached_stop = cfg.stop_after_steps > 0 and step - start_step >= cfg.stop_after_steps
                ckpt_now = (every > 0 and step % every == 0) or reached_stop or step == total
                entries = stats.flush() if log_now or ckpt_now or self._signal_raw else stats.ready()
                bad = self._account(entries, win)
                if bad is not None:
                    s_bad, reason, lr_bad, norm_bad = bad
                    self._account(stats.flush(), win, check=False)  # the newer steps too, so the checkpoint counts
                    path = self._save(step, epoch, micro_in_epoch)
                    lr_key = "optim.lr" if cfg.optim.lr > 0 else "optim.blr"  # the key that sets the lr here
                    raise NonFiniteError(
                        f"{reason}, non-finite loss or gradients at optimizer step {s_bad}, epoch {epoch}, near "
                        f"micro-batch {micro_in_epoch}/{len(self.loader)} of the epoch, lr {lr_bad:.3e}, grad norm "
                        f"{norm_bad}; rank {self.rank}. Checkpoint written to {path} (step {step}). Lower {lr_key} "
                        f"(now {getattr(cfg.optim, lr_key.split('.')[1]):g}), set optim.clip_grad, or use a wider "
                        f"precision (engine.precision=bf16/fp32).")
                last_norm = self._last_norm

                if log_now:
                    n = win["steps"]
                    lsum = win["loss"].clone()
                    if self.world > 1:
                        import torch.distributed as dist

                        lsum = lsum.to(torch.float64)
                        dist.all_reduce(lsum)
                        lsum /= self.world
                    dt = time.perf_counter() - win["t0"]
                    sps = win["samples"] / max(dt, 1e-9)
                    rec = {"kind": "train", "step": step, "epoch": epoch, "loss": float(lsum) / n, "lr": lr,
                           # mean over the applied steps (None when every step of the window was non-finite)
                           "grad_norm": win["gnorm"] / win["gnorm_n"] if win["gnorm_n"] else None,
                           "samples_per_s": sps, "nonfinite": win["nonfinite"],
                           # The device runs ahead of the host (no sync per step): compute_time is the wall time
                           # not spent waiting for the loader, which is exact over a window that ends in a sync.
                           "data_time": win["data"] / n, "compute_time": max(dt - win["data"], 0.0) / n,
                           "max_mem_gb": _max_memory_gb(self.device), "nonfinite_total": self.nonfinite_total}
                    if train_flops:
                        rec["mfu"] = train_flops * sps / self.world / cfg.peak_flops
                    logger.log(rec)
                    if win["nonfinite"] and self.is_main:
                        print(f"[usp_scale] WARNING: {win['nonfinite']} of the last {n} optimizer steps were "
                              f"non-finite and skipped (steps {win['nonfinite_steps'][:8]}"
                              f"{' ...' if win['nonfinite'] > 8 else ''}); {self.nonfinite_total} in the run so far, "
                              f"{len(self.nonfinite_recent)} in the last {cfg.nonfinite_window} (the run stops above "
                              f"{cfg.max_nonfinite_rate:g} x {cfg.nonfinite_window} or at {cfg.max_nonfinite} in a "
                              "row)", file=sys.stderr, flush=True)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
                    win.update(steps=0, data=0.0, samples=0, t0=time.perf_counter(), gnorm=0.0, gnorm_n=0, nonfinite=0,
                               nonfinite_steps=[])
                    win["loss"].zero_()
                    req = self._signal_raw or (self.is_main and os.path.exists(os.path.join(out, STOP_FILE)))
                    # A signal may reach only some ranks: agree at log steps (the checkpoint is collective).
                    self._signal = bool(D.all_reduce_max(float(req)))
                elif self.world == 1 and self._signal_raw:
                    self._signal = True

                if ckpt_now or self._signal:
                    t_save = time.perf_counter()
                    last_ckpt = self._save(step, epoch, micro_in_epoch)
                    win["t0"] += time.perf_counter() - t_save  # checkpoint time is not training throughput
                if self.fid_hook is not None and not self._signal and self.fid_hook.due(step, total):
                    with D.long_timeout():
                        ev = self.fid_hook(engine, self.ema, step, epoch, logger, progress=cfg.progress)
                    win["t0"] += ev["eval_seconds"]  # keep evaluation time out of the throughput numbers
                if self._signal:
                    self._print(f"[usp_scale] stop requested (signal or {STOP_FILE}): checkpointed at step {step}, "
                                "exiting so that a requeued job resumes")
                    if self.is_main and os.path.exists(os.path.join(out, STOP_FILE)):
                        os.remove(os.path.join(out, STOP_FILE))
                    result_stopped = True
                    stop = True
                if reached_stop or step >= total or stop:
                    stop = True
                    break
            if stop:
                break
            # end of an epoch
            if val_loader is not None and cfg.eval_every_epochs > 0 and (epoch + 1) % cfg.eval_every_epochs == 0:
                self._evaluate(val_loader, step, epoch)
            epoch += 1
            micro_in_epoch = 0
        bar.close()
        D.end_train_timeout()

        result = {"step": step, "epoch": epoch, "nonfinite_total": self.nonfinite_total,
                  "steps_run": step - start_step, "checkpoint": last_ckpt,
                  "grad_norm": last_norm, "stopped_by_request": result_stopped}
        if step >= total:
            if val_loader is not None:
                result["eval"] = self._last_eval if self._last_eval_step == step else \
                    self._evaluate(val_loader, step, epoch)
            result["exports"] = self.export(step)
            if self.is_main and cfg.plot:
                result["plot"] = logger.plot(os.path.join(out, "loss_curve.png"), f"{cfg.task} {cfg.model.name}")
        logger.close()
        D.barrier()
        return result

    def _evaluate(self, loader, step, epoch):
        with D.long_timeout():
            res = self.task.evaluate(self.engine, loader)
        self._last_eval, self._last_eval_step = res, step
        if res:
            self.logger.log({"kind": "eval", "step": step, "epoch": epoch, **res})
            self._print(f"[usp_scale] eval step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        return res

    def export(self, step: int) -> dict:
        """Model-only safetensors (+ EMA) and the official-format file; collective."""
        cfg = self.cfg
        out = {}
        if not (cfg.checkpoint.export or cfg.checkpoint.export_official):
            return out
        model_sd = self.engine.full_model_state_dict()
        ema_sd = None
        if self.ema is not None:
            ema_sd = {**model_sd, **self.engine.gather_ema(self.ema.state_dict())}
        opt_sd = None
        if cfg.checkpoint.export_official and cfg.task in ("dit", "sit"):
            opt_sd = self.engine.full_optimizer_state_dict()
        if self.is_main:
            exp = os.path.join(cfg.output_dir, "export")
            os.makedirs(exp, exist_ok=True)
            meta = {"task": cfg.task, "model": cfg.model.name, "step": step}
            if cfg.checkpoint.export:
                out["model"] = save_safetensors(model_sd, os.path.join(exp, "model.safetensors"), meta)
                if ema_sd is not None and cfg.ema.export_ema:
                    out["ema"] = save_safetensors(ema_sd, os.path.join(exp, "ema.safetensors"), meta)
            if cfg.checkpoint.export_official:
                if cfg.task in ("dit", "sit") and ema_sd is None:
                    self._print("[usp_scale] no official DiT/SiT export: ema.decay is 0")
                else:
                    name = self.task.official_name.format(step=step)
                    out["official"] = save_official(os.path.join(exp, name), cfg.task, model_sd, ema_sd=ema_sd,
                                                    opt_sd=opt_sd, args=to_dict(cfg))
        D.barrier()
        return out

    def close(self):
        if getattr(self, "engine", None) is not None:
            self.engine.close()


def run(cfg, **kwargs) -> dict:
    """Build a trainer for ``cfg`` and train; exits non-zero on a non-finite stop."""
    trainer = Trainer(cfg, **kwargs)
    try:
        return trainer.fit()
    except NonFiniteError as e:
        print(f"[usp_scale] ERROR: {e}", file=sys.stderr, flush=True)
        raise
