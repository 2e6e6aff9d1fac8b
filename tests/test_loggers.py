"""The optional Weights & Biases mirror (``--wandb_project``): every metrics.jsonl record and the final table
reach W&B. A fake ``wandb`` module checks what is sent on every machine; a real offline run checks the
package itself where it is installed (it is not in the test extra: it is large)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from importlib.machinery import ModuleSpec
from pathlib import Path

import pytest

from wmse.progress import read_jsonl
from wmse.train import pretrain


class _FakeRun:
    def __init__(self, **init) -> None:
        self.init, self.logged, self.summary, self.finished = init, [], {}, False

    def log(self, data: dict, step: int | None = None) -> None:
        self.logged.append((step, data))

    def finish(self) -> None:
        self.finished = True


class _FakeTable:
    def __init__(self, columns, data) -> None:
        self.columns, self.data = columns, data


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    module.__spec__ = ModuleSpec("wandb", None)
    module.runs = []

    def init(**kw):
        module.runs.append(_FakeRun(**kw))
        return module.runs[-1]

    module.init, module.Table = init, _FakeTable
    monkeypatch.setitem(sys.modules, "wandb", module)
    return module


def _scalars(record: dict) -> dict:
    return {f"{record['kind']}/{k}": v for k, v in record.items() if k not in ("kind", "step")
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def test_wandb_gets_every_metrics_record_and_the_final_table(fake_wandb, tiny_folder, tmp_path, make_config):
    cfg = make_config(tiny_folder, tmp_path, final_eval=True, wandb_project="wmse-test")
    run_dir = pretrain(cfg)
    (run,) = fake_wandb.runs
    assert run.init["project"] == "wmse-test" and run.init["name"] == run_dir.name
    assert run.init["config"]["wandb_project"] == "wmse-test" and run.finished
    records, bad = read_jsonl(run_dir / "metrics.jsonl")
    expected = [(r["step"], _scalars(r)) for r in records if _scalars(r)]
    *steps, (_, table) = run.logged
    assert bad == 0 and steps == expected and {r["kind"] for r in records} >= {"train", "epoch", "eval"}
    final = json.loads((run_dir / "final_eval.json").read_text())
    rows = {row[0]: row[1:] for row in table["final_eval"].data}
    assert table["final_eval"].columns == ["encoder", "knn_top1", "linear_top1", "linear_top5"]
    for encoder in ("trained", "random_init"):
        r = final[encoder]
        assert rows[encoder] == [r["knn_top1"], r["linear_top1"], r["linear_top5"]]
        assert run.summary[f"final/{encoder}/knn_top1"] == r["knn_top1"]
    assert run.summary["final/note"] == final["note"]


def test_wandb_is_off_by_default(fake_wandb, tiny_folder, tmp_path, make_config):
    pretrain(make_config(tiny_folder, tmp_path, epochs=1))
    assert fake_wandb.runs == []


def test_wandb_missing_is_one_line_before_the_run_starts(monkeypatch, tiny_folder, tmp_path, make_config):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'wmse\[wandb\]'"):
        pretrain(make_config(tiny_folder, tmp_path / "runs", wandb_project="p"))
    assert not (tmp_path / "runs").exists()


def test_wandb_offline_run(tiny_folder, tmp_path, make_config):
    pytest.importorskip("wandb", reason="wandb is optional (pip install 'wmse[wandb]') and not installed here")
    cfg = make_config(tiny_folder, tmp_path / "runs", final_eval=True, wandb_project="wmse-test")
    base = tmp_path / "tiny.json"
    base.write_text(json.dumps(cfg.to_dict()))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "cfg"),
           "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_DATA_DIR": str(tmp_path / "data")}
    proc = subprocess.run([sys.executable, "-m", "wmse", "pretrain", "--config", str(base)], capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "run"
    (offline,) = run_dir.glob("wandb/offline-run-*")  # the history is in its .wandb file (binary, for `wandb sync`)
    (history,) = offline.glob("*.wandb")
    assert history.stat().st_size > 0
    (table,) = offline.glob("files/media/table/final_eval_*.table.json")
    final = json.loads((run_dir / "final_eval.json").read_text())
    rows = {row[0]: row[1:] for row in json.loads(table.read_text())["data"]}
    for encoder in ("trained", "random_init"):
        r = final[encoder]
        assert rows[encoder] == [r["knn_top1"], r["linear_top1"], r["linear_top5"]]
