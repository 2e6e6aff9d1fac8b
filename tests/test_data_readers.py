"""Readers on small files written here in each dataset's real format, checked against torchvision's
own readers (or PIL / a hand parse) as the independent reference; real data when present."""

from __future__ import annotations

import gzip
import hashlib
import io
import pickle
import shutil
import struct
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import wmse.data.download as download_mod
import wmse.data.readers as readers
from wmse.data import (SPLITS, ImageDataset, available, compute_stats, dataset_stats, load,
                       split_per_class)

REAL_CIFAR = Path("/work/shared/datasets/cifar10-jpeg/train")
REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Every test gets its own cache and data root, and no network."""
    monkeypatch.setenv("WMSE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WMSE_DATA", str(tmp_path / "data_root_unused"))

    def no_network(url, dest):
        raise urllib.error.URLError("network is unreachable (test)")

    monkeypatch.setattr(download_mod, "fetch", no_network)


def real_images(n: int, seed: int = 0) -> np.ndarray:
    """n real CIFAR-10 images (n, 32, 32, 3) uint8 when the folder is here, else seeded noise."""
    rng = np.random.default_rng(seed)
    if not REAL_CIFAR.is_dir():
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    classes = sorted(p.name for p in REAL_CIFAR.iterdir() if p.is_dir())
    # Files are <class>/0000.jpg .. 4999.jpg: name them directly (listing 50,000 files is slow).
    pick = rng.choice(len(classes) * 5000, size=n, replace=False)
    files = [REAL_CIFAR / classes[k % len(classes)] / f"{k // len(classes):04d}.jpg" for k in pick]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


class _Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 byte strings (SHORT_BINSTRING / BINSTRING), as in the
    official CIFAR files: ``pickle.load(encoding="bytes")`` returns them as bytes (numpy arrays
    included), ``encoding="latin1"`` (torchvision) as str."""

    dispatch = dict(pickle._Pickler.dispatch)

    def _save_py2_string(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else bytes(obj)
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = _save_py2_string
    dispatch[bytes] = _save_py2_string


def py2_pickle(obj: dict) -> bytes:
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


# ------------------------------------------------------------------ CIFAR pickles

def write_cifar10(root: Path, per_batch: int = 7) -> tuple[np.ndarray, list[int], np.ndarray, list[int]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    imgs = real_images(per_batch * 6)
    labels = [int(v) for v in np.random.default_rng(1).integers(0, 10, per_batch * 6)]
    for b in range(6):
        sl = slice(b * per_batch, (b + 1) * per_batch)
        # Official layout: each row is 1024 R, then G, then B values, each plane row-major.
        entry = {"batch_label": "x", "labels": labels[sl], "filenames": ["f"] * per_batch,
                 "data": imgs[sl].transpose(0, 3, 1, 2).reshape(per_batch, 3072)}
        name = f"data_batch_{b + 1}" if b < 5 else "test_batch"
        (folder / name).write_bytes(py2_pickle(entry))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(py2_pickle({"label_names": names, "num_vis": 3072}))
    n_train = per_batch * 5
    return imgs[:n_train], labels[:n_train], imgs[n_train:], labels[n_train:]


def torchvision_cifar(monkeypatch, cls, root: Path, train: bool):
    import torchvision.datasets.cifar as tv_cifar
    # Our files are not the official ones, so their md5s differ: skip torchvision's checks only.
    monkeypatch.setattr(cls, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *a, **k: True)
    return cls(str(root), train=train, download=False)


def test_cifar10_matches_torchvision_reader(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10
    write_cifar10(tmp_path)
    for split, train in (("train", True), ("test", False)):
        ds = load("cifar10", split, root=tmp_path)
        ref = torchvision_cifar(monkeypatch, CIFAR10, tmp_path, train)
        assert ds.images.dtype == torch.uint8 and ds.images.shape == (len(ref.data), 3, 32, 32)
        assert ds.images.is_contiguous()
        np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), ref.data)
        assert ds.labels.tolist() == list(ref.targets) and ds.labels.dtype == torch.int64
        assert ds.classes == ref.classes and ds.paths is None and len(ds) == len(ref.data)


def test_cifar100_matches_torchvision_reader(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR100
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    imgs = real_images(12)
    fine = [int(v) for v in np.random.default_rng(2).integers(0, 100, 12)]
    for name, sl in (("train", slice(0, 8)), ("test", slice(8, 12))):
        entry = {"data": imgs[sl].transpose(0, 3, 1, 2).reshape(-1, 3072), "fine_labels": fine[sl],
                 "coarse_labels": [0] * (sl.stop - sl.start), "filenames": ["f"] * (sl.stop - sl.start)}
        (folder / name).write_bytes(py2_pickle(entry))
    names = [f"class{i:03d}" for i in range(100)]
    (folder / "meta").write_bytes(py2_pickle({"fine_label_names": names, "coarse_label_names": []}))
    for split, train in (("train", True), ("test", False)):
        ds = load("cifar100", split, root=tmp_path)
        ref = torchvision_cifar(monkeypatch, CIFAR100, tmp_path, train)
        np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), ref.data)
        assert ds.labels.tolist() == list(ref.targets) and ds.classes == ref.classes


