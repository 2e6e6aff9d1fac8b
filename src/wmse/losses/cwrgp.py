"""CW-RGP: channel whitening with random group partition (Weng et al., "An Investigation into Whitening Loss
for Self-supervised Learning", NeurIPS 2022).

W-MSE whitens the D channels of a slice of w images (a D x D covariance over the batch axis). Channel whitening
(CW) does the transpose: it whitens the w images of a slice against each other, with the w x w Gram matrix of the
images' (centred) channel vectors, so that after whitening the w images are orthogonal with equal norms. Random
group partition (RGP) splits the channels into groups at random and whitens each group on its own; the loss is
the normalised MSE between the whitened views, as in W-MSE.

Semantics follow the authors' code, github.com/winci-ai/CW-RGP (``base/methods/cwrgp.py`` and
``base/methods/whitening.py``, ``Whitening2d`` with ``axis=0`` and ``Whitening2dZCA``; the CIFAR / STL /
Tiny-ImageNet code, which is W-MSE's code base):

* centring: each image's embedding is centred over *all* D of its channels (``x.mean(1)``), once, before the
  channels are shuffled and grouped: within a group an image's channels are not exactly zero-mean. Nothing is
  centred over the batch (a per-channel offset shared by the batch is not removed);
* per group of k = D / num_groups channels, the w x w Gram matrix A A^T / (k - 1) of the slice's (w, k) block A
  (their ``minus=1``), shrunk as (1 - eps) G + eps I (``w_eps``, default 0);
* ZCA whitening, W = U diag(S)^-1/2 U^T (they use ``svd`` of the symmetric matrix), applied along the batch
  axis: the whitened block is W^T A (w, k); the channels are then put back in their original order;
* the partition is drawn afresh for every view of every slice of every repetition (``torch.randperm(w_dim)``
  inside the loop over views), so the views do *not* share it; ``random_groups=False`` is their ``--no_rg``
  (contiguous groups);
* slicing is W-MSE's: per repetition (``w_iter``) one random permutation of the N images cut into slices of
  ``w_size``, the same slices for every view; loss = mean over repetitions and view pairs of
  2 - 2 cos(z_i, z_j) averaged over images (``norm_mse_loss``), or of the element-wise MSE with
  ``normalize=False`` (their ``--no_norm``).

Their ImageNet variant (``ImageNet/methods/cwrgp.py``) adds an optional covariance penalty (``--cov_w``, switched
off after ``--cov_stop`` epochs); it is not part of the CIFAR method and not computed here.

Random draws, in their order: per repetition one ``randperm(N)`` for the slices, then for each slice and each
view one ``randperm(D)`` for the partition (none when ``random_groups`` is False), all from ``generator``.

Robustness: the ZCA is :func:`wmse.whitening.zca_matrix`: an eigenvalue floor (their code takes ``rsqrt`` of a
zero eigenvalue), and a backward that stays
finite for repeated eigenvalues (duplicated images, collapsed embeddings).

Distributed training: the CIFAR code is single-process (``nn.DataParallel`` on the backbone only, so the loss
sees the whole batch); the ImageNet code runs DDP and whitens each rank's local batch, without gathering. As every
slice is whitened on its own, a distributed caller calls this loss on each rank's local views.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..whitening import factor_dtype, shrink, zca_matrix
from .dbn import _permutation
from .wmse import as_views, check_slices, pair_mse

__all__ = ["cwrgp_loss"]


def _check(N: int, D: int, w_size: int, num_groups: int, w_iter: int, eps: float) -> None:
    if not isinstance(w_size, int) or w_size < 2:
        raise ValueError(f"w_size must be an integer >= 2 (images per whitening slice), got {w_size!r}")
    check_slices(N, w_size)
    if not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"num_groups must be a positive integer, got {num_groups!r}")
    if D % num_groups != 0:
        raise ValueError(
            f"num_groups: the embedding size D ({D}) must be a multiple of num_groups ({num_groups}); "
            "choose a divisor of D"
        )
    if D // num_groups <= w_size:
        raise ValueError(
            f"num_groups: each group has D / num_groups = {D // num_groups} channels, which must exceed w_size "
            f"({w_size}) or the w_size x w_size Gram matrix of a slice is singular; use fewer groups or a "
            "smaller w_size (their CIFAR-10 run: D=512, num_groups=4, w_size=64)"
        )
    if not isinstance(w_iter, int) or w_iter < 1:
        raise ValueError(f"w_iter must be an integer >= 1, got {w_iter!r}")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1) (shrinkage (1 - eps) G + eps I), got {eps}")


def cwrgp_loss(
    views: Sequence[Tensor] | Tensor,
    w_size: int,
    num_groups: int = 4,
    w_iter: int = 1,
    eps: float = 0.0,
    normalize: bool = True,
    random_groups: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """The CW-RGP loss (Weng et al., 2022), as the authors' code computes it.

    Args:
        views: d >= 2 embeddings of the same N images, a sequence of (N, D) tensors or one (d, N, D) tensor.
        w_size: images per whitening slice; N must be a multiple of it, and D / num_groups must exceed it
            (their CIFAR runs: 64 of a batch of 256; their bare default is 128).
        num_groups: channel groups whitened separately (their CIFAR runs: 4 groups of 128 of D=512 channels;
            their bare default is 1).
        w_iter: repetitions with fresh slices and partitions; the loss is averaged over them (their CIFAR-10
            CW-RGP 2 run: 4; default 1).
        eps: shrinkage of each Gram matrix towards identity (their ``w_eps``, default 0).
        normalize: normalised MSE 2 - 2 cos (theirs); False is the element-wise MSE (``--no_norm``).
        random_groups: a fresh random partition per view, slice and repetition (theirs); False keeps
            contiguous groups (``--no_rg``).
        generator: random generator of the slices and partitions (reproducibility), drawn in their order.

    Returns:
        Scalar (float32, or float64 for float64 input; also under autocast): the mean over repetitions, view
        pairs and images of ||z_i/|z_i| - z_j/|z_j|||^2 where z are the channel-whitened views, each row z an
        image's whitened D channels.
    """
    h = as_views(views)
    d, N, D = h.shape
    _check(N, D, w_size, num_groups, w_iter, eps)
    G, k, S = num_groups, D // num_groups, N // w_size
    M = w_iter * S  # slices in all
    with torch.autocast(h.device.type, enabled=False):
        h = h.to(factor_dtype(h))
        rows, chans = [], []
        for _ in range(w_iter):
            rows.append(_permutation(N, generator, h.device))
            if random_groups:
                chans += [_permutation(D, generator, h.device) for _ in range(S * d)]
        x = h.index_select(1, torch.cat(rows)).view(d, M, w_size, D)
        x = x - x.mean(-1, keepdim=True)  # each image centred over its own channels
        perm = None
        if random_groups:  # shuffled channel c of a view's slice is its channel perm[c]
            perm = torch.stack(chans).view(M, d, D).transpose(0, 1)  # (d, M, D)
            x = x.gather(-1, perm[:, :, None, :].expand(d, M, w_size, D))
        A = x.view(d, M, w_size, G, k).transpose(2, 3)  # (d, M, G, w, k)
        gram = shrink(A @ A.mT / (k - 1), eps)  # (d, M, G, w, w)
        z = (zca_matrix(gram).mT @ A).transpose(2, 3).reshape(d, M, w_size, D)
        if perm is not None:  # channels back in their original order
            z = z.gather(-1, perm.argsort(-1)[:, :, None, :].expand(d, M, w_size, D))
        return pair_mse(z, normalize)
