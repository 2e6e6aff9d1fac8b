"""One reader per dataset format, and the registry behind :func:`load`."""

from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .dataset import ImageDataset, data_root
from .download import ensure_archive, missing_error
from .imagefolder import Listing, list_folder, load_listing

__all__ = ["load", "available", "SPLITS"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
STL10_URL = "http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz"
STL10_MD5 = "91f7769df0f17e558f3565bffb0c7dfb"
FASHION_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@dataclass
class _Options:
    """Keyword options every reader receives (each uses what applies to it)."""

    resize: int | None
    download: bool
    cache: bool


# ---------------------------------------------------------------- CIFAR (python pickles)

def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    # The official files use bytes keys; accept str keys too (re-pickled copies).
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _cifar_dir(root: Path, sub: str, marker: str) -> Path:
    """``root/<sub>``, or ``root`` itself when it already is that directory."""
    return root if (root / marker).exists() and not (root / sub).exists() else root / sub


def _read_cifar(root: Path, split: str, opts: _Options, hundred: bool) -> ImageDataset:
    if hundred:
        sub, url, md5 = "cifar-100-python", CIFAR100_URL, CIFAR100_MD5
        batches = {"train": ["train"], "test": ["test"]}[split]
        meta_name, names_key, label_key = "meta", "fine_label_names", "fine_labels"
    else:
        sub, url, md5 = "cifar-10-batches-py", CIFAR10_URL, CIFAR10_MD5
        batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}[split]
        meta_name, names_key, label_key = "batches.meta", "label_names", "labels"
    folder = _cifar_dir(root, sub, meta_name)
    expected = [folder / b for b in batches] + [folder / meta_name]
    ensure_archive("cifar100" if hundred else "cifar10", expected, url, md5, root, opts.download)
    data, labels = [], []
    for b in batches:
        entry = _unpickle(folder / b)
        data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[label_key])
    classes = [c.decode() if isinstance(c, bytes) else c for c in _unpickle(folder / meta_name)[names_key]]
    return ImageDataset(torch.from_numpy(np.concatenate(data)).contiguous(),
                        torch.tensor(labels, dtype=torch.int64), classes, None,
                        f"{'cifar100' if hundred else 'cifar10'}/{split}")


# ---------------------------------------------------------------- STL-10 (binary)