def test_missing_cifar_without_network_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load("cifar10", "train", root=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "data_batch_1" in msg and readers.CIFAR10_URL in msg and "download failed" in msg
    with pytest.raises(FileNotFoundError, match="download=False"):
        load("cifar100", "test", root=tmp_path, download=False)
    with pytest.raises(FileNotFoundError, match="stl10_binary.tar.gz"):
        load("stl10", "train", root=tmp_path)


def _tar_gz(src_root: Path, member: str, dest: Path) -> str:
    with tarfile.open(dest, "w:gz") as tar:
        tar.add(src_root / member, arcname=member)
    return hashlib.md5(dest.read_bytes()).hexdigest()


def test_download_verifies_md5_then_extracts(tmp_path, monkeypatch):
    staging, served = tmp_path / "staging", tmp_path / "served.tar.gz"
    train_imgs, train_labels, _, _ = write_cifar10(staging, per_batch=3)
    md5 = _tar_gz(staging, "cifar-10-batches-py", served)
    calls = []

    def fake_fetch(url, dest):
        calls.append(url)
        shutil.copyfile(served, dest)

    monkeypatch.setattr(download_mod, "fetch", fake_fetch)
    root = tmp_path / "root"
    # Wrong checksum (the real one): refused, nothing extracted, no partial archive left.
    with pytest.raises(ValueError, match="md5"):
        load("cifar10", "train", root=root)
    assert not (root / "cifar-10-batches-py").exists()
    assert not list(root.glob(".download-*")) and not (root / "cifar-10-python.tar.gz").exists()
    monkeypatch.setattr(readers, "CIFAR10_MD5", md5)
    ds = load("cifar10", "train", root=root)
    assert calls == [readers.CIFAR10_URL] * 2
    np.testing.assert_array_equal(ds.images.permute(0, 2, 3, 1).numpy(), train_imgs)
    assert ds.labels.tolist() == train_labels
    load("cifar10", "test", root=root)  # files present now: no third download
    assert len(calls) == 2


# ------------------------------------------------------------------ STL-10 binary

def test_stl10_matches_torchvision_reader(tmp_path, monkeypatch):
    from torchvision.datasets import STL10
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(3)
    base = np.repeat(np.repeat(real_images(15), 3, axis=1), 3, axis=2)  # (15, 96, 96, 3)
    imgs = base.transpose(0, 3, 1, 2)  # (15, 3, 96, 96)
    parts = {"train": imgs[:6], "test": imgs[6:10], "unlabeled": imgs[10:]}
    for name, x in parts.items():
        # The official binary stores every channel column-major.
        (folder / f"{name}_X.bin").write_bytes(np.ascontiguousarray(x.transpose(0, 1, 3, 2)).tobytes())
        if name != "unlabeled":
            (folder / f"{name}_y.bin").write_bytes(rng.integers(1, 11, len(x)).astype(np.uint8).tobytes())
    classes = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
    (folder / "class_names.txt").write_text("\n".join(classes) + "\n")
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)
    for split in SPLITS["stl10"]:
        ds = load("stl10", split, root=tmp_path)
        ref = STL10(str(tmp_path), split=split, download=False)
        np.testing.assert_array_equal(ds.images.numpy(), ref.data)
        assert ds.labels.tolist() == [int(v) for v in ref.labels]
        assert ds.classes == classes
    np.testing.assert_array_equal(load("stl10", "train", root=tmp_path).images.numpy(), parts["train"])
    assert load("stl10", "unlabeled", root=tmp_path).labels.eq(-1).all()


# ------------------------------------------------------------------ Fashion-MNIST IDX

