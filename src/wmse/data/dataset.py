"""The in-memory dataset type, the dataset registry, data/cache locations, statistics and stratified splits."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..registry import Registry

__all__ = [
    "ImageDataset",
    "DatasetSpec",
    "DATASETS",
    "SPLITS",
    "ReadOptions",
    "register_dataset",
    "dataset_spec",
    "data_root",
    "cache_root",
    "dataset_stats",
    "compute_stats",
    "split_per_class",
]


@dataclass
class ImageDataset:
    """A whole split of decoded images.

    Attributes:
        images: uint8 ``(N, C, H, W)``, contiguous, on the CPU (C = 1 or 3): in memory for array formats,
            mapped from the decoded-image store (data/store.py) for image files, shared by every process.
        labels: int64 ``(N,)``; -1 where an image has no label.
        classes: class names; ``labels`` index into this list (empty when unlabeled).
        paths: the source file of each image, or None for array formats.
        name: a short name such as ``"cifar10/train"``.
    """

    images: Tensor
    labels: Tensor
    classes: list[str]
    paths: list[str] | None
    name: str

    def __post_init__(self) -> None:
        # Catch reader bugs early: everything downstream relies on these invariants.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 (N,), got {self.labels.dtype} {tuple(self.labels.shape)}")
        if self.paths is not None and len(self.paths) != len(self.labels):
            raise ValueError("paths must have one entry per image")
        if not self.images.is_contiguous():
            self.images = self.images.contiguous()

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __repr__(self) -> str:
        n, c, h, w = self.images.shape
        return f"ImageDataset(name={self.name!r}, n={n}, shape=({c}, {h}, {w}), classes={len(self.classes)})"


def data_root(root: str | Path | None = None) -> Path:
    """Resolve the data directory: ``root`` if given, else ``$WMSE_DATA``, else ``~/.cache/wmse``."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get("WMSE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "wmse"


def cache_root() -> Path:
    """Directory for decoded-image caches: ``$WMSE_CACHE``, else ``<data root>/.wmse_cache``.

    The data root here ignores any per-call ``root`` on purpose: a folder passed as ``root`` may be
    read-only (shared datasets), while the cache must be writable.
    """
    env = os.environ.get("WMSE_CACHE")
    if env:
        return Path(env).expanduser()
    return data_root(None) / ".wmse_cache"


Stats = tuple[tuple[float, ...], tuple[float, ...]]


@dataclass(frozen=True)
class ReadOptions:
    """Keyword options every reader receives (each uses what applies to it)."""

    resize: int | None = None
    download: bool = True
    cache: bool = True


def given_root(root: str | Path | None) -> Path | None:
    """Root resolver of readers that find their files themselves: ``root`` as passed (None stays None)."""
    return Path(root).expanduser() if root is not None else None


def subdir_root(sub: str) -> Callable[[str | Path | None], Path]:
    """Root resolver: ``root`` if given, else ``<data root>/<sub>`` (e.g. ``~/.cache/wmse/imagenet100``)."""
    def resolve(root: str | Path | None) -> Path:
        return data_root(root) if root is not None else data_root(None) / sub
    resolve.__name__ = f"subdir_root({sub!r})"
    return resolve


@dataclass(frozen=True)
class DatasetSpec:
    """Everything the data layer knows of one dataset: the one place its name is defined.

    Attributes:
        name: the name :func:`wmse.data.load` accepts (lower case, ``_`` not ``-``).
        reader: ``reader(root, split, opts: ReadOptions) -> ImageDataset``; ``root`` is what
            ``resolve_root`` made of the caller's ``root=``.
        splits: the splits ``reader`` accepts, the default ("train") first.
        stats: published per-channel ``(mean, std)`` in [0, 1] units, or None when the images define
            them (``folder``: use :func:`compute_stats`).
        image_files: the split is a set of image files decoded by PIL: it accepts ``resize=`` and goes
            through the decode cache (``$WMSE_CACHE``); array formats (CIFAR pickles, ...) do neither.
        resolve_root: ``root=`` -> the directory the reader gets (default :func:`data_root`:
            ``root``, else ``$WMSE_DATA``, else ``~/.cache/wmse``).
    """

    name: str
    reader: Callable[..., "ImageDataset"]
    splits: tuple[str, ...]
    stats: Stats | None = None
    image_files: bool = False
    resolve_root: Callable[[str | Path | None], Path | None] = data_root

    def __post_init__(self) -> None:
        if not self.splits:
            raise ValueError(f"dataset {self.name!r}: needs at least one split")
        if self.stats is not None and len(self.stats[0]) != len(self.stats[1]):
            raise ValueError(f"dataset {self.name!r}: stats mean and std differ in length")


#: name -> :class:`DatasetSpec`, filled by :func:`register_dataset` next to each reader (readers.py).
DATASETS: Registry[DatasetSpec] = Registry("dataset")


def register_dataset(name: str, splits: tuple[str, ...] | list[str], stats: Stats | None = None, *,
                     image_files: bool = False,
                     resolve_root: Callable[[str | Path | None], Path | None] = data_root,
                     replace: bool = False) -> Callable[[Callable[..., "ImageDataset"]], Callable[..., "ImageDataset"]]:
    """Decorator: register the decorated reader as dataset ``name`` (see :class:`DatasetSpec`).

    >>> @register_dataset("my_set", ("train", "test"), ((0.5,), (0.25,)))   # doctest: +SKIP
    ... def _read_my_set(root, split, opts): ...
    """
    def deco(reader: Callable[..., "ImageDataset"]) -> Callable[..., "ImageDataset"]:
        DATASETS.add(name, DatasetSpec(name, reader, tuple(splits), stats, image_files, resolve_root), replace)
        return reader
    return deco


