"""The in-memory dataset type, data/cache locations, per-dataset statistics and stratified splits."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "ImageDataset",
    "data_root",
    "cache_root",
    "dataset_stats",
    "compute_stats",
    "split_per_class",
]


@dataclass
class ImageDataset:
    """A whole split held in memory as decoded images.

    Attributes:
        images: uint8 ``(N, C, H, W)``, contiguous, on the CPU (C = 1 or 3).
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


# Mean / std per channel in [0, 1] units. CIFAR, STL-10 and Tiny ImageNet use the values of the
# official W-MSE code; ImageNet-100 uses the usual ImageNet values; Fashion-MNIST was computed on
# its training split (tests/test_data_readers.py re-checks it and CIFAR-10 against compute_stats).
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2430, 0.2610)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "stl10": ((0.43, 0.42, 0.39), (0.27, 0.26, 0.27)),
    "tiny_imagenet": ((0.480, 0.448, 0.398), (0.277, 0.269, 0.282)),
    "imagenet100": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) in [0, 1] units for a named dataset.

    Raises:
        ValueError: for ``folder`` (use :func:`compute_stats`) or an unknown name.
    """
    key = name.lower().replace("-", "_")
    if key in _STATS:
        return _STATS[key]
    if key == "folder":
        raise ValueError("dataset_stats('folder'): a folder has no fixed statistics; "
                         "use wmse.data.compute_stats(dataset.images)")
    raise ValueError(f"dataset_stats: unknown dataset {name!r}; known: {', '.join(sorted(_STATS))}")


def compute_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 images, in [0, 1] units.

    Args:
        images: uint8 ``(N, C, H, W)``.
        chunk: images per accumulation step (bounds the float64 temporary memory).
    Returns:
        ``(mean, std)``, each a tuple of C floats.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"compute_stats: images must be a non-empty (N, C, H, W) tensor, got {tuple(images.shape)}")
    c = images.shape[1]
    total = torch.zeros(c, dtype=torch.float64)
    total_sq = torch.zeros(c, dtype=torch.float64)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
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
