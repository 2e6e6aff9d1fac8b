"""Shuffled-DBN (Hua et al., "On Feature Decorrelation in Self-Supervised Learning", ICCV 2021).

The embedding of each view is whitened by a decorrelated batch normalisation: its channels are shuffled by a
random permutation, cut into ``num_groups`` groups of ``D / num_groups`` channels, and each group is ZCA-whitened
over the batch; the channels are then put back in their original order. The loss is the squared Euclidean
distance between the two whitened views of an image, averaged over the batch.

Semantics follow the authors' code, github.com/PatrickHua/FeatureDecorrelationSSL (``models/covnorm.py``, class
``CovNorm`` with ``loss_fn='l22'``; ``models/utils/shuffled_group_whitening.py``, ``ShuffledGroupWhitening``):

* centring is per channel over the batch, and the covariance is the biased one (divided by N, not N - 1:
  their line with N - 1 is commented out);
* the whitening matrix is ZCA, U diag(S)^-1/2 U^T from an eigendecomposition (their default engine ``symeig``),
  with no shrinkage;
* the permutation is drawn afresh on every call of the layer, so the two views get *different* random
  partitions (each view goes through the projector, and its last layer, separately);
* the loss is ``(z1 - z2).norm(dim=1).pow(2).mean()``: not normalised, summed over channels, mean over images;
* ``num_groups`` defaults to 16, the value of all their CIFAR / STL / Tiny-ImageNet configs; ``None`` is their
  automatic rule ``ceil(2 D / N)`` (a group size of half the batch).

The paper's pseudo code (``models/utils/pseudo_code_for_paper.py``) is the same computation.

Robustness: :func:`wmse.whitening.zca_matrix` floors the eigenvalues (no NaN from ``rsqrt`` of a zero
eigenvalue, which their code would give) and has a backward written with divided differences, finite for any
spectrum (autograd through ``eigh`` divides by eigenvalue gaps: NaN for a collapsed batch).

Distributed training: their ``main.py`` wraps the model in ``nn.DataParallel`` and ``main_ddp.py`` in DDP without
any gather or SyncBatchNorm, so every device whitens its own shard of the batch. A distributed caller reproduces
them by calling this loss on each rank's local embeddings (no gathering).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..whitening import factor_dtype, zca_matrix

__all__ = ["dbn_loss"]


def _check_pair(z1: Tensor, z2: Tensor) -> None:
    if not isinstance(z1, Tensor) or not isinstance(z2, Tensor) or z1.dim() != 2 or z1.shape != z2.shape:
        shapes = [tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__ for z in (z1, z2)]
        raise ValueError(
            f"z1 and z2 must be (N, D) tensors of the same shape (the two views of N images), got {shapes}"
        )
    if z1.shape[0] < 2:
        raise ValueError(f"z1, z2: batch statistics need at least 2 images, got N={z1.shape[0]}")


def _resolve_groups(N: int, D: int, num_groups: int | None) -> int:
    """The number of groups: ``num_groups`` itself, or their automatic rule ceil(2 D / N) for None; checked."""
    G = math.ceil(2 * D / N) if num_groups is None else num_groups
    if not isinstance(G, int) or G < 1:
        raise ValueError(f"num_groups must be a positive integer or None (automatic), got {num_groups!r}")
    if D % G != 0:
        raise ValueError(
            f"num_groups: the embedding size D ({D}) must be a multiple of the number of groups ({G}"
            f"{', from the automatic rule ceil(2D/N)' if num_groups is None else ''}); choose a divisor of D"
        )
    if D // G >= N:
        raise ValueError(
            f"num_groups: the group size D / num_groups = {D // G} must be smaller than the batch size N ({N}), "
            f"or every group's covariance is singular; use more groups (num_groups=None gives D/G = N/2)"
        )
    return G


def _permutation(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randperm(n, generator=generator, device=gen_device).to(device)


def dbn_loss(
    z1: Tensor,
    z2: Tensor,
    num_groups: int | None = 16,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The Shuffled-DBN loss of two views (Hua et al., 2021), as the authors' code computes it.

    Args:
        z1, z2: (N, D) projector outputs (before the whitening layer) of the same N images.
        num_groups: G groups of D / G channels, each whitened on its own (their configs: 16); None applies
            their automatic rule G = ceil(2 D / N). D must be a multiple of G and D / G smaller than N.
        shuffle: randomly permute the channels before grouping, a fresh permutation for each view (their
            default; without effect for G = 1).
        generator: random generator of the two channel permutations, drawn for z1 then z2 (reproducibility).

    Returns:
        Scalar (float32, or float64 for float64 input; also under autocast):
        mean_n ||dbn(z1)_n - dbn(z2)_n||^2 with dbn(z) = unshuffle(group-wise ZCA(shuffle(z))), the ZCA using
        the biased (divide by N) batch covariance of each group.
    """
    _check_pair(z1, z2)
    N, D = z1.shape
    G = _resolve_groups(N, D, num_groups)
    k = D // G
    with torch.autocast(z1.device.type, enabled=False):
        dtype = factor_dtype(z1)
        h = torch.stack([z1, z2]).to(dtype)  # (2, N, D)
        perms = None
        if shuffle and G > 1:
            perms = torch.stack([_permutation(D, generator, h.device) for _ in range(2)])  # (2, D)
            h = h.gather(-1, perms[:, None, :].expand(2, N, D))
        x = h.view(2, N, G, k).transpose(1, 2)  # (2, G, N, k)
        xc = x - x.mean(-2, keepdim=True)
        cov = xc.mT @ xc / N
        z = (xc @ zca_matrix(cov)).transpose(1, 2).reshape(2, N, D)
        if perms is not None:  # back to the original channel order
            z = z.gather(-1, perms.argsort(-1)[:, None, :].expand(2, N, D))
        return (z[0] - z[1]).pow(2).sum(-1).mean()
