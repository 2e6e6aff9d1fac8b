"""Barlow Twins (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021).

Semantics follow the authors' code, github.com/facebookresearch/barlowtwins (``main.py``, ``BarlowTwins.forward``):

* each branch's projector output goes through ``nn.BatchNorm1d(D, affine=False)`` in training mode: centred with
  the batch mean, divided by sqrt(biased batch variance + 1e-5) (BatchNorm's own eps and its biased variance;
  the paper's formula normalises "along the batch dimension" without stating either);
* c = bn(z1)^T bn(z2) / batch_size, a D x D cross-correlation (divided by N, not N - 1);
* loss = sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2 with lambd = 0.0051 (``--lambd``).

Distributed training, in their code: the model is converted with ``SyncBatchNorm`` (so ``bn`` standardises with
the global batch statistics), each rank computes its local bn(z1)^T bn(z2) divided by the *global* batch size
(``args.batch_size``), and ``torch.distributed.all_reduce`` sums c over ranks before the loss. That all_reduce is
not autograd-aware: the loss value is the global one, but under DDP's gradient averaging the gradient is
1 / world_size of the global-batch loss's gradient (facebookresearch/barlowtwins#8, lightly-ai/lightly#1977).
Two ways to reproduce it here:

1. gather z1 and z2 over ranks with a differentiable all_gather whose backward sums over ranks
   (``torch.distributed.nn.functional.all_gather``) and call :func:`barlow_twins_loss` on the gathered
   tensors: the value is theirs and the gradient is the exact global-batch gradient (world_size times theirs;
   with LARS, which rescales each weight's update, that matters only for the weight-decay balance and for the
   biases and norms, which LARS does not adapt);
2. exactly their sharded computation: standardise each branch with ``nn.SyncBatchNorm(D, affine=False)``, then
   ``c = barlow_twins_cross_correlation(z1n, z2n, batch_size=global_batch, standardize=False)``, sum c over ranks
   (``torch.distributed.nn.functional.all_reduce`` for the exact gradient, the in-place
   ``torch.distributed.all_reduce`` for theirs), and ``barlow_twins_objective(c, lambd)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..whitening import factor_dtype

__all__ = ["barlow_twins_loss", "barlow_twins_cross_correlation", "barlow_twins_objective"]


def _check_pair(z1: Tensor, z2: Tensor) -> None:
    if not isinstance(z1, Tensor) or not isinstance(z2, Tensor) or z1.dim() != 2 or z1.shape != z2.shape:
        shapes = [tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__ for z in (z1, z2)]
        raise ValueError(
            f"z1 and z2 must be (N, D) tensors of the same shape (the two views of N images), got {shapes}"
        )


def _batch_norm(v: Tensor, eps: float) -> Tensor:
    """BatchNorm1d(affine=False) in training mode: (v - mean) / sqrt(biased var + eps) per column."""
    vc = v - v.mean(0)
    return vc / torch.sqrt(vc.pow(2).mean(0) + eps)


def barlow_twins_cross_correlation(
    z1: Tensor,
    z2: Tensor,
    eps: float = 1e-5,
    batch_size: int | None = None,
    standardize: bool = True,
) -> Tensor:
    """c = bn(z1)^T bn(z2) / batch_size, (D, D), in float32 (float64 for float64 input), also under autocast.

    Args:
        z1, z2: (N, D) projector outputs of the same N images.
        eps: BatchNorm's eps in bn(z) = (z - mean) / sqrt(biased var + eps) (BatchNorm1d's default, 1e-5).
        batch_size: the divisor; None is N. A rank of a distributed run passes the global batch size, as their
            ``c.div_(args.batch_size)``, and sums c over ranks (see the module docstring).
        standardize: False takes z1, z2 as already standardised (e.g. by ``nn.SyncBatchNorm(D, affine=False)``
            over all ranks, as their code does).
    """
    _check_pair(z1, z2)
    N = z1.shape[0]
    if batch_size is None:
        batch_size = N
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (the global batch size) or None, got {batch_size!r}")
    if standardize and N < 2:
        raise ValueError(f"z1, z2: batch standardisation needs at least 2 images, got N={N}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0 (BatchNorm1d's default is 1e-5), got {eps}")
    with torch.autocast(z1.device.type, enabled=False):
        dtype = factor_dtype(z1)
        a, b = z1.to(dtype), z2.to(dtype)
        if standardize:
            a, b = _batch_norm(a, eps), _batch_norm(b, eps)
        return a.T @ b / batch_size


def barlow_twins_objective(c: Tensor, lambd: float = 0.0051) -> Tensor:
    """sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2 of a (D, D) cross-correlation c."""
    if not isinstance(c, Tensor) or c.dim() != 2 or c.shape[0] != c.shape[1]:
        shape = tuple(c.shape) if isinstance(c, Tensor) else type(c).__name__
        raise ValueError(f"c must be a square (D, D) cross-correlation matrix, got {shape}")
    if lambd < 0:
        raise ValueError(f"lambd must be >= 0 (theirs: 0.0051), got {lambd}")
    diag = c.diagonal()
    on_diag = (diag - 1).pow(2).sum()
    off_diag = (c - torch.diag_embed(diag)).pow(2).sum()  # the diagonal is exactly zero: no cancellation
    return on_diag + lambd * off_diag


def barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float = 0.0051, eps: float = 1e-5) -> Tensor:
    """The Barlow Twins loss of two views, as the authors' code computes it.

    Args:
        z1, z2: (N, D) projector outputs of the same N images (under DDP: gathered over ranks, see the module
            docstring).
        lambd: weight of the off-diagonal (redundancy reduction) term (theirs: 0.0051).
        eps: BatchNorm's eps of the batch standardisation (BatchNorm1d's default, 1e-5).

    Returns:
        Scalar (float32, or float64 for float64 input; also under autocast):
        sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2 with c = bn(z1)^T bn(z2) / N and
        bn(z) = (z - mean_n z) / sqrt(mean_n (z - mean_n z)^2 + eps) per channel.
    """
    if lambd < 0:
        raise ValueError(f"lambd must be >= 0 (theirs: 0.0051), got {lambd}")
    return barlow_twins_objective(barlow_twins_cross_correlation(z1, z2, eps), lambd)
