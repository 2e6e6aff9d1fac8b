"""The BYOL pair loss (Grill et al. 2020): normalised MSE between online predictions and targets."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..whitening import factor_dtype

__all__ = ["byol_loss"]


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL pair loss: mean over rows of ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z).

    p: (N, D) online predictions; z: (N, D) target projections (detach them: BYOL stops their gradient).
    The symmetric BYOL loss is byol_loss(p1, z2) + byol_loss(p2, z1). Computed in float32 (float64 for
    float64 input), also under autocast.
    """
    if p.dim() != 2 or p.shape != z.shape:
        raise ValueError(f"p and z must be (N, D) tensors of the same shape, got {tuple(p.shape)}, {tuple(z.shape)}")
    with torch.autocast(p.device.type, enabled=False):
        dtype = factor_dtype(p)
        cos = (F.normalize(p.to(dtype), dim=1) * F.normalize(z.to(dtype), dim=1)).sum(-1)
        return 2 - 2 * cos.mean()
