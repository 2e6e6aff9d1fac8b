"""The pretraining loop: data -> batched augmentation -> method loss -> Adam, with schedule, logging,
periodic kNN, checkpoints, exact resume and clean interruption.

Read it top to bottom: :func:`pretrain` is the whole job in stages; :func:`train_one_epoch` and
:func:`train_step` are one epoch and one step of it, :func:`end_of_epoch` and :func:`finish` what follows
them; the state that changes from step to step is one :class:`TrainState`, everything built once is one
:class:`Job`. The loop's other jobs live in their own modules: signals and the deadline in
:mod:`wmse.stopping`, skipped non-finite steps in :mod:`wmse.nonfinite`, the checkpoint file in
:mod:`wmse.checkpoint`, seeds in :mod:`wmse.seeding`.
"""

from __future__ import annotations

import copy
import itertools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .augment import AugmentConfig, Augmenter
from .checkpoint import Checkpoint, read_checkpoint, restore, rng_state, write_checkpoint
from .config import PRESETS, Config, validate
from .data.loader import BatchLoader
from .device import cpu_has_native_bf16
from .errors import RunStopped, TrainingError
from .fileio import write_text_atomic
from .fingerprint import check_resume_data
from .loggers import check_loggers, open_mirrors
from .methods import Method, build_method
from .models import uses_channels_last
from .nonfinite import StepGuard, kept_checkpoint, state_is_finite, step_guard
from .optim import DEVICE_SKIP, build_optimizer
from .progress import MetricsLog, Progress
from .run_directory import RunDirectory
from .schedule import lr_factor
from .scoring import (check_eval_fits, diagnostics_record, final_evaluation, format_final, knn_monitor,
                      make_eval_transform)
from .seeding import derive_seed
from .splits import RunData, load_run_data
from .stopping import StopFlag
from .whitening import fallback_count

__all__ = ["pretrain", "build_job", "epoch_views", "train_one_epoch", "train_step", "end_of_epoch", "finish",
           "TrainState", "Job"]


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
    train_module: Callable  # (views, ctx) -> loss: the method itself, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    augment: Augmenter
    aug_gen: torch.Generator
    loader: BatchLoader
    transform: Callable  # the evaluation transform
    run_dir: Path
    initial_state: dict | None  # the random-init weights, for the final comparison
    sync_every: int  # steps between host reads of the loss (1: every step, the update skipped on the host)
    guard: StepGuard  # skips non-finite steps, on the host or on the device (wmse.nonfinite)
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
    check_loggers(cfg.wandb_project)  # before the run directory: a missing package costs nothing
    rt = distributed.setup(cfg)
    log = log or (lambda msg: print(msg, file=sys.stderr) if rt.is_main else None)
    run, job, failed = None, None, True
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)

        # ============ the run directory (locked), and the checkpoint to continue from ============
        ckpt = read_checkpoint(resume) if resume else None
        run = _open_run_directory(cfg, resume, rt)

        # ============ data, method, optimizer, augmentation, batches ============
        job, state = _build(cfg, rt, run.path, ckpt, resume, allow_data_change, log)
        cfg = job.cfg  # with the image size of the data when the config left it open
        if state.epoch >= cfg.epochs:
            failed = False
            _already_trained(job, state)
            return run.path

        # ============ logging ============
        if rt.is_main:
            _open_logging(job, run, ckpt is not None, state)

        # ============ training ============
        job.stop = StopFlag(announce=rt.is_main, max_minutes=cfg.max_minutes, ckpt_minutes=cfg.ckpt_minutes)
        state.window_start, state.started = time.perf_counter(), time.monotonic()
        with job.stop.installed():
            for epoch in range(state.epoch, cfg.epochs):
                t_epoch = time.perf_counter()
                if not train_one_epoch(job, state, epoch):
                    break  # stopped by a signal or max_steps: the checkpoint is written
                end_of_epoch(job, state, time.perf_counter() - t_epoch)
        failed = False
        finish(job, state)
        return run.path
    finally:
        if job is not None:
            for closable in (job.progress, job.metrics):
                if closable is not None:
                    closable.close()
        if run is not None and rt.is_main:
            run.close(failed=failed)
        distributed.cleanup(rt)


def _build(cfg: Config, rt: distributed.Runtime, run_dir: Path, ckpt: Checkpoint | None, resume,
           allow_data_change: bool, log) -> tuple[Job, TrainState]:
    """The run's data (checked against the checkpoint's), its job, and where training stands."""
    data = load_run_data(cfg, log)
    if len(data.train) < cfg.batch_size:
        raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({len(data.train)} images)")
    if cfg.image_size is None:  # the images' own side (an image folder without a preset)
        cfg = cfg.replace(image_size=min(data.train.images.shape[2:]))
    check_eval_fits(cfg, data)  # a crop that cannot fit fails now, not at the first evaluation
    fingerprint = check_resume_data(ckpt, data, allow_data_change, log)  # on a resume: the same data?
    job = build_job(cfg, rt, data, run_dir, log)
    job.fingerprint = fingerprint
    return job, _restore(job, ckpt, resume) if ckpt is not None else TrainState()


