"""The pretraining loop: data -> batched augmentation -> method loss -> Adam, with schedule, logging,
periodic kNN, checkpoints, exact resume and clean interruption.

Read it top to bottom: :func:`pretrain` is the whole job in stages; :func:`train_one_epoch` and
:func:`train_step` are one epoch and one step of it; the state that changes from step to step is one
:class:`TrainState`, everything built once is one :class:`Job`.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import distributed
from .augment import AugmentConfig, Augmenter
from .checkpoint import load_checkpoint, rank_rng_state, rng_state, save_atomic, set_rng_state
from .config import PRESETS, Config, validate
from .data.loader import BatchLoader
from .device import cpu_has_native_bf16
from .errors import RunStopped, TrainingError
from .fileio import write_text_atomic
from .fingerprint import check_resume_data
from .methods import METHODS, Method, build_method
from .optim import build_optimizer
from .progress import MetricsLog, Progress
from .splits import RunData, load_run_data
from .scoring import (check_eval_fits, diagnostics_record, final_evaluation, format_final, knn_monitor,
                      make_eval_transform)
from .run_directory import RunDirectory
from .schedule import lr_factor
from .whitening import fallback_count

__all__ = ["pretrain", "build_job", "epoch_views", "train_one_epoch", "train_step", "TrainState", "Job", "StopFlag"]


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and returns.
    ``max_minutes`` (optional) is a deadline checked the same way.

    ``announce``: print the one-line notice (torchrun sends the signal to every rank; only the
    main rank says so).
    """

    def __init__(self, announce: bool = True, max_minutes: float | None = None) -> None:
        self.signal: int | None = None
        self.announce = announce
        self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None

    def raised(self) -> tuple[bool, bool]:
        """(a signal arrived, the deadline has passed): the flags every rank agrees on."""
        return self.signal is not None, self.deadline is not None and time.monotonic() >= self.deadline

    def __call__(self, signum, frame) -> None:
        if self.signal is not None:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.signal = signum
        if self.announce:
            print(f"\nsignal {signal.Signals(signum).name}: saving a checkpoint and stopping after this step",
                  file=sys.stderr)

    @contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class BufferGuard:
    """Copies of the state a step changes besides what the optimizer updates, taken before the forward pass
    and put back when the step is skipped, so a skipped non-finite step leaves the model exactly as it was:
    the buffers (BatchNorm running statistics) and, when the step is skipped on the device after
    ``on_step`` ran (``frozen``), the parameters the optimizer does not own (BYOL's target)."""

    def __init__(self, method: Method, frozen: bool = False) -> None:
        self.tensors = list(method.buffers())
        if frozen:
            self.tensors += [p.data for p in method.parameters() if not p.requires_grad]
        self.saved = [torch.empty_like(t) for t in self.tensors]

    def save(self) -> None:
        for saved, t in zip(self.saved, self.tensors):
            saved.copy_(t)

    def restore(self) -> None:
        for saved, t in zip(self.saved, self.tensors):
            t.copy_(saved)

    def restore_unless(self, ok: torch.Tensor) -> None:
        """Put the saved values back where the device flag ``ok`` is False (no host read)."""
        for saved, t in zip(self.saved, self.tensors):
            torch.where(ok, t, saved, out=t)


class DeviceFlags:
    """The non-finite bookkeeping of steps skipped on the device, read by the host every ``sync_every`` steps.

    ``run``: consecutive non-finite steps; ``total``: all of them; ``hit``: the step (1-based count) at
    which ``run`` reached the limit, -1 before. From that step on every step is skipped, so the model the
    host finds when it reads ``hit`` is the model of that step: the abort is exact.
    """

    def __init__(self, device: torch.device, total: int = 0) -> None:
        zero = torch.zeros((), dtype=torch.int64, device=device)
        self.run, self.total, self.hit = zero.clone(), zero + total, zero - 1
        self.loss = torch.zeros((), dtype=torch.float32, device=device)

    def step_ok(self, loss: torch.Tensor) -> torch.Tensor:
        """Whether this step may update: a finite loss and the limit not reached before (device bool)."""
        self.loss = loss.detach().float()
        return torch.isfinite(self.loss) & (self.hit < 0)

    def update(self, ok: torch.Tensor, step: int, limit: int) -> None:
        bad = (~ok).long()
        self.run = (self.run + 1) * bad
        self.total = self.total + bad
        self.hit = torch.where((self.hit < 0) & (self.run >= limit), step, self.hit)


