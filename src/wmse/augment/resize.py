"""Crop + resize + flip as two batched matmuls with torch's antialiased resize weights."""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = ["resize_weights", "resized_crop", "crop_workspace_size"]


def _filter(d: Tensor, interpolation: str) -> Tensor:
    """Resampling kernel at distance d: Keys cubic (a = -0.5, PIL/torch antialias) or triangle."""
    d = d.abs()
    if interpolation == "bilinear":
        return (1.0 - d).clamp_min(0.0)
    a = -0.5
    near = ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0
    far = (((d - 5.0) * d + 8.0) * d - 4.0) * a
    return torch.where(d < 1.0, near, torch.where(d < 2.0, far, torch.zeros_like(d)))


@functools.lru_cache(maxsize=64)
def _taps_table(in_size: int, out_size: int, interpolation: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Crop-relative taps of every crop length ``0..in_size``: int64 offsets and float32 weights,
    each ``(in_size + 1, out_size, K)`` (row 0 is never used).

    The taps of a crop depend only on its length (the start just shifts them), so they are
    computed once per (in_size, out_size) here and looked up per sample by :func:`resize_weights`,
    which is cheaper than computing the taps of every sample (figures in benchmarks/README.md).
    """
    length_f = torch.arange(in_size + 1, device=device, dtype=torch.float32).clamp_min_(1.0).view(-1, 1, 1)
    scale = length_f / out_size
    unit = 1.0 if interpolation == "bilinear" else 2.0
    support = torch.where(scale >= 1.0, unit * scale, torch.full_like(scale, unit))
    invscale = torch.where(scale >= 1.0, 1.0 / scale, torch.ones_like(scale))
    center = scale * (torch.arange(out_size, device=device, dtype=torch.float32).view(1, -1, 1) + 0.5)
    lo = torch.trunc(center - support + 0.5).clamp_min_(0.0)
    hi = torch.minimum(torch.trunc(center + support + 0.5), length_f)
    # Only the taps inside the filter support (a static bound): the band of the dense matrix.
    taps = min(in_size, int(math.ceil(2.0 * unit * max(1.0, in_size / out_size))) + 1)
    t = lo + torch.arange(taps, device=device, dtype=torch.float32).view(1, 1, -1)
    w = _filter((t - center + 0.5) * invscale, interpolation) * (t < hi)
    w = w / w.sum(dim=-1, keepdim=True)
    return t.to(torch.int64), w


def resize_weights(start: Tensor, length: Tensor, in_size: int, out_size: int,
                   interpolation: str = "bicubic", flip: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Per-sample 1-D resampling matrices of the segment ``[start, start + length)`` to ``out_size``.

    Reproduces torch's ``interpolate(..., antialias=True)`` weights on the cropped segment
    (support widened by the scale when downscaling, taps outside the segment dropped and the
    rest renormalised, i.e. edges clamped to the crop).

    Args:
        start, length: int64 ``(N,)``.
        flip: optional bool ``(N,)``: reverse the output order of those samples (horizontal flip).
        out: optional float32 buffer of that shape to write into.
    Returns:
        float32 ``(N, out_size, in_size)``: output = W @ input along that axis.
    """
    offsets, weights = _taps_table(in_size, out_size, interpolation, start.device)
    offsets, weights = offsets[length], weights[length]  # (N, S, K)
    if flip is not None:
        f = flip.view(-1, 1, 1)
        offsets, weights = torch.where(f, offsets.flip(1), offsets), torch.where(f, weights.flip(1), weights)
    # Taps past the segment have weight 0; clamping keeps their index inside the image.
    idx = (offsets + start.view(-1, 1, 1)).clamp_max_(in_size - 1)
    if out is None:
        out = torch.zeros(start.shape[0], out_size, in_size, device=start.device)
    else:
        out.zero_()
    return out.scatter_add_(2, idx, weights)


def _crop_parts(n: int, c: int, height: int, width: int, size: int) -> list[int]:
    """Sizes of resized_crop's workspace parts: input in matmul layout, first product, result, wy, wx."""
    return [n * c * height * width, n * c * size * width, n * c * size * size, n * size * height, n * size * width]


def crop_workspace_size(n: int, channels: int, height: int, width: int, size: int) -> int:
    """Elements of the ``workspace`` that :func:`resized_crop` needs for n images."""
    return sum(_crop_parts(n, channels, height, width, size))


def resized_crop(x: Tensor, boxes: Tensor, size: int, flip: Tensor | None = None,
                 interpolation: str = "bicubic", out: Tensor | None = None,
                 workspace: Tensor | None = None, rows: Tensor | None = None, clamp: bool = False) -> Tensor:
    """Crop ``boxes`` (N, 4: top, left, h, w) of float ``x (N, C, H, W)``, resize to size x size, flip.

    Two batched matmuls with the channels folded into the matrices, ``(S, H) @ (H, C*W)`` then
    ``(S*C, W) @ (W, S)`` per sample, so no operand is broadcast over channels (a broadcast
    matmul copies the expanded weights and runs C times as many small products: slower on a
    CPU, figures in benchmarks/README.md).

    ``workspace``: optional float32 buffer of at least
    ``N * C * (H * W + size * W + size * size) + N * size * (H + W)`` elements (:func:`crop_workspace_size`)
    for the intermediates and the weight matrices. On a CPU a fresh tensor of a few MB costs more in
    page faults than the matmul that fills it (figures in benchmarks/README.md), so callers that
    resize chunk after chunk pass the same buffer.

    ``rows``: optional int64 ``(N,)``: sample i is ``x[rows[i]]`` (taken while ``x`` is copied
    into the matmul layout, so a caller holding its images in another order pays no extra pass).

    ``clamp``: clamp the result to [0, 1] as it is written out (one pass fewer than clamping after).

    Returns:
        float32 ``(N, C, size, size)``, written into ``out`` when given.
    """
    n, c, height, width = x.shape
    sizes = _crop_parts(n, c, height, width, size)
    need = sum(sizes)
    if workspace is None or workspace.numel() < need:
        workspace = torch.empty(need, device=x.device)
    parts = workspace.view(-1)[:need].split(sizes)
    wy = resize_weights(boxes[:, 0], boxes[:, 2], height, size, interpolation,
                        out=parts[3].view(n, size, height))  # (N, S, H)
    wx = resize_weights(boxes[:, 1], boxes[:, 3], width, size, interpolation, flip,
                        out=parts[4].view(n, size, width))  # (N, S, W)
    x_hcw = parts[0].view(n, height, c, width)  # (N, H, C, W): the channels sit beside the columns
    if rows is None:
        x_hcw.copy_(x.permute(0, 2, 1, 3))
    else:
        torch.index_select(x.permute(0, 2, 1, 3), 0, rows, out=x_hcw)
    first = torch.bmm(wy, x_hcw.view(n, height, c * width), out=parts[1].view(n, size, c * width))
    both = torch.bmm(first.view(n, size * c, width), wx.transpose(1, 2), out=parts[2].view(n, size * c, size))
    both = both.view(n, size, c, size).permute(0, 2, 1, 3)  # back to (N, C, S, S)
    out = torch.empty((n, c, size, size), device=x.device) if out is None else out
    return torch.clamp(both, 0.0, 1.0, out=out) if clamp else out.copy_(both)
