"""Non-finite steps: a step whose loss is not finite is skipped and leaves the model exactly as it was (no update,
the buffers the forward pass moved put back); ``nonfinite_limit`` skipped steps in a row abort the run.

Where the skip is decided is a :class:`StepGuard`, one of two:

- :class:`HostSkip` (``sync_every`` 1): the host reads every step's loss (under DDP one tiny all-reduce, which
  also agrees on a stop) and skips the update there.
- :class:`DeviceSkip` (``sync_every`` > 1): the skip happens on the device (fused Adam's ``found_inf``) and the
  host reads the flags every ``sync_every`` steps, with the same result: no host synchronisation per step.

The training step (:func:`wmse.train.train_step`) is one path for both: it asks the guard whether the step may
update (:meth:`StepGuard.admit`), gates the optimizer (:meth:`StepGuard.gate`), settles the bookkeeping
(:meth:`StepGuard.settle`) and asks for the host's reading of the step, if this step has one
(:meth:`StepGuard.read`).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING

import torch

from . import distributed
from .errors import TrainingError
from .methods import METHODS, Method

if TYPE_CHECKING:  # the loop's types; this module never imports the loop
    from .train import Job, TrainState

__all__ = ["BufferGuard", "DeviceFlags", "StepGuard", "HostSkip", "DeviceSkip", "step_guard", "divergence_message",
           "kept_checkpoint", "state_is_finite", "finite_flag"]


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


class StepGuard:
    """Where a step's skip is decided (see the module docstring); ``buffers`` are saved before each forward."""

    def __init__(self, buffers: BufferGuard) -> None:
        self.buffers = buffers

    def continue_from(self, nonfinite_total: int) -> None:
        """A resumed run: the count of skipped steps so far."""

    def admit(self, job: Job, loss: torch.Tensor) -> bool | torch.Tensor:
        """Whether the step may update: False skips it here (no backward); True or a device flag updates."""
        raise NotImplementedError

    def gate(self, optimizer: torch.optim.Optimizer, ok: bool | torch.Tensor) -> None:
        """Make ``optimizer.step()`` leave everything as it was where ``ok`` is a False device flag."""

    def settle(self, job: Job, state: TrainState, ok: bool | torch.Tensor) -> None:
        """After the update: a skipped step's buffers put back, the counts, the abort at the limit."""
        raise NotImplementedError

    def read(self, job: Job, state: TrainState, t0: float) -> tuple[float, tuple[bool, bool, bool], float] | None:
        """(loss, agreed stop flags, img/s) when the host reads this step (``state.step`` steps done, the
        step began at ``t0``), None between reads."""
        raise NotImplementedError

    def sync(self, job: Job, state: TrainState) -> tuple[float, tuple[bool, bool, bool]] | None:
        """Bring the non-finite counts of ``state`` up to date (before a checkpoint)."""
        return None


class HostSkip(StepGuard):
    """``sync_every`` 1: the host reads every step's loss, with the stop flags, and skips there."""

    def admit(self, job: Job, loss: torch.Tensor) -> bool:
        # the one host read per step; under DDP the mean over ranks, and every rank learns whether any rank
        # was signalled, so all take the same branch
        self.loss_value, self.stopping = distributed.agree(loss, job.stop.raised(), job.rt)
        return math.isfinite(self.loss_value)

    def settle(self, job: Job, state: TrainState, ok: bool) -> None:
        if ok and not state_is_finite(job.method):  # a finite loss whose update overflowed the weights
            ok = False
        if ok:
            state.nonfinite_run = 0
            return
        self.buffers.restore()
        state.nonfinite_run += 1
        state.nonfinite_total += 1
        if state.nonfinite_run >= job.cfg.nonfinite_limit:
            raise TrainingError(divergence_message(job, state, state.step + 1))

    def read(self, job: Job, state: TrainState, t0: float) -> tuple[float, tuple[bool, bool, bool], float]:
        return self.loss_value, self.stopping, job.cfg.batch_size / (time.perf_counter() - t0)