@dataclass
class TrainState:
    """Where training stands. A checkpoint written at (epoch, batch) resumes with batch ``batch`` of
    epoch ``epoch`` (0-based); ``batch`` 0 means the epoch has not started."""

    epoch: int = 0
    batch: int = 0
    step: int = 0  # optimizer steps taken (skipped non-finite steps count too: the schedule moves on)
    nonfinite_total: int = 0
    nonfinite_run: int = 0  # consecutive non-finite steps up to now
    stop_reason: str | None = None  # set when the loop stops before the last epoch: "signal" or "max_steps=N"
    checkpoint_step: int | None = None  # step of the checkpoint on disk (None: none yet)
    window_start: float = 0.0  # when the host last read the device (img/s over the window)
    seconds_before: float = 0.0  # training wall time of earlier invocations (a resumed run)
    started: float = 0.0  # time.monotonic() when this invocation's loop began

    def train_seconds(self) -> float:
        """Wall time spent in the training loop so far (periodic evaluations included), over all resumes."""
        return self.seconds_before + time.monotonic() - self.started


@dataclass
class Job:
    """Everything the loop works with, built once by :func:`pretrain`."""

    cfg: Config
    rt: distributed.Runtime
    log: Callable[[str], None]
    data: RunData
    method: Method
    train_module: Callable  # views -> loss: the method itself, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    augment: Augmenter
    aug_gen: torch.Generator
    loader: BatchLoader
    transform: Callable  # the evaluation transform
    run_dir: Path
    initial_state: dict | None  # the random-init weights, for the final comparison
    buffers: BufferGuard
    sync_every: int  # steps between host reads of the loss (1: every step, the update skipped on the host)
    flags: DeviceFlags | None = None  # sync_every > 1: the non-finite bookkeeping on the device
    metrics: MetricsLog | None = None  # main rank only
    progress: Progress | None = None
    stop: StopFlag | None = None
    fingerprint: dict | None = None  # which data the run uses (recorded in its checkpoints)

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


def pretrain(cfg: Config, resume: str | Path | None = None, log=None, allow_data_change: bool = False) -> Path:
    """Run (or resume) pretraining; returns the run directory.

    ``resume``: a run directory or checkpoint; training continues exactly where it stopped (same batches,
    augmentations and random slices), in the same run directory, on the same data (a checkpoint records a
    fingerprint of it) unless ``allow_data_change``.

    Raises:
        ValueError: a setting, the data or the run directory cannot work (nothing is trained).
        TrainingError: the loss stayed non-finite; the last finite checkpoint is kept.
        RunStopped: SIGINT/SIGTERM stopped the run after writing its checkpoint (resumable).
        OSError: a file could not be written (a full disk); the last complete checkpoint is kept.
    """
    validate(cfg)
    rt = distributed.setup(cfg)
    log = log or (lambda msg: print(msg, file=sys.stderr) if rt.is_main else None)
    run, job, failed = None, None, True
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)

        # ============ the run directory (locked), and the checkpoint to continue from ============
        ckpt = load_checkpoint(resume) if resume else None
        run = _open_run_directory(cfg, resume, rt)

        # ============ data, method, optimizer, augmentation, batches ============
        data = load_run_data(cfg, log)
        if len(data.train) < cfg.batch_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({len(data.train)} images)")
        if cfg.image_size is None:  # the images' own side (an image folder without a preset)
            cfg = cfg.replace(image_size=min(data.train.images.shape[2:]))
        check_eval_fits(cfg, data)  # a crop that cannot fit fails now, not at the first evaluation
        fingerprint = check_resume_data(ckpt, data, allow_data_change, log)
        job = build_job(cfg, rt, data, run.path, log)
        job.fingerprint = fingerprint
        state = _restore(job, ckpt, resume) if ckpt is not None else TrainState()
        if job.sync_every > 1:
            job.flags = DeviceFlags(job.device, state.nonfinite_total)
        if state.epoch >= cfg.epochs:
            failed = False
            if rt.is_main and _final_eval_missing(job):
                log(f"{run.path} is trained (epoch {state.epoch} of {cfg.epochs}) but its final evaluation is "
                    "missing: running it now")
                _final_eval(job, state)
                return run.path
            log(f"{run.path} is already finished (epoch {state.epoch} of {cfg.epochs}); nothing to do. "
                "To train longer, resume with a larger --epochs")
            return run.path

        # ============ logging ============
        if rt.is_main:
            if ckpt is not None:
                run.truncate_metrics(state.step)
            job.metrics = MetricsLog(run.path, purge_step=state.step + 1 if ckpt is not None else None)
            run.write_config(cfg.to_dict(), _provenance(cfg))
            _announce(job, ckpt is not None)
            job.progress = Progress(job.total_steps)

        # ============ training ============
        job.stop = StopFlag(announce=rt.is_main, max_minutes=cfg.max_minutes)
        state.window_start, state.started = time.perf_counter(), time.monotonic()
        with job.stop.installed():
            for epoch in range(state.epoch, cfg.epochs):
                t_epoch = time.perf_counter()
                if not train_one_epoch(job, state, epoch):
                    break  # stopped by a signal or max_steps: the checkpoint is written
                end_of_epoch(job, state, time.perf_counter() - t_epoch)
        failed = False
        _finish(job, state)
        return run.path
    finally:
        if job is not None:
            for closable in (job.progress, job.metrics):
                if closable is not None:
                    closable.close()
        if run is not None and rt.is_main:
            run.close(failed=failed)
        distributed.cleanup(rt)


