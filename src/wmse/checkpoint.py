"""The checkpoint format: what a training checkpoint holds (:class:`Checkpoint`), writing it atomically, reading it
safely (``weights_only``), and restoring a run from it. This is the one module that knows the file's keys.

The file is a dict: ``method`` (state_dict), ``backbone`` (the encoder's state_dict, whose first convolution gives
the input channels), ``optimizer``, the position ``epoch`` / ``batch`` / ``step``, ``rng_ranks`` (every rank's
random states) with ``rng`` (rank 0's) and ``world_size``, ``config`` (every field), ``nonfinite_total``,
``train_seconds``, the training normalisation ``mean`` / ``std``, and ``initial_method`` (the random-init weights,
for the final comparison) when the run scores one. Checkpoints of earlier versions lack some of these: they read
with the defaults of :class:`Checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .fileio import save_atomic

__all__ = ["Checkpoint", "write_checkpoint", "read_checkpoint", "restore", "save_atomic", "load_checkpoint",
           "resolve_checkpoint", "rng_state", "set_rng_state"]


@dataclass
class Checkpoint:
    """A training checkpoint: everything needed to continue the run exactly, and to rebuild its trained method.

    A checkpoint written at (epoch, batch) resumes with batch ``batch`` of epoch ``epoch`` (0-based); ``step``
    counts the optimizer steps taken.
    """

    config: dict  # every field of the run's Config (Config.to_dict)
    method: dict  # the method's state_dict
    backbone: dict  # the encoder's state_dict
    optimizer: dict
    epoch: int
    batch: int
    step: int
    rng_ranks: list[dict]  # every rank's random states (rng_state), in rank order
    nonfinite_total: int = 0  # non-finite steps skipped so far
    train_seconds: float = 0.0  # wall time in the training loop over every invocation
    mean: tuple[float, ...] | None = None  # the training normalisation, so evaluation normalises alike
    std: tuple[float, ...] | None = None
    initial_method: dict | None = None  # random-init weights (runs with a final evaluation)
    data: dict | None = None  # the data fingerprint (wmse.fingerprint); None in checkpoints of earlier versions

    @property
    def world_size(self) -> int:
        """How many processes wrote it."""
        return len(self.rng_ranks)

    def rank_rng_state(self, rank: int, augment_generator: torch.Generator) -> dict:
        """The random states rank ``rank`` restores.

        When the run now has more ranks than the one that wrote it, the extra ranks take rank 0's global state
        but keep their own fresh augmentation stream (``augment_generator``'s current state), so no two ranks
        augment alike.
        """
        if rank < len(self.rng_ranks):
            return self.rng_ranks[rank]
        return {**self.rng_ranks[0], "augment": augment_generator.get_state()}


def write_checkpoint(ckpt: Checkpoint, path: str | Path) -> Path:
    """Write ``ckpt`` to ``path`` atomically (a kill or a full disk leaves the previous file whole)."""
    data = {
        "method": ckpt.method, "backbone": ckpt.backbone, "optimizer": ckpt.optimizer,
        "epoch": ckpt.epoch, "batch": ckpt.batch, "step": ckpt.step,
        "rng": ckpt.rng_ranks[0], "rng_ranks": ckpt.rng_ranks, "world_size": ckpt.world_size,
        "config": ckpt.config, "nonfinite_total": ckpt.nonfinite_total, "train_seconds": ckpt.train_seconds,
        "mean": None if ckpt.mean is None else list(ckpt.mean), "std": None if ckpt.std is None else list(ckpt.std),
    }
    if ckpt.initial_method is not None:
        data["initial_method"] = ckpt.initial_method
    if ckpt.data is not None:
        data["data"] = ckpt.data
    return save_atomic(data, Path(path))


def read_checkpoint(run_or_checkpoint: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """The checkpoint of a run directory (its checkpoints/last.pt) or file; a missing, damaged or foreign file
    is one clear error (see :func:`load_checkpoint`). Fields an earlier version did not write take their
    defaults."""
    data = load_checkpoint(run_or_checkpoint, map_location)
    missing = [k for k in ("backbone", "optimizer", "epoch", "batch", "step") if k not in data]
    if missing or not ("rng_ranks" in data or "rng" in data):
        raise ValueError(f"{resolve_checkpoint(run_or_checkpoint)} is not a complete wmse checkpoint "
                         f"(no {', '.join(repr(k) for k in missing or ['rng'])} entries)")
    mean, std = data.get("mean"), data.get("std")
    return Checkpoint(
        config=data["config"], method=data["method"], backbone=data["backbone"], optimizer=data["optimizer"],
        epoch=int(data["epoch"]), batch=int(data["batch"]), step=int(data["step"]),
        rng_ranks=data.get("rng_ranks") or [data["rng"]], nonfinite_total=int(data.get("nonfinite_total", 0)),
        train_seconds=float(data.get("train_seconds", 0.0)), mean=tuple(mean) if mean else None,
        std=tuple(std) if std else None, initial_method=data.get("initial_method"), data=data.get("data"),
    )


def restore(ckpt: Checkpoint, method: nn.Module, optimizer: torch.optim.Optimizer | None = None,
            augment_generator: torch.Generator | None = None, rank: int = 0) -> None:
    """Put the checkpoint's weights into ``method`` and, for a resumed run, its state into ``optimizer`` and
    rank ``rank``'s random states into the global RNGs and ``augment_generator``."""
    method.load_state_dict(ckpt.method)
    if optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)
    if augment_generator is not None:
        set_rng_state(ckpt.rank_rng_state(rank, augment_generator), augment_generator)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """The raw dict of a checkpoint (``weights_only=True``; :func:`read_checkpoint` gives it named fields);
    a missing or damaged file is one clear error."""
    path = Path(path)
    if path.is_dir():
        path = resolve_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ValueError(f"cannot read checkpoint {path}: {type(err).__name__}: {err}".splitlines()[0]) from err
    if not isinstance(ckpt, dict) or "config" not in ckpt or "method" not in ckpt:
        raise ValueError(f"{path} is not a wmse checkpoint (no 'config' / 'method' entries)")
    return ckpt


def resolve_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A run directory -> its checkpoints/last.pt; a file path is returned as it is."""
    p = Path(run_or_ckpt)
    if p.is_dir():
        candidate = p / "checkpoints" / "last.pt"
        if not candidate.is_file():
            raise FileNotFoundError(f"no checkpoint in run directory {p} (expected {candidate}): the run stopped "
                                    "before its first checkpoint, so there is nothing to resume; start it anew")
        return candidate
    return p


def rng_state(augment_generator: torch.Generator) -> dict:
    """This process's random states: the global CPU (and CUDA) RNG and the augmentation stream."""
    state = {"torch": torch.get_rng_state(), "augment": augment_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, augment_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    augment_generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
