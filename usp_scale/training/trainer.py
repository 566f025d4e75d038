"""The one trainer behind every task and engine: it keeps the loop; each policy has its own module.

``Trainer(cfg)`` builds everything (in ``__init__``): the world-size rules and the batch plan
(:func:`~usp_scale.config.resolve_job`) -> the runtime (:func:`~usp_scale.runtime.init_runtime`: process group,
device, TF32, attention kernel, seeds) -> model (the same initialisation on every rank; on the meta device for an
engine that initialises after sharding) -> loader -> engine (AC, compile, wrap; the optimizer from
:func:`~usp_scale.training.optim.build_optimizer` through a factory the engine calls on the wrapped module) -> EMA ->
LR schedule -> checkpoint manager over the stateful parts -> resume. :meth:`Trainer.train_step` runs one micro-batch
(lr at the first micro-step of an optimizer step, forward and backward with the micro-step's generator, the engine's
step: clip, skip if non-finite; EMA); :meth:`Trainer.fit` loops over epochs and batches and, after each optimizer
step, logs (:mod:`.metrics`), checks the non-finite counters (:mod:`.nonfinite`) and stop requests (:mod:`.stop`),
checkpoints and evaluates; at the end it exports (:mod:`.export`). What a task exports and evaluates is the task's
(:mod:`.tasks`): the trainer names no task and no model family. Checkpoints land on optimizer-step boundaries and
every random draw of a step comes from a generator of (seed, step, rank, micro-step) (:mod:`usp_scale.training.rng`),
so resuming after N steps reproduces the per-step losses of an uninterrupted run without any saved RNG state.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Callable, Optional

import torch
from tqdm import tqdm

from .. import runtime as D
from ..checkpoint import CheckpointManager, model_signature
from ..config import ConfigError, resolve_job, to_dict
from ..data import build_loader
from ..engine import INITIALISE_AFTER_SHARDING, build_engine
from ..eval.hook import build_fid_hook
from ..runtime import init_runtime, seed_all
from .ema import EMA
from .export import Exporter
from .metrics import LogWindow, MetricsLogger, truncate_after_resume
from .nonfinite import NonFiniteError, NonFinitePolicy
from .optim import build_optimizer
from .rng import step_generator
from .rundir import accept_run, prepare_run_dir, unlock_run_dir
from .schedule import LRSchedule
from .state import LoaderPosition, TrainState
from .stepstats import DeferredStepStats
from .stop import StopRequests
from .tasks import Task, build_task


def default_loader(cfg, *, rank: int, world_size: int, device, train: bool = True):
    """:func:`usp_scale.data.build_loader`; ``data.format=synthetic`` draws latents of the model's shape."""
    m = cfg.model
    return build_loader(cfg.data, cfg.vae, rank=rank, world_size=world_size, seed=cfg.seed, train=train,
                        device=device, latent_shape=(m.in_chans, m.img_size, m.img_size), num_classes=m.num_classes)


def nonempty_epoch(loader, data, state, rank: int, micro_per_epoch: int):
    """``iter(loader)`` for the epoch ``state.epoch``, refusing an epoch that yields no sample (every file the loader
    read was skipped as unreadable: the next epoch would yield none either) with a :class:`ConfigError` naming the
    data folder, instead of looping over empty epochs forever."""
    started, yielded = state.micro_in_epoch < micro_per_epoch, 0
    for batch in loader:
        yielded += 1
        yield batch
    if started and yielded == 0:
        where = {"latents": f"data.latent_cache={data.latent_cache}", "synthetic": "data.format=synthetic"}.get(
            data.format, f"data.root={os.path.join(data.root, data.split) if data.split else data.root}")
        raise ConfigError(f"epoch {state.epoch} yielded no sample on rank {rank} ({where}): every file the loader "
                          "read was skipped as unreadable (see the warnings above; e.g. git-lfs pointer files "
                          "instead of images). Fix or replace the files (data.strict=true stops at the first one)")


def build_model(task: Task, engine_name: str, runtime):
    """(model, init_state): the task's model, the same initialisation on every rank (init_runtime seeded the
    generators with ``cfg.seed``). An engine that initialises after sharding gets it on the meta device, and rank 0
    the full state dict of its build (None elsewhere, and for the other engines)."""
    if engine_name not in INITIALISE_AFTER_SHARDING:
        return task.build_model(attn_backend=runtime.attn_backend), None
    init_state = task.build_model(attn_backend=runtime.attn_backend).state_dict() if runtime.is_main else None
    return task.build_model(attn_backend=runtime.attn_backend, device="meta"), init_state


