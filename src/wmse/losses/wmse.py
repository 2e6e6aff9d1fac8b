"""The W-MSE loss (Ermolov et al., ICML 2021): whiten each view's embeddings in slices, then the mean
squared distance of the normalised whitened views of one image."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..whitening import WHITENINGS, whiten, whitening_name

__all__ = ["wmse_loss", "WMSELoss", "pair_mse", "as_views", "check_slices"]


def as_views(views: Sequence[Tensor] | Tensor) -> Tensor:
    """Validate and stack views into one (d, N, D) tensor (a view, not a copy, when given a tensor)."""
    if isinstance(views, Tensor):
        if views.dim() != 3:
            raise ValueError(
                f"views: a tensor of views must have shape (d, N, D), got {tuple(views.shape)}; "
                "pass a list of (N, D) tensors or stack them on a new first dimension"
            )
        stacked = views
    else:
        views = list(views)
        for i, v in enumerate(views):
            if not isinstance(v, Tensor) or v.dim() != 2:
                shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"views[{i}]: each view must be a (N, D) tensor, got {shape}")
        if len(views) >= 2 and any(v.shape != views[0].shape for v in views):
            shapes = [tuple(v.shape) for v in views]
            raise ValueError(f"views: all views must have the same shape (N, D) (same images), got {shapes}")
        stacked = torch.stack(views) if len(views) >= 2 else None
    d = len(views)
    if d < 2:
        raise ValueError(f"views: need at least 2 views of each image, got {d}; pass d >= 2 augmented views")
    return stacked


def check_slices(N: int, w_size: int) -> None:
    """ValueError unless N images cut into whole slices of ``w_size`` (W-MSE's and CW-RGP's slicing)."""
    if w_size > N:
        raise ValueError(f"w_size ({w_size}) is larger than the number of images N ({N}); use w_size <= N")
    if N % w_size != 0:
        raise ValueError(
            f"w_size: the number of images N ({N}) must be a multiple of w_size ({w_size}); "
            "choose a batch size that w_size divides"
        )


def _check_slicing(N: int, D: int, w_size: int, w_iter: int) -> None:
    check_slices(N, w_size)
    if w_size <= D:
        raise ValueError(
            f"w_size ({w_size}) must be larger than the embedding size D ({D}) or the covariance is singular; "
            f"w_size >= 2*D ({2 * D}) is recommended"
        )
    if w_iter < 1:
        raise ValueError(f"w_iter must be >= 1, got {w_iter}")


def _slices(h: Tensor, w_size: int, w_iter: int, generator: torch.Generator | None) -> Tensor:
    """Cut (d, N, D) into (d, w_iter * N / w_size, w_size, D) along w_iter random permutations.

    The same permutation is used for every view, so row r of every view is the same image: the pair loss
    can be taken in permuted order and nothing is scattered back. With w_size == N there is one slice and
    the loss does not depend on the permutation, so no copy is made at all.
    """
    d, N, D = h.shape
    if w_size == N:
        return h.unsqueeze(1)
    device = generator.device if generator is not None else h.device
    perms = torch.stack([torch.randperm(N, generator=generator, device=device) for _ in range(w_iter)])
    return h.index_select(1, perms.view(-1).to(h.device)).view(d, w_iter * (N // w_size), w_size, D)


class _NormalizedPairLoss(torch.autograd.Function):
    """Mean over view pairs i < j and rows of 2 - 2 cos(z_i, z_j), with a fused backward.

    With u_i = z_i / |z_i| and s = sum_i u_i: sum_{i<j} u_i.u_j = (|s|^2 - d) / 2, so the cost is linear in
    the number of views d, and dloss/dz_i = -2 / (P M |z_i|) (s - (u_i.s) u_i) for P pairs and M rows:
    a handful of elementwise passes instead of autograd's graph through F.normalize.
    """

    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:
        d = z.shape[0]
        rows = z[0].numel() // z.shape[-1]
        pairs = d * (d - 1) / 2
        inv_norm = z.norm(dim=-1, keepdim=True).clamp_min_(1e-12).reciprocal_()
        u = z * inv_norm
        total = u.sum(0)
        cos_sum = (total * total).sum(-1).sub_(d).sum()  # sum over rows of 2 * sum_{i<j} u_i.u_j
        ctx.save_for_backward(u, total, inv_norm)
        ctx.scale = 2.0 / (pairs * rows)
        return 2 - cos_sum / (pairs * rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor) -> Tensor:
        u, total, inv_norm = ctx.saved_tensors
        proj = (u * total).sum(-1, keepdim=True)
        grad = torch.addcmul(total, proj, u, value=-1.0)  # s - (u_i.s) u_i, broadcast over views
        return grad.mul_(inv_norm * (-ctx.scale * g))


def pair_mse(z: Tensor, normalize: bool = True) -> Tensor:
    """Mean over all view pairs i < j and all rows of the (normalised) squared distance.

    z: (d, ..., D). With normalize: ||z_i/|z_i| - z_j/|z_j|||^2 = 2 - 2 cos(z_i, z_j); without: the
    mean squared error per element (F.mse_loss). Both use sum_{i<j} a_i.a_j = (|sum a|^2 - sum |a|^2) / 2
    so the cost is linear, not quadratic, in the number of views.
    """
    if normalize:
        return _NormalizedPairLoss.apply(z)
    d, D = z.shape[0], z.shape[-1]
    pairs = d * (d - 1) / 2
    total = z.sum(0)
    sq_dist = d * (z * z).sum(-1).sum(0) - (total * total).sum(-1)
    return sq_dist.mean() / (pairs * D)


def wmse_loss(
    views: Sequence[Tensor] | Tensor,
    w_size: int,
    w_iter: int = 1,
    eps: float = 0.0,
    normalize: bool = True,
    whitening: str = "cholesky",
    generator: torch.Generator | None = None,
    ns_iters: int = 15,
    *,
    method: str | None = None,
) -> Tensor:
    """The W-MSE loss (Ermolov et al., 2021).

    Args:
        views: d >= 2 embeddings of the same N images, a sequence of (N, D) tensors or one (d, N, D) tensor.
        w_size: images per whitening slice; N must be a multiple of it and it must exceed D
            (w_size >= 2*D recommended).
        w_iter: repetitions with fresh random slicing; the loss is averaged over them.
        eps: covariance shrinkage towards identity.
        normalize: MSE of L2-normalised whitened views (the paper); False gives plain MSE (official --no_norm).
        whitening: the whitening operator, "cholesky" (paper), "zca" or "newton_schulz".
        generator: random generator for the slice permutations (reproducibility).
        ns_iters: iterations of "newton_schulz".
        method: former name of ``whitening`` (deprecated).

    Returns:
        Scalar loss (float32, or float64 for float64 input): mean over w_iter and view pairs of
        mean_images ||z_i/|z_i| - z_j/|z_j|||^2, gradients through both views and the whitening.
    """
    whitening = whitening_name(whitening, method, "wmse_loss")
    h = as_views(views)
    d, N, D = h.shape
    _check_slicing(N, D, w_size, w_iter)  # whiten() checks the whitening operator
    with torch.autocast(h.device.type, enabled=False):
        h = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
        z = whiten(_slices(h, w_size, w_iter, generator), whitening, eps, ns_iters)
        return pair_mse(z, normalize)


class WMSELoss(nn.Module):
    """W-MSE loss as a module. forward(views) with views d x (N, D) or (d, N, D); see :func:`wmse_loss`
    (``method``: the former, deprecated name of ``whitening``)."""

    def __init__(
        self,
        w_size: int,
        w_iter: int = 1,
        eps: float = 0.0,
        normalize: bool = True,
        whitening: str = "cholesky",
        ns_iters: int = 15,
        *,
        method: str | None = None,
    ) -> None:
        super().__init__()
        whitening = whitening_name(whitening, method, "WMSELoss")
        WHITENINGS.check(whitening, "whitening")
        if w_iter < 1:
            raise ValueError(f"w_iter must be >= 1, got {w_iter}")
        self.w_size, self.w_iter, self.eps = w_size, w_iter, eps
        self.normalize, self.whitening, self.ns_iters = normalize, whitening, ns_iters

    def forward(self, views: Sequence[Tensor] | Tensor, generator: torch.Generator | None = None) -> Tensor:
        return wmse_loss(
            views, self.w_size, self.w_iter, self.eps, self.normalize, self.whitening, generator, self.ns_iters
        )

    def extra_repr(self) -> str:
        return f"w_size={self.w_size}, w_iter={self.w_iter}, eps={self.eps}, whitening={self.whitening!r}"
