"""The one trainer behind every task and engine.

``Trainer(cfg)`` builds everything (in ``__init__``): process group -> model (the same seed on every rank) ->
loader -> engine (AC, compile, wrap; the optimizer from :func:`~usp_scale.training.optim.build_optimizer` through a
factory the engine calls on the wrapped module) -> EMA -> LR schedule -> checkpoint manager over the stateful parts
-> resume. :meth:`Trainer.train_step` runs one micro-batch (lr at the first micro-step of an optimizer step, forward
and backward with the micro-step's generator, the engine's step: clip, skip if non-finite; EMA); :meth:`Trainer.train`
loops over epochs and batches and, after each optimizer step, logs, checks the non-finite counters and stop
requests, checkpoints and evaluates. Checkpoints land on optimizer-step boundaries and every random draw of a step
comes from a generator of (seed, step, rank, micro-step) (:mod:`usp_scale.training.rng`), so resuming after N steps
reproduces the per-step losses of an uninterrupted run without any saved RNG state.
"""
from __future__ import annotations

import math
import os
import resource
import signal
import sys
import time
from typing import Callable, Optional

import torch

from .. import runtime as D
from ..checkpoint import CheckpointManager, model_signature, save_official, save_safetensors
from ..config import ConfigError, resolve_job, save_config, to_dict
from ..engine import INITIALISE_AFTER_SHARDING, build_engine
from ..runtime import agree_on_success, init_runtime, seed_all
from .ema import EMA
from .logging import MetricsLogger
from .optim import build_optimizer
from .rng import step_generator
from .schedule import LRSchedule
from .state import LoaderPosition, TrainState
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


def _max_memory_gb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # ru_maxrss is KiB on Linux


