"""No whole-dataset copies: subsets are index views of one uint8 tensor (also a read-only memory map), the
normalisation statistics are one streamed pass equal to the whole-set formula and to a float64 reference,
views give the batches, features and losses that copies give, and the start of training grows by one copy
of the decoded pixels, not many."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from wmse.data import ImageDataset, compute_stats, load
from wmse.data.loader import BatchLoader, ImageView, as_view
from wmse.evaluate import extract_features
from wmse.progress import read_metrics
from wmse.scoring import subsample
from wmse.splits import DatasetSubset, load_run_data, subset
from wmse.train import pretrain


def images(n: int = 30, c: int = 3, h: int = 6, w: int = 5, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def copying_subset(ds, idx):
    """What subset() did before index views: a copy of the pixels (the reference the views must match)."""
    paths = [ds.paths[i] for i in idx.tolist()] if ds.paths is not None else None
    return ImageDataset(images=ds.images[idx], labels=ds.labels[idx], classes=ds.classes, paths=paths, name=ds.name)


def readonly_memmap(tmp_path, x: torch.Tensor) -> torch.Tensor:
    """``x`` written to a file and mapped back read-only, as the decoded-image store exposes it."""
    path = tmp_path / "store.u8"
    x.numpy().tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r", shape=tuple(x.shape))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the given NumPy array is not writable": it is never written
        return torch.from_numpy(mapped)


# ---------------------------------------------------------------------------------------------- views


def test_a_subset_shares_the_pixels_of_its_dataset():
    base = images()
    ds = ImageDataset(base, torch.arange(30) % 3, ["a", "b", "c"], [f"f{i}.jpg" for i in range(30)], "t")
    idx = torch.tensor([29, 3, 3, 7, 0])
    sub = subset(ds, idx)
    assert isinstance(sub, DatasetSubset) and len(sub) == 5 and sub.images.shape == (5, 3, 6, 5)
    assert sub.images.base is base and same_storage(sub.images.base, base)  # no copy
    assert torch.equal(sub.labels, ds.labels[idx]) and sub.paths == ["f29.jpg", "f3.jpg", "f3.jpg", "f7.jpg", "f0.jpg"]
    assert torch.equal(sub.images[:], base[idx])
    inner = subset(sub, torch.tensor([4, 1]))  # a subset of a subset still points into the one base tensor
    assert inner.images.base is base and torch.equal(inner.images.index, torch.tensor([0, 3]))
    assert torch.equal(inner.images[:], base[[0, 3]]) and inner.paths == ["f0.jpg", "f3.jpg"]


def test_a_view_reads_like_the_tensor_it_stands_for():
    base = images()
    idx = torch.tensor([5, 2, 9, 9, 0, 17])
    view, ref = ImageView(base, idx), base[idx]
    assert view.dtype == torch.uint8 and view.dim() == view.ndim == 4 and len(view) == 6 and view.device == base.device
    assert torch.equal(view[1:4], ref[1:4]) and torch.equal(view[-2], ref[-2])
    assert torch.equal(view[torch.tensor([3, 0])], ref[[3, 0]]) and torch.equal(view.gather(torch.tensor([5])), ref[5:])
    out = torch.empty(2, 3, 6, 5, dtype=torch.uint8)
    assert view.gather(torch.tensor([1, 2]), out=out) is out and torch.equal(out, ref[1:3])
    taken = view.take(torch.tensor([2, 2]))
    assert taken.base is base and torch.equal(taken[:], ref[[2, 2]])
    whole = as_view(base)
    assert whole.index is None and as_view(whole) is whole and same_storage(whole[3:7], base)  # a slice, no gather
    with pytest.raises(IndexError):
        ImageView(base, torch.tensor([30]))
    with pytest.raises(ValueError, match="uint8"):
        ImageView(base.float())


def test_views_of_a_readonly_memory_map_gather_and_load(tmp_path):
    base = images(40, seed=1)
    mapped = readonly_memmap(tmp_path, base)
    idx = torch.arange(40).flip(0)[::3]
    view = ImageView(mapped, idx)
    assert same_storage(view.base, mapped) and torch.equal(view[:], base[idx])
    got = [(x, y) for x, y in BatchLoader(view, 4, labels=idx, seed=5).epoch(1)]
    want = [(x, y) for x, y in BatchLoader(base[idx].clone(), 4, labels=idx, seed=5).epoch(1)]
    assert all(torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(got, want)) and len(got) == 3
    assert compute_stats(view, chunk_pixels=60) == float64_stats(base[idx])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_batches_of_a_mapped_view_match_those_of_a_copy(tmp_path):
    """The pinned double buffer is filled straight from the view of a read-only memory map."""
    base = images(64, seed=2)
    idx = torch.arange(63, -1, -2)
    want = list(BatchLoader(base[idx].clone(), 8, labels=idx, seed=4).epoch(1))
    got = list(BatchLoader(ImageView(readonly_memmap(tmp_path, base), idx), 8, labels=idx, seed=4,
                           device="cuda").epoch(1))  # all held before comparing: no buffer overwritten early
    assert len(got) == 4 and all(x2.is_cuda and torch.equal(x1, x2.cpu()) and torch.equal(y1, y2.cpu())
                                 for (x1, y1), (x2, y2) in zip(want, got))


# ------------------------------------------------------------------------------------------ statistics


def float64_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The whole-set pass wmse used before the streamed one: every pixel in float64, E[x^2] - mean^2."""
    a = x.to(torch.float64)
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = a.sum(dim=(0, 2, 3)) / count
    var = (a.square().sum(dim=(0, 2, 3)) / count - mean.square()).clamp_min(0.0)
    return tuple((mean / 255.0).tolist()), tuple((var.sqrt() / 255.0).tolist())


