"""The whole evaluation protocol of ``wmse evaluate``: both kNN, the linear probe and the feature
diagnostics of one train/test feature set, as one JSON-serialisable dict."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ..diagnostics import embedding_diagnostics
from .common import check_features
from .knn import knn_evaluate
from .probe import linear_probe


def evaluate_features(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    knn_k: int = 5,
    weighted_k: int = 200,
    temperature: float = 0.07,
    linear: bool = True,
    linear_epochs: int = 500,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    diagnostics: bool = True,
    probe_threads: int | None = 1,
) -> dict:
    """kNN (both kinds), linear probe and feature diagnostics: everything ``wmse evaluate`` reports.

    Args:
        train_x, train_y, test_x, test_y: features ``(N, F)``/``(M, F)`` and int labels.
        linear: run the linear probe (the slow part).
        linear_epochs: epochs of the probe (500 in the paper).
        diagnostics: add spectrum/effective rank of the train features.
        probe_threads: CPU threads of the linear probe (see :func:`linear_probe`).

    Returns:
        A JSON-serialisable dict: ``{"n_train", "n_test", "feature_dim", "num_classes",
        "knn": {...}, "weighted_knn": {...}, "linear": {...}, "diagnostics": {...},
        "seconds": {...}}``; accuracies in percent. The caller adds provenance (checkpoint,
        split, which features) before writing it as ``eval.json``.
    """
    n_cls = check_features(train_x, train_y, test_x, num_classes)
    res: dict = {
        "n_train": int(train_x.shape[0]), "n_test": int(test_x.shape[0]),
        "feature_dim": int(train_x.shape[1]), "num_classes": n_cls, "seconds": {},
    }
    t = time.perf_counter()
    res.update(knn_evaluate(train_x, train_y, test_x, test_y, k=knn_k, weighted_k=weighted_k,
                            temperature=temperature, num_classes=n_cls))
    res["seconds"]["knn"] = time.perf_counter() - t
    if linear:
        res["linear"] = linear_probe(train_x, train_y, test_x, test_y, epochs=linear_epochs,
                                     seed=seed, device=device, num_classes=n_cls,
                                     threads=probe_threads)
        res["seconds"]["linear"] = res["linear"].pop("seconds")
    if diagnostics:
        t = time.perf_counter()
        res["diagnostics"] = embedding_diagnostics(train_x)
        res["seconds"]["diagnostics"] = time.perf_counter() - t
    return res
