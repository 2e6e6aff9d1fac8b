"""Whitening of a batch of slices: Cholesky (the paper), ZCA and Newton-Schulz.

Every function here takes ``x`` of shape ``(..., w, D)``: each leading index is an independent slice of
``w`` rows (samples) and ``D`` columns (features), and all slices are whitened in one batched call.

Covariance and factorisation always run in float32 (float64 when given float64), also under autocast:
solvers refuse bf16/fp16, and a covariance accumulated in bf16 loses the accuracy that whitening needs.
The output has the input's dtype.

Robustness: a covariance that is not positive definite (w <= D, duplicated rows, collapsed features)
makes a plain Cholesky fail. Failure is detected per slice with ``torch.linalg.cholesky_ex`` and the slice
is refactorised with a diagonal jitter that grows until it succeeds. See :func:`fallback_count`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .registry import Registry

__all__ = ["WHITENINGS", "WhiteningOp", "whiten", "Whitening", "fallback_count", "covariance", "shrink",
           "robust_cholesky", "factor_dtype", "inverse_factor", "zca_matrix", "newton_schulz_matrix"]

# Jitter added to a failed slice's covariance, as a multiple of its mean variance (plus a tiny absolute
# floor for an all-zero covariance). The first level is far above float32 rounding of a D x D covariance
# (~D * 6e-8 relative), so a positive semi-definite covariance always factorises at the first retry.
_JITTER_LEVELS = (1e-5, 1e-3, 1e-1, 1.0)
_JITTER_FLOOR = 1e-8

_fallbacks: dict[str, Tensor | int] = {}
_warned = False


def factor_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 input, else float32: the precision of covariances and losses, also under autocast."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_input(x: Tensor, name: str = "x") -> None:
    if x.dim() < 2:
        raise ValueError(f"{name} must have shape (..., w, D) with at least 2 dimensions, got shape {tuple(x.shape)}")
    if x.shape[-2] < 2:
        raise ValueError(f"{name} needs at least 2 rows per slice to estimate a covariance, got w={x.shape[-2]}")


def covariance(xc: Tensor) -> Tensor:
    """Unbiased covariance of centred slices. xc: (..., w, D) -> (..., D, D)."""
    return xc.mT @ xc / (xc.shape[-2] - 1)


def shrink(cov: Tensor, eps: float) -> Tensor:
    """(1 - eps) * cov + eps * I, the official shrinkage towards identity (eps = 0 returns cov itself)."""
    if eps == 0.0:
        return cov
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return (1.0 - eps) * cov + eps * eye


def _jitter_scale(cov: Tensor) -> Tensor:
    """Mean variance of each slice, (..., 1, 1): jitter is relative so it is unit-free."""
    mean_var = cov.diagonal(dim1=-2, dim2=-1).mean(-1).abs()
    return (mean_var + _JITTER_FLOOR)[..., None, None]


def _record_fallbacks(count: Tensor | int, device: torch.device) -> None:
    key = str(device)
    _fallbacks[key] = _fallbacks.get(key, 0) + count


def fallback_count(reset: bool = False) -> int:
    """Number of slices whose covariance needed diagonal jitter since the last reset.

    On CUDA the count is kept on the device (no host synchronisation in the loss); reading it here
    synchronises once. Warns once (per process, or since the last reset) the first time a fallback is seen.
    """
    global _warned
    total = sum(int(v) for v in _fallbacks.values())
    if reset:  # count anew, and warn again at the next fallback
        _fallbacks.clear()
        _warned = False
        return total
    if total and not _warned:
        _warned = True
        warnings.warn(
            f"whitening: {total} slice covariance(s) were not positive definite and were factorised with "
            "diagonal jitter. Likely causes: w_size too small for the embedding size (w_size >= 2*D is "
            "recommended), collapsed or duplicated embeddings, or a learning rate that is too high. "
            "A small eps (e.g. 1e-4) makes this rarer.",
            RuntimeWarning,
            stacklevel=2,
        )
    return total


def robust_cholesky(cov: Tensor) -> Tensor:
    """Lower Cholesky factor of each (..., D, D) covariance, retrying failed slices with growing jitter.

    Success is read per slice from ``cholesky_ex``'s info (no exception). On the CPU the retry runs only when
    a slice failed. On other devices reading the flag would synchronise with the host, so one jittered
    factorisation is computed for every slice and selected where the first one failed (no synchronisation).
    """
    L, info = torch.linalg.cholesky_ex(cov)
    failed = info != 0
    on_cpu = cov.device.type == "cpu"
    if on_cpu and not bool(failed.any()):
        return L  # the common case: no jitter to build
    scale = _jitter_scale(cov)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    if not on_cpu:
        L_jit, _ = torch.linalg.cholesky_ex(cov + _JITTER_LEVELS[0] * scale * eye)
        _record_fallbacks(failed.sum(), cov.device)
        return torch.where(failed[..., None, None], L_jit, L)
    _record_fallbacks(int(failed.sum()), cov.device)
    fallback_count()  # warn now: on the CPU the count is free to read
    for level in _JITTER_LEVELS:
        L_jit, info_jit = torch.linalg.cholesky_ex(cov + level * scale * eye)
        L = torch.where(failed[..., None, None], L_jit, L)
        failed = failed & (info_jit != 0)
        if not bool(failed.any()):
            break
    # Still failing only for non-finite input: leave NaN there, the training loop skips such steps.
    return L


def inverse_factor(cov: Tensor) -> Tensor:
    """L^{-1} for the robust Cholesky factor L of each (..., D, D) covariance (lower triangular).

    X L = I is solved from the right: on the CPU (MKL) that is faster than L X = I for the same X
    (benchmarks/README.md, "Whitening").
    """
    L = robust_cholesky(cov)
    eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    return torch.linalg.solve_triangular(L, eye, upper=False, left=False)


class _CholeskyWhiten(torch.autograd.Function):
    """Z = (X - mu) L^{-T} with L L^T = (1 - eps) C + eps I, with a hand-derived backward.

    Backward (G = dloss/dZ, m = w - 1, Phi = lower triangle with halved diagonal):
        B = G^T Z,  dX = centre_rows( (G - (1 - eps) / m * Z (Phi(B) + Phi(B)^T)) L^{-1} )
    which is the chain rule through the solve, the Cholesky factor and the covariance collapsed into three
    matmuls. Autograd through the same graph needs about twice the work (two more triangular solves and the
    generic Cholesky backward). The jitter of a failed slice is treated as a constant.
    """

    @staticmethod
    def forward(ctx, x: Tensor, eps: float) -> Tensor:
        xc = x - x.mean(-2, keepdim=True)
        # The D x D inverse factor costs less than solving for all w rows (w > D), and turns both the
        # forward and the backward into plain batched matmuls.
        L_inv = inverse_factor(shrink(covariance(xc), eps))
        z = xc @ L_inv.mT
        ctx.save_for_backward(z, L_inv)
        ctx.coef = (1.0 - eps) / (x.shape[-2] - 1)
        return z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> tuple[Tensor, None]:
        z, L_inv = ctx.saved_tensors
        shape = g.shape
        g, z, L_inv = (t.reshape(-1, *t.shape[-2:]) for t in (g, z, L_inv))  # 3-D for baddbmm
        phi = torch.bmm(g.mT, z).tril_()
        phi.diagonal(dim1=-2, dim2=-1).mul_(0.5)
        gx = torch.bmm(torch.baddbmm(g, z, phi + phi.mT, alpha=-ctx.coef), L_inv)
        return (gx - gx.mean(-2, keepdim=True)).view(shape), None


def _whiten_cholesky(x: Tensor, eps: float) -> Tensor:
    """z = L^{-1} (v - mu) for every row of every slice; see _CholeskyWhiten."""
    return _CholeskyWhiten.apply(x, eps)


class _StableZCA(torch.autograd.Function):
    """C^{-1/2} (eigenvalues floored) with a divided-difference backward.

    For W = V g(L) V^T with g(l) = max(l, f)^{-1/2} (f the floor, treated as a constant), the derivative along a
    symmetric dC is V (F o (V^T dC V)) V^T with F_ij = (g(l_i) - g(l_j)) / (l_i - l_j) and F_ii = g'(l_i)
    (Daleckii-Krein). Written as F_ij = -r_ij / (s_i s_j (s_i + s_j)) with s = sqrt(max(l, f)) and
    r_ij = (max(l_i, f) - max(l_j, f)) / (l_i - l_j) in [0, 1] (1 where both are above the floor, 0 where both
    are floored), no eigenvalue gap is ever a divisor of something that does not vanish with it.
    """

    @staticmethod
    def forward(ctx, cov: Tensor) -> Tensor:
        evals, evecs = torch.linalg.eigh(cov)
        floor = _JITTER_LEVELS[0] * _jitter_scale(cov)[..., 0]  # tiny and negative (rounding) eigenvalues
        inv_sqrt = torch.maximum(evals, floor).rsqrt()
        ctx.save_for_backward(evals, evecs, floor)
        return (evecs * inv_sqrt[..., None, :]) @ evecs.mT

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        evals, evecs, floor = ctx.saved_tensors
        lam = torch.maximum(evals, floor)
        s = lam.sqrt()
        gap = evals[..., :, None] - evals[..., None, :]
        lam_gap = lam[..., :, None] - lam[..., None, :]
        above = (evals > floor).to(evals.dtype)
        same = gap == 0
        ratio = torch.where(same, above[..., :, None] * above[..., None, :],
                            lam_gap / torch.where(same, torch.ones_like(gap), gap))
        F = -ratio / (s[..., :, None] * s[..., None, :] * (s[..., :, None] + s[..., None, :]))
        g_sym = (g + g.mT) / 2
        return evecs @ (F * (evecs.mT @ g_sym @ evecs)) @ evecs.mT


def zca_matrix(cov: Tensor) -> Tensor:
    """Symmetric inverse square root C^{-1/2} of each (..., D, D) covariance via eigh, eigenvalues floored
    for singular covariances (healthy ones are left exact).

    Differentiable at any spectrum: the backward uses divided differences (see ``_StableZCA``), equal to
    autograd through ``eigh`` wherever that is finite, and finite where it is not (repeated eigenvalues:
    a collapsed or duplicated batch). The floor is treated as a constant, as the Cholesky jitter is.
    """
    return _StableZCA.apply(cov)


def newton_schulz_matrix(cov: Tensor, iters: int = 15) -> Tensor:
    """C^{-1/2} by coupled Newton-Schulz iterations (matmuls only).

    C is scaled by its Frobenius norm so every eigenvalue lies in [0, 1], where the iteration converges;
    Y -> A^{1/2} and Z -> A^{-1/2} of the scaled matrix A. Convergence slows with the condition number:
    raise ``iters`` for ill-conditioned covariances. A zero eigenvalue (singular C) is amplified by at most
    1.5 per iteration, so the result stays finite.
    """
    if iters < 1:
        raise ValueError(f"ns_iters must be >= 1, got {iters}")
    D = cov.shape[-1]
    eye = torch.eye(D, dtype=cov.dtype, device=cov.device)
    norm = torch.linalg.matrix_norm(cov)[..., None, None] + _JITTER_FLOOR
    Y = cov / norm
    Z = eye.expand_as(Y)
    for _ in range(iters):
        T = 1.5 * eye - 0.5 * (Z @ Y)
        Y = Y @ T
        Z = T @ Z
    return Z * norm.rsqrt()


@dataclass(frozen=True)
class WhiteningOp:
    """A whitening operator.

    ``matrix(cov, ns_iters)``: W (..., D, D) with z = (v - mu) @ W for covariances (..., D, D).
    ``whiten(xf, eps, ns_iters)``: optional direct path for centred-or-not slices (..., w, D) in the
    factor dtype, for an operator with a faster route than ``xc @ matrix(cov)`` (Cholesky's backward).
    """

    matrix: Callable[[Tensor, int], Tensor]
    whiten: Callable[[Tensor, float, int], Tensor] | None = None


WHITENINGS: Registry[WhiteningOp] = Registry("whitening")
WHITENINGS.add("cholesky", WhiteningOp(matrix=lambda cov, iters: inverse_factor(cov).mT,
                                       whiten=lambda xf, eps, iters: _whiten_cholesky(xf, eps)))
WHITENINGS.add("zca", WhiteningOp(matrix=lambda cov, iters: zca_matrix(cov)))
WHITENINGS.add("newton_schulz", WhiteningOp(matrix=newton_schulz_matrix))


def whitening_name(whitening: str, method: str | None, caller: str) -> str:
    """The whitening operator a call names: ``whitening``, or ``method``, its former (deprecated) name, with a
    DeprecationWarning pointing at the caller's caller. TypeError when both name different operators."""
    if method is None:
        return whitening
    warnings.warn(f"{caller}(method=...) is deprecated: the whitening operator is now whitening=...",
                  DeprecationWarning, stacklevel=3)
    if whitening not in ("cholesky", method):
        raise TypeError(f"{caller}: whitening={whitening!r} and method={method!r}; give only whitening= "
                        "(method= is its former name)")
    return method


def whiten(x: Tensor, whitening: str = "cholesky", eps: float = 0.0, ns_iters: int = 15, *,
           method: str | None = None) -> Tensor:
    """Whiten every slice of ``x`` independently.

    Args:
        x: (..., w, D). Each leading index is one slice of w samples with D features.
        whitening: the operator, a name of :data:`WHITENINGS`: "cholesky" (the paper: z = L^{-1}(v - mu) with
            C = L L^T), "zca" (z = C^{-1/2}(v - mu)) or "newton_schulz" (ZCA approximated by ``ns_iters`` coupled
            Newton-Schulz iterations).
        eps: shrinkage, C' = (1 - eps) C + eps I (the official ``w_eps``).
        ns_iters: iterations for "newton_schulz".
        method: former name of ``whitening`` (deprecated).

    Returns:
        (..., w, D) with zero mean and identity covariance per slice, in x's dtype.
    """
    whitening = whitening_name(whitening, method, "whiten")
    _check_input(x)
    op = WHITENINGS.get(whitening, "whitening")
    with torch.autocast(x.device.type, enabled=False):
        xf = x.to(factor_dtype(x))
        if op.whiten is not None:
            return op.whiten(xf, eps, ns_iters).to(x.dtype)
        xc = xf - xf.mean(-2, keepdim=True)
        z = xc @ op.matrix(shrink(covariance(xc), eps), ns_iters)
    return z.to(x.dtype)


class Whitening(nn.Module):
    """Whitening layer with running statistics for inference.

    Training: ``forward(x)`` whitens each slice of x (..., w, D) with its own statistics (as :func:`whiten`)
    and updates ``running_mean`` (D,) and ``running_cov`` (D, D) with an exponential moving average of the
    batch statistics (all slices pooled). Eval: every row is whitened with the running statistics.
    ``whitening``: the operator, as in :func:`whiten` (``method``: its former, deprecated name).
    """

    def __init__(
        self,
        num_features: int,
        whitening: str = "cholesky",
        eps: float = 0.0,
        momentum: float = 0.01,
        track_running_stats: bool = True,
        ns_iters: int = 15,
        *,
        method: str | None = None,
    ) -> None:
        super().__init__()
        whitening = whitening_name(whitening, method, "Whitening")
        WHITENINGS.check(whitening, "whitening")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.num_features = num_features
        self.whitening = whitening
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.ns_iters = ns_iters
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_cov", torch.eye(num_features))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.num_features:
            raise ValueError(f"expected {self.num_features} features in the last dimension, got {x.shape[-1]}")
        if self.training or not self.track_running_stats:
            if self.training and self.track_running_stats:
                self._update_running_stats(x)
            return whiten(x, self.whitening, self.eps, self.ns_iters)
        with torch.autocast(x.device.type, enabled=False):
            cov = shrink(self.running_cov.to(factor_dtype(x)), self.eps)
            W = WHITENINGS[self.whitening].matrix(cov, self.ns_iters)
            z = (x.to(cov.dtype) - self.running_mean.to(cov.dtype)) @ W
        return z.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, x: Tensor) -> None:
        _check_input(x)
        with torch.autocast(x.device.type, enabled=False):
            xf = x.detach().to(factor_dtype(x)).reshape(-1, *x.shape[-2:])
            mean = xf.mean(-2, keepdim=True)
            cov = covariance(xf - mean).mean(0)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.mean(0)[0].to(self.running_mean.dtype), alpha=m)
            self.running_cov.mul_(1 - m).add_(cov.to(self.running_cov.dtype), alpha=m)

    def extra_repr(self) -> str:
        return f"{self.num_features}, whitening={self.whitening!r}, eps={self.eps}, momentum={self.momentum}"
