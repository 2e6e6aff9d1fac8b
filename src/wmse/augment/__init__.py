"""Batched per-sample augmentation on the batch's device (CPU or CUDA), in plain torch.

The recipe of the paper (W-MSE, Ermolov et al. 2021; torchvision semantics) for every view of
every image, each with its own random parameters:

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

Modules: :mod:`.recipe` (AugmentConfig and the recipe's validation, torch-free), :mod:`.params`
(random parameters of a view), :mod:`.colour` (jitter and grayscale), :mod:`.resize` (crop +
resize + flip), :mod:`.augmenter` (the Augmenter), :mod:`.eval` (the evaluation view).
Why the code is shaped for speed, with the figures measured, is in ``benchmarks/README.md``.
"""

# _colour is private; re-exported because tests/test_augment.py checks its two paths against each other.
from .augmenter import Augmenter, _colour
from .colour import adjust_hue, color_jitter, random_grayscale, rgb_to_grayscale
from .eval import check_eval_crop, eval_transform
from .params import ViewParams, sample_crop_boxes, sample_params
from .recipe import AugmentConfig, validate_recipe
from .resize import crop_workspace_size, resize_weights, resized_crop

__all__ = ["AugmentConfig", "ViewParams", "Augmenter", "eval_transform", "sample_crop_boxes", "sample_params",
           "check_eval_crop",
           "color_jitter", "random_grayscale",
           "resize_weights", "resized_crop", "crop_workspace_size", "adjust_hue", "rgb_to_grayscale",
           "validate_recipe"]