def _stl_images(path: Path) -> torch.Tensor:
    """STL-10 stores each image as 3 x 96 x 96 in column-major order: transpose H and W back."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise ValueError(f"{path}: size {raw.size} is not a multiple of 3*96*96; the file is truncated")
    return torch.from_numpy(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())


def _read_stl10(root: Path, split: str, opts: _Options) -> ImageDataset:
    folder = _cifar_dir(root, "stl10_binary", "class_names.txt")
    parts = {"train": ["train"], "test": ["test"], "unlabeled": ["unlabeled"],
             "train+unlabeled": ["train", "unlabeled"]}[split]
    expected = [folder / f"{p}_X.bin" for p in parts] + [folder / f"{p}_y.bin" for p in parts if p != "unlabeled"]
    expected.append(folder / "class_names.txt")
    ensure_archive("stl10", expected, STL10_URL, STL10_MD5, root, opts.download)
    images, labels = [], []
    for p in parts:
        x = _stl_images(folder / f"{p}_X.bin")
        images.append(x)
        if p == "unlabeled":
            labels.append(torch.full((x.shape[0],), -1, dtype=torch.int64))
        else:
            y = torch.from_numpy(np.fromfile(folder / f"{p}_y.bin", dtype=np.uint8).astype(np.int64)) - 1
            if y.numel() != x.shape[0]:
                raise ValueError(f"stl10: {p}_y.bin has {y.numel()} labels for {x.shape[0]} images")
            labels.append(y)
    classes = [c for c in (folder / "class_names.txt").read_text().splitlines() if c.strip()]
    return ImageDataset(torch.cat(images).contiguous(), torch.cat(labels), classes, None, f"stl10/{split}")


# ---------------------------------------------------------------- Fashion-MNIST (IDX .gz)

def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (gzip or plain): magic 0x0000 0x08 <ndim>, big-endian int32 dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX uint8 file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {tuple(dims)} but holds {data.size} bytes; the file is truncated")
    return data.reshape(tuple(int(d) for d in dims))


def _find_idx(dirs: list[Path], stem: str) -> Path | None:
    for d in dirs:
        for name in (f"{stem}.gz", stem):
            if (d / name).exists():
                return d / name
    return None


def _read_fashion_mnist(root: Path | None, split: str, opts: _Options) -> ImageDataset:
    prefix = {"train": "train", "test": "t10k"}[split]
    bases = [root] if root is not None else [data_root(None)]
    dirs = [d for b in bases for d in (b, b / "fashion-mnist", b / "FashionMNIST" / "raw")]
    if root is None:
        dirs.append(FASHION_SYSTEM_DIR)  # Debian's dataset-fashion-mnist package
    img_path = _find_idx(dirs, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find_idx(dirs, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lbl_path is None:
        expected = [dirs[0] / f"{prefix}-images-idx3-ubyte.gz", dirs[0] / f"{prefix}-labels-idx1-ubyte.gz"]
        raise missing_error("fashion_mnist", expected, FASHION_URL,
                            "or install Debian's dataset-fashion-mnist package")
    images = torch.from_numpy(_read_idx(img_path).copy()).unsqueeze(1).contiguous()
    labels = torch.from_numpy(_read_idx(lbl_path).astype(np.int64))
    if labels.numel() != images.shape[0]:
        raise ValueError(f"fashion_mnist: {lbl_path} has {labels.numel()} labels for {images.shape[0]} images")
    return ImageDataset(images, labels, list(FASHION_CLASSES), None, f"fashion_mnist/{split}")


# ---------------------------------------------------------------- image folders

def _from_listing(folder: Path, listing: Listing, opts: _Options, name: str) -> ImageDataset:
    images, labels, paths = load_listing(folder, listing, opts.resize, opts.cache, what=name)
    return ImageDataset(images, labels, listing.classes, paths, name)


def _read_tiny_imagenet(root: Path, split: str, opts: _Options) -> ImageDataset:
    folder = _cifar_dir(root, "tiny-imagenet-200", "wnids.txt")
    wnids_file = folder / "wnids.txt"
    if not wnids_file.exists():
        raise missing_error("tiny_imagenet", [wnids_file, folder / split], "http://cs231n.stanford.edu/tiny-imagenet-200.zip")
    classes = sorted(w.strip() for w in wnids_file.read_text().split() if w.strip())
    index = {w: i for i, w in enumerate(classes)}
    if split == "train":
        files, labels = [], []
        for w in classes:
            found = sorted(str(p) for p in (folder / "train" / w / "images").glob("*") if p.suffix.lower() in
                           (".jpeg", ".jpg", ".png"))
            files.extend(found)
            labels.extend([index[w]] * len(found))
        listing = Listing(files, labels, classes)
    elif split == "val":
        ann = folder / "val" / "val_annotations.txt"
        if not ann.exists():
            raise missing_error("tiny_imagenet", [ann], None)
        rows = [line.split("\t") for line in ann.read_text().splitlines() if line.strip()]
        unknown = {r[1] for r in rows if r[1] not in index}
        if unknown:
            raise ValueError(f"tiny_imagenet: {ann} names classes not in wnids.txt: {sorted(unknown)[:3]}")
        rows.sort(key=lambda r: r[0])
        listing = Listing([str(folder / "val" / "images" / r[0]) for r in rows], [index[r[1]] for r in rows], classes)
    else:  # test: unlabeled
        found = sorted(str(p) for p in (folder / "test" / "images").glob("*") if not p.name.startswith("."))
        listing = Listing(found, [-1] * len(found), classes)
    if not listing.files:
        raise FileNotFoundError(f"tiny_imagenet: no image under {folder / split}; check the tiny-imagenet-200 layout")
    return _from_listing(folder, listing, opts, f"tiny_imagenet/{split}")


def _read_imagenet100(root: Path, split: str, opts: _Options) -> ImageDataset:
    folder = root / split
    if not folder.is_dir() and (root / "imagenet100" / split).is_dir():
        folder = root / "imagenet100" / split
    if not folder.is_dir():
        raise missing_error("imagenet100", [root / "train", root / "val"], None,
                            "ImageNet-100 is an ImageFolder tree root/train/<class>/*.JPEG and root/val/<class>/*.JPEG")
    listing = list_folder(folder)
    if not listing.classes:
        raise ValueError(f"imagenet100: {folder} must hold class subfolders")
    return _from_listing(folder, listing, opts, f"imagenet100/{split}")


def _read_folder(root: Path | None, split: str, opts: _Options) -> ImageDataset:
    if root is None:
        raise ValueError("load('folder') needs root=<path to an image folder> (class subfolders or flat images)")
    folder = Path(root).expanduser()
    return _from_listing(folder, list_folder(folder), opts, f"folder:{folder.name}")


# ---------------------------------------------------------------- registry

@dataclass(frozen=True)
class _Reader:
    fn: Callable[..., ImageDataset]
    splits: tuple[str, ...]
    raw_root: bool = False  # the reader resolves root itself (None allowed)


_READERS: dict[str, _Reader] = {
    "cifar10": _Reader(lambda r, s, o: _read_cifar(r, s, o, hundred=False), ("train", "test")),
    "cifar100": _Reader(lambda r, s, o: _read_cifar(r, s, o, hundred=True), ("train", "test")),
    "stl10": _Reader(_read_stl10, ("train", "test", "unlabeled", "train+unlabeled")),
    "tiny_imagenet": _Reader(_read_tiny_imagenet, ("train", "val", "test")),
    "imagenet100": _Reader(lambda r, s, o: _read_imagenet100(r, s, o), ("train", "val")),
    "folder": _Reader(_read_folder, ("train",), raw_root=True),
    "fashion_mnist": _Reader(_read_fashion_mnist, ("train", "test"), raw_root=True),
}
SPLITS: dict[str, tuple[str, ...]] = {name: r.splits for name, r in _READERS.items()}


def available() -> list[str]:
    """Names accepted by :func:`load`."""
    return sorted(_READERS)


def load(name: str, split: str = "train", root: str | Path | None = None, *, resize: int | None = None,
         download: bool = True, cache: bool = True) -> ImageDataset:
    """Load a whole split as uint8 tensors.

    Args:
        name: one of :func:`available`.
        split: one of ``SPLITS[name]`` (``folder`` has only "train": the folder itself).
        root: data directory (default ``$WMSE_DATA``, else ``~/.cache/wmse``); for ``folder`` the
            image folder itself (required); for ``imagenet100`` the directory holding train/ and val/.
        resize: image folders only: resize the shorter side and center-crop to ``resize`` x ``resize``.
        download: CIFAR / STL-10: fetch and verify the official archive when files are missing.
        cache: image folders: read/write the decoded-tensor cache (``$WMSE_CACHE``).
    Returns:
        An :class:`ImageDataset` with images uint8 ``(N, C, H, W)``.
    """
    key = name.lower().replace("-", "_")
    if key not in _READERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(available())}")
    reader = _READERS[key]
    if split not in reader.splits:
        raise ValueError(f"dataset {key!r} has no split {split!r}; choose one of: {', '.join(reader.splits)}")
    if resize is not None and key not in ("folder", "imagenet100", "tiny_imagenet"):
        raise ValueError(f"resize= applies to image folders (folder, imagenet100, tiny_imagenet), not {key!r}")
    opts = _Options(resize=resize, download=download, cache=cache)
    resolved = (Path(root).expanduser() if root is not None else None) if reader.raw_root else data_root(root)
    if key == "imagenet100" and root is None:
        resolved = resolved / "imagenet100"
    return reader.fn(resolved, split, opts)
