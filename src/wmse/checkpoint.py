"""Checkpoints: atomic writes, safe loads (weights_only), and the random states needed for exact resume."""

from __future__ import annotations

from pathlib import Path

import torch

from .fileio import save_atomic

__all__ = ["save_atomic", "load_checkpoint", "resolve_checkpoint", "rng_state", "set_rng_state", "rank_rng_state"]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; a missing or damaged file is one clear error."""
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
    state = {"torch": torch.get_rng_state(), "augment": augment_generator.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, augment_generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    augment_generator.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rank_rng_state(ckpt: dict, rank: int, augment_generator: torch.Generator) -> dict:
    """The RNG state rank ``rank`` restores from a checkpoint (rank 0 saves every rank's in ``rng_ranks``).

    A checkpoint of a single process has only ``rng``. When the run now has more ranks than the one that
    wrote it, the extra ranks take rank 0's global state but keep their own fresh augmentation stream
    (``augment_generator``'s current state), so no two ranks augment alike.
    """
    states = ckpt.get("rng_ranks") or [ckpt["rng"]]
    if rank < len(states):
        return states[rank]
    return {**states[0], "augment": augment_generator.get_state()}
