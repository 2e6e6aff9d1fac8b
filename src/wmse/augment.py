"""Batched per-sample augmentation on the batch's device (CPU or CUDA), in plain torch.

The recipe (DESIGN §1, torchvision semantics) for every view of every image, each with its own
random parameters:

    RandomApply(ColorJitter(b, c, s, h), p=jitter_p)   # the 4 ops in a random order per sample
    -> RandomGrayscale(p=grayscale_p)
    -> RandomResizedCrop(size, scale, ratio, bicubic, antialias)
    -> RandomHorizontalFlip(p=flip_p)
    -> Normalize(mean, std)

How it is computed (and why it equals torchvision's float-tensor functional ops):

* Colour ops run at the input resolution, before the crop, as in the recipe: contrast blends
  with the mean of the whole image, so cropping first would change the result.
* ``order[:, k]`` is the op each sample applies at stage k. Brightness, contrast and saturation
  are all ``clamp(f * x + (1 - f) * ref)`` with ref = 0, the gray mean, or the gray image; hue is
  RGB -> HSV shift -> RGB with torchvision's formulas. On the CPU the samples are regrouped by
  their op before each stage, so each op runs in place on one contiguous slice of the samples
  that take it. On CUDA one blend per stage serves every sample (f = 1, an exact identity, for
  the others) and hue is computed for all and selected with ``torch.where``: no data-dependent
  shapes, so no host sync.
* Crop + resize + flip is one pair of batched matmuls: per sample a (size x H) and a
  (size x W) weight matrix holding exactly the weights of torch's antialiased resize of the crop
  (Keys cubic a = -0.5, as PIL; the filter widens when downscaling), with edge taps clamped to
  the crop like torchvision's crop-then-resize; a flipped sample has its column matrix reversed.
  The channels are folded into the matrices, ``(S, H) @ (H, C*W)`` then ``(S*C, W) @ (W, S)``.
* Everything stays float32 in [0, 1] between ops (torchvision on uint8/PIL rounds after every
  op: differences of at most ~0.5/255 per op). The resized image is clamped to [0, 1] as the
  uint8 pipelines do.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor

from .config import Config

__all__ = ["AugmentConfig", "ViewParams", "Augmenter", "eval_transform", "sample_crop_boxes", "sample_params",
           "color_jitter", "random_grayscale",
           "resize_weights", "resized_crop", "crop_workspace_size", "adjust_hue", "rgb_to_grayscale"]

# The paper's recipe is written once, as the defaults of the run configuration (torch-free).
_RECIPE = {f.name: f.default for f in fields(Config)}
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


@dataclass
class AugmentConfig:
    """Parameters of the training augmentation (defaults: the paper's CIFAR/STL/Tiny IN recipe)."""

    size: int
    crop_scale: tuple[float, float] = _RECIPE["crop_scale"]
    crop_ratio: tuple[float, float] = _RECIPE["crop_ratio"]
    jitter: tuple[float, float, float, float] = _RECIPE["jitter"]  # brightness, contrast, saturation, hue
    jitter_p: float = _RECIPE["jitter_p"]
    grayscale_p: float = _RECIPE["grayscale_p"]
    flip_p: float = _RECIPE["flip_p"]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"AugmentConfig: size={self.size!r} must be a positive int")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"AugmentConfig: crop_scale={self.crop_scale} must satisfy 0 < lo <= hi <= 1")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"AugmentConfig: crop_ratio={self.crop_ratio} must satisfy 0 < lo <= hi")
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"AugmentConfig: jitter={self.jitter} must be 4 values >= 0 with hue <= 0.5")
        for name in ("jitter_p", "grayscale_p", "flip_p"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"AugmentConfig: {name}={getattr(self, name)} must be a probability in [0, 1]")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"AugmentConfig: interpolation={self.interpolation!r} must be 'bicubic' or 'bilinear'")

    @classmethod
    def imagenet100(cls, size: int = 224) -> "AugmentConfig":
        """The ImageNet-100 values of DESIGN §1: crop scale (0.08, 1), jitter 0.8/0.8/0.8/0.2, gray 0.2."""
        return cls(size=size, crop_scale=(0.08, 1.0), jitter=(0.8, 0.8, 0.8, 0.2), grayscale_p=0.2)

    @classmethod
    def for_dataset(cls, name: str, size: int | None = None) -> "AugmentConfig":
        """Paper defaults by dataset name: 32 px for CIFAR, 64 px for STL-10 / Tiny IN, 224 for IN-100."""
        key = name.lower().replace("-", "_")
        default = {"cifar10": 32, "cifar100": 32, "stl10": 64, "tiny_imagenet": 64, "imagenet100": 224,
                   "fashion_mnist": 28}.get(key)
        if size is None and default is None:
            raise ValueError(f"AugmentConfig.for_dataset: no default size for {name!r}; pass size=")
        if key == "imagenet100":
            return cls.imagenet100(size or 224)
        return cls(size=size or default)


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


