"""evaluate / embed / report on a small trained run, end to end, and their errors."""

import json
from html.parser import HTMLParser

import numpy as np
import pytest
import torch

from wmse.checkpoint import save_atomic
from wmse.cli import main
from wmse.models import torchvision_resnet
from wmse.trained import embed_run, evaluate_run, load_exported_backbone, load_run
from wmse.train import pretrain


@pytest.fixture(scope="module")
def trained_run(tiny_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    from conftest import tiny_config

    return pretrain(tiny_config(tiny_folder, out, epochs=2), log=lambda m: None)


def test_evaluate_writes_results_and_separates_the_classes(trained_run, capsys):
    results = evaluate_run(trained_run, linear_epochs=20, log=lambda m: None)
    saved = json.loads((trained_run / "eval.json").read_text())
    assert saved["knn"] == results["knn"] and saved["features"] == "backbone"
    # Two colour classes: even a briefly trained encoder separates them.
    assert results["knn"]["top1"] > 80 and results["linear"]["top1"] > 80
    assert "held-out" in saved["note"] and "metric" in capsys.readouterr().out


def test_embed_round_trip_into_a_plain_torchvision_resnet(tiny_folder, tmp_path, make_config):
    run = pretrain(make_config(tiny_folder, tmp_path, arch="resnet18", epochs=1, max_steps=1, eval_every=100),
                   log=lambda m: None)
    files = embed_run(run, out_dir=tmp_path / "emb", log=lambda m: None)
    feats, labels = np.load(files["features"]), np.load(files["labels"])
    assert feats.shape == (128, 512) and labels.shape == (128,)
    assert len(files["paths"].read_text().split()) == 128
    plain = torchvision_resnet("resnet18", 16, 3)
    from safetensors.torch import load_file

    plain.load_state_dict(load_file(str(files["backbone"])), strict=True)
    trained = load_run(run)
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), trained.method.backbone(x), atol=1e-5)
        assert torch.allclose(load_exported_backbone(files["backbone"])(x), plain(x))


def test_missing_and_truncated_checkpoints_are_one_line_errors(trained_run, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "no_run")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes((trained_run / "checkpoints" / "last.pt").read_bytes()[:1000])
    assert main(["evaluate", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot read checkpoint" in err and len(err.splitlines()) == 1
    save_atomic({"weights": torch.zeros(1)}, tmp_path / "foreign.pt")
    assert main(["embed", str(tmp_path / "foreign.pt")]) == 2
    assert "not a wmse checkpoint" in capsys.readouterr().err
def test_report_files_are_valid_png_and_html(trained_run, capsys):
    assert main(["report", str(trained_run)]) == 0
    index = trained_run / "report" / "index.html"
    srcs = []

    class Imgs(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                srcs.append(dict(attrs)["src"])

    Imgs().feed(index.read_text())
    assert srcs
    for src in srcs:
        data = (index.parent / src).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"


