"""Encoders from timm and torchvision by name, and the description that rebuilds them.

``--arch timm:NAME`` builds any timm model, ``--arch torchvision:NAME`` any torchvision classification
model, always with random weights (no download): the encoder maps (B, C, S, S) -> (B, out_dim), and
out_dim is read from the model (a dry forward pass at build time, which also turns "this model cannot
take S px images" into one clear error).

* **timm**: ``timm.create_model(NAME, num_classes=0, in_chans=C, img_size=S, ...)`` (``img_size`` only
  for models that take one). On small images (S <= 96, the range of wmse's small-image ResNet stems),
  models with a patch stride get a smaller one unless ``arch_kwargs`` sets ``patch_size``:

  - ViTs and other patch-token models (any model that takes ``patch_size`` except ConvNeXt): 4 px
    patches up to 32 px (an 8x8 token grid on CIFAR, the choice of the ViT-on-CIFAR literature,
    e.g. Lee et al. 2021 "Vision Transformer for Small-Size Datasets", omihub777/ViT-CIFAR), 8 px
    up to 96 px (8x8 tokens at 64 px, 12x12 at STL-10's 96 px). A 16 px patch would leave 4 tokens.
  - ConvNeXt (its stem is a stride-``patch_size`` patchify convolution, then three 2x downsamplings):
    patch 1 up to 32 px, a total stride of 8 as wmse's CIFAR ResNet stem (32 px -> a 4x4 last map); with its
    ImageNet stem (total stride 32) a 28 px image is downsampled to nothing. Above 32 px its own stem (timm
    adds a downsampling to stage 0 after a stride-2 stem, so patch 2 would not give stride 16):
    64 px -> 2x2, 96 px -> 3x3 last map.

* **torchvision**: ``torchvision.models.get_model(NAME, weights=None)`` (``image_size=S`` for models that
  take one, e.g. ``vit_b_16``), its last ``nn.Linear`` (the classifier) replaced by ``nn.Identity`` and,
  for C != 3, its first ``nn.Conv2d`` rebuilt with C input channels.

The description (a JSON object, written as ``backbone.json`` by ``wmse embed``) is the library, the name,
the keyword arguments and the submodules replaced after construction; :func:`rebuild` builds the
same module from it with the library alone, so exported weights load with ``strict=True``.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["LIBRARIES", "check_name", "build_library_encoder", "rebuild", "small_image_patch",
           "is_transformer", "replace_layer", "layer_spec"]

LIBRARIES = ("timm", "torchvision")
SMALL_IMAGE_MAX = 96  # = wmse.models.SMALL_IMAGE_STEM_MAX: beyond it the libraries' own stems are used

# Layers a description may put in place of a submodule (a closed list: a description never runs code).
_LAYERS = {"Identity": nn.Identity, "Conv2d": nn.Conv2d}


def check_name(library: str, name: str) -> None:
    """ValueError when ``library`` has no (classification) model ``name``."""
    if library == "timm":
        import timm

        if not name or not timm.is_model(name):
            raise ValueError(f"unknown timm model {name!r}; timm.list_models('*vit*') lists the ViTs, "
                             "timm.list_models() all of them")
    elif library == "torchvision":
        from torchvision import models

        known = models.list_models(module=models)
        if name not in known:
            raise ValueError(f"unknown torchvision classification model {name!r}; choose one of {', '.join(known)}")
    else:
        raise ValueError(f"unknown encoder library {library!r}; choose one of {', '.join(LIBRARIES)}")


def small_image_patch(name: str, image_size: int) -> int | None:
    """The patch stride a timm model ``name`` gets on ``image_size`` px images (None: the model's own)."""
    import timm

    if image_size > SMALL_IMAGE_MAX:
        return None
    if timm.models.is_model_in_modules(name, ["convnext"]):
        return 1 if image_size <= 32 else None
    return 4 if image_size <= 32 else 8


def layer_spec(module: nn.Module) -> dict[str, Any]:
    """The description of a replacement layer: ``{"type": "Identity"}`` or a Conv2d with its arguments."""
    if isinstance(module, nn.Conv2d):
        return {"type": "Conv2d", "kwargs": dict(
            in_channels=module.in_channels, out_channels=module.out_channels, kernel_size=list(module.kernel_size),
            stride=list(module.stride), padding=list(module.padding), bias=module.bias is not None)}
    if isinstance(module, nn.Identity):
        return {"type": "Identity"}
    raise TypeError(f"no description for a {type(module).__name__} layer")


def replace_layer(model: nn.Module, path: str, spec: dict[str, Any]) -> None:
    """Put the layer ``spec`` (see :func:`layer_spec`) at the dotted submodule ``path`` of ``model``."""
    kind = spec.get("type")
    if kind not in _LAYERS:
        raise ValueError(f"replacement layer {kind!r} is not one of {', '.join(_LAYERS)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.get("kwargs", {}).items()}
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, _LAYERS[kind](**kwargs))


def rebuild(spec: dict[str, Any]) -> nn.Module:
    """The module a description (``library``, ``name``, ``kwargs``, ``replace``) names, random weights.

    timm: ``timm.create_model(name, **kwargs)``; torchvision: ``torchvision.models.get_model(name, **kwargs)``;
    then each ``replace`` entry (dotted path -> layer) in order.
    """
    library, name, kwargs = spec["library"], spec["name"], dict(spec.get("kwargs", {}))
    if library == "timm":
        import timm

        model = timm.create_model(name, pretrained=False, **kwargs)
    elif library == "torchvision":
        from torchvision import models

        model = models.get_model(name, weights=None, **kwargs)
    else:
        raise ValueError(f"unknown encoder library {library!r}; choose one of {', '.join(LIBRARIES)}")
    for path, layer in spec.get("replace", {}).items():
        replace_layer(model, path, layer)
    return model


def _create(spec: dict[str, Any], optional: tuple[str, ...]) -> tuple[nn.Module, dict[str, Any]]:
    """:func:`rebuild`, dropping the ``optional`` keyword arguments the model's constructor does not take."""
    spec = copy.deepcopy(spec)
    while True:
        try:
            return rebuild(spec), spec
        except TypeError as e:
            dropped = [k for k in optional if k in spec["kwargs"] and repr(k) in str(e)]
            if not dropped:
                raise
            del spec["kwargs"][dropped[0]]


def _timm_spec(name: str, image_size: int, in_channels: int, extra: dict[str, Any]) -> tuple[dict, tuple[str, ...]]:
    kwargs: dict[str, Any] = {"num_classes": 0, "in_chans": in_channels, "img_size": image_size}
    optional = ["img_size"]
    patch = small_image_patch(name, image_size)
    if patch is not None:
        kwargs["patch_size"] = patch
        optional.append("patch_size")
    optional = [k for k in optional if k not in extra]  # what the user asks for is never dropped
    return {"library": "timm", "name": name, "kwargs": {**kwargs, **extra}, "replace": {}}, tuple(optional)


def _torchvision_finish(model: nn.Module, spec: dict[str, Any], in_channels: int) -> None:
    """Classifier (the last Linear) -> Identity; for ``in_channels`` != 3 the first Conv2d rebuilt."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"torchvision model {spec['name']!r} has no linear classifier to remove")
    if in_channels != 3:
        first = next((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
        conv = layer_spec(first[1])
        conv["kwargs"]["in_channels"] = in_channels
        spec["replace"][first[0]] = conv
    spec["replace"][linears[-1]] = {"type": "Identity"}
    for path, layer in spec["replace"].items():
        replace_layer(model, path, layer)


def build_library_encoder(library: str, name: str, image_size: int, in_channels: int,
                          extra: dict[str, Any] | None = None) -> nn.Module:
    """A timm / torchvision encoder (B, in_channels, S, S) -> (B, out_dim), random weights.

    The module carries ``out_dim`` (read from a dry forward pass), ``backbone_spec`` (the description
    :func:`rebuild` builds it from) and ``channels_last`` (False for transformers). ``extra``: keyword
    arguments for the model's constructor (``--arch_kwargs``), e.g. ``{"depth": 4}`` for a ViT.
    """
    check_name(library, name)
    extra = dict(extra or {})
    if library == "timm":
        spec, optional = _timm_spec(name, image_size, in_channels, extra)
    else:
        spec, optional = {"library": library, "name": name, "kwargs": {"image_size": image_size, **extra},
                          "replace": {}}, ("image_size",) if "image_size" not in extra else ()
    try:
        model, spec = _create(spec, optional)
    except Exception as e:  # whatever the library's constructor raises on arguments it cannot take
        raise ValueError(f"{library}:{name} cannot be built with {spec['kwargs']}: {_first_line(e)}") from None
    if library == "torchvision":
        _torchvision_finish(model, spec, in_channels)
    _check_patch_grid(model, f"{library}:{name}", image_size)
    model.out_dim = _feature_width(model, f"{library}:{name}", image_size, in_channels)
    model.backbone_spec = spec
    model.channels_last = not is_transformer(model)
    return model


def _check_patch_grid(model: nn.Module, arch: str, image_size: int) -> None:
    """A patch embedding whose stride does not divide the image would silently drop the border pixels."""
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    side = patch[0] if isinstance(patch, (tuple, list)) else patch
    if isinstance(side, int) and image_size % side:
        raise ValueError(f"{arch} cannot take {image_size} px images: its {side} px patches do not tile them "
                         f"(use a multiple of {side}, or another patch_size in --arch_kwargs)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _feature_width(model: nn.Module, arch: str, image_size: int, in_channels: int) -> int:
    """The width of ``model``'s output on two blank images; ValueError when it cannot take them."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(2, in_channels, image_size, image_size))
    except Exception as e:  # a library's own message (a kernel larger than the input, a size assert)
        raise ValueError(f"{arch} cannot take {image_size} px images: {_first_line(e)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"{arch} does not give one feature vector per image at {image_size} px (got {shape})")
    return int(out.shape[1])


def is_transformer(model: nn.Module) -> bool:
    """True for models built of attention blocks (ViT, Swin, ...): channels_last only helps convolutions."""
    return any("Attention" in type(m).__name__ for m in model.modules())
