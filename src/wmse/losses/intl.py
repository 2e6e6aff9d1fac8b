"""INTL: IterNorm with trace loss (Weng et al., "Modulate Your Spectrum in Self-Supervised Learning", ICLR 2024).

Each view's embedding is transformed by IterNorm along the batch axis (channel whitening, as CW-RGP): each image is
centred over its channels, the N x N Gram matrix Sigma = X X^T / (D - 1) of the images is trace-normalised,
Sigma_N = Sigma / tr(Sigma), and T Newton iterations P_{k+1} = (3 P_k - P_k^3 Sigma_N) / 2 from P_0 = I give
W = P_T / sqrt(tr(Sigma)); the output is W^T X. With few iterations this is *not* a converged whitening but a
spectral transformation (a polynomial in Sigma_N) that the paper analyses as such; the trace loss
sum_n (Var_channels(t_n) - 1)^2 over the images of each transformed view keeps that spectrum in check.

Semantics follow the authors' code, github.com/winci-ai/INTL (``methods/intl.py``, ``methods/whitening.py``
``Whitening2dIterNorm`` with ``axis=0``, ``methods/base.py``):

* IterNorm with ``iterations=4`` (``--iters`` default in ``cifar/cfg.py`` and ``cfg.py``), no groups (one
  N x N matrix per view), no eps / shrinkage, no stop-gradient (the momentum-encoder variant ``intl_m`` is a
  separate method);
* each view is transformed on its own; the loss pairs every view i >= 1 with view 0:
  (1 / (K - 1)) sum_{i>=1} [ (2 - 2 cos(t_i, t_0)) + beta (TL(t_i) + TL(t_0)) ] with the cosine averaged over
  images (``norm_mse_loss``), so view 0's trace loss has weight beta and the others beta / (K - 1);
* TL(t) = sum_n (||t_n - mean_c(t_n)||^2 / (D - 1) - 1)^2: each image's variance over its channels (the
  diagonal of the output's N x N Gram), summed over images, not averaged;
* beta = 0.01 (log2(bs) - 3) (``cal_trade_off``, axis 0), with bs the *global* batch: it is computed from
  ``cfg.bs`` before the batch is divided among the GPUs, and IterNorm gathers all ranks' embeddings
  (``FullGatherLayer``) before the transformation, so N here is the gathered batch: 0.05 for their 256.

Why not :func:`wmse.whitening.newton_schulz_matrix`: that is a coupled Newton-Schulz iteration on a
Frobenius-normalised matrix, run to convergence (15 iterations) to give C^{-1/2}; IterNorm is the uncoupled
iteration on the trace-normalised matrix, and at T = 4 the two give different matrices. INTL is defined by the
latter, so its four matmul lines are written here.

Robustness: the iteration is a polynomial in Sigma_N, so a singular Gram matrix (N >= D, duplicated or collapsed
images) needs no factorisation fallback: the null directions are amplified by 1.5 per iteration, about 5x at the
authors' T = 4. The uncoupled iteration is numerically unstable when run long: near convergence (about 10
iterations for a well-conditioned Gram matrix) rounding errors grow again and, by a few tens of iterations, can
overflow; keep T small, as IterNorm does. A zero trace is floored, so an embedding constant over its channels
gives zeros, not NaN.

Distributed training: as their code, gather every rank's embeddings with a differentiable all_gather whose
backward sums the gradient over ranks (their ``FullGatherLayer``; ``torch.distributed.nn.functional.all_gather``)
and call this loss on the gathered views; DDP's gradient averaging then gives exactly the gradient of the
global-batch loss, and ``trade_off=None`` sees the global batch size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..whitening import _JITTER_FLOOR, factor_dtype
from .wmse import as_views

__all__ = ["intl_loss", "iternorm", "trace_loss", "default_trade_off"]


def default_trade_off(batch_size: int) -> float:
    """The authors' trace-loss weight for channel whitening, 0.01 * (log2(batch_size) - 3)."""
    beta = 0.01 * (math.log2(batch_size) - 3)
    if beta < 0:
        raise ValueError(
            f"trade_off: the authors' default 0.01 * (log2(N) - 3) is negative for N={batch_size} < 8 images; "
            "pass trade_off explicitly"
        )
    return beta


def iternorm(x: Tensor, iterations: int = 4) -> Tensor:
    """IterNorm along the batch axis of each (..., N, D) slice: W^T X with W = P_T / sqrt(tr(Sigma)).

    X is each image (row) centred over its channels, Sigma = X X^T / (D - 1) the N x N Gram matrix, and
    P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sigma / tr(Sigma) from P_0 = I. Computed in x's dtype (pass float32 / float64).
    """
    D = x.shape[-1]
    xn = x - x.mean(-1, keepdim=True)
    sigma = xn @ xn.mT / (D - 1)
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(_JITTER_FLOOR)
    sigma_n = sigma / trace
    P = torch.eye(sigma.shape[-1], dtype=x.dtype, device=x.device).expand_as(sigma)
    for _ in range(iterations):
        P = 1.5 * P - 0.5 * (P @ P @ P) @ sigma_n
    return (P * trace.rsqrt()).mT @ xn


def trace_loss(t: Tensor) -> Tensor:
    """sum over images of (variance over channels - 1)^2 for each (..., N, D) slice -> (...)."""
    tc = t - t.mean(-1, keepdim=True)
    var = tc.pow(2).sum(-1) / (t.shape[-1] - 1)
    return (var - 1).pow(2).sum(-1)


def intl_loss(views: Sequence[Tensor] | Tensor, iterations: int = 4, trade_off: float | None = None) -> Tensor:
    """The INTL loss (Weng et al., 2024), as the authors' code computes it.

    Args:
        views: K >= 2 embeddings (projector outputs) of the same N images, a sequence of (N, D) tensors or one
            (K, N, D) tensor; view 0 is the one every other view is compared with. Under DDP pass the views
            gathered over ranks (see the module docstring).
        iterations: IterNorm iterations T (theirs: 4).
        trade_off: weight beta of the trace loss; None is theirs, 0.01 * (log2(N) - 3) (0.05 for N = 256).

    Returns:
        Scalar (float32, or float64 for float64 input; also under autocast):
        mean_{i>=1} [ 2 - 2 mean_n cos(t_i,n, t_0,n) + beta (TL(t_i) + TL(t_0)) ], t = IterNorm of each view.
    """
    h = as_views(views)
    K, N, D = h.shape
    if N < 2 or D < 2:
        raise ValueError(f"views: IterNorm needs at least 2 images and 2 channels, got N={N}, D={D}")
    if not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1 (theirs: 4), got {iterations!r}")
    beta = default_trade_off(N) if trade_off is None else trade_off
    if beta < 0:
        raise ValueError(f"trade_off must be >= 0, got {trade_off}")
    with torch.autocast(h.device.type, enabled=False):
        t = iternorm(h.to(factor_dtype(h)), iterations)
        tl = trace_loss(t)  # (K,)
        u = F.normalize(t, dim=-1)
        mse = 2 - 2 * (u[1:] * u[:1]).sum(-1).mean(-1)  # (K - 1,)
        return (mse + beta * (tl[1:] + tl[0])).mean()
