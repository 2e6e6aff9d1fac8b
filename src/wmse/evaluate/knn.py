"""k-nearest-neighbour classification of frozen features: majority vote (the paper's protocol)
and ``exp(cos / T)``-weighted votes, both from one chunked matmul per block of test rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor

from .common import accuracy, check_features, check_test_y

Metric = Literal["euclidean", "cosine"]
Weighting = Literal["majority", "cosine_temp"]

# Bytes of one chunk of the (test x train) score matrix; bounds kNN memory whatever N is.
_CHUNK_BYTES = 128 * 2**20


def _auto_chunk(n_train: int, chunk: int | None) -> int:
    if chunk is not None:
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1 test rows, got {chunk}")
        return chunk
    return max(1, _CHUNK_BYTES // (4 * n_train))


class _Scores:
    """Dot products of a test chunk with the unit-norm train rows, shared by both metrics.

    ``dots_unit[i, j] = a_i . b_j / |b_j|``. Cosine similarity ranks like it (``|a_i|`` is
    constant per row), and ``|b|^2 - 2 |b| dots_unit = |b|^2 - 2 a.b`` ranks like the squared
    Euclidean distance (``|a|^2`` is constant per row): one matmul and at most one elementwise
    pass per chunk serve both kNN variants. ``work`` is a buffer of the same shape for that pass.
    """

    def __init__(self, dots_unit: Tensor, train_sq: Tensor, train_norm: Tensor, rows: Tensor,
                 work: Tensor):
        self.dots_unit, self.train_sq, self.train_norm, self.rows = dots_unit, train_sq, train_norm, rows
        self.work = work


def _score_chunks(train_x: Tensor, test_x: Tensor, chunk: int) -> Iterator[_Scores]:
    """Yield one :class:`_Scores` per chunk of ``chunk`` test rows, in order.

    Every chunk is written into the same two buffers, so a chunk's scores are valid only until
    the next one is asked for. Why: a block is ~128 MiB, and on the CPU a fresh tensor that size
    costs more in page faults than the matmul that fills it (figures: benchmarks/README.md).
    """
    dtype = torch.promote_types(train_x.dtype, test_x.dtype)
    xt = train_x.to(dtype)
    xq = test_x.to(device=train_x.device, dtype=dtype)
    train_sq = xt.pow(2).sum(dim=1)
    train_norm = train_sq.sqrt()
    unit_t = (xt / train_norm.clamp_min(1e-30)[:, None]).T
    rows_max = min(chunk, xq.shape[0])
    dots = torch.empty(rows_max, xt.shape[0], dtype=dtype, device=xt.device)
    work = torch.empty_like(dots)
    for s in range(0, xq.shape[0], chunk):
        rows = xq[s : s + chunk]
        m = rows.shape[0]
        yield _Scores(torch.mm(rows, unit_t, out=dots[:m]), train_sq, train_norm, rows, work[:m])


def _vote(
    labels: Tensor, weights: Tensor | None, num_classes: int, topk: int
) -> Tensor:
    """Class votes of the neighbours ``labels`` (m, k) -> ranked classes (m, topk).

    Ties in the vote go to the smallest label (stable sort / first argmax), as sklearn's ``mode``.
    """
    votes = torch.zeros(labels.shape[0], num_classes, dtype=torch.float64, device=labels.device)
    w = torch.ones_like(labels, dtype=torch.float64) if weights is None else weights.double()
    votes.scatter_add_(1, labels, w)
    if topk == 1:
        return votes.argmax(dim=1, keepdim=True)
    return torch.sort(votes, dim=1, descending=True, stable=True).indices[:, :topk]


def _knn_from_scores(
    sc: _Scores,
    train_y: Tensor,
    k: int,
    metric: str,
    weighting: str,
    temperature: float,
    num_classes: int,
    topk: int,
) -> Tensor:
    """kNN of one chunk of test rows -> ranked classes (m, topk)."""
    if metric == "euclidean":
        # |b|^2 - 2 a.b = d^2 - |a|^2: the same ranking as the distance, one pass over the block.
        score = torch.addcmul(sc.train_sq, sc.dots_unit, sc.train_norm, value=-2, out=sc.work)
        _, idx = torch.topk(score, k, dim=1, largest=False)
        weights = None
    else:
        best, idx = torch.topk(sc.dots_unit, k, dim=1)
        weights = None
        if weighting == "cosine_temp":
            inv_norm_a = sc.rows.norm(dim=1, keepdim=True).clamp_min(1e-30).reciprocal()
            weights = torch.exp(best * inv_norm_a / temperature)
    return _vote(train_y[idx], weights, num_classes, topk)


def _check_knn_args(k: int, n_train: int, metric: str, weighting: str, temperature: float) -> None:
    if metric not in ("euclidean", "cosine"):
        raise ValueError(f"metric must be 'euclidean' or 'cosine', got {metric!r}")
    if weighting not in ("majority", "cosine_temp"):
        raise ValueError(f"weighting must be 'majority' or 'cosine_temp', got {weighting!r}")
    if weighting == "cosine_temp" and metric != "cosine":
        raise ValueError("weighting='cosine_temp' weights by cosine similarity: use metric='cosine'")
    if not 1 <= k <= n_train:
        raise ValueError(f"k must be between 1 and the number of train rows ({n_train}), got {k}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def knn_classify(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    k: int = 5,
    metric: Metric = "euclidean",
    weighting: Weighting = "majority",
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int | None = None,
    topk: int = 1,
) -> Tensor:
    """k-nearest-neighbour classification of ``test_x`` against labelled ``train_x``.

    Args:
        train_x: ``(N, F)`` float features of the labelled set.
        train_y: ``(N,)`` int labels in ``[0, num_classes)``.
        test_x: ``(M, F)`` float features to classify.
        k: number of neighbours.
        metric: ``"euclidean"`` (paper) or ``"cosine"``.
        weighting: ``"majority"`` (one vote per neighbour, paper) or ``"cosine_temp"``
            (vote ``exp(cos / temperature)``; needs ``metric="cosine"``).
        temperature: for ``"cosine_temp"``.
        num_classes: default ``max(train_y) + 1``.
        chunk: test rows per distance block; default keeps a block under 128 MiB.
        topk: return the ``topk`` best-voted classes per row instead of the prediction alone.

    Returns:
        ``(M,)`` int64 predictions if ``topk == 1`` else ``(M, topk)`` classes by decreasing vote.
        Vote ties go to the smallest label, as sklearn's ``KNeighborsClassifier``.

    The distances are computed in the dtype of the inputs (float32 features: float32) from one
    matmul per chunk. In float32, two neighbours whose distances differ by less than the rounding
    error (about 1e-6 relative) can swap compared with a float64 computation such as sklearn's;
    pass float64 features when exact agreement with a float64 reference matters.
    """
    n_cls = check_features(train_x, train_y, test_x, num_classes)
    _check_knn_args(k, train_x.shape[0], metric, weighting, temperature)
    if not 1 <= topk <= n_cls:
        raise ValueError(f"topk must be between 1 and num_classes ({n_cls}), got {topk}")
    y = train_y.to(device=train_x.device, dtype=torch.int64)
    out = []
    for sc in _score_chunks(train_x, test_x, _auto_chunk(train_x.shape[0], chunk)):
        out.append(_knn_from_scores(sc, y, k, metric, weighting, temperature, n_cls, topk))
    ranked = torch.cat(out) if out else torch.empty(0, topk, dtype=torch.int64)
    return ranked[:, 0] if topk == 1 else ranked


def knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int = 5,
    metric: Metric = "euclidean",
    chunk: int | None = None,
) -> float:
    """Top-1 accuracy (percent) of the majority-vote kNN (paper: k=5, Euclidean)."""
    check_test_y(test_x, test_y)
    pred = knn_classify(train_x, train_y, test_x, k=k, metric=metric, chunk=chunk)
    return accuracy(pred.view(-1, 1), test_y, 1)


def weighted_knn_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int = 200,
    temperature: float = 0.07,
    chunk: int | None = None,
) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of the cosine kNN with ``exp(cos / T)`` votes."""
    check_test_y(test_x, test_y)
    n_cls = check_features(train_x, train_y, test_x, None)
    top = min(5, n_cls)
    ranked = knn_classify(
        train_x, train_y, test_x, k=k, metric="cosine", weighting="cosine_temp",
        temperature=temperature, chunk=chunk, topk=top,
    )
    ranked = ranked.view(-1, top)
    return {"top1": accuracy(ranked, test_y, 1), "top5": accuracy(ranked, test_y, top)}


