"""Encoders by name (timm:NAME, torchvision:NAME): sizes, errors, exports that load back into their library,
and the training loop with a ViT (bf16, channels_last, compile, resume, DDP) and BatchNorm-free encoders."""

from __future__ import annotations

import json
import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

timm = pytest.importorskip("timm")  # a dependency of wmse; skipped only in an environment without it

from wmse.config import validate  # noqa: E402
from wmse.methods import METHODS, build_method  # noqa: E402
from wmse.models import ARCHS, backbone_description, build_backbone, uses_channels_last  # noqa: E402

VIT = "timm:vit_tiny_patch16_224"
TINY_VIT = {"embed_dim": 16, "depth": 1, "num_heads": 2}
CONVNEXT = "timm:convnext_atto"
TINY_CONVNEXT = {"dims": [8, 16, 16, 16], "depths": [1, 1, 1, 1]}


def _out(model: nn.Module, size: int, channels: int) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(torch.randn(3, channels, size, size, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("size, patch, grid", [(28, 4, 7), (32, 4, 8), (64, 8, 8), (96, 8, 12), (112, 16, 7)])
def test_vit_patch_size_follows_image_size(size, patch, grid):
    model = build_backbone(VIT, size, 1, TINY_VIT)
    assert model.patch_embed.patch_size == (patch, patch) and model.patch_embed.grid_size == (grid, grid)
    assert model.out_dim == 16 and _out(model, size, 1).shape == (3, 16)
    assert model.backbone_spec["kwargs"]["img_size"] == size and model.channels_last is False


@pytest.mark.parametrize("size, patch, last", [(28, 1, 3), (32, 1, 4), (33, 4, 1), (64, 4, 2), (96, 4, 3)])
def test_convnext_stem_stride_follows_image_size(size, patch, last):
    model = build_backbone(CONVNEXT, size, 3, TINY_CONVNEXT)
    assert model.stem[0].stride == (patch, patch)
    with torch.no_grad():
        assert model.forward_features(torch.zeros(1, 3, size, size)).shape[-2:] == (last, last)
    assert "img_size" not in model.backbone_spec["kwargs"]  # ConvNeXt takes none: dropped, not passed
    assert model.out_dim == 16 and _out(model, size, 3).shape == (3, 16) and model.channels_last is True


def test_user_patch_size_wins_and_feature_width_is_read_from_the_model():
    model = build_backbone(VIT, 32, 3, {**TINY_VIT, "patch_size": 8, "embed_dim": 24, "num_heads": 3})
    assert model.patch_embed.grid_size == (4, 4) and model.out_dim == 24


def test_torchvision_models_lose_their_classifier_and_take_the_data_channels():
    resnet = build_backbone("torchvision:resnet18", 32, 1)
    assert isinstance(resnet.fc, nn.Identity) and resnet.conv1.in_channels == 1 and resnet.out_dim == 512
    mobilenet = build_backbone("torchvision:mobilenet_v3_small", 32, 3)
    # Its classifier is Linear-Hardswish-Dropout-Linear: only the last Linear goes.
    assert isinstance(mobilenet.classifier[3], nn.Identity) and mobilenet.out_dim == 1024
    assert _out(mobilenet, 32, 3).shape == (3, 1024)


@pytest.mark.parametrize("arch, kwargs, size, words", [
    (VIT, TINY_VIT, 30, "cannot take 30 px images: its 4 px patches"),
    ("torchvision:convnext_tiny", None, 28, "cannot take 28 px images"),
    ("timm:not_a_model", None, 32, "unknown timm model 'not_a_model'"),
    ("torchvision:not_a_model", None, 32, "unknown torchvision classification model"),
    ("resnet18", {"depth": 2}, 32, "arch_kwargs"),
    (VIT, "[1, 2]", 32, "field 'arch_kwargs' must be a JSON object"),
    (CONVNEXT, {"dims": [8, 16, 32], "depths": [1, 1, 1]}, 32, "timm:convnext_atto cannot be built with"),
])
def test_impossible_encoders_are_one_line_value_errors(arch, kwargs, size, words):
    with pytest.raises(ValueError) as info:
        build_backbone(arch, size, 3, kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_registry_and_validation_know_library_names(make_config, tmp_path):
    assert "timm:NAME" in ARCHS.names() and "torchvision:NAME" in ARCHS.names()
    assert VIT in ARCHS and "torchvision:resnet50" in ARCHS and "timm:nope" not in ARCHS
    with pytest.raises(ValueError, match="unknown arch 'vit'; choose one of .*timm:NAME, torchvision:NAME"):
        ARCHS.check("vit")
    cfg = make_config(tmp_path, tmp_path, arch=VIT, arch_kwargs=json.dumps(TINY_VIT))
    validate(cfg)
    with pytest.raises(ValueError, match="unknown timm model"):
        validate(cfg.replace(arch="timm:nope"))
    with pytest.raises(ValueError, match="applies to timm:NAME and torchvision:NAME"):
        validate(cfg.replace(arch="small"))


def test_the_projection_head_takes_the_encoders_width(make_config, tmp_path):
    cfg = make_config(tmp_path, tmp_path, arch=VIT, arch_kwargs=json.dumps({**TINY_VIT, "embed_dim": 12}))
    method = build_method(cfg, 3)
    assert method.head[0].in_features == 12
    assert [z.shape for z in method.embed([torch.randn(4, 3, 16, 16)] * 2)] == [(4, cfg.emb)] * 2


def test_channels_last_only_for_convolutional_encoders():
    assert uses_channels_last(True, build_backbone("small", 16, 1))
    assert uses_channels_last(True, build_backbone(CONVNEXT, 16, 1, TINY_CONVNEXT))
    assert not uses_channels_last(True, build_backbone(VIT, 16, 1, TINY_VIT))
    assert not uses_channels_last(False, build_backbone("small", 16, 1))


# --- exports: the README's lines, run as written, rebuild each family and load strictly


def _export(model: nn.Module, arch: str, size: int, channels: int, tmp_path):
    """What `wmse embed` writes: backbone.safetensors and backbone.json."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "backbone.safetensors"))
    (tmp_path / "backbone.json").write_text(json.dumps(backbone_description(model, arch, size, channels)))
    return json.loads((tmp_path / "backbone.json").read_text()), str(tmp_path / "backbone.safetensors")


def _readme_timm(spec, weights):
    model = timm.create_model(spec["name"], **spec["kwargs"]); model.load_state_dict(load_file(weights), strict=True)  # noqa: E702
    return model


def _readme_torchvision(spec, weights):
    model = torchvision.models.get_model(spec["name"], **spec["kwargs"])
    for path, layer in spec["replace"].items():
        model.set_submodule(path, getattr(torch.nn, layer["type"])(**layer.get("kwargs", {})))
    model.load_state_dict(load_file(weights), strict=True)
    return model


def _readme_resnet18_32px(weights, channels):
    model = torchvision.models.resnet18(); model.conv1 = torch.nn.Conv2d(channels, 64, 3, 1, 1, bias=False)  # noqa: E702
    model.maxpool = torch.nn.Identity(); model.fc = torch.nn.Identity()  # noqa: E702
    model.load_state_dict(load_file(weights), strict=True)
    return model


@pytest.mark.parametrize("arch, kwargs, size, channels, rebuild", [
    (VIT, TINY_VIT, 32, 3, _readme_timm),
    (CONVNEXT, TINY_CONVNEXT, 28, 1, _readme_timm),
    ("torchvision:mobilenet_v3_small", None, 32, 1, _readme_torchvision),
    ("resnet18", None, 32, 1, _readme_torchvision),
    ("resnet18", None, 64, 3, _readme_torchvision),
])
def test_exports_load_back_into_their_library(arch, kwargs, size, channels, rebuild, tmp_path):
    model = build_backbone(arch, size, channels, kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))  # weights unlike any fresh init
    spec, weights = _export(model, arch, size, channels, tmp_path)
    assert spec["library"] == arch.partition(":")[0] if ":" in arch else spec["library"] == "torchvision"
    torch.testing.assert_close(_out(rebuild(spec, weights), size, channels), _out(model, size, channels))


def test_wmse_resnet18_is_torchvision_resnet18_with_the_readme_stem(tmp_path):
    model = build_backbone("resnet18", 32, 1)
    _, weights = _export(model, "resnet18", 32, 1, tmp_path)
    torch.testing.assert_close(_out(_readme_resnet18_32px(weights, 1), 32, 1), _out(model, 32, 1))


# --- the training loop with encoders that have no BatchNorm


def _views(n: int = 32, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(n, 3, size, size, generator=g) for _ in range(2)]


# Per method: the fields a tiny batch needs (CW-RGP whitens emb / cw_groups channels against w_size images).
TINY_FIELDS = {"cwrgp": dict(emb=32, w_size=8, cw_groups=2), "dbn": dict(dbn_groups=2)}


@pytest.mark.parametrize("arch, kwargs", [(VIT, TINY_VIT), (CONVNEXT, TINY_CONVNEXT)])
@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_trains_a_batchnorm_free_encoder(method, arch, kwargs, make_config, tmp_path):
    cfg = make_config(tmp_path, tmp_path, method=method, arch=arch, arch_kwargs=json.dumps(kwargs),
                      **TINY_FIELDS.get(method, {}))
    m = build_method(cfg, 3)
    assert not any(isinstance(x, nn.modules.batchnorm._BatchNorm) for x in m.backbone.modules())
    loss = m.loss(_views())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in m.backbone.parameters() if p.grad is not None]
    assert grads and any(bool(g.abs().sum() > 0) for g in grads)
    m.on_step(1, 10)  # BYOL: the target follows the online network


def _losses(run) -> list[float]:
    from wmse.progress import read_metrics

    return [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]


def test_vit_trains_in_bf16_with_adamw_and_resumes_exactly(tiny_folder, tmp_path, make_config):
    from wmse.checkpoint import load_checkpoint
    from wmse.train import pretrain

    kw = dict(arch=VIT, arch_kwargs=json.dumps(TINY_VIT), precision="bf16", channels_last=True, optimizer="adamw",
              weight_decay=0.05, epochs=2, eval_every=100)
    full = pretrain(make_config(tiny_folder, tmp_path / "a", **kw), log=lambda m: None)
    cfg = make_config(tiny_folder, tmp_path / "b", max_steps=4, **kw)  # stops inside epoch 2
    part = pretrain(cfg, log=lambda m: None)
    pretrain(cfg.replace(max_steps=None), resume=part, log=lambda m: None)
    assert len(_losses(full)) == 6 and all(map(math.isfinite, _losses(full)))
    assert _losses(part) == _losses(full)
    a, b = load_checkpoint(full)["method"], load_checkpoint(part)["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert "backbone.pos_embed" in a and "backbone.cls_token" in a


def test_vit_compiles_in_the_loop(tiny_folder, tmp_path, make_config, monkeypatch):
    """--compile with a ViT: dynamo captures the timm model's forward and backward (aot_eager: the graphs
    inductor would compile, without the minutes of C++ code generation a CPU test cannot afford)."""
    from wmse.train import pretrain

    compile_ = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager", **kw))
    torch._dynamo.reset()
    cfg = make_config(tiny_folder, tmp_path, arch=VIT, arch_kwargs=json.dumps(TINY_VIT), compile=True, max_steps=2,
                      eval_every=100)
    run = pretrain(cfg, log=lambda m: None)
    assert len(_losses(run)) == 2 and all(map(math.isfinite, _losses(run)))
    torch._dynamo.reset()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, cfg) -> None:
    from wmse.train import pretrain

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    pretrain(cfg, log=lambda m: None)


def test_vit_trains_with_ddp_on_two_processes(tiny_folder, tmp_path, make_config):
    from wmse.checkpoint import load_checkpoint

    cfg = make_config(tiny_folder, tmp_path, arch=VIT, arch_kwargs=json.dumps(TINY_VIT), max_steps=2, eval_every=100,
                      optimizer="adamw")
    mp.start_processes(_ddp_worker, args=(_free_port(), cfg), nprocs=2, start_method="fork")
    run = tmp_path / "run"
    assert len(_losses(run)) == 2 and all(map(math.isfinite, _losses(run)))
    assert load_checkpoint(run)["world_size"] == 2 and load_checkpoint(run)["step"] == 2


def test_embed_writes_a_vit_that_timm_rebuilds(tiny_folder, tmp_path, make_config):
    from wmse.train import pretrain
    from wmse.trained import embed_run, load_exported_backbone, load_run

    run = pretrain(make_config(tiny_folder, tmp_path, arch=VIT, arch_kwargs=json.dumps(TINY_VIT), max_steps=1,
                               eval_every=100), log=lambda m: None)
    files = embed_run(run, out_dir=tmp_path / "emb", log=lambda m: None)
    spec = json.loads(files["backbone_spec"].read_text())
    assert (spec["library"], spec["name"], spec["arch"], spec["out_dim"]) == ("timm", VIT[5:], VIT, 16)
    model = _readme_timm(spec, str(files["backbone"]))
    trained = load_run(run).method.backbone.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), trained(x))
        torch.testing.assert_close(load_exported_backbone(files["backbone"])(x), trained(x))


def test_cli_image_size_a_vit_cannot_take_is_one_line_and_leaves_no_run(tiny_folder, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "wmse", "pretrain", "--dataset", "folder", "--data_dir", str(tiny_folder),
                           "--eval_split", "none", "--arch", VIT, "--arch_kwargs", json.dumps(TINY_VIT),
                           "--image_size", "18", "--eval_resize", "18", "--batch_size", "32", "--w_size", "16",
                           "--emb", "8", "--out_dir", str(tmp_path / "runs")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("wmse pretrain: error: timm:vit_tiny_patch16_224 cannot take 18 px images"), line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_an_arch_registered_outside_wmse_exports_without_a_rebuild_description():
    from wmse.models import Arch

    def build(size, channels):
        net = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        net.out_dim = 4
        return net

    ARCHS.add("toy_outside", Arch(build, 4))
    try:
        model = build_backbone("toy_outside", 16, 1)
        assert backbone_description(model, "toy_outside", 16, 1)["library"] is None
        assert uses_channels_last(True, model)
    finally:
        ARCHS.remove("toy_outside")
