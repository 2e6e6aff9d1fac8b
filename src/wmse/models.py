"""Encoders (backbones) and projection heads.

The ResNet backbones are plain torchvision ResNets whose stem is adapted to the image size
(as the paper's official code) and whose ``fc`` is an ``nn.Identity``, so a backbone's ``state_dict`` loads
unchanged into ``torchvision_resnet(arch, image_size, in_channels)``:

================  ==========================================  =================================
image size        conv1                                       maxpool
================  ==========================================  =================================
<= 32 px          3x3, stride 1, padding 1 (CIFAR)            removed (``nn.Identity``)
33 .. 96 px       3x3, stride 1, padding 1 (STL-10, Tiny IN)  kept (3x3, stride 2)
> 96 px           torchvision's 7x7, stride 2, padding 3      kept
================  ==========================================  =================================

``small`` is a four-block conv net for CPU demos (Fashion-MNIST at 28 px in a few minutes).
``timm:NAME`` and ``torchvision:NAME`` are any model of those libraries (:mod:`wmse.encoders`).
Every backbone carries ``backbone_spec``, the description its library rebuilds it from (``backbone.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torchvision import models as tv_models

from .encoders import LIBRARIES, build_library_encoder, check_name, layer_spec, rebuild
from .registry import Registry

__all__ = [
    "ARCHS",
    "Arch",
    "ArchRegistry",
    "RESNET_OUT_DIM",
    "SmallConvNet",
    "ProjectionHead",
    "backbone_description",
    "build_backbone",
    "parse_arch_kwargs",
    "rebuild_backbone",
    "resnet_spec",
    "stem_kind",
    "torchvision_resnet",
    "uses_channels_last",
]

# Feature width after global pooling of each torchvision ResNet.
RESNET_OUT_DIM: dict[str, int] = {"resnet18": 512, "resnet34": 512, "resnet50": 2048}
_RESNET_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "resnet18": tv_models.resnet18,
    "resnet34": tv_models.resnet34,
    "resnet50": tv_models.resnet50,
}

# Image-size limits of the stems (inclusive upper bounds).
CIFAR_STEM_MAX = 32
SMALL_IMAGE_STEM_MAX = 96


def stem_kind(image_size: int) -> str:
    """Name of the stem used for square images of ``image_size`` pixels.

    Returns ``"cifar"`` (3x3 conv1, no maxpool), ``"small_image"`` (3x3 conv1 + maxpool)
    or ``"imagenet"`` (torchvision's 7x7 stride-2 conv1 + maxpool).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive number of pixels, got {image_size}")
    if image_size <= CIFAR_STEM_MAX:
        return "cifar"
    if image_size <= SMALL_IMAGE_STEM_MAX:
        return "small_image"
    return "imagenet"


def _check_in_channels(in_channels: int) -> None:
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1 (1 for grayscale, 3 for RGB), got {in_channels}")


def torchvision_resnet(arch: str, image_size: int, in_channels: int = 3) -> nn.Module:
    """A plain, randomly initialised torchvision ResNet with the stem for ``image_size``.

    ``fc`` is replaced by ``nn.Identity`` so the model maps (B, C, H, W) -> (B, out_dim).
    This is the reference architecture that exported backbone weights load into.

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        image_size: side of the (square) training crops in pixels; selects the stem.
        in_channels: image channels (3 RGB, 1 grayscale); replaces conv1's input width.
    """
    if arch not in _RESNET_FACTORIES:
        raise ValueError(
            f"arch {arch!r} is not a torchvision ResNet; choose one of {sorted(_RESNET_FACTORIES)}"
        )
    _check_in_channels(in_channels)
    model = _RESNET_FACTORIES[arch](weights=None)
    kind = stem_kind(image_size)
    width = model.conv1.out_channels
    if kind in ("cifar", "small_image"):
        # Small images: a 7x7 stride-2 conv would discard most of the spatial detail.
        model.conv1 = nn.Conv2d(in_channels, width, kernel_size=3, stride=1, padding=1, bias=False)
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, width, kernel_size=7, stride=2, padding=3, bias=False)
    if kind == "cifar":
        model.maxpool = nn.Identity()
    if kind != "imagenet" or in_channels != 3:
        # Same initialisation torchvision applies to its own convolutions.
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.fc = nn.Identity()
    return model


def _conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


