"""Seeds derived from keys: every random draw of a run that must be reproducible on its own (after a resume, on
any rank) takes a generator seeded by :func:`derive_seed` of the keys that name it, not the global RNG.

The users and their keys: the batch order of an epoch ``(seed, epoch)`` (:class:`wmse.data.loader.BatchLoader`),
the augmentation of a chunk of batches ``(seed, "augment chunk", rank, epoch, chunk)``
(:func:`wmse.train.epoch_views`), and a method's random choices at a step, W-MSE's slices among them,
``(seed, "method step", step, rank)`` (:func:`step_generator`). The names keep the kinds apart (see
:func:`derive_seed`).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

__all__ = ["derive_seed", "step_generator"]


def _word(key: int | str) -> int:
    """One 32-bit word of entropy: an int modulo 2**32, a name by its CRC-32 (stable across processes and
    Python versions, unlike ``hash``)."""
    if isinstance(key, str):
        return zlib.crc32(key.encode())
    return int(key) & 0xFFFFFFFF


def derive_seed(*keys: int | str) -> int:
    """A seed in [0, 2**63) for ``torch.Generator.manual_seed``, a function of ``keys`` alone.

    numpy's SeedSequence hashes the keys, so nearby keys (seed 0 and 1, epoch 4 and 5) give unrelated streams.
    Integer keys count modulo 2**32. SeedSequence pads up to four keys with zeros, so ``(a, b)`` and
    ``(a, b, 0)`` give the same seed: every kind of draw but the oldest (the batch order, ``(seed, epoch)``)
    therefore puts a name (a string key) second, where that one has a small number.
    """
    if not keys:
        raise ValueError("derive_seed needs at least one key")
    state = np.random.SeedSequence([_word(k) for k in keys]).generate_state(2, np.uint64)
    return int(state[0] >> np.uint64(1))


def step_generator(seed: int, step: int, rank: int = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """The generator of a method's random choices at training step ``step`` (W-MSE's slices, Shuffled-DBN's
    channel shuffles): a function of (seed, step, rank) only, so a resumed run draws what an uninterrupted
    one would, and independent of the global RNG (which evaluation consumes).

    Pass rank 0 on every rank for a draw all ranks share, the real rank for a per-rank draw. ``device``: where
    the generator draws (a CUDA generator draws on the GPU with no host synchronisation; CPU and CUDA
    generators of one seed draw different numbers).
    """
    return torch.Generator(device=device).manual_seed(derive_seed(seed, "method step", step, rank))