def _open_run_directory(cfg: Config, resume, rt: distributed.Runtime) -> RunDirectory:
    """The resumed run's directory, or a new one; rank 0 creates and locks it, and names it for every rank."""
    if resume:
        p = Path(resume)
        run = RunDirectory.existing(p.resolve().parent.parent if p.is_file() else p)
    elif rt.is_main:
        run = RunDirectory.create(cfg.out_dir, cfg.run_name, cfg.preset or f"{cfg.dataset}-{cfg.method}")
    else:
        run = None
    if rt.is_main:
        run.lock()
    path = distributed.broadcast_object(run.path if run is not None else None, rt)
    return run if run is not None else RunDirectory(path, created=False)


def _provenance(cfg: Config) -> dict:
    """Where the fields came from, for config.json: the preset and what differs from it."""
    base = PRESETS.get(cfg.preset)
    changed = cfg.changed(base) if base is not None else cfg.changed(Config())
    return {"_based_on_preset": cfg.preset, "_changed_from_preset": json.loads(json.dumps(
        {k: list(v) if isinstance(v, tuple) else v for k, v in changed.items()}))}


def build_job(cfg: Config, rt: distributed.Runtime, data: RunData, run_dir: Path, log) -> Job:
    """The method (fresh weights), its training wrapper, Adam, the augmenter and the batch loader."""
    device = rt.device
    method = build_method(cfg, data.train.images.shape[1]).to(device)
    initial_state = copy.deepcopy(method.state_dict()) if cfg.final_eval else None
    if cfg.channels_last:
        method = method.to(memory_format=torch.channels_last)
    if cfg.compile:
        # In place: the module keeps its state_dict keys, so checkpoints stay loadable without compile.
        method.backbone.compile()
    train_module = distributed.wrap(method, cfg, rt)
    sync_every = cfg.sync_every or (cfg.log_every if device.type == "cuda" and cfg.optimizer == "adam" else 1)
    # Fused Adam: one kernel for all parameters, and it can skip a step on the device (found_inf). Kept off
    # on the CPU unless the step is skipped there: the unfused update is the one the CPU figures were taken with.
    optimizer = build_optimizer(method.trainable_parameters(), cfg,
                                fused=device.type == "cuda" or sync_every > 1)
    augment = Augmenter(augment_config(cfg), data.mean, data.std)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rt.rank)
    loader = BatchLoader(data.train.images, cfg.batch_size, seed=cfg.seed, device=device,
                         rank=rt.rank, world_size=rt.world_size)
    transform = make_eval_transform(cfg, data.mean, data.std, device, cfg.channels_last)
    return Job(cfg, rt, log, data, method, train_module, optimizer, augment, aug_gen, loader, transform, run_dir,
               initial_state, BufferGuard(method, frozen=sync_every > 1), sync_every)


