"""The pretraining loop: data -> batched augmentation -> method loss -> Adam, with schedule, logging,
periodic kNN, checkpoints, exact resume and clean interruption.

Read it top to bottom: :func:`pretrain` is the whole job in stages; :func:`train_one_epoch` and
:func:`train_step` are one epoch and one step of it; the state that changes from step to step is one
:class:`TrainState`, everything built once is one :class:`Job`.
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from . import distributed
from .augment import AugmentConfig, Augmenter
from .checkpoint import load_checkpoint, rank_rng_state, rng_state, save_atomic, set_rng_state
from .config import Config, validate
from .data.loader import BatchLoader
from .device import cpu_has_native_bf16
from .errors import TrainingError
from .methods import Method, build_method
from .progress import MetricsLog, Progress
from .run_data import RunData, load_run_data
from .run_eval import diagnostics_record, final_evaluation, format_final, knn_monitor, make_eval_transform
from .schedule import lr_factor
from .whitening import fallback_count

__all__ = ["pretrain", "train_one_epoch", "train_step", "TrainState", "Job", "StopFlag"]


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop saves a checkpoint at the next step boundary and returns.

    ``announce``: print the one-line notice (torchrun sends the signal to every rank; only the
    main rank says so).
    """

    def __init__(self, announce: bool = True) -> None:
        self.signal: int | None = None
        self.announce = announce

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
    metrics: MetricsLog | None = None  # main rank only
    progress: Progress | None = None
    stop: StopFlag | None = None

    @property
    def device(self) -> torch.device:
        return self.rt.device

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.epochs


