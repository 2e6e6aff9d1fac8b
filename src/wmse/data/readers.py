"""One reader per dataset format, each registered in :data:`~wmse.data.DATASETS` right above it, and :func:`load`.

Adding a dataset is one decorated function here (or in any module imported before use)::

    @register_dataset("my_set", ("train", "test"), ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    def _read_my_set(root: Path, split: str, opts: ReadOptions) -> ImageDataset: ...

``load``, ``available``, ``SPLITS``, ``dataset_stats`` and the config's dataset check all read that entry.
"""

from __future__ import annotations

import gzip
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .archive import ARCHIVE_SUFFIXES, Archive, is_archive, list_members, load_archive
from .dataset import (DATASETS, SPLITS, ImageDataset, ReadOptions, data_root, dataset_spec, given_root,
                      register_dataset, subdir_root)
from .download import ensure_archive, missing_error
from .imagefolder import Listing, list_folder, load_listing

__all__ = ["load", "available", "SPLITS", "DATASETS"]

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
TINY_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


# ---------------------------------------------------------------- CIFAR (python pickles)

def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    # The official files use bytes keys; accept str keys too (re-pickled copies).
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


def _find_dataset_dir(root: Path, sub: str, marker: str) -> Path:
    """``root/<sub>``, or ``root`` itself when it already is that directory."""
    return root if (root / marker).exists() and not (root / sub).exists() else root / sub


def _read_cifar(root: Path, split: str, opts: ReadOptions, hundred: bool) -> ImageDataset:
    if hundred:
        sub, url, md5 = "cifar-100-python", CIFAR100_URL, CIFAR100_MD5
        batches = {"train": ["train"], "test": ["test"]}[split]
        meta_name, names_key, label_key = "meta", "fine_label_names", "fine_labels"
    else:
        sub, url, md5 = "cifar-10-batches-py", CIFAR10_URL, CIFAR10_MD5
        batches = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}[split]
        meta_name, names_key, label_key = "batches.meta", "label_names", "labels"
    folder = _find_dataset_dir(root, sub, meta_name)
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


# Mean / std per channel in [0, 1] units: CIFAR, STL-10 and Tiny ImageNet use the values of the official
# W-MSE code; ImageNet-100 the usual ImageNet values; Fashion-MNIST was computed on its training split
# (tests/test_data_readers.py re-checks it and CIFAR-10 against compute_stats).

@register_dataset("cifar10", ("train", "test"), ((0.4914, 0.4822, 0.4465), (0.2470, 0.2430, 0.2610)))
def _read_cifar10(root: Path, split: str, opts: ReadOptions) -> ImageDataset:
    return _read_cifar(root, split, opts, hundred=False)


@register_dataset("cifar100", ("train", "test"), ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)))
def _read_cifar100(root: Path, split: str, opts: ReadOptions) -> ImageDataset:
    return _read_cifar(root, split, opts, hundred=True)


# ---------------------------------------------------------------- STL-10 (binary)

def _stl_images(path: Path) -> torch.Tensor:
    """STL-10 stores each image as 3 x 96 x 96 in column-major order: transpose H and W back."""
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise ValueError(f"{path}: size {raw.size} is not a multiple of 3*96*96; the file is truncated")
    return torch.from_numpy(raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2).copy())


@register_dataset("stl10", ("train", "test", "unlabeled", "train+unlabeled"),
                  ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27)))
def _read_stl10(root: Path, split: str, opts: ReadOptions) -> ImageDataset:
    folder = _find_dataset_dir(root, "stl10_binary", "class_names.txt")
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


@register_dataset("fashion_mnist", ("train", "test"), ((0.2860,), (0.3530,)), resolve_root=given_root)
def _read_fashion_mnist(root: Path | None, split: str, opts: ReadOptions) -> ImageDataset:
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