def augment_config(cfg: Config) -> AugmentConfig:
    """The training augmentation of ``cfg``."""
    return AugmentConfig(
        size=cfg.image_size, crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
        jitter=tuple(cfg.jitter), jitter_p=cfg.jitter_p, grayscale_p=cfg.grayscale_p, flip_p=cfg.flip_p,
        solarize_p=tuple(cfg.solarize_p),
    )


def _restore(job: Job, ckpt: dict, resume) -> TrainState:
    """Weights, optimizer, random states and position from a checkpoint (exact resume)."""
    rt = job.rt
    job.method.load_state_dict(ckpt["method"])
    job.optimizer.load_state_dict(ckpt["optimizer"])
    written_by = len(ckpt.get("rng_ranks", [None]))
    if written_by != rt.world_size:
        job.log(f"note: the checkpoint was written by {written_by} process(es), this run has {rt.world_size}: "
                "batches are the same, augmentations after the resume differ from an uninterrupted run")
    set_rng_state(rank_rng_state(ckpt, rt.rank, job.aug_gen), job.aug_gen)
    distributed.set_step(job.train_module, ckpt["step"])
    if job.initial_state is not None and "initial_method" in ckpt:
        job.initial_state = ckpt["initial_method"]
    state = TrainState(epoch=ckpt["epoch"], batch=ckpt["batch"], step=ckpt["step"],
                       nonfinite_total=ckpt.get("nonfinite_total", 0), checkpoint_step=ckpt["step"],
                       seconds_before=ckpt.get("train_seconds", 0.0))
    job.log(f"resumed from {resume} at epoch {state.epoch + 1}, step {state.step}")
    return state


def _announce(job: Job, resumed: bool) -> None:
    cfg = job.cfg
    changed = _provenance(cfg)["_changed_from_preset"]
    shown = ", ".join(f"{k}={v}" for k, v in changed.items()) or "nothing"
    job.log(f"config: preset {cfg.preset}; differs from it in: {shown}" if cfg.preset in PRESETS
            else f"config: no preset; differs from the defaults in: {shown}")
    job.log(f"run directory: {job.run_dir}{' (resumed)' if resumed else ''}\n{job.data.note}")
    job.log(f"method {cfg.method} (d={cfg.n_views}), {cfg.arch} at {cfg.image_size}px, batch {cfg.batch_size}, "
            f"{job.steps_per_epoch} steps/epoch x {cfg.epochs} epochs on {job.device} ({cfg.precision})")
    if cfg.precision == "bf16" and job.device.type == "cpu" and not cpu_has_native_bf16():
        job.log("note: this CPU has no native bf16 instructions, so bf16 autocast is emulated and several times "
                "slower than fp32 here; consider --precision fp32")


def train_one_epoch(job: Job, state: TrainState, epoch: int) -> bool:
    """The batches of ``epoch`` from ``state.batch`` on. Returns False when the run stops inside it (a signal
    or max_steps), after writing the checkpoint; True when the epoch is done."""
    cfg = job.cfg
    first = state.batch if epoch == state.epoch else 0
    state.epoch, state.batch = epoch, first
    for views in epoch_views(job, epoch, first):
        signalled, late = train_step(job, state, views)
        state.batch += 1
        done = cfg.max_steps is not None and state.step >= cfg.max_steps
        if signalled or late or done:
            state.stop_reason = ("signal" if signalled else f"max_minutes={cfg.max_minutes}" if late
                                 else f"max_steps={cfg.max_steps}")
            save_checkpoint(job, state)
            return False
    return True


