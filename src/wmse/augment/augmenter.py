"""The Augmenter: uint8 images -> normalised float views, chunk by chunk on the CPU, whole batch on CUDA."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .colour import _grouping, _jitter_grouped, color_jitter, random_grayscale
from .params import ViewParams, sample_params
from .recipe import AugmentConfig
from .resize import crop_workspace_size, resized_crop
from .stats import _stats_tensor

__all__ = ["Augmenter"]


def _colour(chunk: Tensor, params: ViewParams, floats: Tensor, spare: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """uint8 ``chunk`` -> float in [0, 1], colour-jittered and grayscaled, written into ``floats``.

    With a ``spare`` buffer (the CPU) the rows come back grouped by jitter op: the second value
    is the order that puts them back (``result[order[i]]`` is sample i). Without one (CUDA) they
    stay in order, computed with no data-dependent shapes, and the second value is None.
    """
    m = chunk.shape[0]
    # copy_ then div_ equals torch.div(uint8, 255) bit for bit, and is faster on a CPU
    # (benchmarks/README.md).
    if spare is None:
        x = color_jitter(floats[:m].copy_(chunk).div_(255.0), params, masked_hue=True)
        return random_grayscale(x, params.gray), None
    # Grouped by the first jitter op from the start (gathering uint8 rows is cheap); the crop
    # puts them back in order while copying into its matmul layout: no extra pass over the floats.
    where = _grouping(params, 0, torch.arange(m, device=chunk.device))
    x = floats[:m].copy_(chunk.index_select(0, where)).div_(255.0)
    x, _, where = _jitter_grouped(x, params, where, spare[:m])
    return random_grayscale(x, params.gray[where]), torch.argsort(where)


_SOLARIZE_AT = 128 / 255  # torchvision's RandomSolarize(threshold=128) of a uint8 image, in [0, 1] units


class Augmenter:
    """Batched W-MSE augmentation: uint8 images -> ``n_views`` normalised float views.

    Args:
        cfg: the augmentation parameters.
        mean, std: per-channel statistics in [0, 1] units (one value is broadcast to all channels).
        chunk: images processed at a time on the CPU (keeps temporaries in cache); CUDA uses the whole batch.

    On the CPU the Augmenter keeps its per-chunk working buffers (a few chunks' worth of float
    images) between calls: large buffers allocated afresh for every view come back from the kernel
    zeroed, one page fault per page (why, and the figures: benchmarks/README.md). CUDA's caching
    allocator already reuses memory, so nothing is kept there.
    """

    def __init__(self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float], chunk: int = 128) -> None:
        if any(s <= 0 for s in std):
            raise ValueError(f"Augmenter: std={tuple(std)} must be > 0")
        self.cfg, self.mean, self.std, self.chunk = cfg, tuple(mean), tuple(std), chunk
        self._kept: dict[str, Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], device: torch.device) -> Tensor:
        """A float32 working buffer of ``shape``: the one kept from the last call when it matches (CPU)."""
        kept = self._kept.get(name)
        if kept is not None and kept.shape == shape and kept.device == device:
            return kept
        buf = torch.empty(shape, device=device)
        if device.type == "cpu":
            self._kept[name] = buf
        return buf

    def sample(self, n: int, height: int, width: int, generator: torch.Generator | None = None) -> ViewParams:
        """Parameters of one view, drawn on the generator's device (CPU by default)."""
        device = generator.device if generator is not None else torch.device("cpu")
        return sample_params(self.cfg, n, height, width, generator, device)

    def apply(self, images: Tensor, params: ViewParams, normalize: bool = True,
              solarize: Tensor | None = None) -> Tensor:
        """One view with given parameters: uint8 ``(N, C, H, W)`` -> float32 ``(N, C, size, size)``.

        ``solarize``: optional bool ``(N,)``: RandomSolarize(threshold 128 of 255) of those samples, after the
        crop (as INTL's recipe: torchvision's ``solarize`` on the resized image, ``1 - x`` where ``x >= 128/255``).
        """
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"Augmenter: images must be uint8 (N, C, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
        params = params.to(images.device)
        n, c = images.shape[:2]
        step = n if images.is_cuda else max(1, self.chunk)
        out = torch.empty((n, c, self.cfg.size, self.cfg.size), dtype=torch.float32, device=images.device)
        if normalize:
            mean = _stats_tensor(self.mean, c, out.device, "mean")
            scale = 1.0 / _stats_tensor(self.std, c, out.device, "std")
            shift = -mean * scale
        # Buffers reused by every chunk (fresh tensors of this size cost page faults on a CPU).
        h, w = images.shape[2:]
        size, rows, dev = self.cfg.size, min(step, n), images.device
        workspace = self._buffer("workspace", (crop_workspace_size(rows, c, h, w, size),), dev)
        floats = self._buffer("floats", (rows, c, h, w), dev)
        spare = self._buffer("spare", (rows, c, h, w), dev) if not images.is_cuda else None  # jitter's regrouping
        for s in range(0, n, step):
            p = ViewParams(*(getattr(params, f)[s:s + step] for f in
                             ("boxes", "flip", "jitter", "order", "factors", "gray")))
            x, order = _colour(images[s:s + step], p, floats, spare)
            part = out[s:s + step]  # chunks are written in place: no concatenation copy
            resized_crop(x, p.boxes, size, p.flip, self.cfg.interpolation, out=part,
                         workspace=workspace, rows=order, clamp=True)
            if solarize is not None:  # a mask, not an index: no data-dependent shapes on CUDA
                chosen = solarize[s:s + step].to(part.device).view(-1, 1, 1, 1) & (part >= _SOLARIZE_AT)
                torch.where(chosen, 1.0 - part, part, out=part)
            if normalize:
                part.mul_(scale).add_(shift)
        return out

    def __call__(self, images: Tensor, n_views: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """``n_views`` independent views, each float32 ``(N, C, size, size)`` on ``images.device``."""
        if n_views < 1:
            raise ValueError(f"Augmenter: n_views={n_views} must be >= 1")
        n, _, h, w = images.shape
        views = []
        for v in range(n_views):
            params = self.sample(n, h, w, generator)
            views.append(self.apply(images, params, solarize=self._solarize(v, n, generator)))
        return views

    def _solarize(self, view: int, n: int, generator: torch.Generator | None) -> Tensor | None:
        """Which samples of ``view`` are solarised; None (and no random draw) where its probability is 0."""
        p = self.cfg.solarize_p[min(view, len(self.cfg.solarize_p) - 1)]
        if p == 0.0:
            return None
        device = generator.device if generator is not None else torch.device("cpu")
        return torch.rand(n, generator=generator, device=device) < p