class DeviceSkip(StepGuard):
    """``sync_every`` > 1: the skip is a device flag (:class:`DeviceFlags`) that gates fused Adam; the host reads
    the flags every ``sync_every`` steps (and every ``log_every`` steps, and at the last step)."""

    def __init__(self, buffers: BufferGuard, device: torch.device, sync_every: int) -> None:
        super().__init__(buffers)
        self.device, self.sync_every = device, sync_every
        self.flags = DeviceFlags(device)

    def continue_from(self, nonfinite_total: int) -> None:
        self.flags = DeviceFlags(self.device, nonfinite_total)

    def admit(self, job: Job, loss: torch.Tensor) -> torch.Tensor:
        return self.flags.step_ok(distributed.mean_over_ranks(loss, job.rt))

    def gate(self, optimizer: torch.optim.Optimizer, ok: torch.Tensor) -> None:
        optimizer.found_inf = (~ok).float()  # fused Adam leaves parameters, moments and step count as they were

    def settle(self, job: Job, state: TrainState, ok: torch.Tensor) -> None:
        ok = ok & finite_flag(job.method)  # a finite loss whose update overflowed the weights: non-finite too
        self.buffers.restore_unless(ok)
        self.flags.update(ok, state.step + 1, job.cfg.nonfinite_limit)

    def read(self, job: Job, state: TrainState, t0: float) -> tuple[float, tuple[bool, bool, bool], float] | None:
        cfg = job.cfg
        if state.step % self.sync_every and state.step % cfg.log_every and state.step != job.total_steps:
            return None
        loss_value, stopping = self.sync(job, state)
        img_s = cfg.batch_size * self.sync_every / (time.perf_counter() - state.window_start)  # over the window
        state.window_start = time.perf_counter()
        return loss_value, stopping, img_s

    def sync(self, job: Job, state: TrainState) -> tuple[float, tuple[bool, bool, bool]]:
        """Read the device's non-finite flags into ``state`` (abort if the limit was reached) and agree on a
        stop. Returns the last loss and the agreed flags (signal, deadline, checkpoint due)."""
        flags = self.flags
        loss_value, stopping = distributed.agree(flags.loss, job.stop.raised(), job.rt)
        run, total, hit = (int(t) for t in torch.stack([flags.run, flags.total, flags.hit]).tolist())
        state.nonfinite_run, state.nonfinite_total = run, total
        if hit >= 0:  # every step since was skipped: the model is the model of that step
            state.nonfinite_run = job.cfg.nonfinite_limit
            raise TrainingError(divergence_message(job, state, hit))
        return loss_value, stopping


def step_guard(method: Method, device: torch.device, sync_every: int) -> StepGuard:
    """The guard of a run that reads the host every ``sync_every`` steps (1: every step)."""
    if sync_every > 1:
        return DeviceSkip(BufferGuard(method, frozen=True), device, sync_every)
    return HostSkip(BufferGuard(method))


def divergence_message(job: Job, state: TrainState, step: int) -> str:
    """Why the run aborts at ``step`` (counted from 1, as in metrics.jsonl), the causes that apply to this
    config, and what was kept."""
    cfg = job.cfg
    causes = [f"a learning rate too high for this run (lr={cfg.lr}; try a smaller --lr or a longer --warmup_iters)"]
    causes += METHODS[cfg.method].nonfinite_hints(cfg)
    if cfg.precision == "bf16":
        causes.append("bf16 rounding (try --precision fp32)")
    return (f"loss was non-finite for {state.nonfinite_run} steps in a row (step {step}); "
            f"{kept_checkpoint(job, state)}. "
            f"Likely causes: {'; '.join(causes)}")


def kept_checkpoint(job: Job, state: TrainState) -> str:
    """Which checkpoint exists, in words: the last finite one, or none."""
    if state.checkpoint_step is None:
        return "no checkpoint was written"
    return f"the last finite checkpoint (step {state.checkpoint_step}) is kept in {job.run_dir / 'checkpoints'}"


def finite_flag(method: Method) -> torch.Tensor:
    """Whether every floating-point parameter and buffer of ``method`` is finite, as one device bool."""
    return torch.stack([torch.isfinite(t).all() for t in (*method.parameters(), *method.buffers())
                        if t.is_floating_point()]).all()


def state_is_finite(method: Method) -> bool:
    """Whether every floating-point parameter and buffer of ``method`` is finite (one host read)."""
    return bool(finite_flag(method))