def pretrain(cfg: Config, resume: str | Path | None = None, log=None) -> Path:
    """Run (or resume) pretraining; returns the run directory.

    ``resume``: a run directory or checkpoint; training continues exactly where it stopped (same batches,
    augmentations and random slices), in the same run directory.
    """
    validate(cfg)
    rt = distributed.setup(cfg)
    log = log or (lambda msg: print(msg, file=sys.stderr) if rt.is_main else None)
    job = None
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)

        # ============ the run directory, and the checkpoint to continue from ============
        ckpt = load_checkpoint(resume) if resume else None
        run_dir = _run_directory(cfg, resume, rt)

        # ============ data, method, optimizer, augmentation, batches ============
        data = load_run_data(cfg, log)
        if len(data.train) < cfg.batch_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training set ({len(data.train)} images)")
        job = _build_job(cfg, rt, data, run_dir, log)
        state = _restore(job, ckpt, resume) if ckpt is not None else TrainState()

        # ============ logging ============
        if rt.is_main:
            job.metrics = MetricsLog(run_dir)
            (run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
            _announce(job)
            job.progress = Progress(job.total_steps)

        # ============ training ============
        job.stop = StopFlag(announce=rt.is_main)
        with job.stop.installed():
            for epoch in range(state.epoch, cfg.epochs):
                t_epoch = time.perf_counter()
                if not train_one_epoch(job, state, epoch):
                    break  # stopped by a signal or max_steps: the checkpoint is written
                end_of_epoch(job, state, time.perf_counter() - t_epoch)
        _finish(job, state)
        return run_dir
    finally:
        if job is not None:
            for closable in (job.progress, job.metrics):
                if closable is not None:
                    closable.close()
        distributed.cleanup(rt)


def _run_directory(cfg: Config, resume, rt: distributed.Runtime) -> Path:
    """The run directory: the resumed run's, or a new one that rank 0 names (a time stamp) for every rank."""
    if resume:
        p = Path(resume)
        return p.resolve().parent.parent if p.is_file() else p
    run_dir = _make_run_dir(cfg) if rt.is_main else None
    return distributed.broadcast_object(run_dir, rt)


def _make_run_dir(cfg: Config) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.run_name or f"{cfg.preset or cfg.dataset + '-' + cfg.method}-{stamp}"
    run_dir = Path(cfg.out_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _build_job(cfg: Config, rt: distributed.Runtime, data: RunData, run_dir: Path, log) -> Job:
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
    optimizer = torch.optim.Adam(method.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augment = Augmenter(augment_config(cfg), data.mean, data.std)
    aug_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000 * rt.rank)
    loader = BatchLoader(data.train.images, cfg.batch_size, seed=cfg.seed, device=device,
                         rank=rt.rank, world_size=rt.world_size)
    transform = make_eval_transform(cfg, data.mean, data.std, device, cfg.channels_last)
    return Job(cfg, rt, log, data, method, train_module, optimizer, augment, aug_gen, loader, transform, run_dir,
               initial_state)


def augment_config(cfg: Config) -> AugmentConfig:
    """The training augmentation of ``cfg``."""
    return AugmentConfig(
        size=cfg.image_size, crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
        jitter=tuple(cfg.jitter), jitter_p=cfg.jitter_p, grayscale_p=cfg.grayscale_p, flip_p=cfg.flip_p,
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
                       nonfinite_total=ckpt.get("nonfinite_total", 0))
    job.log(f"resumed from {resume} at epoch {state.epoch + 1}, step {state.step}")
    return state


def _announce(job: Job) -> None:
    cfg = job.cfg
    job.log(f"run directory: {job.run_dir}\n{job.data.note}")
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
    for images, _ in job.loader.epoch(epoch, start=first):
        stopping = train_step(job, state, images)
        state.batch += 1
        if stopping or (cfg.max_steps is not None and state.step >= cfg.max_steps):
            state.stop_reason = "signal" if stopping else f"max_steps={cfg.max_steps}"
            save_checkpoint(job, state)
            return False
    return True


def train_step(job: Job, state: TrainState, images: torch.Tensor) -> bool:
    """One optimizer step on a batch of uint8 images; returns whether any process was signalled to stop.

    A non-finite loss skips the update; ``cfg.nonfinite_limit`` of them in a row abort the run.
    """
    cfg, device, method, optimizer = job.cfg, job.device, job.method, job.optimizer
    t0 = time.perf_counter()
    lr = cfg.lr * lr_factor(state.step, job.steps_per_epoch, cfg.epochs, cfg.warmup_iters, cfg.schedule,
                            cfg.lr_drop_epochs, cfg.lr_drop_factor)
    for group in optimizer.param_groups:
        group["lr"] = lr
    views = job.augment(images, cfg.n_views, generator=job.aug_gen)
    if cfg.channels_last:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
        loss = job.train_module(views)
    # the one host read per step (finiteness needs it); under DDP the mean over ranks, and every rank
    # learns whether any rank was signalled, so all take the same branch below
    loss_value, stopping = distributed.agree(loss, job.stop.signal is not None, job.rt)
    optimizer.zero_grad(set_to_none=True)
    if math.isfinite(loss_value):
        state.nonfinite_run = 0
        loss.backward()
        optimizer.step()
        method.on_step(state.step + 1, job.total_steps)
    else:
        state.nonfinite_run += 1
        state.nonfinite_total += 1
        if state.nonfinite_run >= cfg.nonfinite_limit:
            raise TrainingError(
                f"loss was non-finite for {state.nonfinite_run} steps in a row (step {state.step}). Likely causes: "
                f"learning rate too high (lr={cfg.lr}), w_size ({cfg.w_size}) too small for the embedding "
                f"size ({cfg.emb}; w_size >= 2*emb is recommended), or eps=0 with collapsed embeddings "
                f"(try --w_eps 1e-4 or --precision fp32)")
    state.step += 1
    if job.rt.is_main:
        img_s = cfg.batch_size / (time.perf_counter() - t0)
        job.progress.update(state.step, state.epoch, cfg.epochs, loss_value, lr, img_s)
        if state.step % cfg.log_every == 0 or state.step == job.total_steps:
            job.metrics.write("train", state.step, epoch=state.epoch, loss=loss_value, lr=lr, img_per_s=img_s,
                              nonfinite_skipped=state.nonfinite_total)
    return stopping


def save_checkpoint(job: Job, state: TrainState) -> None:
    """RUN/checkpoints/last.pt at ``state``'s position (every rank takes part: rank 0 writes every rank's
    random state)."""
    rt = job.rt
    rng_ranks = distributed.gather_objects(rng_state(job.aug_gen), rt)
    if not rt.is_main:
        distributed.barrier(rt)  # wait until rank 0 has written it
        return
    ckpt = {
        "method": job.method.state_dict(), "backbone": job.method.backbone.state_dict(),
        "optimizer": job.optimizer.state_dict(), "epoch": state.epoch, "batch": state.batch, "step": state.step,
        "rng": rng_ranks[0], "rng_ranks": rng_ranks, "world_size": rt.world_size,
        "config": job.cfg.to_dict(), "nonfinite_total": state.nonfinite_total,
        "mean": list(job.data.mean), "std": list(job.data.std),  # so evaluation normalises exactly as training
    }
    if job.initial_state is not None:
        ckpt["initial_method"] = job.initial_state
    save_atomic(ckpt, job.run_dir / "checkpoints" / "last.pt")
    distributed.barrier(rt)


def end_of_epoch(job: Job, state: TrainState, seconds: float) -> None:
    """The epoch summary; every cfg.eval_every epochs the kNN monitor and diagnostics; the checkpoint."""
    cfg = job.cfg
    state.epoch, state.batch = state.epoch + 1, 0
    done = state.epoch
    if job.rt.is_main:
        job.metrics.write("epoch", state.step, epoch=done, seconds=seconds, whitening_fallbacks=fallback_count())
        if job.data.labelled and (done % cfg.eval_every == 0 or done == cfg.epochs):
            _evaluate_epoch(job, state, seconds)
    if done % cfg.ckpt_every == 0 or done == cfg.epochs:
        save_checkpoint(job, state)


def _evaluate_epoch(job: Job, state: TrainState, seconds: float) -> None:
    result = knn_monitor(job.method, job.data, job.cfg, job.device, job.transform)
    diag = diagnostics_record(job.method, job.data, job.cfg, job.device, job.transform)
    job.metrics.write("eval", state.step, epoch=state.epoch, **result)
    job.metrics.write("diagnostics", state.step, epoch=state.epoch, **diag)
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
    if state.stop_reason is not None:
        log(f"stopped at step {state.step} ({state.stop_reason}); resume with: wmse pretrain --resume {job.run_dir}")
    elif cfg.final_eval and rt.is_main and job.data.labelled:
        results = final_evaluation(job.method, job.initial_state, job.data, cfg, job.device, job.transform, log)
        (job.run_dir / "final_eval.json").write_text(json.dumps({"note": job.data.note, **results}, indent=2))
        print(format_final(results, job.data.note))
