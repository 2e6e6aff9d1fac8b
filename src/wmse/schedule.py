"""Learning-rate schedule of the official W-MSE code: linear warm-up, then step drops or cosine.

The schedule is a pure function of the global step, so resuming needs no scheduler state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

SCHEDULES = ("step", "cosine")


def default_drop_epochs(epochs: int) -> tuple[int, ...]:
    """The official drops at epochs E-50 and E-25 (clipped at 0 for short runs)."""
    return tuple(max(0, epochs - k) for k in (50, 25))


def lr_factor(
    step: int,
    steps_per_epoch: int,
    epochs: int,
    warmup_iters: int = 500,
    schedule: str = "step",
    drop_epochs: Sequence[int] | None = None,
    drop_factor: float = 0.2,
    end_factor: float = 0.0,
) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Warm-up: the first ``warmup_iters`` steps use (step + 1) / warmup_iters, as the official loop.
    "step": x drop_factor at each epoch in ``drop_epochs`` (default E-50, E-25) that has been reached.
    "cosine": end + (1 - end) 0.5 (1 + cos(pi * step / total_steps)) over the whole run, from 1 to
    ``end_factor``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'step' or 'cosine', got {schedule!r}")
    if step < warmup_iters:
        return (step + 1) / warmup_iters
    if schedule == "cosine":
        total = max(1, steps_per_epoch * epochs)
        return end_factor + (1.0 - end_factor) * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    epoch = step // max(1, steps_per_epoch)
    drops = default_drop_epochs(epochs) if drop_epochs is None else drop_epochs
    return drop_factor ** sum(1 for e in drops if epoch >= e)
