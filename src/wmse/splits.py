"""Which images a run trains on and which it is evaluated on.

The kNN / linear classifiers fit on ``clf_split`` (default: the labelled images of the training split, e.g.
STL-10's "train" when pretraining on "train+unlabeled") and are scored on ``eval_split``, or, for an image
folder, on its own test folder or archive (``eval_data_dir``); without either, a seeded per-class part of the
training split is held out of pretraining and scored on.

Nothing here copies pixels: a subset is an index view of the dataset it comes from (:class:`DatasetSubset`,
:class:`~wmse.data.loader.ImageView`), and the normalisation statistics of an image folder are one streamed
pass over chunks of its uint8 images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import Config
from .data import ImageDataset, compute_stats, dataset_stats, load, split_per_class
from .data.loader import ImageView, as_view

__all__ = ["RunData", "DatasetSubset", "load_run_data", "normalization_stats", "subset"]

@dataclass
class RunData:
    """Everything a run needs from its dataset, as uint8 tensors on the CPU."""

    train: ImageDataset | DatasetSubset
    eval_train_images: ImageView | None  # for kNN / the probe: labelled, un-augmented
    eval_train_labels: Tensor | None
    eval_test_images: ImageView | None
    eval_test_labels: Tensor | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    note: str  # which split evaluation uses, said in the output

    @property
    def labelled(self) -> bool:
        """Whether there is anything to evaluate against."""
        return self.eval_test_images is not None


@dataclass
class DatasetSubset:
    """Some images of a dataset, as an index view: the pixels stay in the dataset's uint8 tensor.

    Read like an :class:`~wmse.data.ImageDataset` (``images``, ``labels``, ``classes``, ``paths``, ``name``,
    ``len``); ``images`` is an :class:`~wmse.data.loader.ImageView` that gathers a batch when asked.
    """

    images: ImageView
    labels: Tensor  # int64 (M,): a copy, small
    classes: list[str]
    paths: list[str] | None
    name: str

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        return f"DatasetSubset(name={self.name!r}, n={len(self)} of {self.images.base.shape[0]})"


def subset(ds: ImageDataset | DatasetSubset, idx: Tensor) -> DatasetSubset:
    """The images ``idx`` of ``ds`` (labels and paths follow), without copying a pixel."""
    idx = torch.as_tensor(idx, dtype=torch.int64)
    paths = [ds.paths[i] for i in idx.tolist()] if ds.paths is not None else None
    return DatasetSubset(ImageView(ds.images, idx), ds.labels[idx], ds.classes, paths, ds.name)


def normalization_stats(dataset: str, images: Tensor | ImageView) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The dataset's published mean/std, or those of the images themselves (image folders)."""
    try:
        return dataset_stats(dataset)
    except (KeyError, ValueError):
        return compute_stats(images)


def _load(cfg: Config, split: str, root=None) -> ImageDataset:
    return load(cfg.dataset, split, root if root is not None else cfg.data_dir, resize=cfg.resize)


def check_classes(train_labels: Tensor, test_labels: Tensor, what: str, knn_k: int) -> None:
    """ValueError (before any training) when the classifiers would fit on a set missing a class of the
    set they are scored on, on fewer images than kNN's k, or the scored set is empty."""
    if test_labels.numel() == 0:
        raise ValueError(f"{what}: the evaluation set is empty; raise --holdout or give --eval_data_dir")
    if train_labels.numel() < knn_k:
        raise ValueError(f"{what}: {train_labels.numel()} labelled training image(s), fewer than knn_k={knn_k}")
    missing = sorted(set(test_labels.unique().tolist()) - set(train_labels.unique().tolist()))
    if missing:
        raise ValueError(f"{what}: class(es) {missing[:5]} of the evaluation set have no labelled training image, "
                         "so neither kNN nor the linear probe can predict them; lower --holdout or add images")


def load_run_data(cfg: Config, log=print) -> RunData:
    """The training split and a labelled evaluation pair (test split or folder, or a seeded held-out split)."""
    t0 = time.perf_counter()
    train = _load(cfg, cfg.train_split)
    log(f"data: {cfg.dataset}/{cfg.train_split}: {len(train)} images {tuple(train.images.shape[1:])} "
        f"in {time.perf_counter() - t0:.1f}s")
    mean, std = normalization_stats(cfg.dataset, train.images)
    if cfg.eval_split is None and cfg.eval_data_dir is None:
        if not bool((train.labels >= 0).any()):
            return RunData(train, None, None, None, None, mean, std, "no labels: kNN monitoring off")
        train_idx, test_idx = split_per_class(train.labels, cfg.holdout, cfg.seed)
        kept, held = subset(train, train_idx), subset(train, test_idx)
        check_classes(kept.labels, held.labels, f"holdout={cfg.holdout}", cfg.knn_k)
        note = (f"evaluation on a seeded per-class held-out split of {cfg.train_split}: {len(test_idx)} images "
                f"(holdout={cfg.holdout}, seed={cfg.seed}); pretraining and the classifiers use the other "
                f"{len(train_idx)}")
        return RunData(kept, kept.images, kept.labels, held.images, held.labels, mean, std, note)
    clf = _load(cfg, cfg.clf_split) if cfg.clf_split else train
    labelled = clf.labels >= 0
    if not bool(labelled.any()):
        return RunData(train, None, None, None, None, mean, std, "no labels: kNN monitoring off")
    if not bool(labelled.all()):
        clf = subset(clf, labelled.nonzero().squeeze(1))
    if cfg.eval_data_dir is not None:
        test, scored_on = _load(cfg, "train", cfg.eval_data_dir), cfg.eval_data_dir
        if test.classes != clf.classes:
            raise ValueError(f"eval_data_dir {cfg.eval_data_dir} has classes {test.classes[:5]}... but the training "
                             f"data has {clf.classes[:5]}...: both need the same class folders")
    else:
        test, scored_on = _load(cfg, cfg.eval_split), cfg.eval_split
    check_classes(clf.labels, test.labels[test.labels >= 0], f"evaluation on {scored_on}", cfg.knn_k)
    note = (f"classifiers fit on {cfg.clf_split or cfg.train_split} ({len(clf)} labelled images), "
            f"scored on {scored_on} ({len(test)} images)")
    return RunData(train, as_view(clf.images), clf.labels, as_view(test.images), test.labels, mean, std, note)
