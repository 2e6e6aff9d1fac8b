"""Config: Table 1 presets against an independent transcription of the official commands, overrides, validation."""

from __future__ import annotations

import dataclasses
import inspect
import json
import shlex

import pytest

from wmse.config import (
    DATASETS, METHODS, PRESETS, Config, apply_overrides, describe_presets, get_preset, parse_value, validate,
)
from wmse.data import available

# Transcribed from the README of htdt/self-supervised ("To reproduce the results from table 1").
OFFICIAL_README = """
python -m train --dataset cifar10 --epoch 1000 --lr 3e-3 --num_samples 4 --bs 256 --emb 64 --w_size 128
python -m train --dataset cifar100 --epoch 1000 --lr 3e-3 --num_samples 4 --bs 256 --emb 64 --w_size 128
python -m train --dataset stl10 --epoch 2000 --lr 2e-3 --num_samples 4 --bs 256 --emb 128 --w_size 256
python -m train --dataset tiny_in --epoch 1000 --lr 2e-3 --num_samples 4 --bs 256 --emb 128 --w_size 256
python -m train --dataset cifar10 --epoch 1000 --lr 3e-3 --emb 64 --w_size 128
python -m train --dataset cifar100 --epoch 1000 --lr 3e-3 --emb 64 --w_size 128
python -m train --dataset stl10 --epoch 2000 --lr 2e-3 --emb 128 --w_size 256 --w_iter 4
python -m train --dataset tiny_in --epoch 1000 --lr 2e-3 --emb 128 --w_size 256 --w_iter 4
python -m train --dataset cifar10 --epoch 1000 --lr 3e-3 --emb 64 --method contrastive
python -m train --dataset cifar100 --epoch 1000 --lr 3e-3 --emb 64 --method contrastive
python -m train --dataset stl10 --epoch 2000 --lr 2e-3 --emb 128 --method contrastive
python -m train --dataset tiny_in --epoch 1000 --lr 2e-3 --emb 128 --method contrastive
python -m train --dataset cifar10 --epoch 1000 --lr 3e-3 --emb 64 --method byol
python -m train --dataset cifar100 --epoch 1000 --lr 3e-3 --emb 64 --method byol
python -m train --dataset stl10 --epoch 2000 --lr 2e-3 --emb 128 --method byol
python -m train --dataset tiny_in --epoch 1000 --lr 2e-3 --emb 128 --method byol
python -m train --dataset imagenet --epoch 240 --lr 2e-3 --emb 128 --w_size 256 --crop_s0 0.08 --cj0 0.8 --cj1 0.8 --cj2 0.8 --cj3 0.2 --gs_p 0.2
python -m train --dataset imagenet --epoch 240 --lr 2e-3 --num_samples 4 --bs 256 --emb 128 --w_size 256 --crop_s0 0.08 --cj0 0.8 --cj1 0.8 --cj2 0.8 --cj3 0.2 --gs_p 0.2
"""

# Defaults of the official cfg.py for every flag the commands above leave out.
OFFICIAL_DEFAULTS = {
    "method": "w_mse", "num_samples": 2, "bs": 512, "w_size": 128, "w_iter": 1, "w_eps": 0.0, "tau": 0.5,
    "byol_tau": 0.99, "head_size": 1024, "adam_l2": 1e-6, "lr_step": "step", "drop_gamma": 0.2,
    "crop_s0": 0.2, "crop_s1": 1.0, "crop_r0": 0.75, "crop_r1": 4 / 3, "cj0": 0.4, "cj1": 0.4, "cj2": 0.4,
    "cj3": 0.1, "cj_p": 0.8, "gs_p": 0.1, "hf_p": 0.5, "arch": "resnet18", "knn": 5,
}
# Facts of the official dataset modules and model.py: crop size (selects the stem) and dataset names.
OFFICIAL_CROP = {"cifar10": 32, "cifar100": 32, "stl10": 64, "tiny_in": 64, "imagenet": 224}
DATASET_NAME = {"cifar10": "cifar10", "cifar100": "cifar100", "stl10": "stl10", "tiny_in": "tiny_imagenet",
                "imagenet": "imagenet100"}
METHOD_NAME = {"w_mse": "wmse", "contrastive": "contrastive", "byol": "byol"}


def _official_flags(line: str) -> dict[str, str]:
    words = shlex.split(line)[3:]  # drop "python -m train"
    return {k.removeprefix("--"): v for k, v in zip(words[::2], words[1::2])}


