"""The evaluation view: optional Resize + CenterCrop + Normalize, no randomness."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .resize import resize_weights
from .stats import _stats_tensor

__all__ = ["eval_transform", "eval_resized_shape", "check_eval_crop"]


def eval_resized_shape(height: int, width: int, resize: int | None) -> tuple[int, int]:
    """(H, W) after the evaluation's Resize(shorter side = ``resize``) (torchvision's rounding); as is for None."""
    if resize is None:
        return height, width
    short, long = min(height, width), max(height, width)
    new_long = int(resize * long / short)
    return (resize, new_long) if height <= width else (new_long, resize)


def check_eval_crop(size: int, height: int, width: int, resize: int | None) -> None:
    """ValueError unless the centre crop of ``size`` fits images of (height, width) after the optional resize."""
    nh, nw = eval_resized_shape(height, width, resize)
    if size > nh or size > nw:
        shown = f"{height}x{width}" + (f" (resized to {nh}x{nw} by eval_resize={resize})" if resize else "")
        raise ValueError(f"the evaluation centre-crops {size} px (eval_size, else image_size) from images of {shown}: "
                         f"pass --eval_resize {size} (or larger), or a smaller --eval_size")


def eval_transform(images: Tensor, size: int, mean: Sequence[float], std: Sequence[float],
                   resize: int | None = None, interpolation: str = "bicubic") -> Tensor:
    """Evaluation view: optional Resize(shorter side = ``resize``) + CenterCrop(size) + normalise.

    Matches torchvision's ``Resize(resize, antialias=True)`` (long side ``int(resize * long / short)``)
    and ``CenterCrop(size)`` (offset ``round((H - size) / 2)``) on float images.

    Args:
        images: uint8 ``(N, C, H, W)``.
    Returns:
        float32 ``(N, C, size, size)`` on the images' device.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"eval_transform: images must be uint8 (N, C, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    n, c, height, width = images.shape
    x = images.to(torch.float32).div_(255.0)
    if resize is not None:
        nh, nw = eval_resized_shape(height, width, resize)
        dev = images.device
        zero, one = torch.zeros(1, dtype=torch.int64, device=dev), torch.ones(1, dtype=torch.int64, device=dev)
        wy = resize_weights(zero, one * height, height, nh, interpolation)[0]
        wx = resize_weights(zero, one * width, width, nw, interpolation)[0]
        x = torch.matmul(torch.matmul(wy, x), wx.t()).clamp_(0.0, 1.0)
        height, width = nh, nw
    if size > height or size > width:
        raise ValueError(f"eval_transform: size={size} exceeds the image ({height}x{width}); pass resize>={size}")
    top, left = int(round((height - size) / 2.0)), int(round((width - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size]
    mean_t = _stats_tensor(mean, c, x.device, "mean")
    std_t = _stats_tensor(std, c, x.device, "std")
    return ((x - mean_t) / std_t).contiguous()
