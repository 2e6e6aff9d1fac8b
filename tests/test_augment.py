"""Batched augmentation vs torchvision: exact op semantics given the same parameters, matching
parameter distributions over many draws, and the properties training relies on."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms as T1
import torchvision.transforms.v2.functional as F
from PIL import Image
from scipy import stats
from torchvision.transforms import InterpolationMode

from wmse.augment import (AugmentConfig, Augmenter, ViewParams, adjust_hue, color_jitter, eval_transform,
                          resize_weights, resized_crop, rgb_to_grayscale, sample_crop_boxes, sample_params)

REAL_CIFAR = Path("/work/shared/datasets/cifar10-jpeg/train")
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2430, 0.2610)
TV_INTERP = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}




@functools.lru_cache(maxsize=4)
def real_images(n: int = 64, side: int = 32) -> torch.Tensor:
    """uint8 (n, 3, side, side): real CIFAR-10 images (one in every class folder in turn), upscaled
    with PIL when side > 32; seeded noise when the folder is absent."""
    if REAL_CIFAR.is_dir():
        classes = sorted(p for p in REAL_CIFAR.iterdir() if p.is_dir())
        # File k // 10 of class k % 10, named directly (listing 50,000 files is slow on a busy disk).
        files = [classes[k % len(classes)] / f"{k // len(classes):04d}.jpg" for k in range(n)]
        pil = [Image.open(f).convert("RGB") for f in files]
    else:
        rng = np.random.default_rng(0)
        pil = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(n)]
    if side != 32:
        pil = [im.resize((side, side), Image.Resampling.BICUBIC) for im in pil]
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in pil])


def tv_reference(images: torch.Tensor, p: ViewParams, cfg: AugmentConfig, mean, std) -> torch.Tensor:
    """The recipe image by image with torchvision.transforms.v2.functional on float tensors."""
    ops = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue]
    out = []
    for i in range(images.shape[0]):
        x = images[i].float() / 255
        if p.jitter[i]:
            for op in p.order[i].tolist():
                x = ops[op](x, p.factors[i, op].item())
        if p.gray[i] and x.shape[0] == 3:
            x = F.rgb_to_grayscale(x, num_output_channels=3)
        top, left, h, w = p.boxes[i].tolist()
        x = F.resized_crop(x, top, left, h, w, [cfg.size, cfg.size], interpolation=TV_INTERP[cfg.interpolation],
                           antialias=True)
        if p.flip[i]:
            x = F.horizontal_flip(x)
        out.append(F.normalize(x.clamp(0, 1), list(mean), list(std)))
    return torch.stack(out)


# ------------------------------------------------------------------ exact agreement, same parameters

@pytest.mark.parametrize("side,size,interp", [(32, 32, "bicubic"), (96, 64, "bicubic"), (32, 32, "bilinear"),
                                              (64, 24, "bilinear")])
def test_whole_recipe_matches_torchvision_functional(side, size, interp):
    images = real_images(48, side)
    cfg = AugmentConfig(size=size, interpolation=interp, jitter_p=0.9, grayscale_p=0.3)
    aug = Augmenter(cfg, MEAN, STD, chunk=20)  # chunking must not change anything
    p = aug.sample(48, side, side, torch.Generator().manual_seed(side + size))
    assert p.jitter.any() and p.gray.any() and p.flip.any() and (~p.flip).any()
    ours = aug.apply(images, p)
    ref = tv_reference(images, p, cfg, MEAN, STD)
    # float32 round-off only (the reference is the same arithmetic in another order); in [0, 1]
    # units the bound is 1e-5 * std ~ 3e-6.
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_single_channel_images_match_torchvision():
    rgb = real_images(32)
    gray_u8 = (rgb_to_grayscale(rgb.float()) + 0.5).clamp(0, 255).to(torch.uint8)  # (32, 1, 32, 32)
    cfg = AugmentConfig(size=28, jitter_p=1.0, grayscale_p=0.5)
    aug = Augmenter(cfg, (0.286,), (0.353,))
    p = aug.sample(32, 32, 32, torch.Generator().manual_seed(5))
    ours = aug.apply(gray_u8, p)
    assert ours.shape == (32, 1, 28, 28)
    # torchvision: saturation and hue are the identity on one channel; grayscale is a no-op there.
    torch.testing.assert_close(ours, tv_reference(gray_u8, p, cfg, (0.286,), (0.353,)), atol=1e-5, rtol=0)


def test_hue_and_grayscale_ops_match_torchvision():
    x = real_images(64).float() / 255
    shift = torch.linspace(-0.5, 0.5, 64)
    ref = torch.stack([F.adjust_hue(x[i], shift[i].item()) for i in range(64)])
    torch.testing.assert_close(adjust_hue(x, shift), ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(rgb_to_grayscale(x), F.rgb_to_grayscale(x), atol=1e-6, rtol=0)
    flat = torch.full((2, 3, 4, 4), 0.3)  # gray pixels: zero chroma, hue undefined -> unchanged
    torch.testing.assert_close(adjust_hue(flat, torch.tensor([0.2, -0.4])), flat)


def test_resized_crop_with_flip_matches_torchvision_and_takes_the_box():
    x = real_images(16, 64).float() / 255
    boxes = torch.tensor([[0, 0, 64, 64], [10, 3, 20, 40], [63, 63, 1, 1], [5, 30, 50, 12]] * 4)
    flip = torch.arange(16) % 3 == 0
    ours = resized_crop(x, boxes, 32, flip)
    for i in range(16):
        ref = F.resized_crop(x[i], *boxes[i].tolist(), [32, 32], interpolation=InterpolationMode.BICUBIC,
                             antialias=True)
        ref = F.horizontal_flip(ref) if flip[i] else ref
        torch.testing.assert_close(ours[i], ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(ours[2], x[2, :, 63:, 63:].expand(3, 32, 32))  # a 1-pixel box is constant


def test_hue_in_place_and_crop_with_row_order_match_the_plain_calls():
    x = real_images(16, 64).float() / 255
    shift = torch.linspace(-0.5, 0.5, 16)
    expected = adjust_hue(x, shift)
    y = x.clone()
    assert adjust_hue(y, shift, out=y) is y
    torch.testing.assert_close(y, expected, atol=0, rtol=0)
    boxes = sample_crop_boxes(16, 64, 64, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(3))
    flip = torch.arange(16) % 2 == 0
    rows = torch.randperm(16, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(resized_crop(x, boxes, 24, flip, rows=rows), resized_crop(x[rows], boxes, 24, flip),
                               atol=0, rtol=0)
    dirty = torch.full((16, 24, 64), 7.0)  # a reused buffer still holding the last chunk's values
    torch.testing.assert_close(resize_weights(boxes[:, 1], boxes[:, 3], 64, 24, flip=flip, out=dirty),
                               resize_weights(boxes[:, 1], boxes[:, 3], 64, 24, flip=flip), atol=0, rtol=0)
    plain = resized_crop(x, boxes, 24, flip)
    assert plain.min() < 0 or plain.max() > 1  # bicubic overshoots: the clamp has work to do
    torch.testing.assert_close(resized_crop(x, boxes, 24, flip, clamp=True), plain.clamp(0, 1), atol=0, rtol=0)


def test_augmenter_colour_stage_gives_the_same_images_on_both_paths():
    # The CUDA path (no spare buffer: masked, rows in order) run on the CPU against the CPU path
    # (rows grouped by op, with the order that puts them back).
    from wmse.augment import _colour
    images = real_images(40, 32)
    p = sample_params(AugmentConfig(size=32, grayscale_p=0.3), 40, 32, 32, torch.Generator().manual_seed(5))
    assert p.gray.any() and p.jitter.any()
    masked, none = _colour(images, p, torch.empty(40, 3, 32, 32), None)
    grouped, order = _colour(images, p, torch.empty(40, 3, 32, 32), torch.empty(40, 3, 32, 32))
    assert none is None and not torch.equal(order, torch.arange(40))
    torch.testing.assert_close(grouped[order], masked)
    gray = masked[p.gray]
    torch.testing.assert_close(gray[:, 0], gray[:, 2], atol=0, rtol=0)  # grayscale happened on both


def test_masked_and_grouped_jitter_paths_agree():
    x = real_images(64).float() / 255
    p = sample_params(AugmentConfig(size=32), 64, 32, 32, torch.Generator().manual_seed(1))
    torch.testing.assert_close(color_jitter(x.clone(), p, masked_hue=True), color_jitter(x.clone(), p,
                                                                                      masked_hue=False))


# ------------------------------------------------------------------ parameter distributions

@pytest.mark.parametrize("height,width,scale,ratio", [(32, 32, (0.2, 1.0), (3 / 4, 4 / 3)),
                                                     (96, 64, (0.08, 1.0), (3 / 4, 4 / 3)),
                                                     (20, 80, (0.7, 1.0), (3 / 4, 4 / 3))])
def test_crop_boxes_match_torchvision_get_params(height, width, scale, ratio):
    n = 6000
    torch.manual_seed(0)
    dummy = torch.empty(3, height, width)
    ref = np.array([T1.RandomResizedCrop.get_params(dummy, list(scale), list(ratio)) for _ in range(n)],
                   dtype=np.float64)
    ours = sample_crop_boxes(n, height, width, scale, ratio, torch.Generator().manual_seed(1)).numpy()
    assert ((ours[:, 2] >= 1) & (ours[:, 0] + ours[:, 2] <= height)).all()
    assert ((ours[:, 3] >= 1) & (ours[:, 1] + ours[:, 3] <= width)).all()
    feats = {"area": lambda b: b[:, 2] * b[:, 3] / (height * width), "aspect": lambda b: b[:, 3] / b[:, 2],
             "top": lambda b: b[:, 0] / np.maximum(height - b[:, 2], 1),
             "left": lambda b: b[:, 1] / np.maximum(width - b[:, 3], 1)}
    for name, f in feats.items():
        res = stats.ks_2samp(f(ours), f(ref))
        assert res.pvalue > 1e-3, f"{name}: KS p={res.pvalue:.2g}"
    # The fallback (no try fits) is taken about as often.
    fallback = lambda b: np.mean((b[:, 2] == height) | (b[:, 3] == width))  # noqa: E731
    assert abs(fallback(ours) - fallback(ref)) < 0.03


def test_jitter_factors_and_order_match_torchvision():
    n = 5000
    cfg = AugmentConfig(size=32, jitter=(0.4, 0.3, 0.5, 0.1))
    p = sample_params(cfg, n, 32, 32, torch.Generator().manual_seed(2))
    torch.manual_seed(0)
    ref = [T1.ColorJitter.get_params((0.6, 1.4), (0.7, 1.3), (0.5, 1.5), (-0.1, 0.1)) for _ in range(n)]
    for k in range(4):
        res = stats.ks_2samp(p.factors[:, k].numpy(), np.array([r[k + 1] for r in ref]))
        assert res.pvalue > 1e-3, f"factor {k}: KS p={res.pvalue:.2g}"
    # The op order is a uniform random permutation: each op at each position 1/4 of the time.
    counts = torch.stack([(p.order == op).sum(dim=0) for op in range(4)]).numpy()
    ref_counts = np.array([[sum(int(r[0][pos]) == op for r in ref) for pos in range(4)] for op in range(4)])
    assert (p.order.sort(dim=1).values == torch.arange(4)).all()
    assert stats.chisquare(counts.flatten(), np.full(16, n / 4)).pvalue > 1e-3
    assert stats.chisquare(ref_counts.flatten(), np.full(16, n / 4)).pvalue > 1e-3


def _binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1


def test_flip_grayscale_and_jitter_rates_seen_on_real_images():
    images = real_images(64)
    # Whole-image crop and no colour change: each output is the image or its mirror.
    cfg = AugmentConfig(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, grayscale_p=0.0,
                        flip_p=0.3)
    aug, gen = Augmenter(cfg, (0.0,) * 3, (1.0,) * 3), torch.Generator().manual_seed(3)
    views = torch.cat(aug(images, 40, gen))
    base = (images.float() / 255).repeat(40, 1, 1, 1)
    same = (views - base).abs().amax(dim=(1, 2, 3)) < 1e-5
    mirrored = (views - base.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-5
    assert (same | mirrored).all()
    assert _binomial_ok(int((mirrored & ~same).sum()), views.shape[0], 0.3)
    # Grayscale: the three channels are equal.
    aug = Augmenter(AugmentConfig(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0,
                                  grayscale_p=0.2), (0.0,) * 3, (1.0,) * 3)
    views = torch.cat(aug(images, 40, gen))
    gray = (views[:, 0] - views[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    assert _binomial_ok(int(gray.sum()), views.shape[0], 0.2)
    # Jitter applied: the colours change (flip off, crop whole, gray off).
    aug = Augmenter(AugmentConfig(size=32, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.8,
                                  grayscale_p=0.0, flip_p=0.0), (0.0,) * 3, (1.0,) * 3)
    views = torch.cat(aug(images, 40, gen))
    changed = (views - (images.float() / 255).repeat(40, 1, 1, 1)).abs().amax(dim=(1, 2, 3)) > 1e-4
    assert _binomial_ok(int(changed.sum()), views.shape[0], 0.8)


# ------------------------------------------------------------------ properties used by training

def test_shapes_dtypes_ranges_and_device():
    images = real_images(32, 96)
    aug = Augmenter(AugmentConfig(size=64), MEAN, STD)
    views = aug(images, 4, torch.Generator().manual_seed(0))
    assert len(views) == 4
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for v in views:
        assert v.shape == (32, 3, 64, 64) and v.dtype == torch.float32 and v.device == images.device
        raw = v * std + mean
        assert raw.min() >= -1e-6 and raw.max() <= 1 + 1e-6
    with pytest.raises(ValueError, match="uint8"):
        aug(images.float(), 2)
    with pytest.raises(ValueError, match="n_views"):
        aug(images, 0)


def test_kept_buffers_follow_the_input_shape_and_never_leak_into_results():
    aug = Augmenter(AugmentConfig(size=24), MEAN, STD, chunk=16)
    small, big = real_images(40, 32), real_images(20, 48)
    p_small = aug.sample(40, 32, 32, torch.Generator().manual_seed(6))
    p_big = aug.sample(20, 48, 48, torch.Generator().manual_seed(7))
    first = aug.apply(small, p_small)
    kept = first.clone()
    other = aug.apply(big, p_big)  # other shapes: the kept buffers are replaced
    again = aug.apply(small, p_small)
    torch.testing.assert_close(first, kept, atol=0, rtol=0)  # the first result was not overwritten
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    fresh = Augmenter(AugmentConfig(size=24), MEAN, STD, chunk=16)
    torch.testing.assert_close(other, fresh.apply(big, p_big), atol=0, rtol=0)
    assert first.data_ptr() != again.data_ptr()


def test_seeded_determinism_and_independence():
    images = real_images(64)
    aug = Augmenter(AugmentConfig(size=32), MEAN, STD)
    a = aug(images, 2, torch.Generator().manual_seed(11))
    b = aug(images, 2, torch.Generator().manual_seed(11))
    c = aug(images, 2, torch.Generator().manual_seed(12))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])  # two views of the same images differ
    torch.manual_seed(3)
    d = aug(images, 1)
    torch.manual_seed(3)
    assert torch.equal(d[0], aug(images, 1)[0])  # no generator: the global RNG, also reproducible
    # One image repeated: every sample and every view gets its own parameters (jitter always on,
    # so continuous factors make every output distinct; un-jittered views may share a crop box).
    same = images[:1].expand(256, -1, -1, -1).contiguous()
    always = Augmenter(AugmentConfig(size=32, jitter_p=1.0), MEAN, STD)
    v1, v2 = always(same, 2, torch.Generator().manual_seed(4))
    flat = torch.cat([v1, v2]).flatten(1)
    assert torch.unique(flat, dim=0).shape[0] == 512
    # Parameters of the two views are uncorrelated.
    gen = torch.Generator().manual_seed(5)
    p1, p2 = aug.sample(4000, 32, 32, gen), aug.sample(4000, 32, 32, gen)
    area1, area2 = (p1.boxes[:, 2] * p1.boxes[:, 3]).double(), (p2.boxes[:, 2] * p2.boxes[:, 3]).double()
    assert abs(np.corrcoef(area1, area2)[0, 1]) < 0.06
    assert abs(np.corrcoef(p1.factors[:, 3], p2.factors[:, 3])[0, 1]) < 0.06


def test_eval_transform_matches_torchvision_resize_center_crop():
    images = real_images(8, 96)
    ours = eval_transform(images, 64, MEAN, STD, resize=70)
    for i in range(8):
        x = F.resize(images[i].float() / 255, [70], interpolation=InterpolationMode.BICUBIC, antialias=True)
        ref = F.normalize(F.center_crop(x.clamp(0, 1), [64, 64]), list(MEAN), list(STD))
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)
    wide = real_images(4, 32)[:, :, :, :30].contiguous()  # 32 x 30: non-square, odd crop offsets
    ours = eval_transform(wide, 27, MEAN, STD, resize=29)
    for i in range(4):
        x = F.resize(wide[i].float() / 255, [29], interpolation=InterpolationMode.BICUBIC, antialias=True)
        ref = F.normalize(F.center_crop(x.clamp(0, 1), [27, 27]), list(MEAN), list(STD))
        torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)
    plain = eval_transform(real_images(4), 28, MEAN, STD)
    ref = F.normalize(F.center_crop(real_images(4).float() / 255, [28, 28]), list(MEAN), list(STD))
    torch.testing.assert_close(plain, ref)
    with pytest.raises(ValueError, match="resize"):
        eval_transform(real_images(4), 40, MEAN, STD)


def test_config_validation_and_presets():
    cfg = AugmentConfig.imagenet100()
    assert (cfg.size, cfg.crop_scale, cfg.jitter, cfg.grayscale_p) == (224, (0.08, 1.0), (0.8, 0.8, 0.8, 0.2), 0.2)
    assert AugmentConfig.for_dataset("stl10").size == 64 and AugmentConfig.for_dataset("cifar100").size == 32
    bad = [dict(size=0), dict(size=32, crop_scale=(0.5, 0.2)), dict(size=32, jitter_p=1.5),
           dict(size=32, interpolation="nearest"), dict(size=32, jitter=(0.4, 0.4, 0.4, 0.7))]
    for kwargs in bad:
        with pytest.raises(ValueError, match="AugmentConfig"):
            AugmentConfig(**kwargs)
    with pytest.raises(ValueError, match="mean"):
        Augmenter(AugmentConfig(size=8), (0.5, 0.5), (0.2, 0.2))(real_images(2), 1)


def test_one_recipe_validator_names_fields_for_each_caller():
    from wmse.augment import validate_recipe
    from wmse.config import Config

    good = dict(crop_scale=(0.2, 1.0), crop_ratio=(0.75, 4 / 3), jitter=(0.4, 0.4, 0.4, 0.1),
                jitter_p=0.8, grayscale_p=0.1, flip_p=0.5)
    validate_recipe(**good)
    cases = [(dict(crop_scale=(0.5, 0.2)), "crop_scale"), (dict(crop_scale=(0.0, 1.0)), "crop_scale"),
             (dict(crop_ratio=(2.0, 1.0)), "crop_ratio"), (dict(jitter=(0.4, 0.4, 0.4)), "jitter"),
             (dict(jitter=(0.4, -0.1, 0.4, 0.1)), "jitter"), (dict(jitter=(0.4, 0.4, 0.4, 0.6)), "jitter"),
             (dict(jitter=(0.4, math.nan, 0.4, 0.1)), "jitter"), (dict(jitter_p=-0.1), "jitter_p"),
             (dict(grayscale_p=1.5), "grayscale_p"), (dict(flip_p=math.nan), "flip_p")]
    for change, name in cases:
        with pytest.raises(ValueError, match=f"field '{name}'"):  # the run configuration's naming (default)
            validate_recipe(**{**good, **change})
        with pytest.raises(ValueError, match=f"AugmentConfig: {name}"):
            validate_recipe(**{**good, **change}, field_name=lambda n: f"AugmentConfig: {n}")
        with pytest.raises(ValueError, match=f"AugmentConfig: {name}"):
            AugmentConfig(size=32, **change)
    with pytest.raises(ValueError, match="field 'flip_p' must be in"):
        validate_recipe(**{**good, "flip_p": 1.5})
    # AugmentConfig's defaults are the run configuration's recipe.
    default, run = AugmentConfig(size=32), Config()
    assert all(getattr(default, name) == getattr(run, name) for name in good)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu_given_the_same_parameters():
    images = real_images(64)
    aug = Augmenter(AugmentConfig(size=32), MEAN, STD)
    p = aug.sample(64, 32, 32, torch.Generator().manual_seed(0))
    torch.testing.assert_close(aug.apply(images.cuda(), p).cpu(), aug.apply(images, p), atol=1e-5, rtol=0)
    views = aug(images.cuda(), 2, torch.Generator(device="cuda").manual_seed(0))
    assert all(v.is_cuda and v.shape == (64, 3, 32, 32) for v in views)


def test_solarize_per_view_matches_torchvision_and_draws_nothing_at_p0():
    from torchvision.transforms.v2 import functional as TF

    images = torch.randint(0, 256, (64, 3, 20, 20), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = Augmenter(AugmentConfig(size=16), MEAN, STD)
    both = Augmenter(AugmentConfig(size=16, solarize_p=(0.0, 1.0)), MEAN, STD)
    a = plain(images, 3, generator=torch.Generator().manual_seed(7))
    b = both(images, 1, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0])  # p = 0: the same view and no random draw
    params = plain.sample(64, 20, 20, torch.Generator().manual_seed(3))
    raw = plain.apply(images, params, normalize=False)
    solar = plain.apply(images, params, normalize=False, solarize=torch.ones(64, dtype=torch.bool))
    assert torch.equal(solar, TF.solarize(raw, threshold=128 / 255))
    half = torch.arange(64) % 2 == 0
    mixed = plain.apply(images, params, normalize=False, solarize=half)
    assert torch.equal(mixed[half], solar[half]) and torch.equal(mixed[~half], raw[~half])


def test_solarize_rate_is_the_views_probability():
    aug = Augmenter(AugmentConfig(size=8, solarize_p=(0.0, 0.3)), MEAN, STD)
    flags = [aug._solarize(v, 4000, torch.Generator().manual_seed(v)) for v in range(3)]
    assert flags[0] is None
    for f in flags[1:]:  # the last probability repeats for views past the tuple
        assert abs(f.double().mean().item() - 0.3) < 4 * (0.3 * 0.7 / 4000) ** 0.5
    with pytest.raises(ValueError, match="solarize_p"):
        AugmentConfig(size=8, solarize_p=(1.5,))
