"""Backbones (stems by image size, torchvision compatibility) and projection heads."""

from __future__ import annotations


import pytest
import torch
from torch import nn
from torchvision import models as tv

from wmse.models import ProjectionHead, SmallConvNet, build_backbone, stem_kind, torchvision_resnet




def _conv1(model: nn.Module) -> tuple[int, int, int, int, int]:
    c = model.conv1
    return c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0]


@pytest.mark.parametrize(
    "size, kernel, stride, padding, maxpool",
    [(28, 3, 1, 1, False), (32, 3, 1, 1, False), (33, 3, 1, 1, True), (64, 3, 1, 1, True),
     (96, 3, 1, 1, True), (97, 7, 2, 3, True), (224, 7, 2, 3, True)],
)
def test_resnet_stem_follows_image_size(size: int, kernel: int, stride: int, padding: int, maxpool: bool) -> None:
    model = build_backbone("resnet18", size)
    assert _conv1(model) == (3, 64, kernel, stride, padding)
    assert isinstance(model.maxpool, nn.MaxPool2d) is maxpool
    assert isinstance(model.fc, nn.Identity)


def test_stem_kind_boundaries() -> None:
    assert [stem_kind(s) for s in (1, 32, 33, 96, 97)] == ["cifar", "cifar", "small_image", "small_image", "imagenet"]
    with pytest.raises(ValueError, match="image_size"):
        stem_kind(0)


@pytest.mark.parametrize("arch, out_dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_resnet_output_shape(arch: str, out_dim: int) -> None:
    model = build_backbone(arch, 32).eval()
    assert model.out_dim == out_dim
    with torch.no_grad():  # 8 px inputs: the stem is fixed by image_size, small inputs keep this fast
        assert model(torch.randn(2, 3, 8, 8)).shape == (2, out_dim)


@pytest.mark.parametrize("size, channels", [(32, 3), (64, 3), (224, 3), (32, 1), (64, 1), (224, 1)])
def test_resnet_shapes_per_stem(size: int, channels: int) -> None:
    model = build_backbone("resnet18", size, in_channels=channels).eval()
    assert model.conv1.in_channels == channels
    x = torch.randn(2, channels, min(size, 64), min(size, 64))  # 64 px is enough for the 224 px stem
    with torch.no_grad():
        assert model(x).shape == (2, 512)


def test_imagenet_stem_keeps_torchvision_conv1() -> None:
    """At > 96 px with RGB the model is torchvision's ResNet-18 with only fc removed."""
    ours = build_backbone("resnet18", 224)
    ref = tv.resnet18(weights=None)
    ours_keys = set(ours.state_dict())
    assert ours_keys == {k for k in ref.state_dict() if not k.startswith("fc.")}
    assert _conv1(ours) == _conv1(ref)


@pytest.mark.parametrize("arch, size, channels", [("resnet18", 32, 3), ("resnet18", 64, 1), ("resnet50", 224, 3)])
def test_backbone_weights_load_into_plain_torchvision(arch: str, size: int, channels: int) -> None:
    """Exported weights load strictly into torchvision's model with the same stem and agree exactly."""
    torch.manual_seed(0)
    ours = build_backbone(arch, size, channels)
    # Train-mode steps so BN running statistics differ from their initial values.
    side = 16  # input side; the stem depends on `size` only, small inputs keep the test fast
    with torch.no_grad():
        ours(torch.randn(4, channels, side, side) * 3 + 1)
    ref = torchvision_resnet(arch, size, channels)
    assert type(ref) is tv.ResNet
    ref.load_state_dict(ours.state_dict(), strict=True)
    ours.eval()
    ref.eval()
    x = torch.randn(3, channels, side, side)
    with torch.no_grad():
        assert torch.equal(ours(x), ref(x))


def test_torchvision_resnet_rejects_small_and_bad_channels() -> None:
    with pytest.raises(ValueError, match="arch 'small'"):
        torchvision_resnet("small", 32)
    with pytest.raises(ValueError, match="in_channels"):
        build_backbone("resnet18", 32, in_channels=0)
    with pytest.raises(ValueError, match="unknown arch 'vgg'"):
        build_backbone("vgg", 32)


@pytest.mark.parametrize("size, channels", [(28, 1), (32, 3), (64, 3)])
def test_small_backbone_shapes(size: int, channels: int) -> None:
    model = build_backbone("small", size, channels)
    assert isinstance(model, SmallConvNet)
    assert model(torch.randn(4, channels, size, size)).shape == (4, model.out_dim)
    assert model.out_dim == 256


def test_small_backbone_trains() -> None:
    """Gradients reach the first convolution (no dead path) and outputs stay finite."""
    model = build_backbone("small", 28, 1)
    out = model(torch.randn(8, 1, 28, 28))
    out.square().mean().backward()
    grad = model.features[0].weight.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_projection_head_layers_and_shapes() -> None:
    head = ProjectionHead(512, 1024, 64)
    kinds = [type(m) for m in head]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (head[0].in_features, head[0].out_features, head[3].out_features) == (512, 1024, 64)
    assert head(torch.randn(5, 512)).shape == (5, 64)


def test_projection_head_bn_last_standardises_output() -> None:
    head = ProjectionHead(16, 32, 8, bn_last=True)
    assert isinstance(head[-1], nn.BatchNorm1d) and head[-1].affine
    out = head(torch.randn(64, 16))
    # Training-mode BN with unit weight and zero bias: zero mean, unit (biased) variance per column.
    torch.testing.assert_close(out.mean(0), torch.zeros(8), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.var(0, unbiased=False), torch.ones(8), atol=1e-3, rtol=0)


def test_projection_head_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="out_dim"):
        ProjectionHead(16, 32, 0)