def _from_listing(folder: Path, listing: Listing, opts: ReadOptions, name: str) -> ImageDataset:
    images, labels, paths = load_listing(folder, listing, opts.resize, opts.cache, what=name)
    return ImageDataset(images, labels, listing.classes, paths, name)


def _from_archive(archive: Path, select: Callable[[Archive], Listing], kind: str, opts: ReadOptions,
                  name: str) -> ImageDataset:
    images, labels, paths, classes = load_archive(archive, select, kind=kind, resize=opts.resize, cache=opts.cache,
                                                  what=name)
    return ImageDataset(images, labels, classes, paths, name)


_TINY_EXTS = (".jpeg", ".jpg", ".png")


def _tiny_listing(split: str, read_text: Callable[[str], str | None], files_in: Callable[[str], list[str]],
                  where: str) -> Listing:
    """Tiny ImageNet's layout as a Listing of paths relative to the tiny-imagenet-200 folder.

    ``read_text(rel)``: a text file's content or None; ``files_in(rel_dir)``: the file names directly in a folder.
    """
    wnids = read_text("wnids.txt")
    if wnids is None:
        raise missing_error("tiny_imagenet", [Path(where) / "wnids.txt", Path(where) / split], TINY_URL,
                            "or put tiny-imagenet-200.zip itself there")
    classes = sorted(w.strip() for w in wnids.split() if w.strip())
    index = {w: i for i, w in enumerate(classes)}
    if split == "train":
        files, labels = [], []
        for w in classes:
            found = sorted(f for f in files_in(f"train/{w}/images") if Path(f).suffix.lower() in _TINY_EXTS)
            files.extend(f"train/{w}/images/{f}" for f in found)
            labels.extend([index[w]] * len(found))
        listing = Listing(files, labels, classes)
    elif split == "val":
        ann = read_text("val/val_annotations.txt")
        if ann is None:
            raise missing_error("tiny_imagenet", [Path(where) / "val" / "val_annotations.txt"], None)
        rows = [line.split("\t") for line in ann.splitlines() if line.strip()]
        unknown = {r[1] for r in rows if r[1] not in index}
        if unknown:
            raise ValueError(f"tiny_imagenet: {where}/val/val_annotations.txt names classes not in wnids.txt: "
                             f"{sorted(unknown)[:3]}")
        rows.sort(key=lambda r: r[0])
        listing = Listing([f"val/images/{r[0]}" for r in rows], [index[r[1]] for r in rows], classes)
    else:  # test: unlabeled
        found = sorted(f for f in files_in("test/images") if not f.startswith("."))
        listing = Listing([f"test/images/{f}" for f in found], [-1] * len(found), classes)
    if not listing.files:
        raise FileNotFoundError(f"tiny_imagenet: no image under {where}/{split}; check the tiny-imagenet-200 layout")
    return listing


def _tiny_from_zip(arc: Archive, split: str) -> Listing:
    """The Tiny ImageNet listing of the official zip (``tiny-imagenet-200/...``, or the same without that folder)."""
    names = set(arc.names)
    base = "tiny-imagenet-200/" if "tiny-imagenet-200/wnids.txt" in names else ""
    by_dir: dict[str, list[str]] = {}
    for n in arc.names:
        if n.startswith(base):
            d, _, f = n[len(base):].rpartition("/")
            by_dir.setdefault(d, []).append(f)

    def read_text(rel: str) -> str | None:
        return arc.read(base + rel).decode() if base + rel in names else None

    listing = _tiny_listing(split, read_text, lambda d: by_dir.get(d, []), f"{arc.path}/{base.rstrip('/')}")
    return Listing([base + f for f in listing.files], listing.labels, listing.classes)


@register_dataset("tiny_imagenet", ("train", "val", "test"), ((0.480, 0.448, 0.398), (0.277, 0.269, 0.282)),
                  image_files=True)