def _expected(line: str) -> tuple[str, dict]:
    f = {**{k: str(v) for k, v in OFFICIAL_DEFAULTS.items()}, **_official_flags(line)}
    method = METHOD_NAME[f["method"]]
    d = int(f["num_samples"])
    name = f"{DATASET_NAME[f['dataset']]}-{method}{d if method == 'wmse' else ''}"
    fields = {
        "method": method, "dataset": DATASET_NAME[f["dataset"]], "image_size": OFFICIAL_CROP[f["dataset"]],
        "epochs": int(f["epoch"]), "lr": float(f["lr"]), "emb": int(f["emb"]), "batch_size": int(f["bs"]),
        "n_views": d, "w_iter": int(f["w_iter"]), "w_eps": float(f["w_eps"]),
        "contrastive_temperature": float(f["tau"]),
        "byol_tau": float(f["byol_tau"]), "head_hidden": int(f["head_size"]),
        "byol_predictor_hidden": int(f["head_size"]),
        "weight_decay": float(f["adam_l2"]), "schedule": f["lr_step"], "lr_drop_factor": float(f["drop_gamma"]),
        "crop_scale": (float(f["crop_s0"]), float(f["crop_s1"])),
        "crop_ratio": (float(f["crop_r0"]), float(f["crop_r1"])),
        "jitter": tuple(float(f[f"cj{i}"]) for i in range(4)), "jitter_p": float(f["cj_p"]),
        "grayscale_p": float(f["gs_p"]), "flip_p": float(f["hf_p"]), "arch": f["arch"], "knn_k": int(f["knn"]),
        "warmup_iters": 500, "lr_drop_epochs": None, "normalize": True, "w_whitening": "cholesky",
    }
    if method == "wmse":  # w_size only matters (and is only compared) for W-MSE
        fields["w_size"] = int(f["w_size"])
    return name, fields


OFFICIAL = dict(_expected(line) for line in OFFICIAL_README.strip().splitlines())


def test_table1_presets_are_exactly_the_official_commands() -> None:
    # Every preset named {paper dataset}-{Table 1 method}; the others (quick, cifar10-quick, folder-wmse2,
    # recipes of later methods) have names of another shape.
    table1 = {name for name in PRESETS if name.rpartition("-")[0] in DATASET_NAME.values()
              and name.rpartition("-")[2] in ("wmse2", "wmse4", "contrastive", "byol")}
    assert table1 == set(OFFICIAL)
    assert len(OFFICIAL) == 18


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_preset_matches_official_command(name: str) -> None:
    cfg = get_preset(name)
    mismatches = {k: (getattr(cfg, k), v) for k, v in OFFICIAL[name].items() if getattr(cfg, k) != pytest.approx(v)}
    assert not mismatches, f"{name}: (ours, official) {mismatches}"
    assert cfg.preset == name
    validate(cfg)


def test_dataset_specific_splits_and_eval_transforms() -> None:
    stl = get_preset("stl10-wmse2")
    assert (stl.train_split, stl.clf_split, stl.eval_split) == ("train+unlabeled", "train", "test")
    assert (stl.eval_resize, stl.eval_size) == (70, 64)  # official Resize(70) + CenterCrop(64)
    assert get_preset("cifar100-byol").eval_split == "test"
    assert get_preset("tiny_imagenet-wmse4").eval_split == "val"


def test_quick_presets() -> None:
    q = get_preset("quick")
    validate(q)
    assert (q.dataset, q.arch, q.image_size, q.n_views, q.method) == ("fashion_mnist", "small", 28, 2, "wmse")
    assert 32 <= q.emb <= 64 and q.w_size >= 2 * q.emb and q.batch_size % q.w_size == 0
    assert q.final_eval
    c = get_preset("cifar10-quick")
    validate(c)
    assert (c.dataset, c.eval_split, c.arch, c.image_size) == ("folder", None, "resnet18", 32)
    assert 5 <= c.epochs <= 20


def test_get_preset_returns_a_copy_and_rejects_unknown_names() -> None:
    cfg = get_preset("cifar10-wmse2")
    cfg.lr = 1.0
    assert get_preset("cifar10-wmse2").lr == 3e-3
    with pytest.raises(ValueError, match="unknown preset 'cifar11'.*cifar10-wmse2.*quick"):
        get_preset("cifar11")


def test_describe_presets_lists_every_preset() -> None:
    text = describe_presets()
    lines = text.splitlines()
    for name, cfg in PRESETS.items():
        row = next(line for line in lines if line.split()[:1] == [name])
        assert row.split()[1:3] == [cfg.method, cfg.dataset]