def _idx_bytes(arr: np.ndarray) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def test_fashion_mnist_idx_gz(tmp_path):
    from torchvision.datasets.mnist import read_image_file, read_label_file
    rng = np.random.default_rng(4)
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for prefix, n in (("train", 9), ("t10k", 4)):
        imgs, labels = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        for stem, arr in ((f"{prefix}-images-idx3-ubyte", imgs), (f"{prefix}-labels-idx1-ubyte", labels)):
            (folder / f"{stem}.gz").write_bytes(gzip.compress(_idx_bytes(arr)))
            (tmp_path / stem).write_bytes(_idx_bytes(arr))  # uncompressed copy for torchvision's parser
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ds = load("fashion_mnist", split, root=tmp_path)
        ref_x = read_image_file(str(tmp_path / f"{prefix}-images-idx3-ubyte"))
        ref_y = read_label_file(str(tmp_path / f"{prefix}-labels-idx1-ubyte"))
        assert ds.images.shape == (ref_x.shape[0], 1, 28, 28)
        assert torch.equal(ds.images[:, 0], ref_x) and torch.equal(ds.labels, ref_y.long())
        assert len(ds.classes) == 10


def test_fashion_mnist_truncated_and_missing(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    good = _idx_bytes(np.zeros((3, 28, 28)))
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(good[:-10]))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(np.zeros(3))))
    with pytest.raises(ValueError, match="truncated"):
        load("fashion_mnist", "train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz"):
        load("fashion_mnist", "test", root=tmp_path)