def _read_tiny_imagenet(root: Path, split: str, opts: ReadOptions) -> ImageDataset:
    name = f"tiny_imagenet/{split}"
    archive = root if is_archive(root) and root.is_file() else root / "tiny-imagenet-200.zip"
    folder = _find_dataset_dir(root, "tiny-imagenet-200", "wnids.txt")
    if not (folder / "wnids.txt").exists() and archive.is_file():  # the zip as downloaded, not extracted
        return _from_archive(archive, lambda arc: _tiny_from_zip(arc, split), name, opts, name)

    def read_text(rel: str) -> str | None:
        return (folder / rel).read_text() if (folder / rel).is_file() else None

    def files_in(rel_dir: str) -> list[str]:
        d = folder / rel_dir
        return [e.name for e in os.scandir(d) if e.is_file()] if d.is_dir() else []

    listing = _tiny_listing(split, read_text, files_in, str(folder))
    listing = Listing([str(folder / f) for f in listing.files], listing.labels, listing.classes)
    return _from_listing(folder, listing, opts, name)


@register_dataset("imagenet100", ("train", "val"), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                  image_files=True, resolve_root=subdir_root("imagenet100"))
def _read_imagenet100(root: Path, split: str, opts: ReadOptions) -> ImageDataset:
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


@register_dataset("folder", ("train",), None, image_files=True, resolve_root=given_root)
def _read_folder(root: Path | None, split: str, opts: ReadOptions) -> ImageDataset:
    """An ImageFolder tree (class subfolders) or flat images, as a folder or one archive file (archive.py)."""
    if root is None:
        raise ValueError("load('folder') needs root=<image folder or archive> (--data_dir PATH on the command line): "
                         "class subfolders or flat images")
    if root.is_file():
        if not is_archive(root):
            raise ValueError(f"{root} is a file, not an image folder or an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        return _from_archive(root, lambda arc: list_members(arc.names, str(root)), "folder", opts,
                             f"folder:{root.name}")
    if is_archive(root) and not root.exists():
        raise FileNotFoundError(f"archive {root} does not exist; pass --data_dir PATH (root= in Python) to an image "
                                "folder or archive")
    return _from_listing(root, list_folder(root), opts, f"folder:{root.name}")


# ---------------------------------------------------------------- load


def available() -> list[str]:
    """Names accepted by :func:`load` (sorted)."""
    return sorted(DATASETS)


def load(name: str, split: str = "train", root: str | Path | None = None, *, resize: int | None = None,
         download: bool = True, cache: bool = True) -> ImageDataset:
    """Load a whole split as uint8 tensors.

    Args:
        name: one of :func:`available`.
        split: one of ``SPLITS[name]`` (``folder`` has only "train": the folder itself).
        root: data directory (default ``$WMSE_DATA``, else ``~/.cache/wmse``); for ``folder`` the
            image folder itself or one archive file (.zip, .tar, .tar.gz, ...; required); for
            ``imagenet100`` the directory holding train/ and val/; for ``tiny_imagenet`` the directory
            holding tiny-imagenet-200/ (or tiny-imagenet-200.zip).
        resize: image-file datasets only: resize the shorter side and center-crop to ``resize`` x ``resize``.
        download: CIFAR / STL-10: fetch and verify the official archive when files are missing.
        cache: image-file datasets: read/write the decoded-tensor cache (``$WMSE_CACHE``).
    Returns:
        An :class:`ImageDataset` with images uint8 ``(N, C, H, W)``.
    """
    spec = dataset_spec(name)
    if split not in spec.splits:
        raise ValueError(f"dataset {spec.name!r} has no split {split!r}; choose one of: {', '.join(spec.splits)}")
    if resize is not None and not spec.image_files:
        image_sets = ", ".join(n for n, s in DATASETS.items() if s.image_files)
        raise ValueError(f"resize= (--resize) applies to image-file datasets ({image_sets}), not {spec.name!r}")
    opts = ReadOptions(resize=resize, download=download, cache=cache)
    return spec.reader(spec.resolve_root(root), split, opts)