# ---------------------------------------------------------------------------------------------
# Overrides


def test_overrides_parse_by_field_type() -> None:
    cfg = apply_overrides(get_preset("cifar10-wmse2"), {
        "epochs": "10", "lr": "1e-4", "normalize": "no", "channels_last": "TRUE", "compile": "1", "sync_bn": "yes",
        "arch": "resnet34", "data_dir": "/data", "run_name": "none", "eval_split": "None",
        "crop_scale": "0.3, 0.9", "jitter": "0.1,0.2,0.3,0.05", "lr_drop_epochs": "5,8", "max_steps": "7",
    })
    assert (cfg.epochs, cfg.lr, cfg.normalize, cfg.channels_last, cfg.compile, cfg.sync_bn) == (
        10, 1e-4, False, True, True, True)
    assert (cfg.arch, cfg.data_dir, cfg.run_name, cfg.eval_split, cfg.max_steps) == ("resnet34", "/data", None, None, 7)
    assert cfg.crop_scale == (0.3, 0.9) and cfg.jitter == (0.1, 0.2, 0.3, 0.05) and cfg.lr_drop_epochs == (5, 8)
    assert isinstance(cfg.epochs, int) and isinstance(cfg.lr, float)
    assert cfg.emb == 64  # untouched fields keep the preset's values
    assert parse_value("lr_drop_epochs", "none") is None
    assert parse_value("lr_drop_epochs", "900") == (900,)
    assert parse_value("flip_p", "0.25") == 0.25


@pytest.mark.parametrize(
    "field, text, message",
    [
        ("xyz", "1", "unknown config field 'xyz'; see `wmse presets --show NAME`"),
        ("lr", "abc", "field 'lr' expects a float, got 'abc'"),
        ("epochs", "1.5", "field 'epochs' expects an int, got '1.5'"),
        ("normalize", "maybe", "field 'normalize' expects a boolean"),
        ("crop_scale", "0.2", "field 'crop_scale' expects 2 comma-separated floats"),
        ("jitter", "0.4,0.4,x,0.1", "field 'jitter' expects 4 comma-separated floats"),
        ("lr_drop_epochs", "5,a", "field 'lr_drop_epochs' expects comma-separated ints"),
        ("epochs", "none", "field 'epochs' expects an int"),
    ],
)
def test_override_errors_name_the_field(field: str, text: str, message: str) -> None:
    with pytest.raises(ValueError) as err:
        apply_overrides(Config(), {field: text})
    assert message in str(err.value)


def test_dict_round_trip_through_json() -> None:
    for cfg in (get_preset("stl10-wmse4"), apply_overrides(get_preset("quick"), {"lr_drop_epochs": "1,2"})):
        back = Config.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert back == cfg
        assert isinstance(back.crop_scale, tuple)


def test_from_dict_and_replace_reject_unknown_fields() -> None:
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['bogus'\]"):
        Config.from_dict({"lr": 0.1, "bogus": 1})
    with pytest.raises(ValueError, match="unknown config field 'bogus'"):
        Config().replace(bogus=1)
    assert Config().replace(lr=0.5).lr == 0.5
    assert Config.from_dict({"lr": 1, "epochs": "3"}) == Config(lr=1.0, epochs=3)


# A config.json / checkpoint config written before the method fields took their method's prefix: the former
# names, transcribed (not read from the code's own table), each with a value that is not the default.
OLD_NAMES = {"whitening": ("w_whitening", "zca"), "whiten_global": ("w_global", True),
             "temperature": ("contrastive_temperature", 0.2), "tau": ("byol_tau", 0.97),
             "predictor_hidden": ("byol_predictor_hidden", 40), "sim_weight": ("vicreg_sim_weight", 20.0),
             "var_weight": ("vicreg_var_weight", 21.0), "cov_weight": ("vicreg_cov_weight", 2.0),
             "lambd": ("barlow_lambd", 0.01)}


def test_a_config_json_of_the_earlier_form_loads(tmp_path) -> None:
    current = get_preset("cifar10-byol").to_dict()
    old = {k: v for k, v in current.items() if k not in {new for new, _ in OLD_NAMES.values()}}
    old.update({name: value for name, (_, value) in OLD_NAMES.items()})
    (tmp_path / "config.json").write_text(json.dumps(old))
    cfg = Config.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert cfg == get_preset("cifar10-byol").replace(**dict(OLD_NAMES.values()))
    # A current name wins over a former one; a name that never was a field is still refused.
    assert Config.from_dict({"tau": 0.5, "byol_tau": 0.9}).byol_tau == 0.9
    with pytest.raises(ValueError, match=r"unknown config field\(s\) \['taux'\]"):
        Config.from_dict({**old, "taux": 1})