@pytest.mark.skipif(not (REAL_FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_found_without_root(tmp_path):
    from torchvision.datasets.mnist import read_label_file
    ds = load("fashion_mnist", "train")  # no root: WMSE_DATA is empty, falls back to the Debian path
    assert ds.images.shape == (60000, 1, 28, 28) and ds.labels.bincount().tolist() == [6000] * 10
    mean, std = compute_stats(ds.images)
    ref_mean, ref_std = dataset_stats("fashion_mnist")
    assert abs(mean[0] - ref_mean[0]) < 1e-3 and abs(std[0] - ref_std[0]) < 1e-3
    raw = tmp_path / "t10k-labels"
    raw.write_bytes(gzip.decompress((REAL_FASHION / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    test = load("fashion_mnist", "test")
    assert len(test) == 10000 and torch.equal(test.labels, read_label_file(str(raw)).long())


# ------------------------------------------------------------------ image folders

def _save(path: Path, arr: np.ndarray, fmt: str = "PNG") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt)


def test_folder_tree_with_corrupt_file_matches_imagefolder(tmp_path):
    from torchvision.datasets import ImageFolder
    imgs = real_images(6)
    root = tmp_path / "tree"
    for i, arr in enumerate(imgs):
        _save(root / ("dog" if i % 2 else "cat") / f"{i}.png", arr)
    (root / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    buf = io.BytesIO()
    Image.fromarray(imgs[0]).save(buf, format="JPEG")
    (root / "dog" / "truncated.jpg").write_bytes(buf.getvalue()[:200])
    (root / "empty_class").mkdir()
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable .*broken\.jpg.*truncated\.jpg"):
        ds = load("folder", root=root)
    shutil.rmtree(root / "empty_class")  # torchvision's ImageFolder refuses empty class folders
    ref = ImageFolder(str(root), is_valid_file=lambda p: "broken" not in p and "truncated" not in p)
    assert ds.classes == ref.classes == ["cat", "dog"] and len(ds) == 6 and len(ds.paths) == 6
    assert [p for p, _ in ref.samples] == ds.paths
    assert [t for _, t in ref.samples] == ds.labels.tolist()
    for path, img in zip(ds.paths, ds.images):
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), np.asarray(Image.open(path).convert("RGB")))


def test_flat_folder_is_unlabeled_and_grayscale_stays_one_channel(tmp_path):
    rng = np.random.default_rng(5)
    for i in range(4):
        _save(tmp_path / "flat" / f"{i}.png", rng.integers(0, 256, (20, 20), dtype=np.uint8))
    ds = load("folder", root=tmp_path / "flat")
    assert ds.images.shape == (4, 1, 20, 20) and ds.labels.eq(-1).all() and ds.classes == []
    np.testing.assert_array_equal(ds.images[2, 0].numpy(), np.asarray(Image.open(ds.paths[2])))


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no image"):
        load("folder", root=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load("folder", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="needs root"):
        load("folder")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="none of the 1 image files"):
        load("folder", root=tmp_path / "bad")


def test_folder_mixed_sizes_need_resize_which_matches_torchvision(tmp_path):
    import torchvision.transforms.v2 as T
    rng = np.random.default_rng(6)
    sizes = [(40, 24), (24, 40), (33, 50), (16, 16)]
    for i, (h, w) in enumerate(sizes):
        _save(tmp_path / "mixed" / f"{i}.png", rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="resize"):
        load("folder", root=tmp_path / "mixed")
    ds = load("folder", root=tmp_path / "mixed", resize=16)
    ref_tf = T.Compose([T.Resize(16, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(16)])
    for path, img in zip(ds.paths, ds.images):
        ref = np.asarray(ref_tf(Image.open(path).convert("RGB")))
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), ref)


def test_tiny_imagenet_layout(tmp_path):
    from torchvision.datasets import ImageFolder
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # unsorted on purpose: classes are sorted
    (base).mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    imgs = real_images(12)
    k = 0
    for w in wnids:
        for j in range(2):
            _save(base / "train" / w / "images" / f"{w}_{j}.JPEG", imgs[k], "JPEG")
            k += 1
    rows = []
    for j, w in enumerate(["n03", "n01", "n03", "n02"]):
        _save(base / "val" / "images" / f"val_{j}.JPEG", imgs[k], "JPEG")
        rows.append(f"val_{j}.JPEG\t{w}\t0\t0\t31\t31")
        k += 1
    (base / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    for j in range(2):
        _save(base / "test" / "images" / f"test_{j}.JPEG", imgs[k], "JPEG")
        k += 1
    train = load("tiny_imagenet", "train", root=tmp_path)
    ref = ImageFolder(str(base / "train"))
    assert train.classes == ref.classes == ["n01", "n02", "n03"]
    assert train.labels.tolist() == [t for _, t in ref.samples]
    for (path, _), img in zip(ref.samples, train.images):
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), np.asarray(Image.open(path).convert("RGB")))
    val = load("tiny_imagenet", "val", root=tmp_path)
    expected = {f"val_{j}.JPEG": ["n01", "n02", "n03"].index(w) for j, w in enumerate(["n03", "n01", "n03", "n02"])}
    assert {Path(p).name: int(t) for p, t in zip(val.paths, val.labels)} == expected
    test = load("tiny_imagenet", "test", root=base)  # root may also be the tiny-imagenet-200 folder itself
    assert len(test) == 2 and test.labels.eq(-1).all()


def test_imagenet100_train_val_tree(tmp_path):
    rng = np.random.default_rng(7)
    for split in ("train", "val"):
        for c in ("n1", "n2"):
            for j in range(2):
                _save(tmp_path / split / c / f"{j}.JPEG", rng.integers(0, 256, (30 + j, 40, 3), dtype=np.uint8), "JPEG")
    ds = load("imagenet100", "val", root=tmp_path, resize=24)
    assert ds.images.shape == (4, 3, 24, 24) and ds.classes == ["n1", "n2"] and ds.labels.tolist() == [0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match="imagenet100"):
        load("imagenet100", "train", root=tmp_path / "nothing")


# ------------------------------------------------------------------ registry, stats, splits

def test_registry_errors_list_the_choices():
    assert available() == sorted(["cifar10", "cifar100", "stl10", "tiny_imagenet", "imagenet100", "folder",
                                  "fashion_mnist"])
    with pytest.raises(ValueError, match="cifar10, cifar100, fashion_mnist"):
        load("mnist")
    with pytest.raises(ValueError, match="train, test, unlabeled, train\\+unlabeled"):
        load("stl10", "validation")
    with pytest.raises(ValueError, match="resize"):
        load("cifar10", resize=16)
    with pytest.raises(ValueError, match="compute_stats"):
        dataset_stats("folder")
    with pytest.raises(ValueError, match="unknown dataset"):
        dataset_stats("mnist")
    for name in available():
        if name != "folder":
            mean, std = dataset_stats(name)
            assert len(mean) == len(std) in (1, 3) and all(0 < s < 1 for s in std)


def test_one_registry_entry_per_dataset_drives_load_splits_stats_and_resize(tmp_path):
    from wmse.data import DATASETS, DatasetSpec, register_dataset
    assert sorted(DATASETS) == available() and set(SPLITS) == set(DATASETS)
    for name, spec in DATASETS.items():
        assert isinstance(spec, DatasetSpec) and spec.name == name and SPLITS[name] == spec.splits
        assert (spec.stats is None) == (name == "folder")
    assert {n for n, s in DATASETS.items() if s.image_files} == {"folder", "imagenet100", "tiny_imagenet"}
    seen = []

    @register_dataset("toy_set", ("train", "holdout"), ((0.5,), (0.25,)), image_files=True)
    def _read_toy(root, split, opts):
        seen.append((root, split, opts.resize, opts.cache))
        return ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64), ["x"],
                            None, f"toy_set/{split}")

    try:
        assert "toy_set" in available() and SPLITS["toy_set"] == ("train", "holdout")
        assert dataset_stats("Toy-Set") == ((0.5,), (0.25,))
        assert len(load("toy_set", "holdout", root=tmp_path, resize=3, cache=False)) == 2
        assert seen == [(tmp_path, "holdout", 3, False)]
        with pytest.raises(ValueError, match="no split 'test'.*train, holdout"):
            load("toy_set", "test")
        with pytest.raises(ValueError, match="already registered"):
            register_dataset("toy_set", ("train",))(lambda r, s, o: None)  # a name is defined once
    finally:
        DATASETS.remove("toy_set")
    assert "toy_set" not in SPLITS and "toy_set" not in available()


