"""Datasets as uint8 tensors: one reader per format behind :func:`load`, plus a decoded-image store.

Every dataset is one entry of :data:`DATASETS` (a :class:`DatasetSpec`: reader, splits, published
statistics, whether it is made of image files, how ``root`` resolves), registered next to its reader
in ``readers.py`` with :func:`register_dataset`.

Data root: ``root=``, else ``$WMSE_DATA``, else ``~/.cache/wmse``. Image folders (and image archives:
``load("folder", root="train.zip")``) are decoded once into a memory-mapped store (store.py) under
``$WMSE_CACHE``, else ``<data root>/.wmse_cache`` (never inside the image folder itself).

>>> ds = load("cifar10", "train")            # doctest: +SKIP
>>> ds.images.shape, ds.labels.shape          # doctest: +SKIP
(torch.Size([50000, 3, 32, 32]), torch.Size([50000]))
"""

from .archive import ARCHIVE_SUFFIXES, read_member
from .dataset import (DATASETS, SPLITS, DatasetSpec, ImageDataset, ReadOptions, cache_root, compute_stats,
                      data_root, dataset_spec, dataset_stats, register_dataset, split_per_class)
from .readers import available, load

__all__ = [
    "ImageDataset",
    "load",
    "available",
    "SPLITS",
    "DATASETS",
    "DatasetSpec",
    "ReadOptions",
    "register_dataset",
    "dataset_spec",
    "dataset_stats",
    "compute_stats",
    "split_per_class",
    "data_root",
    "cache_root",
    "ARCHIVE_SUFFIXES",
    "read_member",
]