def _already_trained(job: Job, state: TrainState) -> None:
    """A run with no epoch left: its final evaluation when that is missing, else the note that it is done."""
    cfg, log = job.cfg, job.log
    if job.rt.is_main and _final_eval_missing(job):
        log(f"{job.run_dir} is trained (epoch {state.epoch} of {cfg.epochs}) but its final evaluation is "
            "missing: running it now")
        _final_eval(job, state)
        return
    log(f"{job.run_dir} is already finished (epoch {state.epoch} of {cfg.epochs}); nothing to do. "
        "To train longer, resume with a larger --epochs")


def _open_logging(job: Job, run: RunDirectory, resumed: bool, state: TrainState) -> None:
    """metrics.jsonl (cut back to the checkpoint on a resume), its mirrors, config.json and the progress line."""
    cfg = job.cfg
    if resumed:
        run.truncate_metrics(state.step)
    job.metrics = MetricsLog(run.path, purge_step=state.step + 1 if resumed else None,
                             mirrors=open_mirrors(cfg, run.path))
    run.write_config(cfg.to_dict(), _provenance(cfg))
    _announce(job, resumed)
    job.progress = Progress(job.total_steps)


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
    channels_last = uses_channels_last(cfg.channels_last, method.backbone)  # convnets only, not ViTs
    if channels_last:
        method = method.to(memory_format=torch.channels_last)
    if cfg.compile:
        # In place: the module keeps its state_dict keys, so checkpoints stay loadable without compile.
        method.backbone.compile()
    train_module = distributed.wrap(method, cfg, rt)
    sync_every = cfg.sync_every or (cfg.log_every if device.type == "cuda" and cfg.optimizer in DEVICE_SKIP else 1)
    # Fused Adam: one kernel for all parameters, and it can skip a step on the device (found_inf). Kept off
    # on the CPU unless the step is skipped there: the unfused update is the one the CPU figures were taken with.
    optimizer = build_optimizer(method.named_trainable_parameters(), cfg,
                                fused=device.type == "cuda" or sync_every > 1)
    augment = Augmenter(augment_config(cfg), data.mean, data.std)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rt.rank)
    loader = BatchLoader(data.train.images, cfg.batch_size, seed=cfg.seed, device=device,
                         rank=rt.rank, world_size=rt.world_size)
    transform = make_eval_transform(cfg, data.mean, data.std, device, channels_last)
    return Job(cfg, rt, log, data, method, train_module, optimizer, augment, aug_gen, loader, transform, run_dir,
               initial_state, sync_every, step_guard(method, device, sync_every))


def augment_config(cfg: Config) -> AugmentConfig:
    """The training augmentation of ``cfg``."""
    return AugmentConfig(
        size=cfg.image_size, crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
        jitter=tuple(cfg.jitter), jitter_p=cfg.jitter_p, grayscale_p=cfg.grayscale_p, flip_p=cfg.flip_p,
        solarize_p=tuple(cfg.solarize_p),
    )


def _restore(job: Job, ckpt: Checkpoint, resume) -> TrainState:
    """Weights, optimizer, random states and position from a checkpoint (exact resume)."""
    rt = job.rt
    if ckpt.world_size != rt.world_size:
        job.log(f"note: the checkpoint was written by {ckpt.world_size} process(es), this run has {rt.world_size}: "
                "batches are the same, augmentations after the resume differ from an uninterrupted run")
    restore(ckpt, job.method, job.optimizer, job.aug_gen, rt.rank)
    if job.initial_state is not None and ckpt.initial_method is not None:
        job.initial_state = ckpt.initial_method
    job.guard.continue_from(ckpt.nonfinite_total)
    state = TrainState(epoch=ckpt.epoch, batch=ckpt.batch, step=ckpt.step, nonfinite_total=ckpt.nonfinite_total,
                       checkpoint_step=ckpt.step, seconds_before=ckpt.train_seconds)
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
        signalled, late, due = train_step(job, state, views)
        state.batch += 1
        done = cfg.max_steps is not None and state.step >= cfg.max_steps
        if signalled or late or done:
            state.stop_reason = ("signal" if signalled else f"max_minutes={cfg.max_minutes}" if late
                                 else f"max_steps={cfg.max_steps}")
            save_checkpoint(job, state)
            return False
        if due and state.batch < job.steps_per_epoch:  # ckpt_minutes passed (the epoch's end writes its own)
            save_checkpoint(job, state)
    return True