def test_data_errors_name_the_cli_flags(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load("cifar10", "train", root=tmp_path, download=False)
    assert "--data_dir" in str(err.value) and "root=" in str(err.value) and "WMSE_DATA" in str(err.value)
    with pytest.raises(FileNotFoundError, match="--data_dir"):
        load("folder", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="--data_dir"):
        load("folder")
    rng = np.random.default_rng(8)
    for i, hw in enumerate([(8, 8), (9, 8)]):
        _save(tmp_path / "mixed" / f"{i}.png", rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"--resize PIXELS \(resize= in Python\)") as err:
        load("folder", root=tmp_path / "mixed")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="--resize"):
        load("cifar10", resize=16)


def test_image_dataset_validates():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64), [], None, "x")
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), [], None, "x")


def test_compute_stats_matches_float64_numpy():
    x = torch.randint(0, 256, (37, 3, 5, 7), dtype=torch.uint8)
    mean, std = compute_stats(x, chunk_pixels=10 * 5 * 7)
    ref = x.numpy().astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, ref.mean(axis=(0, 2, 3)), rtol=1e-10)
    np.testing.assert_allclose(std, ref.std(axis=(0, 2, 3)), rtol=1e-8)


def test_split_per_class_is_stratified_seeded_partition():
    labels = torch.tensor([0] * 10 + [1] * 20 + [2] * 30)[torch.randperm(60, generator=torch.Generator().manual_seed(0))]
    tr, te = split_per_class(labels, 0.2, seed=3)
    assert torch.equal(torch.cat([tr, te]).sort().values, torch.arange(60))
    assert labels[te].bincount().tolist() == [2, 4, 6]
    tr2, te2 = split_per_class(labels, 0.2, seed=3)
    assert torch.equal(te, te2) and torch.equal(tr, tr2)
    assert not torch.equal(split_per_class(labels, 0.2, seed=4)[1], te)
    assert labels[split_per_class(labels, 3, seed=0)[1]].bincount().tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="cannot hold out"):
        split_per_class(labels, 10, seed=0)
    with pytest.raises(ValueError, match="-1"):
        split_per_class(torch.tensor([0, -1, 1]), 0.5, seed=0)
    with pytest.raises(ValueError, match="fraction"):
        split_per_class(labels, 1.5, seed=0)


# ------------------------------------------------------------------ the real CIFAR-10 folder

@pytest.mark.skipif(not REAL_CIFAR.is_dir(), reason=f"{REAL_CIFAR} not present")
def test_real_cifar10_folder_listing_and_one_class_decoded():
    from wmse.data.imagefolder import list_folder
    listing = list_folder(REAL_CIFAR)  # all 50,000 files listed (decoding them all is benchmarked, not tested)
    assert listing.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck"]
    assert np.bincount(listing.labels).tolist() == [5000] * 10
    cat = load("folder", root=REAL_CIFAR / "cat")  # a flat folder of 5,000 real JPEGs
    assert cat.images.shape == (5000, 3, 32, 32) and cat.labels.eq(-1).all()
    np.testing.assert_array_equal(cat.images[123].permute(1, 2, 0).numpy(),
                                  np.asarray(Image.open(cat.paths[123]).convert("RGB")))


@pytest.mark.skipif(not REAL_CIFAR.is_dir(), reason=f"{REAL_CIFAR} not present")
def test_real_cifar10_statistics_close_to_official():
    imgs = torch.from_numpy(real_images(3000, seed=9)).permute(0, 3, 1, 2)
    mean, std = compute_stats(imgs)
    ref_mean, ref_std = dataset_stats("cifar10")
    # 3,000 random images of the JPEG re-encoding vs the official 50,000-image values.
    np.testing.assert_allclose(mean, ref_mean, atol=0.01)
    np.testing.assert_allclose(std, ref_std, atol=0.01)