class SmallConvNet(nn.Module):
    """Four conv-BN-ReLU blocks + global average pooling, for CPU demos.

    Widths 32-64-128-``out_dim``; the first block has stride 2 and max-pooling halves the
    resolution after blocks 2 and 3, so a 28 px image is processed at 14, 14, 7 and 4 px:
    about 12 M multiply-adds per image (a CIFAR-stem ResNet-18 at 32 px needs ~560 M).

    Shapes: (B, in_channels, H, W) float -> (B, out_dim).
    """

    def __init__(self, in_channels: int = 3, out_dim: int = 256) -> None:
        super().__init__()
        _check_in_channels(in_channels)
        self.out_dim = out_dim
        self.features = nn.Sequential(
            *_conv_bn_relu(in_channels, 32, stride=2),
            *_conv_bn_relu(32, 64),
            nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn_relu(64, 128),
            nn.MaxPool2d(2, ceil_mode=True),
            *_conv_bn_relu(128, out_dim),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, out_dim)."""
        return torch.flatten(self.pool(self.features(x)), 1)


@dataclass(frozen=True)
class Arch:
    """An encoder architecture: ``build(image_size, in_channels)`` -> module (B, C, H, W) -> (B, out_dim).

    ``resnet``: the module is a plain torchvision ResNet (exported weights load into
    :func:`torchvision_resnet`). ``family`` (``"timm"`` / ``"torchvision"``): the entry stands for every
    ``family:NAME`` (:mod:`wmse.encoders`); ``out_dim`` is then None (read from the model).
    """

    build: Callable[[int, int], nn.Module] | None
    out_dim: int | None
    resnet: bool = False
    family: str | None = None


class ArchRegistry(Registry[Arch]):
    """:class:`Registry` whose ``timm:NAME`` / ``torchvision:NAME`` entries resolve every ``timm:...`` name.

    Looking up ``"timm:convnext_atto"`` checks that the library has the model and returns the family's entry;
    ``names()`` lists the family entries as ``timm:NAME`` (what validation and error messages show).
    """

    def get(self, name: str, arg: str | None = None) -> Arch:
        family, sep, model = name.partition(":") if isinstance(name, str) else ("", "", "")
        entry = self._items.get(f"{family}:NAME") if sep else None
        if entry is None:
            return super().get(name, arg)
        try:
            check_name(family, model)
        except ValueError as e:
            raise ValueError(f"{arg}: {e}" if arg else str(e)) from None
        return entry

    def __contains__(self, name: object) -> bool:
        try:
            self.get(name)  # type: ignore[arg-type]
        except ValueError:
            return False
        return True


def _resnet(arch: str) -> Callable[[int, int], nn.Module]:
    def build(image_size: int, in_channels: int) -> nn.Module:
        model = torchvision_resnet(arch, image_size, in_channels)
        model.out_dim = RESNET_OUT_DIM[arch]
        model.backbone_spec = resnet_spec(arch, model)
        return model

    return build


def resnet_spec(arch: str, model: nn.Module) -> dict:
    """The description (:func:`wmse.encoders.rebuild`) of a :func:`torchvision_resnet`: torchvision's
    ``arch`` with this model's conv1, maxpool and fc (Identity) put in place."""
    replace = {"conv1": layer_spec(model.conv1)}
    if isinstance(model.maxpool, nn.Identity):
        replace["maxpool"] = layer_spec(model.maxpool)
    replace["fc"] = {"type": "Identity"}
    return {"library": "torchvision", "name": arch, "kwargs": {}, "replace": replace}


def _small(image_size: int, in_channels: int) -> nn.Module:
    stem_kind(image_size)  # validates image_size
    model = SmallConvNet(in_channels)
    model.backbone_spec = {"library": "wmse", "name": "small", "kwargs": {"in_channels": in_channels}}
    return model


ARCHS: ArchRegistry = ArchRegistry("arch")
for _name in _RESNET_FACTORIES:
    ARCHS.add(_name, Arch(_resnet(_name), RESNET_OUT_DIM[_name], resnet=True))
ARCHS.add("small", Arch(_small, 256))
for _library in LIBRARIES:
    ARCHS.add(f"{_library}:NAME", Arch(None, None, family=_library))


def parse_arch_kwargs(text: str | dict | None) -> dict[str, Any]:
    """``--arch_kwargs`` (a JSON object, e.g. ``'{"depth": 4}'``) as a dict; ValueError naming the field."""
    if text is None or isinstance(text, dict):
        return dict(text or {})
    expected = f"field 'arch_kwargs' must be a JSON object such as '{{\"depth\": 4}}', got {text!r}"
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{expected} ({e.msg})") from None
    if not isinstance(value, dict):
        raise ValueError(expected)
    return value


