"""Evaluation of frozen representations: feature extraction, kNN, linear probe, a printed table.

The protocol follows the paper and the official code (htdt/self-supervised, ``eval/knn.py`` and
``eval/sgd.py``), which we read to match it:

- features are ``E(x)`` of the un-augmented train and test images, used as they are (the official
  code applies no normalisation and no BatchNorm before the linear layer, and neither do we);
- kNN: k = 5, Euclidean distance, majority vote (official: ``torch.cdist`` + ``topk`` +
  ``unique(return_counts=True)`` + ``argmax``, so among tied vote counts the smallest label wins,
  which is also what scikit-learn's ``KNeighborsClassifier`` does);
- weighted kNN (not in the official code, reported by many papers, e.g. InstDisc and DINO):
  k = 200, cosine similarity, each neighbour votes ``exp(sim / 0.07)`` for its class;
- linear probe: one ``nn.Linear(F, C)`` with PyTorch's default init, cross-entropy, Adam
  (lr 1e-2, weight_decay 5e-6 added to the gradient, i.e. L2 not AdamW), the lr multiplied by
  ``gamma = (1e-6 / 1e-2) ** (1 / epochs)`` after every epoch (``ExponentialLR``), 500 epochs of
  shuffled batches of 1000, top-1 and top-5 on the test set with the final weights.

The computations are rewritten for speed on a CPU (a chunked matmul for the distances, shared by
the Euclidean and cosine kNN; the linear layer trained with hand-written gradients and Adam
update), and tested against scikit-learn and against the official formulation.

All accuracies returned by this module are percentages in ``[0, 100]``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "extract_features",
    "knn_classify",
    "knn_accuracy",
    "weighted_knn_accuracy",
    "knn_evaluate",
    "linear_probe",
    "evaluate_features",
    "format_table",
]

Metric = Literal["euclidean", "cosine"]
Weighting = Literal["majority", "cosine_temp"]

# Bytes of one chunk of the (test x train) score matrix; bounds kNN memory whatever N is.
_CHUNK_BYTES = 128 * 2**20


# --------------------------------------------------------------------------------------------
# Feature extraction
# --------------------------------------------------------------------------------------------


def extract_features(
    encoder: Callable[[Tensor], Tensor],
    images_uint8: Tensor,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    autocast: bool = True,
    progress: bool | None = None,
) -> Tensor:
    """Run a frozen encoder over a whole image tensor, batch by batch, without gradients.

    Putting the encoder in eval mode is the caller's job (so BatchNorm uses running stats).

    Args:
        encoder: maps a float batch ``(B, C, S, S)`` on ``device`` to ``(B, F)`` (a ``(B, F, 1, 1)``
            output is flattened).
        images_uint8: ``(N, C, H, W)`` uint8 images (CPU or ``device``).
        transform: maps a uint8 batch ``(B, C, H, W)`` on ``device`` to the encoder's float input
            (the evaluation transform: resize/crop and mean/std normalisation, no augmentation).
        batch_size: images per forward pass.
        device: where the encoder runs.
        autocast: run the encoder under bfloat16 autocast on CPU/CUDA. The features are returned
            in float32 either way. On CPUs without native bf16 (no AVX512-BF16/AMX) this can be
            slower than float32; pass False there.
        progress: print progress lines on stderr; None prints them only for more than 20 batches.

    Returns:
        ``(N, F)`` float32 CPU tensor.
    """
    if not isinstance(images_uint8, Tensor) or images_uint8.dtype != torch.uint8:
        raise ValueError(
            "images_uint8 must be a uint8 tensor (N, C, H, W), got "
            f"{getattr(images_uint8, 'dtype', type(images_uint8).__name__)}"
        )
    if images_uint8.ndim != 4:
        raise ValueError(f"images_uint8 must have shape (N, C, H, W), got {tuple(images_uint8.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device)
    n = images_uint8.shape[0]
    n_batches = math.ceil(n / batch_size)
    show = n_batches > 20 if progress is None else progress
    use_autocast = autocast and dev.type in ("cpu", "cuda")
    out: list[Tensor] = []
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
        for b, i in enumerate(range(0, n, batch_size)):
            x = transform(images_uint8[i : i + batch_size].to(dev, non_blocking=True))
            f = encoder(x).flatten(1)
            out.append(f.float().cpu())
            if show and (b + 1) % max(1, n_batches // 10) == 0:
                rate = (i + x.shape[0]) / (time.perf_counter() - start)
                print(f"features: {i + x.shape[0]}/{n} images ({rate:.0f} img/s)", file=sys.stderr)
    if not out:
        raise ValueError("images_uint8 is empty: no images to extract features from")
    return torch.cat(out)


# --------------------------------------------------------------------------------------------
# k-nearest neighbours
# --------------------------------------------------------------------------------------------


def _check_features(
    train_x: Tensor, train_y: Tensor, test_x: Tensor, num_classes: int | None
) -> int:
    """Validate shapes/dtypes of a train/test feature set; return the number of classes."""
    for name, x in (("train_x", train_x), ("test_x", test_x)):
        if not isinstance(x, Tensor) or x.ndim != 2 or not x.is_floating_point():
            raise ValueError(
                f"{name} must be a float tensor of shape (N, F), got "
                f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}"
            )
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x has {train_x.shape[1]} features per row but test_x has {test_x.shape[1]}: "
            "extract both with the same encoder"
        )
    if train_y.ndim != 1 or train_y.shape[0] != train_x.shape[0]:
        raise ValueError(
            f"train_y must have shape ({train_x.shape[0]},) to match train_x, got {tuple(train_y.shape)}"
        )
    if train_y.is_floating_point():
        raise ValueError("train_y must hold integer class labels, got a float tensor")
    if train_x.shape[0] == 0:
        raise ValueError("train_x is empty: nothing to compare against")
    if int(train_y.min()) < 0:
        raise ValueError(
            "train_y has negative labels (unlabeled images?): keep only labeled images for evaluation"
        )
    n_cls = int(train_y.max()) + 1
    if num_classes is None:
        return n_cls
    if num_classes < n_cls:
        raise ValueError(f"num_classes={num_classes} but train_y has label {n_cls - 1}")
    return num_classes


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
    costs more in page faults than the matmul that fills it (the matmuls of the 10,000 x 50,000 kNN took
    4.96 s in fresh blocks against 3.4 s in one reused block, 2 threads, this project's CPU).
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
    n_cls = _check_features(train_x, train_y, test_x, num_classes)
    _check_knn_args(k, train_x.shape[0], metric, weighting, temperature)
    if not 1 <= topk <= n_cls:
        raise ValueError(f"topk must be between 1 and num_classes ({n_cls}), got {topk}")
    y = train_y.to(device=train_x.device, dtype=torch.int64)
    out = []
    for sc in _score_chunks(train_x, test_x, _auto_chunk(train_x.shape[0], chunk)):
        out.append(_knn_from_scores(sc, y, k, metric, weighting, temperature, n_cls, topk))
    ranked = torch.cat(out) if out else torch.empty(0, topk, dtype=torch.int64)
    return ranked[:, 0] if topk == 1 else ranked


def _accuracy(ranked: Tensor, test_y: Tensor, top: int) -> float:
    """Percent of rows whose label is among the first ``top`` columns of ``ranked`` (M, T)."""
    if ranked.shape[0] == 0:
        raise ValueError("test_x is empty: nothing to evaluate")
    hit = (ranked[:, :top] == test_y.to(ranked.device).view(-1, 1)).any(dim=1)
    return 100.0 * float(hit.double().mean())


def _check_test_y(test_x: Tensor, test_y: Tensor) -> None:
    if test_y.ndim != 1 or test_y.shape[0] != test_x.shape[0]:
        raise ValueError(
            f"test_y must have shape ({test_x.shape[0]},) to match test_x, got {tuple(test_y.shape)}"
        )


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
    _check_test_y(test_x, test_y)
    pred = knn_classify(train_x, train_y, test_x, k=k, metric=metric, chunk=chunk)
    return _accuracy(pred.view(-1, 1), test_y, 1)


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
    _check_test_y(test_x, test_y)
    n_cls = _check_features(train_x, train_y, test_x, None)
    top = min(5, n_cls)
    ranked = knn_classify(
        train_x, train_y, test_x, k=k, metric="cosine", weighting="cosine_temp",
        temperature=temperature, chunk=chunk, topk=top,
    )
    ranked = ranked.view(-1, top)
    return {"top1": _accuracy(ranked, test_y, 1), "top5": _accuracy(ranked, test_y, top)}


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
    n_cls = _check_features(train_x, train_y, test_x, num_classes)
    _check_test_y(test_x, test_y)
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
        "knn": {"k": k, "metric": "euclidean", "top1": _accuracy(m, test_y, 1)},
        "weighted_knn": {
            "k": weighted_k, "metric": "cosine", "temperature": temperature,
            "top1": _accuracy(w, test_y, 1), "top5": _accuracy(w, test_y, top),
        },
    }


# --------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------


def _init_linear(in_features: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """``nn.Linear``'s default init, drawn from ``generator``: weight then bias, both
    U(-1/sqrt(F), 1/sqrt(F)). Returns ``(C, F + 1)``: the bias is the last column."""
    bound = 1.0 / math.sqrt(in_features)
    w = torch.empty(num_classes, in_features).uniform_(-bound, bound, generator=generator)
    b = torch.empty(num_classes, 1).uniform_(-bound, bound, generator=generator)
    return torch.cat([w, b], dim=1)


# torch's fused Adam kernel (what ``torch.optim.Adam(fused=True)`` calls): one op instead of the
# eight below, 9 us instead of ~64 us per step on this CPU. Private, so used only where it exists.
_FUSED_ADAM = getattr(torch, "_fused_adam_", None)


class _Adam:
    """``torch.optim.Adam`` (L2 ``weight_decay``, no amsgrad) for one tensor, written out.

    Same update as torch's single-tensor implementation; written here because constructing the
    first ``torch.optim`` optimizer in a process costs seconds of imports, more than the whole
    kNN, and because one tensor needs no parameter-group machinery. Uses torch's fused kernel
    for the update where the installed torch has it (``fused``).
    """

    def __init__(self, param: Tensor, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 fused: bool | None = None):
        self.param, self.wd, self.b1, self.b2, self.eps = param, weight_decay, *betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0
        # CPU only: that is where it is tested and measured (the CUDA path keeps the written-out update).
        supported = _FUSED_ADAM is not None and param.device.type == "cpu"
        self.fused = supported if fused is None else fused and supported
        self.step_t = torch.zeros((), dtype=torch.float32, device=param.device)

    def step(self, grad: Tensor, lr: float) -> None:
        """One update with gradient ``grad`` (overwritten) at learning rate ``lr``."""
        self.t += 1
        if self.fused:
            self.step_t.fill_(self.t)
            _FUSED_ADAM([self.param], [grad], [self.m], [self.v], [], [self.step_t], amsgrad=False,
                        lr=lr, beta1=self.b1, beta2=self.b2, weight_decay=self.wd, eps=self.eps,
                        maximize=False)
            return
        grad.add_(self.param, alpha=self.wd)
        self.m.lerp_(grad, 1 - self.b1)
        self.v.mul_(self.b2).addcmul_(grad, grad, value=1 - self.b2)
        denom = self.v.sqrt().div_(math.sqrt(1 - self.b2**self.t)).add_(self.eps)
        self.param.addcdiv_(self.m, denom, value=-lr / (1 - self.b1**self.t))


def _train_linear(
    train_x: Tensor,
    train_y: Tensor,
    num_classes: int,
    epochs: int,
    lr: float,
    lr_end: float,
    weight_decay: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    prefetch: bool = False,
) -> Tensor:
    """Train the probe; return its parameters ``(C, F + 1)`` (weight | bias) on ``device``.

    Random draws, all from ``torch.Generator().manual_seed(seed)`` on the CPU: the init
    (:func:`_init_linear`), then one ``randperm(N)`` per epoch cut into consecutive batches
    (the last one smaller when ``batch_size`` does not divide N; the official code requires
    N to be a multiple of 1000).

    The gradient of mean cross-entropy is written by hand, ``dL/dlogits = (softmax - onehot)/B``,
    and the bias is a column of ones appended to the features, so one step is a gather, two
    small matmuls and one Adam update of one tensor: no autograd graph, no parameter groups.
    ``prefetch`` gathers the next batch in a helper thread (see :func:`_prefetched`); the
    result is the same either way.
    """
    gen = torch.Generator().manual_seed(seed)
    n, f = train_x.shape
    param = _init_linear(f, num_classes, gen).to(device)
    x = torch.cat([train_x.to(device, torch.float32), torch.ones(n, 1, device=device)], dim=1)
    # Class-major (C, N) one-hot: the step works on transposed logits (C, B), which measured
    # 2.5x faster than (B, C) for the skinny matmul on a CPU.
    onehot_t = F.one_hot(train_y.to(device, torch.int64), num_classes).to(torch.float32).T.contiguous()
    opt = _Adam(param, weight_decay)
    gamma = (lr_end / lr) ** (1.0 / epochs)
    bs = min(batch_size, n)

    def schedule() -> Iterator[tuple[float, Tensor]]:
        for epoch in range(epochs):
            # ExponentialLR steps after each epoch: epoch e trains at lr * gamma**e.
            perm = torch.randperm(n, generator=gen).to(device)
            for s in range(0, n, bs):
                yield lr * gamma**epoch, perm[s : s + bs]

    xb_buf = [torch.empty(bs, f + 1, device=device) for _ in range(2)]
    yb_buf = [torch.empty(num_classes, bs, device=device) for _ in range(2)]

    def gather(idx: Tensor, turn: int) -> tuple[Tensor, Tensor]:
        m = idx.shape[0]
        return (torch.index_select(x, 0, idx, out=xb_buf[turn][:m]),
                torch.index_select(onehot_t, 1, idx, out=yb_buf[turn][:, :m]))

    helper = ThreadPoolExecutor(1, thread_name_prefix="wmse-probe") if prefetch else None
    try:
        batches = (_prefetched(schedule(), gather, helper) if helper is not None
                   else ((lr_step, *gather(idx, 0)) for lr_step, idx in schedule()))
        for lr_step, xb, yb_t in batches:
            g_t = torch.softmax(torch.mm(param, xb.T), dim=0).sub_(yb_t)  # dL/dlogits^T * B
            opt.step(torch.mm(g_t, xb).mul_(1.0 / xb.shape[0]), lr_step)
    finally:
        if helper is not None:
            helper.shutdown()
    return param.detach()


def _prefetched(plan: Iterator[tuple[float, Tensor]], gather: Callable[[Tensor, int], tuple[Tensor, Tensor]],
                helper: ThreadPoolExecutor) -> Iterator[tuple[float, Tensor, Tensor]]:
    """(lr, x rows, one-hot columns) of each step of ``plan``, with the gather of batch s + 1 (into
    the other buffer) running in ``helper`` while the caller computes step s.

    With one torch thread every op runs in the thread that calls it, so the two overlap on two
    cores. The gather of 1000 random rows is memory-bound, about a third of a step: measured
    1.5x per step against the single-thread loop on the 2-core machine. Handing the helper half
    of the gradient matmul as well was slower (two hand-offs per step cost more than they save).
    """
    turn = 0
    current = next(plan, None)
    batch = helper.submit(gather, current[1], turn) if current is not None else None
    while current is not None:
        xb, yb_t = batch.result()
        upcoming = next(plan, None)
        if upcoming is not None:
            turn ^= 1
            batch = helper.submit(gather, upcoming[1], turn)
        yield current[0], xb, yb_t  # the caller is done with this buffer when it asks for the next
        current = upcoming


def _want_prefetch(prefetch: bool | None, device: torch.device) -> bool:
    if device.type != "cpu":
        return False
    if prefetch is not None:
        return prefetch
    if torch.get_num_threads() != 1:  # each thread's ops would start their own thread team
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return cores >= 2


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    epochs: int = 500,
    lr: float = 1e-2,
    lr_end: float = 1e-6,
    weight_decay: float = 5e-6,
    batch_size: int = 1000,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
    threads: int | None = 1,
    prefetch: bool | None = None,
) -> dict[str, float]:
    """Linear classifier on frozen features, as the official ``eval/sgd.py``.

    ``nn.Linear(F, C)`` (default init), cross-entropy, Adam(lr, weight_decay as L2), lr decayed
    exponentially from ``lr`` to ``lr_end`` over ``epochs`` (stepped per epoch), shuffled batches
    of ``batch_size``; no feature normalisation, no BatchNorm (the official code has neither).

    Args:
        train_x: ``(N, F)`` float features; train_y: ``(N,)`` int labels.
        test_x: ``(M, F)`` float features; test_y: ``(M,)`` int labels.
        device: where to train (the features are copied there once).
        num_classes: default ``max(train_y) + 1`` (as the official code).
        threads: torch CPU threads while training on the CPU (restored after); None keeps the
            current setting. Default 1: each step is a few sub-millisecond ops, and on the shared
            2-core machine two threads made the probe 30x slower (each op waits for the other
            thread to be scheduled) while one thread was never measured slower.
        prefetch: gather the next batch in a second thread while the current step computes
            (CPU only; the same result, about 1.5x faster with two free cores). None: on when
            training on the CPU with one torch thread and this process may use two cores.

    Returns:
        ``{"top1", "top5", "train_top1", "train_loss", "epochs", "seconds"}``; accuracies in
        percent, ``train_loss`` the final mean cross-entropy on the train set (no decay term).
    """
    n_cls = _check_features(train_x, train_y, test_x, num_classes)
    _check_test_y(test_x, test_y)
    if test_x.shape[0] == 0:
        raise ValueError("test_x is empty: nothing to evaluate")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not 0 < lr_end <= lr:
        raise ValueError(f"need 0 < lr_end <= lr, got lr={lr}, lr_end={lr_end}")
    dev = torch.device(device)
    start = time.perf_counter()
    saved = torch.get_num_threads()
    if threads is not None and dev.type == "cpu":
        torch.set_num_threads(threads)
    try:
        param = _train_linear(train_x, train_y, n_cls, epochs, lr, lr_end, weight_decay,
                              batch_size, seed, dev, prefetch=_want_prefetch(prefetch, dev))
    finally:
        torch.set_num_threads(saved)
    w, b = param[:, :-1], param[:, -1]
    top = min(5, n_cls)
    with torch.no_grad():
        test_logits = test_x.to(dev, torch.float32) @ w.T + b
        train_logits = train_x.to(dev, torch.float32) @ w.T + b
        ranked = test_logits.topk(top, dim=1).indices
        y_tr = train_y.to(dev, torch.int64)
        train_loss = float(F.cross_entropy(train_logits, y_tr))
        train_top1 = 100.0 * float((train_logits.argmax(1) == y_tr).double().mean())
    return {
        "top1": _accuracy(ranked, test_y, 1),
        "top5": _accuracy(ranked, test_y, top),
        "train_top1": train_top1,
        "train_loss": train_loss,
        "epochs": epochs,
        "seconds": time.perf_counter() - start,
    }


# --------------------------------------------------------------------------------------------
# The whole protocol and its table
# --------------------------------------------------------------------------------------------


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
    from .diagnostics import embedding_diagnostics  # local: keeps the import graph one-way

    n_cls = _check_features(train_x, train_y, test_x, num_classes)
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


def flatten(d: Mapping, prefix: str = "", lists: bool = False) -> Iterator[tuple[str, object]]:
    """(dotted.key, value) for every leaf of a nested mapping; lists and tuples only when ``lists``."""
    for key, val in d.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(val, Mapping):
            yield from flatten(val, name, lists)
        elif lists or not isinstance(val, (list, tuple)):
            yield name, val


def format_table(results: Mapping) -> str:
    """Two-column text table of every scalar in a (nested) results dict; lists are left out.

    Nested keys are joined with dots (``linear.top1``); floats get 2 decimals, or 4 significant
    digits when they are small (losses, learning rates).
    """
    rows = []
    for name, val in flatten(results):
        if isinstance(val, bool) or not isinstance(val, float):
            text = str(val)
        elif val != 0 and abs(val) < 0.1:
            text = f"{val:.4g}"
        else:
            text = f"{val:.2f}"
        rows.append((name, text))
    if not rows:
        return "(no results)"
    width = max(len(n) for n, _ in rows)
    vwidth = max(len(v) for _, v in rows)
    lines = [f"{'metric'.ljust(width)}  {'value'.rjust(vwidth)}", "-" * (width + 2 + vwidth)]
    lines += [f"{n.ljust(width)}  {v.rjust(vwidth)}" for n, v in rows]
    return "\n".join(lines)
