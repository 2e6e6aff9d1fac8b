"""The augmentation recipe's parameters (AugmentConfig) and the rules a recipe must satisfy.

No torch here: :func:`validate_recipe` is plain Python, written once for every configuration that
carries a recipe (AugmentConfig, the run configuration), each naming the fields its own way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["AugmentConfig", "validate_recipe", "RECIPE", "Recipe"]


@dataclass(frozen=True)
class Recipe:
    """The paper's augmentation (W-MSE's CIFAR / STL-10 / Tiny ImageNet recipe), written once: the defaults of
    AugmentConfig and of the run configuration's fields (wmse.config.RunFields)."""

    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.1
    flip_p: float = 0.5
    solarize_p: tuple[float, ...] = (0.0,)  # per view, the last value repeating (not in the paper: INTL's)


RECIPE = Recipe()


def _field(name: str) -> str:
    return f"field {name!r}"


def validate_recipe(crop_scale: Sequence[float], crop_ratio: Sequence[float], jitter: Sequence[float],
                    jitter_p: float, grayscale_p: float, flip_p: float, solarize_p: Sequence[float] = (0.0,),
                    field_name: Callable[[str], str] = _field) -> None:
    """Raise ValueError unless the values describe a valid recipe.

    Args:
        crop_scale, crop_ratio: RandomResizedCrop's (min, max) area fraction and aspect ratio.
        jitter: ColorJitter's brightness, contrast, saturation and hue strengths.
        jitter_p, grayscale_p, flip_p: probabilities of ColorJitter, RandomGrayscale, the flip.
        solarize_p: RandomSolarize's probability for each view (the last value repeats).
        field_name: how a message names a parameter, e.g. ``"field 'flip_p'"`` (the default,
            as the run configuration names its fields).
    """
    # ``not a <= b`` rather than ``a > b``: NaN fails every comparison, so it is rejected too.
    if len(crop_scale) != 2 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ValueError(f"{field_name('crop_scale')} must satisfy 0 < min <= max <= 1, got {crop_scale}")
    if len(crop_ratio) != 2 or not 0.0 < crop_ratio[0] <= crop_ratio[1]:
        raise ValueError(f"{field_name('crop_ratio')} must satisfy 0 < min <= max, got {crop_ratio}")
    if len(jitter) != 4 or not all(j >= 0.0 for j in jitter) or not jitter[3] <= 0.5:
        raise ValueError(f"{field_name('jitter')} needs 4 non-negative strengths (brightness, contrast, "
                         f"saturation, hue) and hue <= 0.5, got {jitter}")
    for name, p in (("jitter_p", jitter_p), ("grayscale_p", grayscale_p), ("flip_p", flip_p)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{field_name(name)} must be in [0.0, 1.0], got {p}")
    if not solarize_p or not all(0.0 <= p <= 1.0 for p in solarize_p):
        raise ValueError(f"{field_name('solarize_p')} needs one probability in [0, 1] per view (the last "
                         f"repeats), got {solarize_p}")


@dataclass
class AugmentConfig:
    """Parameters of the training augmentation (defaults: the paper's CIFAR/STL/Tiny IN recipe)."""

    size: int
    crop_scale: tuple[float, float] = RECIPE.crop_scale
    crop_ratio: tuple[float, float] = RECIPE.crop_ratio
    jitter: tuple[float, float, float, float] = RECIPE.jitter  # brightness, contrast, saturation, hue
    jitter_p: float = RECIPE.jitter_p
    grayscale_p: float = RECIPE.grayscale_p
    flip_p: float = RECIPE.flip_p
    solarize_p: tuple[float, ...] = RECIPE.solarize_p  # view v uses solarize_p[min(v, len - 1)]
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"AugmentConfig: size={self.size!r} must be a positive int")
        validate_recipe(self.crop_scale, self.crop_ratio, self.jitter, self.jitter_p, self.grayscale_p,
                        self.flip_p, self.solarize_p, field_name=lambda name: f"AugmentConfig: {name}")
        if self.interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"AugmentConfig: interpolation={self.interpolation!r} must be 'bicubic' or 'bilinear'")

    @classmethod
    def imagenet100(cls, size: int = 224) -> "AugmentConfig":
        """The paper's ImageNet-100 recipe: crop scale (0.08, 1), jitter 0.8/0.8/0.8/0.2, grayscale p 0.2
        (crop ratio, jitter p and flip p as the default recipe)."""
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