def build_backbone(arch: str, image_size: int, in_channels: int = 3,
                   arch_kwargs: str | dict | None = None) -> nn.Module:
    """The encoder E of a name of :data:`ARCHS`: (B, in_channels, H, W) float -> (B, out_dim).

    For ResNets the returned module *is* ``torchvision_resnet(arch, image_size, in_channels)``
    (same class, same state_dict keys) with an extra ``out_dim`` attribute (512 for
    resnet18/34, 2048 for resnet50). ``"small"`` gives a :class:`SmallConvNet` (out_dim 256).
    ``timm:NAME`` / ``torchvision:NAME``: :func:`wmse.encoders.build_library_encoder`, with ``arch_kwargs``
    (a JSON object or dict) passed to the model's constructor.

    Every module carries ``backbone_spec``, the description :func:`rebuild_backbone` rebuilds it from, and
    ``channels_last`` (whether the channels_last memory format helps it: convolutional nets, not ViTs).
    """
    entry = ARCHS.get(arch, "arch")
    kwargs = parse_arch_kwargs(arch_kwargs)
    if entry.family is not None:
        return build_library_encoder(entry.family, arch.partition(":")[2], image_size, in_channels, kwargs)
    if kwargs:
        raise ValueError(f"field 'arch_kwargs' applies to timm:NAME and torchvision:NAME archs, not {arch!r}")
    model = entry.build(image_size, in_channels)
    model.channels_last = True
    return model


def uses_channels_last(wanted: bool, backbone: nn.Module) -> bool:
    """``--channels_last`` where it helps: convolutional backbones, not transformers (``backbone.channels_last``)."""
    return wanted and getattr(backbone, "channels_last", True)


def backbone_description(backbone: nn.Module, arch: str, image_size: int, in_channels: int) -> dict:
    """What ``wmse embed`` writes as backbone.json: ``library``, ``name``, ``kwargs``, ``replace`` (the submodules
    put in place after construction), plus wmse's arch, image_size, in_channels and out_dim."""
    # An arch registered outside wmse may carry no description: its own code rebuilds it (library None).
    spec = getattr(backbone, "backbone_spec", None) or {"library": None, "name": arch, "kwargs": {}}
    return {"format": "wmse-backbone-1", **spec, "arch": arch, "image_size": image_size,
            "in_channels": in_channels, "out_dim": backbone.out_dim}


def rebuild_backbone(spec: dict) -> nn.Module:
    """The module a backbone description (``backbone.json`` of ``wmse embed``) names, random weights.

    Library models are built by their library alone (:func:`wmse.encoders.rebuild`); ``"wmse"`` names
    wmse's own :class:`SmallConvNet`.
    """
    if spec.get("library") == "wmse":
        if spec.get("name") != "small":
            raise ValueError(f"unknown wmse backbone {spec.get('name')!r} in the description")
        return SmallConvNet(**spec.get("kwargs", {}))
    return rebuild(spec)


class ProjectionHead(nn.Sequential):
    """The projection head g: (Linear -> BatchNorm1d -> ReLU) x (layers - 1) -> Linear [-> BatchNorm1d].

    ``layers=2`` (the default, W-MSE's head): Linear -> BatchNorm1d -> ReLU -> Linear. ``bn_last=True``
    appends ``BatchNorm1d(out_dim)`` (with affine parameters, as the official Contrastive baseline does
    after its head). The same class is BYOL's predictor.

    Shapes: (B, in_dim) -> (B, out_dim).
    """

    def __init__(self, in_dim: int, hidden: int = 1024, out_dim: int = 64, bn_last: bool = False,
                 layers: int = 2) -> None:
        for name, value in (("in_dim", in_dim), ("hidden", hidden), ("out_dim", out_dim), ("layers", layers)):
            if value < 1:
                raise ValueError(f"ProjectionHead {name} must be >= 1, got {value}")
        widths = [in_dim] + [hidden] * (layers - 1)
        modules: list[nn.Module] = []
        for a, b in zip(widths, widths[1:]):
            modules += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU(inplace=True)]
        modules.append(nn.Linear(widths[-1], out_dim))
        if bn_last:
            modules.append(nn.BatchNorm1d(out_dim))
        super().__init__(*modules)
        self.in_dim = in_dim
        self.out_dim = out_dim