# ------------------------------------------------------------------ parameter sampling

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


# ------------------------------------------------------------------ colour ops (float in [0, 1])

def rgb_to_grayscale(x: Tensor) -> Tensor:
    """``(N, 3, H, W)`` -> ``(N, 1, H, W)`` luma with torchvision's weights (``(N, 1, ...)`` passes through)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return torch.mul(r, _GRAY[0]).add_(g, alpha=_GRAY[1]).add_(b, alpha=_GRAY[2]).unsqueeze(1)


def adjust_hue(x: Tensor, shift: Tensor, out: Tensor | None = None) -> Tensor:
    """Rotate hue by ``shift`` (N,) in [-0.5, 0.5] turns; x float ``(N, 3, H, W)`` in [0, 1].

    Same HSV model as torchvision (V = max, chroma = max - min kept; hue from the max channel,
    ties resolved r, then g, then b). HSV -> RGB uses the branch-free form
    ``R = min + chroma * k(|6H - 3|)``, ``G = max - chroma * k(|6H - 2|)``,
    ``B = max - chroma * k(|6H - 4|)`` with ``k(d) = clamp(d - 1, 0, 1)``.
    ``out`` may be ``x`` itself (the input is read in full before the first output plane is written).
    """
    if x.shape[1] != 3:
        return x if out is None else out.copy_(x)
    # Plain float ops on (N, H, W) planes, fused where torch has the fused op: on the CPU every
    # extra pass costs about as much as the arithmetic (33 passes here, 46 before: 1.3 vs 1.8 ms
    # for 30 images of 64 px).
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    chroma = maxc - minc
    # 6H before the shift: (g - b) / chroma if r is the max, 2 + (b - r) / chroma if g, else 4 + ...
    # Where chroma == 0 every numerator is exactly 0, so any positive divisor gives hue 0.
    num = torch.where(maxc == g, torch.sub(b, r).add_(chroma, alpha=2.0), torch.sub(r, g).add_(chroma, alpha=4.0))
    num = torch.where(maxc == r, torch.sub(g, b), num)
    h6 = num.div_(chroma.clamp_min(1e-30)).add_(6.0 * shift.view(-1, 1, 1)).remainder_(6.0)
    out = torch.empty_like(x) if out is None else out
    for i, (offset, base, sign) in enumerate(((3.0, minc, 1.0), (2.0, maxc, -1.0), (4.0, maxc, -1.0))):
        plane = torch.sub(h6, offset, out=out[:, i]).abs_().sub_(1.0).clamp_(0.0, 1.0)
        torch.addcmul(base, plane, chroma, value=sign, out=plane)
    return out


def _jitter_stage_masked(x: Tensor, op: Tensor, active: Tensor, factors: Tensor) -> Tensor:
    """One stage over the whole batch, no data-dependent shapes (the CUDA path: no host sync).

    Brightness, contrast and saturation are one blend ``clamp(f * x + (1 - f) * ref)`` with
    ref = 0, the mean gray level, or the gray image; f = 1 (exact identity) for the other
    samples. Hue is computed for every sample and kept where the sample does hue at this stage.
    """
    n, c = x.shape[:2]
    is_b, is_c, is_s = (active & (op == _BRIGHTNESS)), (active & (op == _CONTRAST)), (active & (op == _SATURATION))
    if c == 1:
        is_s = torch.zeros_like(is_s)  # saturation is the identity on one channel (torchvision)
    f = torch.where(is_b, factors[:, 0], torch.where(is_c, factors[:, 1], torch.where(is_s, factors[:, 2], 1.0)))
    one_minus = (1.0 - f).view(n, 1, 1, 1)
    gray = rgb_to_grayscale(x)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)
    # (1 - f) * ref, per sample: the gray image (saturation), its mean (contrast) or 0 (brightness).
    s_coef = one_minus * is_s.view(n, 1, 1, 1).to(x.dtype)
    c_coef = one_minus * is_c.view(n, 1, 1, 1).to(x.dtype)
    ref = torch.addcmul(mean * c_coef, gray, s_coef)
    x = torch.addcmul(ref, x, f.view(n, 1, 1, 1), out=x).clamp_(0.0, 1.0)  # in place: x is this view's own copy
    if c == 3:
        is_h = active & (op == _HUE)
        x = torch.where(is_h.view(n, 1, 1, 1), adjust_hue(x, factors[:, 3]), x)
    return x


def _apply_op(x: Tensor, op: int, factors: Tensor) -> None:
    """Apply jitter op ``op`` in place to every sample of ``x`` (k, C, H, W), with its own factor.

    The blends are torchvision's ``clamp(f * img + (1 - f) * ref, 0, 1)`` with ref = 0
    (brightness), the image's mean gray level (contrast) or its gray image (saturation).
    """
    if op == _HUE:
        if x.shape[1] == 3:  # the identity on one channel (torchvision)
            adjust_hue(x, factors[:, 3], out=x)
        return
    f = factors[:, op].view(-1, 1, 1, 1)
    if op == _BRIGHTNESS:
        ref = None
    elif op == _CONTRAST:
        ref = rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    elif x.shape[1] == 3:
        ref = rgb_to_grayscale(x)
    else:
        return  # saturation is the identity on one channel (torchvision)
    x.mul_(f)
    if ref is not None:  # computed from x before the scaling above
        x.add_(ref.mul_(1.0 - f))
    x.clamp_(0.0, 1.0)


def _stage_ops(params: ViewParams, stage: int, where: Tensor) -> Tensor:
    """Op of the samples ``where`` (original indices) at ``stage``; 4 for samples without jitter."""
    return torch.where(params.jitter[where], params.order[where, stage], 4)


def _grouping(params: ViewParams, stage: int, where: Tensor) -> Tensor:
    """Stable order that groups the samples ``where`` by their op at ``stage``: brightness,
    contrast, saturation, hue, then the samples without jitter."""
    return torch.argsort(_stage_ops(params, stage, where), stable=True)


def _jitter_grouped(x: Tensor, params: ViewParams, where: Tensor, spare: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The four stages with the samples regrouped by op before each stage (the CPU path).

    Row j of ``x`` is sample ``where[j]`` of ``params``. Each op then runs in place on one
    contiguous slice of the samples that take it, so no sample pays for an op it does not do;
    the regrouping copy (an index_select into ``spare``, skipped when the rows are already
    grouped) costs less than the full-batch blends and the hue gather/scatter it replaces
    (one 64 px chunk of 128: 11 ms against ~20 ms, this project's CPU).

    Returns:
        (jittered rows, the other buffer, the new ``where``).
    """
    identity = torch.arange(x.shape[0], device=x.device)
    for stage in range(4):
        op = _stage_ops(params, stage, where)
        perm = torch.argsort(op, stable=True)
        if not torch.equal(perm, identity):
            x, spare = torch.index_select(x, 0, perm, out=spare), x
            where = where[perm]
        factors = params.factors[where]
        start = 0
        for op_id, count in enumerate(torch.bincount(op, minlength=5).tolist()[:4]):  # order-free counts
            if count:
                _apply_op(x[start:start + count], op_id, factors[start:start + count])
            start += count
    return x, spare, where


