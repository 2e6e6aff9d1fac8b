"""VICReg (Bardes, Ponce and LeCun, "VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised
Learning", ICLR 2022): invariance, variance and covariance terms on the embeddings of two views.

Semantics follow the authors' code, github.com/facebookresearch/vicreg (``main_vicreg.py``, ``VICReg.forward``):

* invariance: ``F.mse_loss(x, y)``, the mean over all N x D elements of (x - y)^2;
* variance: each branch is centred; std = sqrt(unbiased batch variance + eps) per channel (eps = 1e-4);
  v = mean_c relu(1 - std_x) / 2 + mean_c relu(1 - std_y) / 2;
* covariance: C = X^T X / (N - 1) of each centred branch; c = sum of its squared off-diagonal entries / D,
  *summed* (not averaged) over the two branches;
* loss = 25 * invariance + 25 * v + 1 * c (``--sim-coeff``, ``--std-coeff``, ``--cov-coeff``).

Where the paper differs: its objective is lambda s + mu [v(Z) + v(Z')] + nu [c(Z) + c(Z')], i.e. the two branches'
variance terms summed; the code averages them (the ``/ 2``), so at the published mu = 25 the code's variance
term weighs half of the paper's formula. We follow the code, which produced the published results.

Distributed training: their code computes the invariance term on each rank's local batch, then gathers x and y
over all ranks with a differentiable all_gather whose backward sums the gradient over ranks (``FullGatherLayer``)
and computes variance and covariance on the gathered batch (dividing by the global ``batch_size - 1``, which is
N - 1 of the gathered tensors). Under DDP's gradient averaging that is exactly the gradient of this loss on the
gathered batch (the mean of the local MSEs of equal shards is the global MSE). So a distributed caller gathers z1
and z2 in the same differentiable way (``torch.distributed.nn.functional.all_gather``, or a layer like theirs)
and calls :func:`vicreg_loss` on the gathered tensors; only the logged value differs from theirs, whose
invariance term is the local one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..whitening import factor_dtype

__all__ = ["vicreg_loss", "vicreg_terms"]


def _check(z1: Tensor, z2: Tensor, eps: float) -> None:
    if not isinstance(z1, Tensor) or not isinstance(z2, Tensor) or z1.dim() != 2 or z1.shape != z2.shape:
        shapes = [tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__ for z in (z1, z2)]
        raise ValueError(
            f"z1 and z2 must be (N, D) tensors of the same shape (the two views of N images), got {shapes}"
        )
    if z1.shape[0] < 2:
        raise ValueError(f"z1, z2: the batch variance needs at least 2 images, got N={z1.shape[0]}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0 (sqrt(var + eps) has an infinite gradient at zero variance), got {eps}")


def _off_diagonal_sq_sum(cov: Tensor) -> Tensor:
    return (cov - torch.diag_embed(cov.diagonal())).pow(2).sum()  # the diagonal is exactly zero: no cancellation


def vicreg_terms(z1: Tensor, z2: Tensor, eps: float = 1e-4) -> tuple[Tensor, Tensor, Tensor]:
    """The three unweighted terms (invariance, variance, covariance) of :func:`vicreg_loss`, in float32
    (float64 for float64 input), also under autocast. z1, z2: (N, D)."""
    _check(z1, z2, eps)
    N, D = z1.shape
    with torch.autocast(z1.device.type, enabled=False):
        dtype = factor_dtype(z1)
        x, y = z1.to(dtype), z2.to(dtype)
        invariance = F.mse_loss(x, y)
        x = x - x.mean(0)
        y = y - y.mean(0)
        std_x = torch.sqrt(x.pow(2).sum(0) / (N - 1) + eps)
        std_y = torch.sqrt(y.pow(2).sum(0) / (N - 1) + eps)
        variance = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
        covariance = (_off_diagonal_sq_sum(x.T @ x / (N - 1)) + _off_diagonal_sq_sum(y.T @ y / (N - 1))) / D
        return invariance, variance, covariance


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> Tensor:
    """The VICReg loss of two views, as the authors' code computes it.

    Args:
        z1, z2: (N, D) expander outputs of the same N images (under DDP: gathered over ranks, see the module
            docstring).
        sim_weight, var_weight, cov_weight: the coefficients of the invariance, variance and covariance terms
            (theirs: 25, 25, 1).
        eps: added to the variance inside the square root (theirs: 1e-4); must be > 0.

    Returns:
        Scalar (float32, or float64 for float64 input; also under autocast):
        sim_weight * mean (z1 - z2)^2 + var_weight * (v(z1) + v(z2)) / 2 + cov_weight * (c(z1) + c(z2)) with
        v(z) = mean_c relu(1 - sqrt(Var_n z_c + eps)) and c(z) = sum_{i != j} Cov(z)_ij^2 / D.
    """
    for name, w in (("sim_weight", sim_weight), ("var_weight", var_weight), ("cov_weight", cov_weight)):
        if w < 0:
            raise ValueError(f"{name} must be >= 0, got {w}")
    invariance, variance, covariance = vicreg_terms(z1, z2, eps)
    return sim_weight * invariance + var_weight * variance + cov_weight * covariance