def knn_evaluate(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    k: int = 5,
    weighted_k: int = 200,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk: int | None = None,
) -> dict[str, dict[str, float]]:
    """Both kNN protocols from one pass over the distance matrix (half the matmul work).

    Returns:
        ``{"knn": {"k", "top1"}, "weighted_knn": {"k", "temperature", "top1", "top5"}}``,
        accuracies in percent. Same results as :func:`knn_accuracy` (Euclidean, majority) and
        :func:`weighted_knn_accuracy`.
    """
    n_cls = check_features(train_x, train_y, test_x, num_classes)
    check_test_y(test_x, test_y)
    _check_knn_args(k, train_x.shape[0], "euclidean", "majority", temperature)
    _check_knn_args(weighted_k, train_x.shape[0], "cosine", "cosine_temp", temperature)
    top = min(5, n_cls)
    y = train_y.to(device=train_x.device, dtype=torch.int64)
    maj, wtd = [], []
    for sc in _score_chunks(train_x, test_x, _auto_chunk(train_x.shape[0], chunk)):
        maj.append(_knn_from_scores(sc, y, k, "euclidean", "majority", temperature, n_cls, 1))
        wtd.append(_knn_from_scores(sc, y, weighted_k, "cosine", "cosine_temp", temperature,
                                    n_cls, top))
    if not maj:
        raise ValueError("test_x is empty: nothing to evaluate")
    m, w = torch.cat(maj), torch.cat(wtd)
    return {
        "knn": {"k": k, "metric": "euclidean", "top1": accuracy(m, test_y, 1)},
        "weighted_knn": {
            "k": weighted_k, "metric": "cosine", "temperature": temperature,
            "top1": accuracy(w, test_y, 1), "top5": accuracy(w, test_y, top),
        },
    }
