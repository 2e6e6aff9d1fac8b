"""The linear probe of the official ``eval/sgd.py``: ``nn.Linear`` + cross-entropy + Adam +
``ExponentialLR``, trained with hand-written gradients and Adam update (one tensor, no autograd),
and on the CPU with the next batch gathered in a helper thread."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor

from .common import accuracy, check_features, check_test_y

# (lr of the step, indices of its batch), in training order.
Plan = Iterator[tuple[float, Tensor]]
# (batch indices, buffer turn 0 or 1) -> (x rows (B, F + 1), one-hot columns (C, B)).
Gather = Callable[[Tensor, int], tuple[Tensor, Tensor]]


def _init_linear(in_features: int, num_classes: int, generator: torch.Generator) -> Tensor:
    """``nn.Linear``'s default init, drawn from ``generator``: weight then bias, both
    U(-1/sqrt(F), 1/sqrt(F)). Returns ``(C, F + 1)``: the bias is the last column."""
    bound = 1.0 / math.sqrt(in_features)
    w = torch.empty(num_classes, in_features).uniform_(-bound, bound, generator=generator)
    b = torch.empty(num_classes, 1).uniform_(-bound, bound, generator=generator)
    return torch.cat([w, b], dim=1)


class _Adam:
    """``torch.optim.Adam`` (L2 ``weight_decay`` added to the gradient, no amsgrad) for one
    tensor, written out with public ops.

    The same update, op for op, as torch's single-tensor implementation (``foreach=False``); a
    test checks it against ``torch.optim.Adam``. Written out rather than calling
    ``torch.optim.Adam(fused=True)`` because a probe step is a few small ops, so per-step overhead
    counts: ``optimizer.step()``'s Python machinery (hooks, parameter groups, state lookups) costs
    more than these eight ops on a (10, 513) tensor (figures: benchmarks/README.md).
    """

    def __init__(self, param: Tensor, weight_decay: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.wd, self.b1, self.b2, self.eps = param, weight_decay, *betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    def step(self, grad: Tensor, lr: float) -> None:
        """One update with gradient ``grad`` (overwritten) at learning rate ``lr``."""
        self.t += 1
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
    bs = min(batch_size, n)
    x, onehot_t = _probe_inputs(train_x, train_y, num_classes, device)
    opt = _Adam(param, weight_decay)
    plan = _plan(n, bs, epochs, lr, lr_end, gen, device)
    with _batches(plan, _gatherer(x, onehot_t, bs), prefetch) as batches:
        for lr_step, xb, yb_t in batches:
            g_t = torch.softmax(torch.mm(param, xb.T), dim=0).sub_(yb_t)  # dL/dlogits^T * B
            opt.step(torch.mm(g_t, xb).mul_(1.0 / xb.shape[0]), lr_step)
    return param.detach()


def _probe_inputs(train_x: Tensor, train_y: Tensor, num_classes: int,
                  device: torch.device) -> tuple[Tensor, Tensor]:
    """Features with a column of ones (the bias) ``(N, F + 1)`` and the one-hot labels ``(C, N)``.

    Class-major one-hot because the step works on transposed logits ``(C, B)``: the skinny
    matmul is faster that way round on a CPU (benchmarks/README.md).
    """
    n = train_x.shape[0]
    x = torch.cat([train_x.to(device, torch.float32), torch.ones(n, 1, device=device)], dim=1)
    onehot = F.one_hot(train_y.to(device, torch.int64), num_classes).to(torch.float32)
    return x, onehot.T.contiguous()


def _plan(n: int, bs: int, epochs: int, lr: float, lr_end: float, gen: torch.Generator,
          device: torch.device) -> Plan:
    """(lr, batch indices) of every step: one shuffle per epoch, the lr decayed per epoch."""
    gamma = (lr_end / lr) ** (1.0 / epochs)
    for epoch in range(epochs):
        # ExponentialLR steps after each epoch: epoch e trains at lr * gamma**e.
        perm = torch.randperm(n, generator=gen).to(device)
        for s in range(0, n, bs):
            yield lr * gamma**epoch, perm[s : s + bs]


def _gatherer(x: Tensor, onehot_t: Tensor, bs: int) -> Gather:
    """A function that copies a batch's rows of ``x`` and columns of ``onehot_t`` into one of two
    reused buffer pairs (``turn`` 0 or 1), so the helper thread can fill one while a step reads
    the other, and no step allocates."""
    xb_buf = [torch.empty(bs, x.shape[1], device=x.device) for _ in range(2)]
    yb_buf = [torch.empty(onehot_t.shape[0], bs, device=x.device) for _ in range(2)]

    def gather(idx: Tensor, turn: int) -> tuple[Tensor, Tensor]:
        m = idx.shape[0]
        return (torch.index_select(x, 0, idx, out=xb_buf[turn][:m]),
                torch.index_select(onehot_t, 1, idx, out=yb_buf[turn][:, :m]))

    return gather


@contextmanager
def _batches(plan: Plan, gather: Gather, prefetch: bool) -> Iterator[Iterator[tuple[float, Tensor, Tensor]]]:
    """(lr, x rows, one-hot columns) of each step, gathered inline or one step ahead in a helper
    thread; the helper is shut down on the way out, also when training fails."""
    if not prefetch:
        yield ((lr_step, *gather(idx, 0)) for lr_step, idx in plan)
        return
    helper = ThreadPoolExecutor(1, thread_name_prefix="wmse-probe")
    try:
        yield _prefetched(plan, gather, helper)
    finally:
        helper.shutdown()


def _prefetched(plan: Plan, gather: Gather, helper: ThreadPoolExecutor
                ) -> Iterator[tuple[float, Tensor, Tensor]]:
    """(lr, x rows, one-hot columns) of each step of ``plan``, with the gather of batch s + 1 (into
    the other buffer) running in ``helper`` while the caller computes step s.

    With one torch thread every op runs in the thread that calls it, so the two overlap on two
    cores. The gather of 1000 random rows is memory-bound and a good part of a step, so hiding
    it pays; handing the helper half of the gradient matmul as well did not (two hand-offs per
    step cost more than they save). Figures: benchmarks/README.md.
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
            current setting. Default 1: each step is a few sub-millisecond ops, too small to
            split, and with two threads every op also waits for the second thread to be
            scheduled, which on a busy machine makes the probe many times slower
            (benchmarks/README.md).
        prefetch: gather the next batch in a second thread while the current step computes
            (CPU only; the same result, faster with two free cores). None: on when training on
            the CPU with one torch thread and this process may use two cores.

    Returns:
        ``{"top1", "top5", "train_top1", "train_loss", "epochs", "seconds"}``; accuracies in
        percent, ``train_loss`` the final mean cross-entropy on the train set (no decay term).
    """
    n_cls = check_features(train_x, train_y, test_x, num_classes)
    check_test_y(test_x, test_y)
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
    return {**_scores(param, train_x, train_y, test_x, test_y, n_cls), "epochs": epochs,
            "seconds": time.perf_counter() - start}


def _scores(param: Tensor, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor,
            num_classes: int) -> dict[str, float]:
    """Test top-1/top-5 and train top-1/mean cross-entropy of the trained parameters."""
    dev = param.device
    w, b = param[:, :-1], param[:, -1]
    top = min(5, num_classes)
    with torch.no_grad():
        test_logits = test_x.to(dev, torch.float32) @ w.T + b
        train_logits = train_x.to(dev, torch.float32) @ w.T + b
        ranked = test_logits.topk(top, dim=1).indices
        y_tr = train_y.to(dev, torch.int64)
        train_loss = float(F.cross_entropy(train_logits, y_tr))
        train_top1 = 100.0 * float((train_logits.argmax(1) == y_tr).double().mean())
    return {
        "top1": accuracy(ranked, test_y, 1),
        "top5": accuracy(ranked, test_y, top),
        "train_top1": train_top1,
        "train_loss": train_loss,
    }
