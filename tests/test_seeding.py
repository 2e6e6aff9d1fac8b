"""wmse.seeding: one helper derives every seed of a run from keys (batch order, augmentation chunks, a method's
draws at a step)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from wmse.data.loader import BatchLoader
from wmse.seeding import derive_seed, step_generator


def _seed_sequence(words: list[int]) -> int:
    """numpy's SeedSequence by hand: the mixing the batch order used before the helper (so batches stay)."""
    return int(np.random.SeedSequence(words).generate_state(2, np.uint64)[0] >> np.uint64(1))


def test_deterministic_and_in_range():
    for keys in [(0,), (3, 7), (2**40, 1, 2, 3), (-1, 5), (1, "method step", 4, 0)]:
        a, b = derive_seed(*keys), derive_seed(*keys)
        assert a == b and 0 <= a < 2**63
    with pytest.raises(ValueError, match="at least one key"):
        derive_seed()


def test_distinct_keys_give_distinct_seeds():
    grid = list(itertools.product(range(6), range(6), range(4)))
    seeds = {derive_seed(*k) for k in grid}
    assert len(seeds) == len(grid)
    assert derive_seed(1, 2) != derive_seed(2, 1)  # order matters


def test_the_three_kinds_of_draw_never_share_a_seed():
    """Batch order (seed, epoch), augmentation chunks (seed, "augment chunk", rank, epoch, chunk) and a
    method's step draws (seed, "method step", step, rank) over small ranges: no two draws of a run get one
    seed. SeedSequence pads short key lists with zeros, so without the names (seed, 1) and (seed, 1, 0, 0)
    would meet: the batch order of epoch 1 and rank 1's first augmentation chunk."""
    seed = 7
    assert derive_seed(seed, 1) == derive_seed(seed, 1, 0, 0)  # why the names are there
    batches = [derive_seed(seed, e) for e in range(20)]
    chunks = [derive_seed(seed, "augment chunk", r, e, c) for r in range(3) for e in range(20) for c in range(5)]
    steps = [derive_seed(seed, "method step", s, r) for s in range(100) for r in range(3)]
    everything = batches + chunks + steps
    assert len(set(everything)) == len(everything)


def test_batch_order_is_unchanged_by_the_helper():
    images = torch.zeros(50, 1, 2, 2, dtype=torch.uint8)
    for seed, epoch in [(0, 0), (3, 5), (2**32 + 3, 1)]:
        loader = BatchLoader(images, 10, seed=seed)
        gen = torch.Generator().manual_seed(_seed_sequence([seed & 0xFFFFFFFF, epoch]))
        assert torch.equal(loader.permutation(epoch), torch.randperm(50, generator=gen))


def test_step_generator_is_a_function_of_seed_step_and_rank():
    draw = lambda *a: torch.randperm(64, generator=step_generator(*a)).tolist()  # noqa: E731
    assert draw(1, 5, 0) == draw(1, 5, 0)
    assert len({tuple(draw(s, t, r)) for s, t, r in itertools.product(range(2), range(3), range(2))}) == 12
    torch.manual_seed(0)
    a = draw(1, 5, 0)
    torch.rand(10)  # the global RNG moves: the step's draws do not
    assert draw(1, 5, 0) == a
