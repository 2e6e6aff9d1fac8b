"""Features of a frozen encoder over a whole image set, batch by batch (a batch of pixels at a time)."""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch
from torch import Tensor

from ..data.loader import ImageView


def extract_features(
    encoder: Callable[[Tensor], Tensor],
    images_uint8: Tensor | ImageView,
    transform: Callable[[Tensor], Tensor],
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    autocast: bool = True,
    progress: bool | None = None,
) -> Tensor:
    """Run a frozen encoder over a whole image set, batch by batch, without gradients.

    Only one batch of pixels is gathered (from an :class:`~wmse.data.loader.ImageView`) and converted to
    float at a time, so memory does not grow with the number of images beyond the ``(N, F)`` features.

    Putting the encoder in eval mode is the caller's job (so BatchNorm uses running stats).

    Args:
        encoder: maps a float batch ``(B, C, S, S)`` on ``device`` to ``(B, F)`` (a ``(B, F, 1, 1)``
            output is flattened).
        images_uint8: ``(N, C, H, W)`` uint8 images (CPU or ``device``): a tensor (a memory map works) or an
            :class:`~wmse.data.loader.ImageView` of one.
        transform: maps a uint8 batch ``(B, C, H, W)`` on ``device`` to the encoder's float input
            (the evaluation transform: resize/crop and mean/std normalisation, no augmentation).
        batch_size: images per forward pass.
        device: where the encoder runs.
        autocast: run the encoder under bfloat16 autocast on CPU/CUDA. The features are returned
            in float32 either way. On CPUs without native bf16 (no AVX512-BF16/AMX) this can be
            slower than float32; pass False there.
        progress: print progress lines on stderr; None prints them only for more than 20 batches.

    Returns:
        ``(N, F)`` float32 CPU tensor.
    """
    _check_images(images_uint8, batch_size)
    dev = torch.device(device)
    n = images_uint8.shape[0]
    n_batches = math.ceil(n / batch_size)
    show = n_batches > 20 if progress is None else progress
    use_autocast = autocast and dev.type in ("cpu", "cuda")
    out: list[Tensor] = []
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_autocast):
        for b, i in enumerate(range(0, n, batch_size)):
            x = transform(images_uint8[i : i + batch_size].to(dev, non_blocking=True))
            out.append(encoder(x).flatten(1).float().cpu())
            if show and (b + 1) % max(1, n_batches // 10) == 0:
                done = i + x.shape[0]
                rate = done / (time.perf_counter() - start)
                print(f"features: {done}/{n} images ({rate:.0f} img/s)", file=sys.stderr)
    if not out:
        raise ValueError("images_uint8 is empty: no images to extract features from")
    return torch.cat(out)


def _check_images(images_uint8: Tensor | ImageView, batch_size: int) -> None:
    if not isinstance(images_uint8, (Tensor, ImageView)) or images_uint8.dtype != torch.uint8:
        raise ValueError(
            "images_uint8 must be a uint8 tensor (N, C, H, W), got "
            f"{getattr(images_uint8, 'dtype', type(images_uint8).__name__)}"
        )
    if images_uint8.ndim != 4:
        raise ValueError(f"images_uint8 must have shape (N, C, H, W), got {tuple(images_uint8.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
