"""Random parameters of one view: RandomResizedCrop boxes, flips, ColorJitter's factors and op
order, RandomGrayscale, drawn for a whole batch at once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .recipe import AugmentConfig

__all__ = ["ViewParams", "sample_crop_boxes", "sample_params"]


@dataclass
class ViewParams:
    """Random parameters of one view for N images (all on one device).

    Attributes:
        boxes: int64 ``(N, 4)``: top, left, height, width of the crop.
        flip: bool ``(N,)``.
        jitter: bool ``(N,)``: ColorJitter applied.
        order: int64 ``(N, 4)``: op applied at each stage (0 brightness, 1 contrast, 2 saturation, 3 hue).
        factors: float32 ``(N, 4)``: brightness, contrast, saturation factors and hue shift.
        gray: bool ``(N,)``: RandomGrayscale applied.
    """

    boxes: Tensor
    flip: Tensor
    jitter: Tensor
    order: Tensor
    factors: Tensor
    gray: Tensor

    def to(self, device: torch.device) -> "ViewParams":
        return ViewParams(*(getattr(self, f).to(device, non_blocking=True) for f in
                            ("boxes", "flip", "jitter", "order", "factors", "gray")))


def _uniform(n: int | tuple[int, ...], lo: float, hi: float, generator: torch.Generator | None,
             device: torch.device) -> Tensor:
    shape = (n,) if isinstance(n, int) else n
    return torch.rand(shape, generator=generator, device=device, dtype=torch.float64) * (hi - lo) + lo


def sample_crop_boxes(n: int, height: int, width: int, scale: Sequence[float], ratio: Sequence[float],
                      generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> Tensor:
    """Vectorised ``torchvision.transforms.RandomResizedCrop.get_params`` for n images.

    Up to 10 tries per image of area ~ U(scale) * H * W and log aspect ratio ~ U(log ratio); the
    first try that fits is used, otherwise the central crop clipped to the ratio range.

    Returns:
        int64 ``(n, 4)``: top, left, height, width.
    """
    device = torch.device(device)
    area = height * width
    target = area * _uniform((n, 10), scale[0], scale[1], generator, device)
    aspect = torch.exp(_uniform((n, 10), math.log(ratio[0]), math.log(ratio[1]), generator, device))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.to(torch.float32).argmax(dim=1, keepdim=True)  # index of the first fitting try (ties: first)
    ok = fits.any(dim=1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    # Fallback, as torchvision: whole image, clipped to the nearest allowed aspect ratio.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    h = torch.where(ok, h, torch.full_like(h, fh))
    w = torch.where(ok, w, torch.full_like(w, fw))
    u = torch.rand((n, 2), generator=generator, device=device, dtype=torch.float64)
    top = torch.floor(u[:, 0] * (height - h + 1))
    left = torch.floor(u[:, 1] * (width - w + 1))
    top = torch.where(ok, top, torch.full_like(top, (height - fh) // 2))
    left = torch.where(ok, left, torch.full_like(left, (width - fw) // 2))
    return torch.stack([top, left, h, w], dim=1).to(torch.int64)


def sample_params(cfg: AugmentConfig, n: int, height: int, width: int,
                  generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> ViewParams:
    """Draw the parameters of one view for n images of size (height, width)."""
    device = torch.device(device)
    boxes = sample_crop_boxes(n, height, width, cfg.crop_scale, cfg.crop_ratio, generator, device)
    u = torch.rand((n, 3), generator=generator, device=device)
    b, c, s, hue = cfg.jitter
    factors = torch.stack([
        _uniform(n, max(0.0, 1 - b), 1 + b, generator, device),
        _uniform(n, max(0.0, 1 - c), 1 + c, generator, device),
        _uniform(n, max(0.0, 1 - s), 1 + s, generator, device),
        _uniform(n, -hue, hue, generator, device),
    ], dim=1).to(torch.float32)
    order = torch.rand((n, 4), generator=generator, device=device).argsort(dim=1)  # uniform permutations
    return ViewParams(boxes=boxes, flip=u[:, 0] < cfg.flip_p, jitter=u[:, 1] < cfg.jitter_p, order=order,
                      factors=factors, gray=u[:, 2] < cfg.grayscale_p)