def epoch_views(job: Job, epoch: int, first: int = 0) -> Iterator[list[torch.Tensor]]:
    """The augmented views of every batch of ``epoch`` from batch ``first`` on, one list of d views a batch.

    ``augment_batches`` 1: each batch is augmented just before its step with the run's augmentation stream
    (``job.aug_gen``, saved in checkpoints). K > 1: K batches are augmented in one call (fewer, larger
    kernels on a GPU) with a generator seeded by (seed, rank, epoch, chunk), so a resume inside a chunk
    re-augments it identically without saving any random state.
    """
    cfg, k = job.cfg, job.cfg.augment_batches
    if k == 1:
        for images, _ in job.loader.epoch(epoch, start=first):
            yield job.augment(images, cfg.n_views, generator=job.aug_gen)
        return
    start = first - first % k
    batches = job.loader.epoch(epoch, start=start)
    for chunk in range(start // k, -(-job.steps_per_epoch // k)):
        images = [b for b, _ in itertools.islice(batches, k)]
        gen = torch.Generator(device=job.device).manual_seed(_chunk_seed(cfg.seed, job.rt.rank, epoch, chunk))
        views = job.augment(torch.cat(images), cfg.n_views, generator=gen)
        parts = [v.split([len(b) for b in images]) for v in views]
        for i in range(len(images)):
            if chunk * k + i >= first:
                yield [p[i] for p in parts]


def _chunk_seed(seed: int, rank: int, epoch: int, chunk: int) -> int:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, rank, epoch, chunk]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def train_step(job: Job, state: TrainState, views: list[torch.Tensor]) -> tuple[bool, bool]:
    """One optimizer step on the d augmented views of a batch; returns the agreed stop flags (a process was
    signalled, the max_minutes deadline passed), all False between host reads.

    A non-finite loss skips the step: no update, and the buffers (BatchNorm statistics) the forward pass
    moved are put back. ``cfg.nonfinite_limit`` skipped steps in a row abort the run. With
    ``job.sync_every`` 1 the host reads the loss every step and skips there; otherwise the skip happens on
    the device (fused Adam's ``found_inf``) and the host reads the flags every ``sync_every`` steps
    (:func:`_device_update`), with the same result.
    """
    cfg, optimizer = job.cfg, job.optimizer
    t0 = time.perf_counter()
    lr = cfg.lr * lr_factor(state.step, job.steps_per_epoch, cfg.epochs, cfg.warmup_iters, cfg.schedule,
                            cfg.lr_drop_epochs, cfg.lr_drop_factor, cfg.lr_end_factor)
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = _forward(job, views)
    if job.sync_every > 1:
        return _device_update(job, state, loss, lr)
    # the one host read per step (finiteness needs it); under DDP the mean over ranks, and every rank
    # learns whether any rank was signalled, so all take the same branch below
    loss_value, stopping = distributed.agree(loss, job.stop.raised(), job.rt)
    optimizer.zero_grad(set_to_none=True)
    finite = math.isfinite(loss_value)
    if finite:
        loss.backward()
        optimizer.step()
        job.method.on_step(state.step + 1, job.total_steps)
        finite = bool(_finite_flag(job.method))  # a finite loss whose update overflowed the weights
    else:
        job.buffers.restore()
    if finite:
        state.nonfinite_run = 0
    else:
        state.nonfinite_run += 1
        state.nonfinite_total += 1
        if state.nonfinite_run >= cfg.nonfinite_limit:
            raise TrainingError(_divergence_message(job, state, state.step + 1))
    state.step += 1
    _log_step(job, state, loss_value, lr, cfg.batch_size / (time.perf_counter() - t0))
    return stopping


