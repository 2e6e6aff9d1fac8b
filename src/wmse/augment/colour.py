"""Colour ops on float images in [0, 1]: grayscale, hue, and RandomApply(ColorJitter) with a
per-sample op order (a grouped CPU path and a masked CUDA path), then RandomGrayscale."""

from __future__ import annotations

import torch
from torch import Tensor

from .params import ViewParams

__all__ = ["rgb_to_grayscale", "adjust_hue", "color_jitter", "random_grayscale"]

_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3


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
    # extra pass over the planes costs about as much as the arithmetic (benchmarks/README.md).
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
    (figures in benchmarks/README.md).

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
