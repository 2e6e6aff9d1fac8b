"""Comparing runs (`wmse compare`), the feature map of `wmse report`, `wmse pretrain --config FILE` and
`wmse presets --show NAME --write FILE`, through the CLI on tiny real runs made once for the module."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from wmse.checkpoint import load_checkpoint
from wmse.cli import _new_config, main
from wmse.config import Config, apply_overrides, get_preset, read_config_file
from wmse.methods import build_method
from wmse.progress import read_jsonl
from wmse.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def wmse(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "wmse", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=600)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_folder, make_config):
    """Three tiny runs from one config file: W-MSE with a final evaluation, BYOL without (kNN monitor only),
    and W-MSE scored on a different held-out part (holdout 0.2)."""
    root = tmp_path_factory.mktemp("compare")
    base = root / "tiny.json"
    cfg = make_config(tiny_folder, root / "runs", final_eval=True, run_name=None)
    base.write_text(json.dumps(cfg.to_dict()))
    _ok(wmse("pretrain", "--config", base, "--run_name", "wmse_a"))
    _ok(wmse("pretrain", "--config", base, "--run_name", "byol_b", "--method", "byol", "--final_eval", "no"))
    _ok(wmse("pretrain", "--config", base, "--run_name", "wmse_c", "--holdout", "0.2", "--final_eval", "no"))
    return root / "runs"


def _rows(path: Path) -> dict[str, dict]:
    with path.open() as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_compare_table_matches_the_runs_files(runs: Path) -> None:
    proc = _ok(wmse("compare", runs))
    out = runs / "compare"  # the default: beside the runs
    rows = _rows(out / "compare.csv")
    assert set(rows) == {"wmse_a", "byol_b", "wmse_c"}
    final = json.loads((runs / "wmse_a" / "final_eval.json").read_text())
    a = rows["wmse_a"]
    assert a["kNN"] == f"{final['trained']['knn_top1']:.2f}"
    assert a["linear"] == f"{final['trained']['linear_top1']:.2f}"
    gain = final["trained"]["knn_top1"] - final["random_init"]["knn_top1"]
    assert a["kNN gain"] == f"{gain:+.2f}"
    assert (a["method"], a["encoder"], a["epochs"]) == ("wmse", "small", "2/2")
    records, _ = read_jsonl(runs / "byol_b" / "metrics.jsonl")
    last_knn = [r["knn_top1"] for r in records if r["kind"] == "eval"][-1]
    assert rows["byol_b"]["kNN"] == f"{last_knn:.2f} (m)" and rows["byol_b"]["linear"] == ""
    minutes = sum(r["seconds"] for r in records if r["kind"] == "epoch") / 60
    assert rows["byol_b"]["train min"] == f"{minutes:.2f}"
    # Two evaluation sets: flagged, and each run ranked only within its own.
    assert rows["wmse_a"]["eval set"][:2] == rows["byol_b"]["eval set"][:2] != rows["wmse_c"]["eval set"][:2]
    assert rows["wmse_c"]["rank"].endswith("1")
    assert "held-out 0.2" in rows["wmse_c"]["eval set"]
    assert "different evaluation sets" in proc.stdout and "WARNING" in (out / "compare.md").read_text()
    assert sum(line.startswith("| ") for line in (out / "compare.md").read_text().splitlines()) == 1 + 3
    png = (out / "compare.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and Image.open(out / "compare.png").size[0] > 500


def test_compare_one_eval_set_is_not_flagged(runs: Path, tmp_path: Path, capsys) -> None:
    assert main(["compare", str(runs / "wmse_a"), str(runs / "byol_b"), "--out", str(tmp_path / "cmp")]) == 0
    assert "different evaluation sets" not in capsys.readouterr().out  # in-process: one torch import less
    rows = _rows(tmp_path / "cmp" / "compare.csv")
    knn = {n: float(rows[n]["kNN"].split()[0]) for n in rows}
    for n in rows:  # 1 + the runs that score higher (a tie shares the rank)
        assert rows[n]["rank"] == str(1 + sum(v > knn[n] for v in knn.values()))
    assert all(not rows[n]["eval set"].startswith("A:") for n in rows)


def test_compare_warns_about_a_broken_run_and_compares_the_rest(runs: Path, tmp_path: Path, capsys) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(runs / "wmse_a", broken)
    (broken / "final_eval.json").write_text('{"trained": {"knn_top1": 5')
    with (broken / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "eval", "ep')
    assert main(["compare", str(broken), str(runs / "byol_b"), str(tmp_path / "missing"), "--out",
                 str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("wmse compare: warning: ") for line in lines), err
    assert any(str(broken / "final_eval.json") in line for line in lines)
    assert any("1 unreadable line" in line for line in lines)
    rows = _rows(tmp_path / "o" / "compare.csv")
    assert set(rows) == {"broken", "byol_b"} and rows["broken"]["kNN"].endswith("(m)")


def test_compare_without_runs_is_one_line_exit_2(tmp_path: Path) -> None:
    proc = wmse("compare", tmp_path, tmp_path / "nope")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no run directories" in proc.stderr and "Traceback" not in proc.stderr


def test_report_feature_map(runs: Path) -> None:
    run = runs / "wmse_a"
    index = write_report(run)
    png = run / "report" / "features.png"
    assert png.read_bytes().startswith(PNG_MAGIC) and Image.open(png).size[0] > 500
    assert "features.png" in index.read_text()


def test_random_init_rebuilt_with_the_seed_equals_the_runs_own(runs: Path) -> None:
    """The feature map's fallback for runs without final_eval (build the method after manual_seed(seed)) gives
    exactly the initial weights training started from (kept in the checkpoint when final_eval is on)."""
    ckpt = load_checkpoint(runs / "wmse_a" / "checkpoints" / "last.pt")
    cfg = Config.from_dict(ckpt["config"])
    torch.manual_seed(cfg.seed)
    rebuilt = build_method(cfg, 3).state_dict()
    assert rebuilt.keys() == ckpt["initial_method"].keys()
    for key, value in ckpt["initial_method"].items():
        assert torch.equal(rebuilt[key], value), key


def test_report_without_sklearn_says_how_to_install(runs: Path, tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs / "byol_b", run)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn raises ImportError
    said: list[str] = []
    index = write_report(run, log=said.append)
    assert len(said) == 1 and "pip install 'wmse[report]'" in said[0]
    assert "features.png skipped" in index.read_text() and not (run / "report" / "features.png").exists()


# ---------------------------------------------------------------- a run from one file


def test_pretrain_config_repeats_a_run(runs: Path) -> None:
    first = json.loads((runs / "wmse_c" / "config.json").read_text())
    _ok(wmse("pretrain", "--config", runs / "wmse_c" / "config.json", "--run_name", "again", "--epochs", "1"))
    again = json.loads((runs / "again" / "config.json").read_text())
    shutil.rmtree(runs / "again")  # not one of the compared runs
    differ = {k for k in first if not k.startswith("_") and first[k] != again[k]}
    assert differ == {"run_name", "epochs"} and again["epochs"] == 1 and again["holdout"] == 0.2


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_presets_write_reads_back(tmp_path: Path, suffix: str, capsys) -> None:
    if suffix == ".yaml":
        pytest.importorskip("yaml", reason="PyYAML (optional) is not installed")
    path = tmp_path / f"quick{suffix}"
    assert main(["presets", "--show", "quick", "--write", str(path)]) == 0
    assert str(path) in capsys.readouterr().out
    assert Config(**read_config_file(path)) == get_preset("quick")


def test_config_file_on_top_of_its_preset_under_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"preset": "quick", "epochs": 3, "lr": 1e-3, "_changed_from_preset": {"x": 1}}))
    cfg = apply_overrides(_new_config(None, {"lr": "2e-3"}, str(path)), {"lr": "2e-3"})  # as cmd_pretrain
    assert cfg == get_preset("quick").replace(epochs=3, lr=2e-3)
    cfg = _new_config("cifar10-wmse2", {}, str(path))  # --preset wins over the file's preset field
    assert cfg == get_preset("cifar10-wmse2").replace(preset="quick", epochs=3, lr=1e-3)


@pytest.mark.parametrize("content, message", [
    ('{"epoch": 3}', "unknown config field 'epoch' (did you mean 'epochs'?)"),
    ('{"epochs": 0.5}', "field 'epochs' expects an int, got '0.5'"),
    ('{"crop_scale": [0.2]}', "field 'crop_scale' expects 2 comma-separated floats"),
    ('[1, 2]', "must hold a mapping of field: value"),
    ('{"epochs": 3', "is not valid JSON"),
])
def test_config_file_errors_are_one_line_exit_2(tmp_path: Path, content: str, message: str, capsys) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    rc = main(["pretrain", "--config", str(path), "--out_dir", str(tmp_path / "runs")])  # in-process: fast
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and message in err and str(path) in err, err
    assert not (tmp_path / "runs").exists()