def numpy_stats(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    a = x.numpy().astype(np.float64) / 255.0
    return a.mean(axis=(0, 2, 3)), a.std(axis=(0, 2, 3))


@pytest.mark.parametrize("shape,chunk", [((50, 3, 17, 13), 1), ((50, 3, 17, 13), 1000), ((7, 1, 32, 32), 5000),
                                         ((200, 3, 24, 24), 10**9)])
def test_streamed_stats_equal_the_whole_set_formula_and_a_float64_reference(shape, chunk):
    gen = torch.Generator().manual_seed(sum(shape))
    x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    x[: shape[0] // 2] //= 4  # unequal halves: a chunk-order or weighting mistake shows
    mean, std = compute_stats(x, chunk_pixels=chunk)
    assert (mean, std) == float64_stats(x)  # the former whole-set pass, bit for bit
    ref_mean, ref_std = numpy_stats(x)
    np.testing.assert_allclose(mean, ref_mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(std, ref_std, rtol=0, atol=1e-9)


def test_streamed_stats_of_a_real_folder(tiny_folder):
    ds = load("folder", root=tiny_folder)
    mean, std = compute_stats(ds.images, chunk_pixels=16 * 16 * 10)
    assert (mean, std) == float64_stats(ds.images)
    ref_mean, ref_std = numpy_stats(ds.images)
    np.testing.assert_allclose(mean, ref_mean, atol=1e-6)
    np.testing.assert_allclose(std, ref_std, atol=1e-6)


def test_streamed_stats_read_one_chunk_at_a_time(monkeypatch):
    """Memory O(chunk): no call ever sees more than one chunk's pixels of one channel."""
    seen = []
    real = torch.bincount
    monkeypatch.setattr(torch, "bincount", lambda t, **kw: seen.append(t.numel()) or real(t, **kw))
    x = images(100, h=10, w=10)
    compute_stats(x, chunk_pixels=700)  # 7 images of 100 pixels per chunk
    assert max(seen) == 700 and len(seen) == 3 * 15
    seen.clear()
    compute_stats(x, chunk_pixels=10)  # smaller than one image: one image per chunk
    assert max(seen) == 100
    with pytest.raises(ValueError, match="uint8"):
        compute_stats(x.float())
    with pytest.raises(ValueError, match="non-empty"):
        compute_stats(x[:0])


# ------------------------------------------------------------------------- the run's data and losses


def test_the_held_out_split_and_the_training_set_are_views_of_one_tensor(tiny_folder, make_config, tmp_path):
    data = load_run_data(make_config(tiny_folder, tmp_path), log=lambda m: None)
    base = data.train.images.base
    assert isinstance(data.train, DatasetSubset) and data.eval_train_images.base is base
    assert data.eval_test_images.base is base and len(base) == 128
    kept, held = data.train.images.index, data.eval_test_images.index
    assert sorted(kept.tolist() + held.tolist()) == list(range(128))
    full = load("folder", root=tiny_folder)
    assert torch.equal(data.eval_test_images[:], full.images[held])
    assert torch.equal(data.eval_test_labels, full.labels[held])
    assert (data.mean, data.std) == float64_stats(full.images)  # statistics of the whole training split


def test_subsample_is_a_view_of_the_same_images_as_before():
    base, labels = images(50), torch.arange(50)
    view, y = subsample(ImageView(base, torch.arange(10, 50)), labels[10:], 7, seed=3)
    idx = torch.randperm(40, generator=torch.Generator().manual_seed(3))[:7]  # what subsample drew before
    assert view.base is base and torch.equal(view[:], base[10:][idx]) and torch.equal(y, labels[10:][idx])
    whole, _ = subsample(base, labels, None, seed=3)
    assert whole.base is base and len(whole) == 50


def test_features_of_a_view_equal_those_of_the_copied_images():
    base = images(37, h=8, w=8)
    idx = torch.randperm(37, generator=torch.Generator().manual_seed(0))[:23]
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1))

    def transform(x):
        return x.float() / 255.0

    got = extract_features(net, ImageView(base, idx), transform, batch_size=5, autocast=False)
    want = extract_features(net, base[idx], transform, batch_size=5, autocast=False)
    assert torch.equal(got, want) and got.shape == (23, 4)


def test_views_train_and_evaluate_exactly_as_copies(tiny_folder, make_config, tmp_path, monkeypatch):
    """Same seed, same pixels: the index views give the losses and kNN scores that copied subsets gave."""
    cfg = make_config(tiny_folder, tmp_path / "views", eval_max_train=20)
    views = read_metrics(pretrain(cfg, log=lambda m: None))
    monkeypatch.setattr("wmse.splits.subset", copying_subset)
    copies = read_metrics(pretrain(cfg.replace(out_dir=str(tmp_path / "copies")), log=lambda m: None))

    def pick(records, kind, key):
        return [r[key] for r in records if r["kind"] == kind]

    assert pick(views, "train", "loss") == pick(copies, "train", "loss") and len(pick(views, "train", "loss")) == 6
    knn = pick(views, "eval", "knn_top1")
    assert knn == pick(copies, "eval", "knn_top1") and len(knn) == 2


# ---------------------------------------------------------------------------------------------- memory

# VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS at fork (pytest's, with torch imported).
MEASURE = textwrap.dedent("""
    import json, sys
    from wmse.config import get_preset
    from wmse.splits import load_run_data

    def status_kb(key):
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))

    cfg = get_preset("folder-wmse2").replace(data_dir=sys.argv[1])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from the current RSS: the imports' transient peak does not hide growth
    before = status_kb("VmRSS")
    data = load_run_data(cfg, log=lambda m: None)
    print(json.dumps({"growth": (status_kb("VmHWM") - before) * 1024, "decoded": data.train.images.base.numel()}))
""")


def can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not can_reset_peak_rss(), reason="needs Linux's /proc/self/clear_refs to reset the peak RSS")
def test_the_start_of_training_holds_one_copy_of_the_pixels(tmp_path):
    """Peak RSS of load_run_data (warm decode cache, fresh process) grows by the decoded pixels plus a constant;
    the whole-set float statistics and the copied splits made it grow by ~17x of them (benchmarks/README.md)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "folder"
    for c in range(4):
        (folder / f"c{c}").mkdir(parents=True)
        for i in range(150):  # 600 x 3 x 256 x 256: 112.5 MiB decoded
            small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((256, 256), Image.BILINEAR).save(folder / f"c{c}" / f"{i}.jpg", quality=80)
    decoded = load("folder", root=folder).images.numel()  # fills the decode cache ($WMSE_CACHE of this test)
    run = subprocess.run([sys.executable, "-c", MEASURE, str(folder)], capture_output=True, text=True, check=True)
    measured = json.loads(run.stdout)
    assert measured["decoded"] == decoded == 600 * 3 * 256 * 256
    # The constant: lazy imports, one chunk of the statistics pass, allocator slack. A copied split (kept +
    # held out: one more copy) would exceed it, so would any float pass over the whole set (8 bytes a pixel).
    assert measured["growth"] <= decoded + (64 << 20), measured
