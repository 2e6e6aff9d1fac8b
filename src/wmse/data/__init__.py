"""Datasets as uint8 tensors: one reader per format behind :func:`load`, plus a decoded-image cache.

Data root: ``root=``, else ``$WMSE_DATA``, else ``~/.cache/wmse``. Decoded image folders are cached
under ``$WMSE_CACHE``, else ``<data root>/.wmse_cache`` (never inside the image folder itself).

>>> ds = load("cifar10", "train")            # doctest: +SKIP
>>> ds.images.shape, ds.labels.shape          # doctest: +SKIP
(torch.Size([50000, 3, 32, 32]), torch.Size([50000]))
"""

from .dataset import ImageDataset, cache_root, compute_stats, data_root, dataset_stats, split_per_class
from .readers import SPLITS, available, load

__all__ = [
    "ImageDataset",
    "load",
    "available",
    "SPLITS",
    "dataset_stats",
    "compute_stats",
    "split_per_class",
    "data_root",
    "cache_root",
]