def dataset_key(name: str) -> str:
    """The registry key of a user-typed name: ``"Tiny-ImageNet"`` -> ``"tiny_imagenet"``."""
    return name.lower().replace("-", "_") if isinstance(name, str) else name


def dataset_spec(name: str, arg: str | None = None) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name``; ValueError listing the known names (sorted) otherwise."""
    key = dataset_key(name)
    if key not in DATASETS:
        where = f"{arg}: " if arg else ""
        raise ValueError(f"{where}unknown dataset {name!r}; choose one of: {', '.join(sorted(DATASETS))}")
    return DATASETS[key]


class _SplitsView(Mapping):
    """``SPLITS[name]`` -> that dataset's splits, read live from :data:`DATASETS`."""

    def __getitem__(self, name: str) -> tuple[str, ...]:
        if name not in DATASETS:
            raise KeyError(name)
        return DATASETS[name].splits

    def __iter__(self) -> Iterator[str]:
        return iter(DATASETS)

    def __len__(self) -> int:
        return len(DATASETS)

    def __repr__(self) -> str:
        return repr(dict(self))


SPLITS: Mapping[str, tuple[str, ...]] = _SplitsView()


def dataset_stats(name: str) -> Stats:
    """Per-channel (mean, std) in [0, 1] units for a named dataset.

    Raises:
        ValueError: for a dataset without published statistics (``folder``: use :func:`compute_stats`)
            or an unknown name.
    """
    spec = dataset_spec(name, arg="dataset_stats")
    if spec.stats is None:
        raise ValueError(f"dataset_stats({spec.name!r}): a {spec.name} has no fixed statistics; "
                         "use wmse.data.compute_stats(dataset.images)")
    return spec.stats


#: Pixels per channel read at once by :func:`compute_stats` (16 Mi: its one temporary, a channel of a chunk, is 16 MB).
STATS_CHUNK_PIXELS = 1 << 24


def compute_stats(images, chunk_pixels: int = STATS_CHUNK_PIXELS) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] units, in one streamed pass.

    Each chunk of whole images adds to a 256-bin histogram per channel (exact int64 counts), so memory is
    one chunk (``chunk_pixels`` pixels per channel, at least one image) whatever the number of images, and
    no pixel is converted to float. The sums of x and x^2 taken from the histogram are exact integers; mean
    and variance then come from them in float64 (E[x^2] - mean^2, whose rounding error is far below 1e-9
    because the sums are exact).

    Args:
        images: uint8 ``(N, C, H, W)``: a tensor (a memory map works) or an index view
            (:class:`wmse.data.loader.ImageView`).
        chunk_pixels: pixels per channel read at once.
    Returns:
        ``(mean, std)``, each a tuple of C floats.
    """
    if images.dtype != torch.uint8 or len(images.shape) != 4 or images.shape[0] == 0:
        raise ValueError(f"compute_stats: images must be a non-empty uint8 (N, C, H, W) tensor, got "
                         f"{images.dtype} {tuple(images.shape)}")
    n, c, h, w = images.shape
    counts = torch.zeros(c, 256, dtype=torch.int64)
    step = max(1, chunk_pixels // (h * w))
    for start in range(0, n, step):
        chunk = images[start:start + step]
        for ch in range(c):
            counts[ch] += torch.bincount(chunk[:, ch].reshape(-1), minlength=256)
    values = torch.arange(256, dtype=torch.int64)
    total = (counts * values).sum(1).to(torch.float64)
    total_sq = (counts * values.square()).sum(1).to(torch.float64)
    count = n * h * w
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return tuple((mean / 255.0).tolist()), tuple((var.sqrt() / 255.0).tolist())


def split_per_class(labels: Tensor, holdout: float | int, seed: int) -> tuple[Tensor, Tensor]:
    """A seeded split stratified by class (held-out evaluation when no test split is at hand).

    Args:
        labels: int64 ``(N,)``, all >= 0.
        holdout: a fraction in (0, 1) of each class, or a count of images per class, to hold out.
        seed: the split depends only on ``labels``, ``holdout`` and ``seed``.
    Returns:
        ``(train_idx, test_idx)``: sorted int64 index tensors that partition ``range(N)``.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"split_per_class: labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError("split_per_class: labels contain -1 (unlabeled images); a stratified split needs labels")
    is_fraction = isinstance(holdout, float)
    if is_fraction and not 0.0 < holdout < 1.0:
        raise ValueError(f"split_per_class: holdout={holdout} must be a fraction in (0, 1) or a per-class count")
    if not is_fraction and (not isinstance(holdout, int) or holdout < 1):
        raise ValueError(f"split_per_class: holdout={holdout!r} must be a positive int count or a float fraction")
    gen = torch.Generator().manual_seed(int(seed))
    train_parts, test_parts = [], []
    for cls in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == cls).flatten()
        n_test = int(round(holdout * idx.numel())) if is_fraction else int(holdout)
        if n_test >= idx.numel():
            raise ValueError(f"split_per_class: class {cls} has {idx.numel()} images, cannot hold out {n_test}; "
                             "lower holdout")
        perm = idx[torch.randperm(idx.numel(), generator=gen)]
        test_parts.append(perm[:n_test])
        train_parts.append(perm[n_test:])
    train_idx = torch.cat(train_parts).sort().values if train_parts else torch.empty(0, dtype=torch.int64)
    test_idx = torch.cat(test_parts).sort().values if test_parts else torch.empty(0, dtype=torch.int64)
    return train_idx, test_idx