def epoch_views(job: Job, epoch: int, first: int = 0) -> Iterator[list[torch.Tensor]]:
    """The augmented views of every batch of ``epoch`` from batch ``first`` on, one list of d views a batch.

    ``augment_batches`` 1: each batch is augmented just before its step with the run's augmentation stream
    (``job.aug_gen``, saved in checkpoints). K > 1: K batches are augmented in one call (fewer, larger
    kernels on a GPU) with a generator seeded by (seed, "augment chunk", rank, epoch, chunk), so a resume
    inside a chunk re-augments it identically without saving any random state.
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
        seed = derive_seed(cfg.seed, "augment chunk", job.rt.rank, epoch, chunk)
        gen = torch.Generator(device=job.device).manual_seed(seed)
        views = job.augment(torch.cat(images), cfg.n_views, generator=gen)
        parts = [v.split([len(b) for b in images]) for v in views]
        for i in range(len(images)):
            if chunk * k + i >= first:
                yield [p[i] for p in parts]


def train_step(job: Job, state: TrainState, views: list[torch.Tensor]) -> tuple[bool, bool, bool]:
    """One optimizer step on the d augmented views of a batch; returns the agreed flags (a process was
    signalled, the max_minutes deadline passed, a checkpoint by time is due), all False between host reads.

    A non-finite loss skips the step: no update, and the buffers (BatchNorm statistics) the forward pass
    moved are put back; ``cfg.nonfinite_limit`` skipped steps in a row abort the run. ``job.guard`` decides
    where: on the host, which reads the loss every step (``sync_every`` 1), or on the device, read every
    ``sync_every`` steps, with the same result (:mod:`wmse.nonfinite`).
    """
    cfg, optimizer, guard = job.cfg, job.optimizer, job.guard
    t0 = time.perf_counter()
    lr = cfg.lr * lr_factor(state.step, job.steps_per_epoch, cfg.epochs, cfg.warmup_iters, cfg.schedule,
                            cfg.lr_drop_epochs, cfg.lr_drop_factor, cfg.lr_end_factor)
    for group in optimizer.param_groups:
        group["lr"] = lr
    guard.buffers.save()
    loss = _forward(job, views, state.step)
    ok = guard.admit(job, loss)
    optimizer.zero_grad(set_to_none=True)
    if ok is not False:  # False: skipped on the host; True, or a device flag that gates the optimizer
        loss.backward()
        guard.gate(optimizer, ok)
        optimizer.step()
        job.method.on_step(state.step + 1, job.total_steps)
    guard.settle(job, state, ok)
    state.step += 1
    reading = guard.read(job, state, t0)
    if reading is None:
        return False, False, False
    loss_value, stopping, img_s = reading
    _log_step(job, state, loss_value, lr, img_s)
    return stopping


def _forward(job: Job, views: list[torch.Tensor], step: int) -> torch.Tensor:
    """The views through the method: the loss of step ``step``. One call whether there is one process or
    several: the context carries the all-gather (the identity in one process) and the step's seed, from which
    the method draws its random choices (exact after a resume)."""
    cfg = job.cfg
    if uses_channels_last(cfg.channels_last, job.method.backbone):
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    ctx = distributed.process_context(job.rt, cfg.seed, step)
    with torch.autocast(job.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        return job.train_module(views, ctx)


def _log_step(job: Job, state: TrainState, loss_value: float, lr: float, img_s: float) -> None:
    if not job.rt.is_main or job.progress is None:  # other ranks, and jobs run without logging (benchmarks)
        return
    cfg = job.cfg
    job.progress.update(state.step, state.epoch, cfg.epochs, loss_value, lr, img_s)
    if state.step % cfg.log_every == 0 or state.step == job.total_steps:
        job.metrics.write("train", state.step, epoch=state.epoch, loss=loss_value, lr=lr, img_per_s=img_s,
                          nonfinite_skipped=state.nonfinite_total)


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


def save_checkpoint(job: Job, state: TrainState) -> None:
    """RUN/checkpoints/last.pt at ``state``'s position (every rank takes part: rank 0 writes every rank's
    random state). Not written while the last losses are non-finite or the weights are not: the previous
    checkpoint, a finite state, stays."""
    rt = job.rt
    job.guard.sync(job, state)  # the device's non-finite count decides whether the state may be saved
    finite = state.nonfinite_run == 0 and state_is_finite(job.method)
    gathered = distributed.gather_objects((rng_state(job.aug_gen), finite), rt)
    if not all(ok for _, ok in gathered):
        job.log(f"checkpoint not written at step {state.step}: the model is not finite or its last "
                f"{state.nonfinite_run} losses were not; {kept_checkpoint(job, state)}")
        return
    if rt.is_main:
        write_checkpoint(Checkpoint(
            config=job.cfg.to_dict(), method=job.method.state_dict(), backbone=job.method.backbone.state_dict(),
            optimizer=job.optimizer.state_dict(), epoch=state.epoch, batch=state.batch, step=state.step,
            rng_ranks=[rng for rng, _ in gathered], nonfinite_total=state.nonfinite_total,
            train_seconds=state.train_seconds(), mean=tuple(job.data.mean), std=tuple(job.data.std),
            initial_method=job.initial_state, data=job.fingerprint), job.run_dir / "checkpoints" / "last.pt")
    distributed.barrier(rt)  # the other ranks wait until rank 0 has written it
    state.checkpoint_step = state.step
    if job.stop is not None:
        job.stop.checkpointed()


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


def finish(job: Job, state: TrainState) -> None:
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
                            f"{kept_checkpoint(job, state)}. Try a smaller --lr or a longer --warmup_iters")
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
    for mirror in job.metrics.mirrors if job.metrics is not None else []:  # None: a resume that only evaluates
        mirror.final(results, job.data.note)