class Trainer:
    """One run: everything is built in ``__init__`` (and a checkpoint resumed), :meth:`fit` runs it."""

    def __init__(self, cfg, *, task: Optional[Task] = None, loader_factory: Optional[Callable] = None,
                 local_rank_arg: Optional[int] = None):
        self.cfg = cfg
        # the rules needing the world size; global batch -> per rank + accumulation; precision
        self.batch_plan = resolve_job(cfg, D.detect(local_rank_arg=local_rank_arg).world_size)
        self.runtime = rt = init_runtime(cfg, local_rank_arg=local_rank_arg)  # process group, device, TF32, seeds
        self.rank, self.world, self.device = rt.rank, rt.world_size, rt.device
        self.is_main = self.rank == 0
        self.task = task or build_task(cfg)
        self.loader_factory = loader_factory or default_loader
        out = cfg.output_dir
        prepare_run_dir(out, self.is_main)  # one job per folder (lock), writable now, litter of killed writers removed
        self._print(f"[usp_scale] {self.batch_plan.describe()}; precision {cfg.engine.precision}, gradients reduced "
                    f"in {cfg.engine.reduce_dtype}")
        model, init_state = build_model(self.task, cfg.engine.name, rt)
        self.signature = model_signature(model)
        self.train_flops = self.task.train_flops_per_sample(model)  # before any engine partitions the parameters
        seed_all(cfg.seed + self.rank)  # training draws use explicit generators; anything else differs per rank
        loader = self.loader_factory(cfg, rank=self.rank, world_size=self.world, device=self.device, train=True)
        self.loader = self.task.prepare_loader(loader, self.device)   # e.g. REPA's teacher tokens
        self.accum = accum = cfg.schedule.accum_iter
        self.steps_per_epoch = len(self.loader) // accum
        if self.steps_per_epoch == 0:
            raise ConfigError(f"the loader has {len(self.loader)} batches per epoch, fewer than "
                              f"schedule.accum_iter={accum}")
        self.global_batch = cfg.data.batch_size * accum * self.world
        # In-training FID (eval.fid_every > 0): checks its files now; keeps an unwrapped model copy.
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
        self.window = LogWindow(self.device, self.world, self.train_flops, cfg.peak_flops)
        self.nonfinite, self.stop = NonFinitePolicy(cfg, self.state), StopRequests(out, self.is_main)
        self.exporter = Exporter(cfg, self.task, self.is_main)
        self.resumed_from = self._resume()
        accept_run(cfg, self.is_main)  # resume checks passed: only now its config.yaml replaces the old one
        self.val_loader = self.loader_factory(cfg, rank=self.rank, world_size=self.world, device=self.device,
                                              train=False) if self.task.evaluates else None
        self.stats = DeferredStepStats(self.device)
        self._loss_acc = torch.zeros((), dtype=torch.float64, device=self.device)
        self._lr = float("nan")
        self._last_eval, self._last_eval_step = {}, -1

    # ------------------------------------------------------------------ helpers
    def _print(self, *a):
        if self.is_main:
            print(*a, flush=True)

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
        truncate_after_resume(self.state.step, self.logger, os.path.join(cfg.output_dir, cfg.eval.metrics_file),
                              self.is_main)
        return resume

    def _save(self):
        meta = {"step": self.state.step, "epoch": self.state.epoch, "engine": self.engine.name,
                "checkpoint_format": self.engine.state.format, "world_size": self.world,
                "global_batch": self.global_batch, "task": self.cfg.task, "signature": self.signature,
                "config": to_dict(self.cfg), "deepspeed_config": self.engine.state.config}
        with D.long_timeout():  # a slow filesystem must not trip engine.train_timeout_s
            path = self.ckpt.save(self.state.step, meta)
        self._print(f"[usp_scale] checkpoint: {path}")
        return path

    def _check_nonfinite(self, entries) -> None:
        """Account ``entries``; past the non-finite limits, checkpoint and raise :class:`NonFiniteError`."""
        hit = self.nonfinite.account(entries, self.window)
        if hit is None:
            return
        self.nonfinite.account(self.stats.flush(), self.window, check=False)  # newer steps too: the checkpoint counts them
        raise self.nonfinite.error(hit, checkpoint=self._save(), micro_batches=len(self.loader), rank=self.rank)

    def _log(self) -> None:
        """Write the metrics record of the window (collective: the loss is averaged over ranks), start a new one."""
        rec = {**self.window.record(self.state, self._lr), **self.task.window_metrics(self.world)}
        self.logger.log(rec)
        if self.is_main:
            self.nonfinite.warn(self.window)
        self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{self._lr:.2e}")
        self.window.reset()

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
        self.window.add_step(self._loss_acc / self.accum, self.global_batch)
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
        self._check_nonfinite(self.stats.flush() if log_now or ckpt_now or self.stop.raw else self.stats.ready())
        stopping = False
        if log_now:
            self._log()
            stopping = self.stop.agreed()
        elif self.world == 1 and self.stop.raw:
            stopping = True
        if ckpt_now or stopping:
            t_save = time.perf_counter()
            self.last_ckpt = self._save()
            self.window.exclude(time.perf_counter() - t_save)  # checkpoint time is not training throughput
        if self.fid_hook is not None and not stopping and self.fid_hook.due(st.step, total):
            with D.long_timeout():
                ev = self.fid_hook(self.engine, self.ema, st.step, st.epoch, self.logger, progress=cfg.progress)
            self.window.exclude(ev["eval_seconds"])  # keep evaluation time out of the throughput numbers
        if stopping:
            self._print(f"[usp_scale] stop requested (signal or {os.path.basename(self.stop.path)}): checkpointed at "
                        f"step {st.step}, exiting so that a requeued job resumes")
            return self.stop.consume()
        return reached_stop or st.step >= total

    def _end_epoch(self) -> None:
        cfg, st = self.cfg, self.state
        if self.val_loader is not None and cfg.eval_every_epochs > 0 and (st.epoch + 1) % cfg.eval_every_epochs == 0:
            self._evaluate(st.step, st.epoch)
        st.epoch += 1
        st.micro_in_epoch = 0

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict:
        """Train to the end of the schedule, ``stop_after_steps``, a stop request or a non-finite stop
        (:class:`NonFiniteError`, after a checkpoint). Returns the run's summary (with exports at the end)."""
        cfg, st = self.cfg, self.state
        self.stop.install()
        total = self.schedule.total_steps
        if self.resumed_from and self.fid_hook is not None:  # an evaluation interrupted after its checkpoint
            self.fid_hook.catch_up(self.engine, self.ema, st.step, st.epoch, total, self.logger, progress=cfg.progress)
        self.bar = tqdm(total=total, initial=st.step, disable=not (self.is_main and cfg.progress), desc=cfg.task,
                        dynamic_ncols=True)
        self.engine.model.train()
        self.start_step = st.step
        self.last_ckpt = None
        self.window.reset()
        stop = False
        while st.step < total and not stop:
            self.loader.set_epoch(st.epoch)
            it = nonempty_epoch(self.loader, cfg.data, st, self.rank, self.steps_per_epoch * self.accum)
            while st.micro_in_epoch < self.steps_per_epoch * self.accum:
                t_data = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    break
                self.window.add_data_time(time.perf_counter() - t_data)
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
            if self.stop.at_epoch_end(self.world):  # stop requests are honoured outside the step loop too
                self.last_ckpt, stop = self._save(), self.stop.consume()
        self.bar.close()
        D.end_train_timeout()
        return self._finish()

    def _finish(self) -> dict:
        cfg, st = self.cfg, self.state
        result = {"step": st.step, "epoch": st.epoch, "nonfinite_total": st.nonfinite_total,
                  "steps_run": st.step - self.start_step, "checkpoint": self.last_ckpt,
                  "grad_norm": self.nonfinite.last_norm, "stopped_by_request": self.stop.honoured}
        if st.step >= self.schedule.total_steps:
            if self.val_loader is not None:
                result["eval"] = self._last_eval if self._last_eval_step == st.step else \
                    self._evaluate(st.step, st.epoch)
            result["exports"] = self.exporter.export(self.engine.weights, self.ema, st.step)
            if self.is_main and cfg.plot:
                result["plot"] = self.logger.plot(os.path.join(cfg.output_dir, "loss_curve.png"),
                                                  f"{cfg.task} {cfg.model.name}")
        self.logger.close()
        D.barrier()
        return result

    def _evaluate(self, step, epoch):
        with D.long_timeout():
            res = self.task.evaluate(self.engine, self.val_loader)
        self._last_eval, self._last_eval_step = res, step
        if res:
            self.logger.log({"kind": "eval", "step": step, "epoch": epoch, **res})
            self._print(f"[usp_scale] eval step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        return res

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
    finally:
        unlock_run_dir(cfg.output_dir)  # (the OS releases it when the process ends; run() may be called again)
