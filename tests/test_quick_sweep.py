"""benchmarks/quick_sweep.py on tiny data: every run is scored on a seeded held-out part of the training
images, even when the extra arguments ask for the test split, and the winner comes from those scores."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quick_sweep.py"


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("quick_sweep", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--dataset", "folder", "--arch", "small", "--image_size", "16", "--emb", "8", "--head_hidden", "32",
        "--w_size", "16", "--batch_size", "32", "--epochs", "2", "--warmup_iters", "2", "--precision", "fp32",
        "--channels_last", "false", "--linear_epochs", "5", "--threads", "1", "--eval_max_train", "none"]


def test_sweep_scores_on_held_out_training_images(sweep, tiny_folder, tmp_path):
    out = tmp_path / "sweep"
    result = sweep.main(["--out", str(out), "--grid", "tiny", "--data_dir", str(tiny_folder), "--holdout", "0.25",
                         "--seed", "3", "--jobs", "2", "--", *TINY, "--eval_split", "test"])  # overridden: held-out only
    assert result["winner"] in sweep.GRIDS["tiny"] and len(result["rows"]) == 2
    for point in sweep.GRIDS["tiny"]:
        run = out / sweep.run_name(point)
        cfg = json.loads((run / "config.json").read_text())
        assert (cfg["eval_split"], cfg["holdout"], cfg["seed"], cfg["lr"]) == (None, 0.25, 3, float(point["lr"]))
        assert sweep.held_out_only(run) is None
        assert "holdout=0.25, seed=3" in json.loads((run / "final_eval.json").read_text())["note"]
    best = max(result["rows"], key=lambda r: r["knn_gain"])
    assert result["winner"] == best["settings"] and json.loads((out / "sweep.json").read_text()) == result


def test_a_run_scored_on_the_test_split_is_refused(sweep, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eval_split": "test", "eval_data_dir": None}))
    (tmp_path / "final_eval.json").write_text(json.dumps({"note": "scored on test"}))
    assert "scored on test" in sweep.held_out_only(tmp_path)