def _forward(job: Job, views: list[torch.Tensor]) -> torch.Tensor:
    """The views through the method: the step's loss (buffers saved first)."""
    cfg = job.cfg
    if cfg.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    job.buffers.save()
    with torch.autocast(job.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        return job.train_module(views)


def _device_update(job: Job, state: TrainState, loss: torch.Tensor, lr: float) -> tuple[bool, bool]:
    """The update of a step whose skip is decided on the device; the host reads every ``sync_every`` steps."""
    cfg, optimizer, flags = job.cfg, job.optimizer, job.flags
    ok = flags.step_ok(distributed.mean_over_ranks(loss, job.rt))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.found_inf = (~ok).float()  # fused Adam leaves parameters, moments and step count as they were
    optimizer.step()
    job.method.on_step(state.step + 1, job.total_steps)
    ok = ok & _finite_flag(job.method)  # a finite loss whose update overflowed the weights: non-finite too
    job.buffers.restore_unless(ok)
    flags.update(ok, state.step + 1, cfg.nonfinite_limit)
    state.step += 1
    if state.step % job.sync_every and state.step % cfg.log_every and state.step != job.total_steps:
        return False, False
    loss_value, stopping = sync_flags(job, state)
    img_s = cfg.batch_size * job.sync_every / (time.perf_counter() - state.window_start)
    state.window_start = time.perf_counter()
    _log_step(job, state, loss_value, lr, img_s)
    return stopping


def sync_flags(job: Job, state: TrainState) -> tuple[float, tuple[bool, bool]]:
    """Read the device's non-finite flags into ``state`` (abort if the limit was reached) and agree on a stop.
    Returns the last loss and the agreed stop flags (signal, deadline)."""
    flags = job.flags
    loss_value, stopping = distributed.agree(flags.loss, job.stop.raised(), job.rt)
    run, total, hit = (int(t) for t in torch.stack([flags.run, flags.total, flags.hit]).tolist())
    state.nonfinite_run, state.nonfinite_total = run, total
    if hit >= 0:  # every step since was skipped: the model is the model of that step
        state.nonfinite_run = job.cfg.nonfinite_limit
        raise TrainingError(_divergence_message(job, state, hit))
    return loss_value, stopping


def _log_step(job: Job, state: TrainState, loss_value: float, lr: float, img_s: float) -> None:
    if not job.rt.is_main or job.progress is None:  # other ranks, and jobs run without logging (benchmarks)
        return
    cfg = job.cfg
    job.progress.update(state.step, state.epoch, cfg.epochs, loss_value, lr, img_s)
    if state.step % cfg.log_every == 0 or state.step == job.total_steps:
        job.metrics.write("train", state.step, epoch=state.epoch, loss=loss_value, lr=lr, img_per_s=img_s,
                          nonfinite_skipped=state.nonfinite_total)


def _divergence_message(job: Job, state: TrainState, step: int) -> str:
    """Why the run aborts at ``step`` (counted from 1, as in metrics.jsonl), the causes that apply to this
    config, and what was kept."""
    cfg = job.cfg
    causes = [f"a learning rate too high for this run (lr={cfg.lr}; try a smaller --lr or a longer --warmup_iters)"]
    causes += METHODS[cfg.method].nonfinite_hints(cfg)
    if cfg.precision == "bf16":
        causes.append("bf16 rounding (try --precision fp32)")
    return (f"loss was non-finite for {state.nonfinite_run} steps in a row (step {step}); {_kept(job, state)}. "
            f"Likely causes: {'; '.join(causes)}")


def _finite_flag(method: Method) -> torch.Tensor:
    """Whether every float parameter and buffer is finite, as one device bool (one host read if read)."""
    return torch.stack([torch.isfinite(t).all() for t in (*method.parameters(), *method.buffers())
                        if t.is_floating_point()]).all()


def _kept(job: Job, state: TrainState) -> str:
    """Which checkpoint exists: the last finite one, or none."""
    if state.checkpoint_step is None:
        return "no checkpoint was written"
    return f"the last finite checkpoint (step {state.checkpoint_step}) is kept in {job.run_dir / 'checkpoints'}"


def _state_is_finite(method: Method) -> bool:
    return bool(_finite_flag(method))


def save_checkpoint(job: Job, state: TrainState) -> None:
    """RUN/checkpoints/last.pt at ``state``'s position (every rank takes part: rank 0 writes every rank's
    random state). Not written while the last losses are non-finite or the weights are not: the previous
    checkpoint, a finite state, stays."""
    rt = job.rt
    if job.flags is not None:
        sync_flags(job, state)  # the device's non-finite count decides whether the state may be saved
    finite = state.nonfinite_run == 0 and _state_is_finite(job.method)
    gathered = distributed.gather_objects((rng_state(job.aug_gen), finite), rt)
    rng_ranks = [g[0] for g in gathered]
    if not all(g[1] for g in gathered):
        job.log(f"checkpoint not written at step {state.step}: the model is not finite or its last "
                f"{state.nonfinite_run} losses were not; {_kept(job, state)}")
        return
    if rt.is_main:
        ckpt = {
            "method": job.method.state_dict(), "backbone": job.method.backbone.state_dict(),
            "optimizer": job.optimizer.state_dict(), "epoch": state.epoch, "batch": state.batch, "step": state.step,
            "rng": rng_ranks[0], "rng_ranks": rng_ranks, "world_size": rt.world_size,
            "config": job.cfg.to_dict(), "nonfinite_total": state.nonfinite_total,
            "train_seconds": state.train_seconds(),
            "mean": list(job.data.mean), "std": list(job.data.std),  # so evaluation normalises exactly as training
            "data": job.fingerprint,  # which data: --resume on other data is refused
        }
        if job.initial_state is not None:
            ckpt["initial_method"] = job.initial_state
        save_atomic(ckpt, job.run_dir / "checkpoints" / "last.pt")
    distributed.barrier(rt)  # the other ranks wait until rank 0 has written it
    state.checkpoint_step = state.step


def end_of_epoch(job: Job, state: TrainState, seconds: float) -> None:
    """The epoch summary, the checkpoint, and every cfg.eval_every epochs the kNN monitor and diagnostics
    (after the checkpoint: a failing evaluation never costs the epoch)."""
    cfg = job.cfg
    state.epoch, state.batch = state.epoch + 1, 0
    done = state.epoch
    if job.rt.is_main:
        job.metrics.write("epoch", state.step, epoch=done, seconds=seconds, whitening_fallbacks=fallback_count())
    if done % cfg.ckpt_every == 0 or done == cfg.epochs:
        save_checkpoint(job, state)
    if job.rt.is_main and job.data.labelled and (done % cfg.eval_every == 0 or done == cfg.epochs):
        _evaluate_epoch(job, state, seconds)


def _evaluate_epoch(job: Job, state: TrainState, seconds: float) -> None:
    result = knn_monitor(job.method, job.data, job.cfg, job.device, job.transform)
    diag = diagnostics_record(job.method, job.data, job.cfg, job.device, job.transform)
    job.metrics.write("eval", state.step, epoch=state.epoch, minutes=state.train_seconds() / 60, **result)
    job.metrics.write("diagnostics", state.step, epoch=state.epoch, **diag)
    if result["knn_top1"] is None:
        job.log(f"epoch {state.epoch}: {result['nonfinite_features']} evaluation features are not finite (the "
                f"encoder has diverged): kNN and diagnostics skipped [{seconds:.0f}s/epoch]")
        return
    job.log(f"epoch {state.epoch}: kNN top-1 {result['knn_top1']:.2f}% "
            f"(eff. rank features {diag.get('feature_eff_rank', float('nan')):.1f}) [{seconds:.0f}s/epoch]")


def _finish(job: Job, state: TrainState) -> None:
    """After the loop: the whitening note, the resume hint of a stopped run, or the final evaluation."""
    rt, cfg, log = job.rt, job.cfg, job.log
    if job.progress is not None:
        job.progress.close()
    fallbacks = fallback_count()
    if fallbacks and rt.is_main:
        log(f"whitening: {fallbacks} slice covariances needed jitter during this run")
    distributed.barrier(rt)  # all checkpoints written; rank 0 alone goes on to the final evaluation
    if state.checkpoint_step != state.step:  # the last save was refused: the model or its last losses diverged
        raise TrainingError(f"the run ended at step {state.step} with a non-finite model or loss "
                            f"({state.nonfinite_total} non-finite steps skipped), so that state is not saved; "
                            f"{_kept(job, state)}. Try a smaller --lr or a longer --warmup_iters")
    if state.stop_reason == "signal":
        raise RunStopped(job.run_dir, state.step, signal.Signals(job.stop.signal).name)
    if state.stop_reason is not None:
        log(f"stopped at step {state.step} ({state.stop_reason}); continue with: wmse pretrain --resume {job.run_dir}")
    elif cfg.final_eval and rt.is_main and job.data.labelled:
        _final_eval(job, state)


def _final_eval_missing(job: Job) -> bool:
    """Whether the run wants a final evaluation and has no readable RUN/final_eval.json."""
    if not (job.cfg.final_eval and job.data.labelled):
        return False
    try:
        return not isinstance(json.loads((job.run_dir / "final_eval.json").read_text()), dict)
    except (OSError, ValueError):
        return True


def _final_eval(job: Job, state: TrainState) -> None:
    """The final comparison with the random init -> RUN/final_eval.json (atomic) and the table on stdout.
    SIGINT/SIGTERM stop it at once (RunStopped): the checkpoint is saved and ``--resume`` runs it again."""
    def stop(signum, frame):
        raise RunStopped(job.run_dir, state.step, signal.Signals(signum).name)

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)} if \
        threading.current_thread() is threading.main_thread() else {}
    try:
        results = final_evaluation(job.method, job.initial_state, job.data, job.cfg, job.device, job.transform,
                                   job.log)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    write_text_atomic(job.run_dir / "final_eval.json", json.dumps({"note": job.data.note, **results}, indent=2))
    print(format_final(results, job.data.note))
