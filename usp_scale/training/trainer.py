"""The one trainer behind every task and engine.

Order of setup: process group -> seeds -> model (same seed on every rank, then seed + rank) ->
loader -> engine (AC, compile, wrap, optimizer) -> EMA -> LR schedule -> resume -> loop.
Each optimizer step: set lr (per iteration), accumulate ``accum_iter`` micro-batches, step
(clip, skip if non-finite), EMA update, log, checkpoint. Checkpoints land on optimizer-step
boundaries, so resuming after N steps reproduces the per-step losses of an uninterrupted run.
"""
from __future__ import annotations

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
from .evaluation import build_fid_hook
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
    """Too many consecutive non-finite steps; a checkpoint was written first."""


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
        if cfg.engine.name == "local":
            info = D.detect(local_rank_arg=local_rank_arg)
            if info.world_size > 1:
                raise ConfigError(f"engine.name=local but the launcher started {info.world_size} processes; "
                                  "use engine.name=ddp, fsdp2 or deepspeed")
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
                "task": self.cfg.task, "signature": self.signature, "config": to_dict(self.cfg)}

    def _save(self, step, epoch, micro_in_epoch):
        trainer_state = {"step": step, "epoch": epoch, "micro_in_epoch": micro_in_epoch,
                         "nonfinite_total": self.nonfinite_total, "nonfinite_streak": self.nonfinite_streak,
                         "schedule": self.schedule.state_dict()}
        rank_state = {"loader": self.loader.state_dict()}
        with D.long_timeout():  # a slow filesystem must not trip engine.train_timeout_s
            path = self.ckpt.save(step, self.engine, ema=self.ema, trainer_state=trainer_state,
                                  rank_state=rank_state, meta=self._meta(step, epoch))
        self._print(f"[usp_scale] checkpoint: {path}")
        return path

    def _account(self, entries, win, max_nonfinite):
        """Fold step results read back from the device into the counters and the log window. Returns
        (step, streak, lr, grad norm) of the step whose streak reached ``max_nonfinite`` (> 0), else None."""
        hit = None
        for s_done, (ok_f, norm_f), lr_f in entries:
            self._last_norm = norm_f
            win["gnorm"] += norm_f if math.isfinite(norm_f) else 0.0
            if ok_f:
                self.nonfinite_streak = 0
                continue
            self.nonfinite_total += 1
            self.nonfinite_streak += 1
            if hit is None and self.nonfinite_streak >= max_nonfinite > 0:
                hit = (s_done, self.nonfinite_streak, lr_f, norm_f)
                break
        return hit

    def _truncate_records(self, step: int) -> None:
        """On resume at ``step``: drop the records past ``step`` from every JSON-lines file the run appends to
        (metrics.jsonl, the FID hook's eval.metrics_file and its .txt), written after the checkpoint by the run
        that stopped (or by a later run, when resuming an earlier checkpoint). Rank 0 edits the files; collective
        (a failure there, e.g. a corrupt line, stops every rank with its message)."""
        from ..eval import agree_on_success
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
        resume = self.ckpt.resolve(cfg.checkpoint.resume)
        rank_state = None
        if resume:
            strict = [s.strip() for s in cfg.checkpoint.strict_keys.split(",") if s.strip()]
            other = self.ckpt.check(resume, signature=self.signature, config=to_dict(cfg), world_size=self.world,
                                    engine_name=cfg.engine.name, strict_prefixes=strict)
            if other:
                self._print(f"[usp_scale] resuming from {resume} with changed settings:\n" + "\n".join(other))
            ts, rank_state = self.ckpt.load(resume, engine, ema=self.ema)
            step, epoch, micro_in_epoch = ts["step"], ts["epoch"], ts["micro_in_epoch"]
            self.nonfinite_total, self.nonfinite_streak = ts["nonfinite_total"], ts["nonfinite_streak"]
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
                   samples=0, t0=time.perf_counter(), gnorm=0.0)
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
                bad = self._account(entries, win, cfg.max_nonfinite)
                if bad is not None:
                    s_bad, streak, lr_bad, norm_bad = bad
                    self._account(stats.flush(), win, 0)    # the newer steps too, so the checkpoint counts them
                    path = self._save(step, epoch, micro_in_epoch)
                    raise NonFiniteError(
                        f"{streak} consecutive non-finite steps (loss or gradients) ending at optimizer step "
                        f"{s_bad}, epoch {epoch}, near micro-batch {micro_in_epoch}/{len(self.loader)} of the epoch, "
                        f"lr {lr_bad:.3e}, grad norm {norm_bad}; rank {self.rank}. Checkpoint written to {path} "
                        f"(step {step}). Lower optim.blr, set optim.clip_grad, or use a wider precision "
                        f"(engine.precision=bf16/fp32).")
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
                           "grad_norm": win["gnorm"] / n, "samples_per_s": sps,
                           # The device runs ahead of the host (no sync per step): compute_time is the wall time
                           # not spent waiting for the loader, which is exact over a window that ends in a sync.
                           "data_time": win["data"] / n, "compute_time": max(dt - win["data"], 0.0) / n,
                           "max_mem_gb": _max_memory_gb(self.device), "nonfinite_total": self.nonfinite_total}
                    if train_flops:
                        rec["mfu"] = train_flops * sps / self.world / cfg.peak_flops
                    logger.log(rec)
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
                    win.update(steps=0, data=0.0, samples=0, t0=time.perf_counter(), gnorm=0.0)
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

        result = {"step": step, "epoch": epoch, "nonfinite_total": self.nonfinite_total, "checkpoint": last_ckpt,
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