def test_a_former_field_name_on_the_command_line_names_the_new_one(capsys) -> None:
    from wmse.cli import main

    with pytest.raises(ValueError, match="unknown config field 'tau' \\(now 'byol_tau'\\)"):
        apply_overrides(Config(), {"tau": "0.9"})
    assert main(["pretrain", "--preset", "quick", "--whiten_global", "true"]) == 2
    assert "unknown config field 'whiten_global' (now 'w_global')" in capsys.readouterr().err
    assert main(["presets", "--show", "cifar10-byol"]) == 0
    shown = dict(line.split(maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert shown["byol_tau"] == "0.99" and shown["w_whitening"] == "cholesky" and "tau" not in shown


@pytest.mark.parametrize("name", list(METHODS.names()))
def test_each_method_field_has_one_default(name: str) -> None:
    """A method built in Python without its fields has the config's (and so the command line's) defaults, and
    so does one built from a default config; the run fields its constructor takes default as the config's."""
    from wmse.config import all_fields
    from wmse.models import ProjectionHead, SmallConvNet

    cls = METHODS[name]
    backbone = SmallConvNet(1, out_dim=8)
    python_api = cls(backbone, ProjectionHead(8, 8, 4))
    from_config = cls.from_config(Config(method=name), backbone)
    names = [f.name for f in dataclasses.fields(cls.Options)]
    assert names and set(names) <= set(all_fields())
    for field in names:
        default = all_fields()[field].default
        assert getattr(python_api, field) == default == getattr(Config(), field), field
        assert getattr(from_config, field) == default, field
    parameters = inspect.signature(cls.__init__).parameters
    for field in cls.run_fields:
        assert parameters[field].default == getattr(Config(), field) == getattr(python_api, field), field


# ---------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(w_size=1024), r"w_size \(1024\) is larger than batch_size \(512\)"),
        (dict(w_size=96), r"batch_size \(512\) must be a multiple of w_size \(96\)"),
        (dict(w_size=64), r"w_size \(64\) must be larger than emb \(64\).*w_size >= 2\*emb \(128\) is recommended"),
        (dict(n_views=1), "n_views must be >= 2"),
        (dict(method="simclr"), "unknown method 'simclr'; choose one of wmse, contrastive, byol"),
        (dict(arch="vgg11"), "unknown arch 'vgg11'"),
        (dict(dataset="mnist"), "unknown dataset 'mnist'"),
        (dict(schedule="linear"), "unknown schedule 'linear'; choose one of step, cosine"),
        (dict(w_whitening="pca"), "unknown whitening 'pca'"),
        (dict(precision="fp16"), "unknown precision 'fp16'"),
        (dict(epochs=0), "field 'epochs' must be >= 1, got 0"),
        (dict(batch_size=1, w_size=1, emb=1, method="byol"), "batch_size must be >= 2"),
        (dict(lr=0.0), "field 'lr' must be > 0"),
        (dict(w_iter=0), "field 'w_iter' must be >= 1"),
        (dict(method="contrastive", contrastive_temperature=0.0), "contrastive_temperature"),
        (dict(method="byol", byol_tau=1.5), "field 'byol_tau' must be in"),
        (dict(crop_scale=(0.5, 0.2)), "crop_scale"),
        (dict(flip_p=1.5), "field 'flip_p' must be in"),
        (dict(eval_split=None, holdout=0.0), "holdout"),
        (dict(eval_resize=60, eval_size=64), "eval_resize"),
        (dict(max_steps=0), "field 'max_steps' must be >= 1"),
        (dict(eval_split="val"), "field 'eval_split': dataset 'cifar10' has no split 'val'; choose one of train, test"),
        (dict(dataset="folder"), "field 'eval_split': dataset 'folder' has no split 'test'"),
        (dict(train_split="unlabeled"), "field 'train_split'"),
    ],
)
def test_validate_rejects_impossible_settings(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        validate(Config(**changes))


def test_known_datasets_are_those_of_the_data_layer() -> None:
    assert set(DATASETS) == set(available())


def test_validate_checks_w_size_only_for_wmse() -> None:
    validate(Config(method="contrastive", w_size=1000, batch_size=100))
    validate(Config(method="wmse", w_size=96, emb=64, batch_size=192))  # < 2*emb is allowed, > emb required
    for cfg in PRESETS.values():
        validate(cfg)