class Trainer:
    """One run: everything is built in ``__init__`` (and a checkpoint resumed), :meth:`train` runs it."""

    def __init__(self, cfg, *, task: Optional[Task] = None, loader_factory: Optional[Callable] = None,
                 local_rank_arg: Optional[int] = None):
        self.cfg = cfg
        # the rules needing the world size; global batch -> per rank + accumulation; precision
        self.batch_plan = resolve_job(cfg, D.detect(local_rank_arg=local_rank_arg).world_size)
        self.runtime = rt = init_runtime(cfg, local_rank_arg=local_rank_arg)  # process group, device, TF32, seeds
        self.rank, self.world = rt.rank, rt.world_size
        self.is_main = self.rank == 0
        self.device = rt.device
        self.task = task or build_task(cfg)
        self.loader_factory = loader_factory or default_loader
        self._last_eval, self._last_eval_step = {}, -1
        self._signal_raw = False  # set by the signal handler (this rank only)
        self._signal = False  # agreed by all ranks: checkpoint and stop
        out = cfg.output_dir
        if self.is_main:
            os.makedirs(out, exist_ok=True)
            save_config(cfg, os.path.join(out, "config.yaml"))
        self._print(f"[usp_scale] {self.batch_plan.describe()}; precision {cfg.engine.precision}, gradients reduced "
                    f"in {cfg.engine.reduce_dtype}")
        # Model: the same initialisation on every rank (init_runtime seeded the generators with cfg.seed). An engine
        # that initialises after sharding gets it on the meta device and the full state of rank 0's build.
        init_state = None
        if cfg.engine.name in INITIALISE_AFTER_SHARDING:
            init_state = self.task.build_model(attn_backend=rt.attn_backend).state_dict() if self.is_main else None
            model = self.task.build_model(attn_backend=rt.attn_backend, device="meta")
        else:
            model = self.task.build_model(attn_backend=rt.attn_backend)
        self.signature = model_signature(model)
        self.train_flops = self.task.train_flops_per_sample(model)  # before any engine partitions the parameters
        seed_all(cfg.seed + self.rank)  # training draws use explicit generators; anything else differs per rank

        self.loader = self.loader_factory(cfg, rank=self.rank, world_size=self.world, device=self.device, train=True)
        self.accum = accum = cfg.schedule.accum_iter
        self.steps_per_epoch = len(self.loader) // accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the loader has {len(self.loader)} batches per epoch, fewer than "
                              f"schedule.accum_iter={accum}")
        self.global_batch = cfg.data.batch_size * accum * self.world
        # In-training FID (dit/sit, eval.fid_every > 0): checks its settings now; keeps an unwrapped model copy.
        from ..eval.hook import build_fid_hook  # torch-fidelity is imported only when eval.fid_every > 0

        self.fid_hook = build_fid_hook(cfg, self.task, model, self.loader, self.device)
        task = self.task
        self.engine = build_engine(
            cfg.engine, model, lambda m: build_optimizer(cfg.optim, task.param_groups(m), self.device),
            accum_iter=accum, clip_grad=cfg.optim.clip_grad, device=self.device, micro_batch=cfg.data.batch_size,
            init_state=init_state)
        del init_state
        self.ema = EMA(self.engine.weights.ema_sources(), cfg.ema.decay) if cfg.ema.decay > 0 else None
        self.schedule = LRSchedule.from_config(cfg.schedule, cfg.optim, global_batch=self.global_batch,
                                               steps_per_epoch=self.steps_per_epoch)
        self.state = TrainState(samples_per_micro=cfg.data.batch_size * self.world)
        # The LR schedule is a function of the config and state.step (a resumed run with a longer schedule follows
        # the new config): it is not a saved state.
        self.ckpt = CheckpointManager(
            os.path.join(out, "checkpoints"), cfg.checkpoint.keep_last, engine_state=self.engine.state, ema=self.ema,
            states={"train": self.state, "loader": LoaderPosition(self.loader, cfg.data.batch_size * self.world)})
        self.logger = MetricsLogger(out, self.is_main, cfg.tensorboard)
        self.resumed_from = self._resume()
        self.val_loader = None
        if cfg.task in ("cls", "linprobe"):
            self.val_loader = self.loader_factory(cfg, rank=self.rank, world_size=self.world, device=self.device,
                                                  train=False)
        self.stats = DeferredStepStats(self.device)
        self._loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        self._lr = float("nan")
        self._last_norm = float("nan")
        self._new_window()

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

    def _meta(self):
        return {"step": self.state.step, "epoch": self.state.epoch, "engine": self.engine.name,
                "checkpoint_format": self.engine.state.format, "world_size": self.world,
                "global_batch": self.global_batch, "task": self.cfg.task, "signature": self.signature,
                "config": to_dict(self.cfg), "deepspeed_config": self.engine.state.config}

    def _resume(self) -> Optional[str]:
        """Resume from ``checkpoint.resume`` (auto: the newest complete step folder) when there is one: check it,
        load every stateful part, drop the metrics records written after it. Returns its folder or None."""
        cfg = self.cfg
        resume = self.ckpt.resolve(cfg.checkpoint.resume)
        if not resume:
            return None
        strict = [s.strip() for s in cfg.checkpoint.strict_keys.split(",") if s.strip()]
        other = self.ckpt.check(resume, signature=self.signature, config=to_dict(cfg), world_size=self.world,
                                engine_name=self.engine.name, checkpoint_format=self.engine.state.format,
                                global_batch=self.global_batch, strict_prefixes=strict,
                                deepspeed_config=self.engine.state.config,
                                deepspeed_source=cfg.engine.deepspeed_config)
        if other:
            self._print(f"[usp_scale] resuming from {resume} with changed settings:\n" + "\n".join(other))
        self.ckpt.load(resume)
        self._print(f"[usp_scale] resumed from {resume} at step {self.state.step} (epoch {self.state.epoch})")
        self._truncate_records(self.state.step)
        return resume

    def _save(self):
        with D.long_timeout():  # a slow filesystem must not trip engine.train_timeout_s
            path = self.ckpt.save(self.state.step, self._meta())
        self._print(f"[usp_scale] checkpoint: {path}")
        return path

    def _new_window(self):
        """Start a log window: what the next metrics record averages over."""
        self.win = dict(steps=0, loss=torch.zeros((), dtype=torch.float64, device=self.device), data=0.0,
                        samples=0, t0=time.perf_counter(), gnorm=0.0, gnorm_n=0, nonfinite=0, nonfinite_steps=[])

    def _account(self, entries, check: bool = True):
        """Fold step results read back from the device into the counters and the log window. Returns
        (step, reason, lr, grad norm) of the first step at which the non-finite streak reached ``max_nonfinite``
        or the non-finite steps among the last ``nonfinite_window`` exceeded ``max_nonfinite_rate`` (when
        ``check``), else None."""
        cfg, st, win = self.cfg, self.state, self.win
        hit = None
        for s_done, (ok_f, norm_f), lr_f in entries:
            self._last_norm = norm_f
            while st.nonfinite_recent and st.nonfinite_recent[0] <= s_done - cfg.nonfinite_window:
                st.nonfinite_recent.popleft()
            if ok_f and math.isfinite(norm_f):
                win["gnorm"] += norm_f
                win["gnorm_n"] += 1
            if ok_f:
                st.nonfinite_streak = 0
                continue
            st.nonfinite_total += 1
            st.nonfinite_streak += 1
            st.nonfinite_recent.append(s_done)
            win["nonfinite"] += 1
            win["nonfinite_steps"].append(s_done)
            if hit is not None or not check:
                continue
            rate_hit = cfg.max_nonfinite_rate > 0 and \
                len(st.nonfinite_recent) > cfg.max_nonfinite_rate * cfg.nonfinite_window
            if st.nonfinite_streak >= cfg.max_nonfinite > 0:
                hit = (s_done, f"{st.nonfinite_streak} consecutive non-finite steps (max_nonfinite="
                               f"{cfg.max_nonfinite})", lr_f, norm_f)
            elif rate_hit:
                hit = (s_done, f"{len(st.nonfinite_recent)} non-finite steps among the last {cfg.nonfinite_window} "
                               f"(more than max_nonfinite_rate={cfg.max_nonfinite_rate:g} of nonfinite_window="
                               f"{cfg.nonfinite_window})", lr_f, norm_f)
        return hit

    def _check_nonfinite(self, entries) -> None:
        """Account ``entries``; past the non-finite limits, checkpoint and raise :class:`NonFiniteError`."""
        bad = self._account(entries)
        if bad is None:
            return
        cfg, st = self.cfg, self.state
        s_bad, reason, lr_bad, norm_bad = bad
        self._account(self.stats.flush(), check=False)  # the newer steps too, so the checkpoint counts them
        path = self._save()
        lr_key = "optim.lr" if cfg.optim.lr > 0 else "optim.blr"  # the key that sets the lr here
        raise NonFiniteError(
            f"{reason}, non-finite loss or gradients at optimizer step {s_bad}, epoch {st.epoch}, near "
            f"micro-batch {st.micro_in_epoch}/{len(self.loader)} of the epoch, lr {lr_bad:.3e}, grad norm "
            f"{norm_bad}; rank {self.rank}. Checkpoint written to {path} (step {st.step}). Lower {lr_key} "
            f"(now {getattr(cfg.optim, lr_key.split('.')[1]):g}), set optim.clip_grad, or use a wider "
            f"precision (engine.precision=bf16/fp32).")

    def _log(self) -> None:
        """Write the metrics record of the window (collective: the loss is averaged over ranks), start a new one."""
        cfg, st, win = self.cfg, self.state, self.win
        n = win["steps"]
        lsum = win["loss"].clone()
        if self.world > 1:
            import torch.distributed as dist

            lsum = lsum.to(torch.float64)
            dist.all_reduce(lsum)
            lsum /= self.world
        dt = time.perf_counter() - win["t0"]
        sps = win["samples"] / max(dt, 1e-9)
        rec = {"kind": "train", "step": st.step, "epoch": st.epoch, "loss": float(lsum) / n, "lr": self._lr,
               # mean over the applied steps (None when every step of the window was non-finite)
               "grad_norm": win["gnorm"] / win["gnorm_n"] if win["gnorm_n"] else None,
               "samples_per_s": sps, "nonfinite": win["nonfinite"],
               # The device runs ahead of the host (no sync per step): compute_time is the wall time
               # not spent waiting for the loader, which is exact over a window that ends in a sync.
               "data_time": win["data"] / n, "compute_time": max(dt - win["data"], 0.0) / n,
               "max_mem_gb": _max_memory_gb(self.device), "nonfinite_total": st.nonfinite_total}
        if self.train_flops:
            rec["mfu"] = self.train_flops * sps / self.world / cfg.peak_flops
        self.logger.log(rec)
        if win["nonfinite"] and self.is_main:
            print(f"[usp_scale] WARNING: {win['nonfinite']} of the last {n} optimizer steps were "
                  f"non-finite and skipped (steps {win['nonfinite_steps'][:8]}"
                  f"{' ...' if win['nonfinite'] > 8 else ''}); {st.nonfinite_total} in the run so far, "
                  f"{len(st.nonfinite_recent)} in the last {cfg.nonfinite_window} (the run stops above "
                  f"{cfg.max_nonfinite_rate:g} x {cfg.nonfinite_window} or at {cfg.max_nonfinite} in a "
                  "row)", file=sys.stderr, flush=True)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{self._lr:.2e}")
        self._new_window()

    def _stop_requested(self) -> bool:
        """Collective (at log steps): a signal or the stop file on any rank (a signal may reach only some ranks;
        the checkpoint that follows is collective)."""
        req = self._signal_raw or (self.is_main and os.path.exists(os.path.join(self.cfg.output_dir, STOP_FILE)))
        return bool(D.all_reduce_max(float(req)))

    def _truncate_records(self, step: int) -> None:
        """On resume at ``step``: drop the records past ``step`` from every JSON-lines file the run appends to
        (metrics.jsonl, the FID hook's eval.metrics_file and its .txt), written after the checkpoint by the run
        that stopped (or by a later run, when resuming an earlier checkpoint). Rank 0 edits the files; collective
        (a failure there, e.g. a corrupt line, stops every rank with its message)."""
        from ..eval.hook import truncate_eval_records

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

    # ------------------------------------------------------------------ one micro-batch
    def train_step(self, batch: dict):
        """Forward and backward of one micro-batch, and the engine's step. Returns the engine's
        :class:`~usp_scale.engine.base.StepResult` when this micro-batch ended an optimizer step (then
        ``state.step`` counts it and the EMA followed it), else None."""
        engine, st = self.engine, self.state
        micro = engine.micro_step
        if micro == 0:
            self._lr = self.schedule.apply(engine.param_groups, st.step)
        gen = step_generator(self.cfg.seed, st.step, self.rank, micro, self.device)
        with engine.sync_context(), engine.autocast():
            loss = self.task.loss(engine, batch, generator=gen)
        engine.backward(loss)
        self._loss_acc += loss.detach().double()
        st.micro_in_epoch += 1
        res = engine.step()
        if res is None:
            return None
        st.step += 1
        self.win["steps"] += 1
        self.win["loss"] += self._loss_acc / self.accum
        self.win["samples"] += self.global_batch
        self._loss_acc.zero_()
        if self.ema is not None:
            self.ema.update(engine.weights.ema_sources(), gate=res.ok)   # skipped steps leave it unchanged
        # Applied?/grad norm reach the host one step late (no device sync per step).
        self.stats.push(st.step, res.ok, res.norm, meta=self._lr)
        return res

    # ------------------------------------------------------------------ after an optimizer step
    def _after_step(self) -> bool:
        """Log, non-finite check, stop requests, checkpoint and FID after an optimizer step; True to stop."""
        cfg, st = self.cfg, self.state
        total = self.schedule.total_steps
        log_now = st.step % max(cfg.log_every, 1) == 0 or st.step == total
        every = cfg.checkpoint.every_steps
        reached_stop = cfg.stop_after_steps > 0 and st.step - self.start_step >= cfg.stop_after_steps
        ckpt_now = (every > 0 and st.step % every == 0) or reached_stop or st.step == total
        self._check_nonfinite(self.stats.flush() if log_now or ckpt_now or self._signal_raw else self.stats.ready())
        if log_now:
            self._log()
            self._signal = self._stop_requested()
        elif self.world == 1 and self._signal_raw:
            self._signal = True
        if ckpt_now or self._signal:
            t_save = time.perf_counter()
            self.last_ckpt = self._save()
            self.win["t0"] += time.perf_counter() - t_save  # checkpoint time is not training throughput
        if self.fid_hook is not None and not self._signal and self.fid_hook.due(st.step, total):
            with D.long_timeout():
                ev = self.fid_hook(self.engine, self.ema, st.step, st.epoch, self.logger, progress=cfg.progress)
            self.win["t0"] += ev["eval_seconds"]  # keep evaluation time out of the throughput numbers
        if self._signal:
            self._print(f"[usp_scale] stop requested (signal or {STOP_FILE}): checkpointed at step {st.step}, "
                        "exiting so that a requeued job resumes")
            if self.is_main and os.path.exists(os.path.join(cfg.output_dir, STOP_FILE)):
                os.remove(os.path.join(cfg.output_dir, STOP_FILE))
            self.stopped_by_request = True
            return True
        return reached_stop or st.step >= total

    def _end_epoch(self) -> None:
        cfg, st = self.cfg, self.state
        if self.val_loader is not None and cfg.eval_every_epochs > 0 and (st.epoch + 1) % cfg.eval_every_epochs == 0:
            self._evaluate(self.val_loader, st.step, st.epoch)
        st.epoch += 1
        st.micro_in_epoch = 0

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Train to the end of the schedule, ``stop_after_steps``, a stop request or a non-finite stop
        (:class:`NonFiniteError`, after a checkpoint). Returns the run's summary (with exports at the end)."""
        cfg, st = self.cfg, self.state
        self._install_signals()
        total = self.schedule.total_steps
        if self.resumed_from and self.fid_hook is not None:  # an evaluation interrupted after its checkpoint
            self.fid_hook.catch_up(self.engine, self.ema, st.step, st.epoch, total, self.logger, progress=cfg.progress)
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=st.step, disable=not (self.is_main and cfg.progress), desc=cfg.task,
                        dynamic_ncols=True)
        self.engine.model.train()
        self.start_step = st.step
        self.last_ckpt = None
        self.stopped_by_request = False
        self._new_window()
        stop = False
        while st.step < total and not stop:
            self.loader.set_epoch(st.epoch)
            it = iter(self.loader)
            while st.micro_in_epoch < self.steps_per_epoch * self.accum:
                t_data = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                self.win["data"] += time.perf_counter() - t_data
                if self.train_step(batch) is None:
                    continue
                self.bar.update(1)
                if st.step == self.start_step + 1:  # past compilation and warm-up: a hung peer now fails fast
                    D.use_train_timeout(cfg.engine.train_timeout_s)
                stop = self._after_step()
                if stop:
                    break
            if stop:
                break
            self._end_epoch()
        self.bar.close()
        D.end_train_timeout()
        return self._finish()

    fit = train  # the name the launchers and tests use

    def _finish(self) -> dict:
        cfg, st = self.cfg, self.state
        result = {"step": st.step, "epoch": st.epoch, "nonfinite_total": st.nonfinite_total,
                  "steps_run": st.step - self.start_step, "checkpoint": self.last_ckpt,
                  "grad_norm": self._last_norm, "stopped_by_request": self.stopped_by_request}
        if st.step >= self.schedule.total_steps:
            if self.val_loader is not None:
                result["eval"] = self._last_eval if self._last_eval_step == st.step else \
                    self._evaluate(self.val_loader, st.step, st.epoch)
            result["exports"] = self.export(st.step)
            if self.is_main and cfg.plot:
                result["plot"] = self.logger.plot(os.path.join(cfg.output_dir, "loss_curve.png"),
                                                  f"{cfg.task} {cfg.model.name}")
        self.logger.close()
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
        weights = self.engine.weights
        model_sd = weights.full_model_state_dict()
        ema_sd = None
        if self.ema is not None:
            ema_sd = {**model_sd, **weights.gather_ema(self.ema.state_dict())}
        opt_sd = None
        if cfg.checkpoint.export_official and cfg.task in ("dit", "sit"):
            opt_sd = weights.full_optimizer_state_dict()
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
