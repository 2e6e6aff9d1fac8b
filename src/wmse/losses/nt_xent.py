"""NT-Xent (SimCLR, Chen et al. 2020): the contrastive baseline of the W-MSE paper."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..whitening import factor_dtype

__all__ = ["nt_xent_loss"]

# Logit given to a sample's similarity with itself, so softmax ignores it (official value).
_SELF_MASK = 1e9


def nt_xent_loss(z1: Tensor, z2: Tensor, temperature: float = 0.5, normalize: bool = True,
                 anchors: slice | None = None) -> Tensor:
    """NT-Xent (SimCLR) loss of two views, as the official W-MSE code's contrastive baseline.

    z1, z2: (N, D) head outputs of the same N images. For each sample the positive is the other view of
    its image; the 2N - 2 other samples of the batch are negatives. Symmetric in z1 and z2.

    ``anchors``: a slice of the N images; the loss is then the mean over those images' anchors only
    (still against all 2N samples), so the means over disjoint equal slices average to the full loss.
    Distributed training uses it to give each rank its own rows of the global logits matrix instead
    of all of it.

    Computed in float32 (float64 for float64 inputs), also under autocast.
    """
    if z1.dim() != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must be (N, D) tensors of the same shape, got {tuple(z1.shape)}, {tuple(z2.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    rows = range(z1.shape[0])[anchors if anchors is not None else slice(None)]
    if len(rows) == 0 or rows.step != 1:
        raise ValueError(f"anchors must be a non-empty contiguous slice of the {z1.shape[0]} rows, got {anchors}")
    with torch.autocast(z1.device.type, enabled=False):
        dtype = factor_dtype(z1)
        a, b = z1.to(dtype), z2.to(dtype)
        if normalize:
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        sel = slice(rows.start, rows.stop)
        target = torch.arange(rows.start, rows.stop, device=a.device)
        # Each anchor's own column is masked out of its same-view logits.
        self_mask = torch.zeros(len(rows), a.shape[0], dtype=dtype, device=a.device)
        self_mask[torch.arange(len(rows), device=a.device), target] = _SELF_MASK
        logits_ab, logits_ba = a[sel] @ b.T / temperature, b[sel] @ a.T / temperature
        logits_aa = a[sel] @ a.T / temperature - self_mask
        logits_bb = b[sel] @ b.T / temperature - self_mask
        loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], dim=1), target)
        loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], dim=1), target)
        return (loss_a + loss_b) / 2