def color_jitter(x: Tensor, params: ViewParams, masked_hue: bool | None = None) -> Tensor:
    """RandomApply(ColorJitter) with per-sample factors and op order; x float ``(N, C, H, W)`` in [0, 1].

    ``masked_hue`` (default: on CUDA) computes every op for every sample and selects, with no
    data-dependent shapes; otherwise the samples are regrouped by op at each stage
    (:func:`_jitter_grouped`). Both give the same result.
    Use the returned tensor: ``x`` serves as working memory and is overwritten (pass a copy to keep
    it); on the CPU the result may be in another buffer, with ``x`` left holding intermediate rows.
    """
    masked_hue = x.is_cuda if masked_hue is None else masked_hue
    if masked_hue:
        for stage in range(4):
            x = _jitter_stage_masked(x, params.order[:, stage], params.jitter, params.factors)
        return x
    if not bool(params.jitter.any()):
        return x
    where = torch.arange(x.shape[0], device=x.device)
    x, spare, where = _jitter_grouped(x, params, where, torch.empty_like(x))
    return torch.index_select(x, 0, torch.argsort(where), out=spare)


def random_grayscale(x: Tensor, gray: Tensor) -> Tensor:
    """Replace the selected samples (``gray`` (N,) bool) by their 3-channel luma.

    Works in place on CPU tensors (the caller's ``x`` is overwritten there): pass a copy to keep it.
    """
    if x.shape[1] == 1:
        return x
    if not x.is_cuda:  # only the selected samples (~10%); on CUDA this would cost a host sync
        sel = gray.nonzero().flatten()
        if sel.numel():
            x[sel] = rgb_to_grayscale(x[sel]).expand(-1, x.shape[1], -1, -1)
        return x
    # lerp with weight exactly 0 or 1 returns start or end exactly (cheaper than a broadcast where).
    return torch.lerp(x, rgb_to_grayscale(x).expand_as(x), gray.view(-1, 1, 1, 1).to(x.dtype))


