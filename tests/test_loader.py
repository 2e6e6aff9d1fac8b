"""BatchLoader: seeded per-epoch permutations, drop_last, exact mid-epoch resume, DDP slices."""

from __future__ import annotations

import pytest
import torch

from wmse.data.loader import BatchLoader


def data(n: int = 23):
    images = torch.randint(0, 256, (n, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return images, torch.arange(n)  # labels = index, so each batch names its images


def order(loader: BatchLoader, epoch: int, **kw) -> list[int]:
    return [i for _, y in loader.epoch(epoch, **kw) for i in y.tolist()]


def test_batches_are_the_indexed_images_and_cover_the_epoch():
    images, labels = data()
    loader = BatchLoader(images, 5, labels=labels, seed=1)
    assert len(loader) == 4  # 23 // 5, partial batch dropped
    seen = []
    for x, y in loader:
        assert x.dtype == torch.uint8 and x.shape == (5, 3, 4, 4) and x.device.type == "cpu"
        assert torch.equal(x, images[y]) and y.dtype == torch.int64
        seen += y.tolist()
    assert len(set(seen)) == 20 and seen == loader.permutation(0)[:20].tolist()
    full = BatchLoader(images, 5, labels=labels, drop_last=False)
    assert len(full) == 5 and [len(y) for _, y in full] == [5, 5, 5, 5, 3]
    assert sorted(order(full, 0)) == list(range(23))


def test_permutation_depends_only_on_seed_and_epoch():
    images, labels = data(40)
    a = BatchLoader(images, 4, labels=labels, seed=7)
    b = BatchLoader(images, 8, labels=labels, seed=7)  # batch size does not change the order
    assert order(a, 3) == order(b, 3)
    assert order(a, 3) != order(a, 4)
    assert order(a, 3) != order(BatchLoader(images, 4, labels=labels, seed=8), 3)
    assert order(a, 3) == order(a, 3)
    assert order(BatchLoader(images, 4, labels=labels, shuffle=False), 5) == list(range(40))


def test_start_skips_batches_for_exact_resume():
    images, labels = data(40)
    loader = BatchLoader(images, 4, labels=labels, seed=2)
    full = list(loader.epoch(6))
    resumed = list(loader.epoch(6, start=3))
    assert len(resumed) == len(full) - 3
    for (x1, y1), (x2, y2) in zip(full[3:], resumed):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert list(loader.epoch(6, start=len(loader))) == []
    with pytest.raises(ValueError, match="start"):
        list(loader.epoch(0, start=-1))


def test_ddp_ranks_split_every_global_batch():
    images, labels = data(40)
    glob = BatchLoader(images, 8, labels=labels, seed=3)
    ranks = [BatchLoader(images, 8, labels=labels, seed=3, rank=r, world_size=4) for r in range(4)]
    assert all(len(r) == len(glob) for r in ranks)
    for step, (_, y) in enumerate(glob.epoch(2)):
        parts = [list(r.epoch(2))[step][1] for r in ranks]
        assert all(p.numel() == 2 for p in parts)
        assert torch.equal(torch.cat(parts), y)  # contiguous, disjoint, in rank order
    with pytest.raises(ValueError, match="divisible by world_size=3"):
        BatchLoader(images, 8, world_size=3, rank=0)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(images, 8, world_size=2, rank=2)


def test_unlabeled_and_errors():
    images, _ = data(10)
    _, y = next(iter(BatchLoader(images, 4)))
    assert y.eq(-1).all()
    with pytest.raises(ValueError, match="uint8"):
        BatchLoader(images.float(), 4)
    with pytest.raises(ValueError, match="labels"):
        BatchLoader(images, 4, labels=torch.arange(9))
    with pytest.raises(ValueError, match="exceeds"):
        BatchLoader(images, 11)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(images, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_batches_match_cpu_batches():
    images, labels = data(64)
    cpu = BatchLoader(images, 16, labels=labels, seed=4)
    gpu = BatchLoader(images, 16, labels=labels, seed=4, device="cuda")
    for (x1, y1), (x2, y2) in zip(cpu.epoch(1), gpu.epoch(1)):
        assert x2.is_cuda and y2.is_cuda
        # Consuming after later batches were issued checks the pinned double buffer is not overwritten early.
        assert torch.equal(x1, x2.cpu()) and torch.equal(y1, y2.cpu())
    batches = list(gpu.epoch(2))  # hold all batches, then compare
    ref = list(cpu.epoch(2))
    for (x1, _), (x2, _) in zip(ref, batches):
        assert torch.equal(x1, x2.cpu())