# ------------------------------------------------------------------ crop + resize + flip

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
    computed once per (in_size, out_size) here and looked up per sample by :func:`resize_weights`:
    both matrices of a 128-image chunk took ~1.2 ms this way against 2.3-4.8 ms computed per sample.
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
    matmul copies the expanded weights and runs C times as many 64 x 64 products: measured
    ~2x slower per chunk on a CPU).

    ``workspace``: optional float32 buffer of at least
    ``N * C * (H * W + size * W + size * size) + N * size * (H + W)`` elements (:func:`crop_workspace_size`)
    for the intermediates and the weight matrices. On a CPU a fresh 6 MB tensor costs more in page
    faults than the matmul that fills it (the two weight matrices of a 128-image chunk at 96 -> 64 px:
    5.7 ms and ~1,470 page faults per call when allocated fresh), so callers that resize chunk after
    chunk pass the same buffer.

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


# ------------------------------------------------------------------ the augmenter

def _colour(chunk: Tensor, params: ViewParams, floats: Tensor, spare: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """uint8 ``chunk`` -> float in [0, 1], colour-jittered and grayscaled, written into ``floats``.

    With a ``spare`` buffer (the CPU) the rows come back grouped by jitter op: the second value
    is the order that puts them back (``result[order[i]]`` is sample i). Without one (CUDA) they
    stay in order, computed with no data-dependent shapes, and the second value is None.
    """
    m = chunk.shape[0]
    # copy_ then div_ equals torch.div(uint8, 255) bit for bit, and is ~1.4x faster on a CPU.
    if spare is None:
        x = color_jitter(floats[:m].copy_(chunk).div_(255.0), params, masked_hue=True)
        return random_grayscale(x, params.gray), None
    # Grouped by the first jitter op from the start (gathering uint8 rows is cheap); the crop
    # puts them back in order while copying into its matmul layout: no extra pass over the floats.
    where = _grouping(params, 0, torch.arange(m, device=chunk.device))
    x = floats[:m].copy_(chunk.index_select(0, where)).div_(255.0)
    x, _, where = _jitter_grouped(x, params, where, spare[:m])
    return random_grayscale(x, params.gray[where]), torch.argsort(where)


def _stats_tensor(values: Sequence[float], channels: int, device: torch.device, name: str) -> Tensor:
    t = torch.as_tensor(values, dtype=torch.float32, device=device).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values for {channels}-channel images")
    return t.view(1, channels, 1, 1)


class Augmenter:
    """Batched W-MSE augmentation: uint8 images -> ``n_views`` normalised float views.

    Args:
        cfg: the augmentation parameters.
        mean, std: per-channel statistics in [0, 1] units (one value is broadcast to all channels).
        chunk: images processed at a time on the CPU (keeps temporaries in cache); CUDA uses the whole batch.

    On the CPU the Augmenter keeps its per-chunk working buffers (a few chunks' worth of float
    images) between calls: allocated afresh for every view, buffers above glibc's mmap threshold
    (32 MiB) come back from the kernel zeroed page by page, ~30,000 page faults per 512-image call
    at 96 px. CUDA's caching allocator already reuses memory, so nothing is kept there.
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

    def apply(self, images: Tensor, params: ViewParams, normalize: bool = True) -> Tensor:
        """One view with given parameters: uint8 ``(N, C, H, W)`` -> float32 ``(N, C, size, size)``."""
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
            if normalize:
                part.mul_(scale).add_(shift)
        return out

    def __call__(self, images: Tensor, n_views: int, generator: torch.Generator | None = None) -> list[Tensor]:
        """``n_views`` independent views, each float32 ``(N, C, size, size)`` on ``images.device``."""
        if n_views < 1:
            raise ValueError(f"Augmenter: n_views={n_views} must be >= 1")
        n, _, h, w = images.shape
        return [self.apply(images, self.sample(n, h, w, generator)) for _ in range(n_views)]


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
        short, long = min(height, width), max(height, width)
        new_long = int(resize * long / short)
        nh, nw = (resize, new_long) if height <= width else (new_long, resize)
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
