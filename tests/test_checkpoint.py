"""Atomic checkpoint writes and the one clear error for missing or damaged files."""

import pytest
import torch

from wmse.checkpoint import load_checkpoint, resolve_checkpoint, rng_state, save_atomic, set_rng_state


def test_roundtrip_and_no_temp_files(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    state = {"method": {"w": torch.arange(3.0)}, "config": {"lr": 0.1}, "step": 7}
    save_atomic(state, path)
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    loaded = load_checkpoint(tmp_path / "run")  # a run directory resolves to checkpoints/last.pt
    assert loaded["step"] == 7 and torch.equal(loaded["method"]["w"], torch.arange(3.0))


def test_missing_truncated_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint in run directory"):
        resolve_checkpoint(tmp_path)
    good = tmp_path / "good.pt"
    save_atomic({"method": {}, "config": {}}, good)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(good.read_bytes()[:40])
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(bad)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="not a wmse checkpoint"):
        load_checkpoint(other)


def test_rng_state_restores_both_generators():
    gen = torch.Generator().manual_seed(3)
    state = rng_state(gen)
    a = (torch.rand(3), torch.rand(3, generator=gen))
    set_rng_state(state, gen)
    b = (torch.rand(3), torch.rand(3, generator=gen))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_only_checkpoint_py_knows_the_checkpoint_keys():
    """The file's keys are spelled in wmse/checkpoint.py alone: no other module loads the raw dict
    (load_checkpoint / torch.load of a checkpoint) or spells a key only a checkpoint has; the rest of the
    package goes through Checkpoint's named fields."""
    import ast
    from dataclasses import fields
    from pathlib import Path

    from wmse.checkpoint import Checkpoint

    src = Path(__file__).resolve().parents[1] / "src" / "wmse"
    text = (src / "checkpoint.py").read_text()
    keys = {f.name for f in fields(Checkpoint)} | {"rng", "world_size"}
    assert all(f'"{k}"' in text for k in keys)  # every key is written there
    # keys no other module has a reason to spell (the others, "method", "step", ..., are common words)
    own = {"rng", "rng_ranks", "world_size", "nonfinite_total", "train_seconds", "initial_method"}
    for path in src.rglob("*.py"):
        if path.name == "checkpoint.py":
            continue
        tree = ast.parse(path.read_text())
        spelled = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in own}
        assert not spelled, f"{path.relative_to(src)} spells checkpoint keys {sorted(spelled)}"
        calls = {n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None)
                 for n in ast.walk(tree) if isinstance(n, ast.Call)}
        assert "load_checkpoint" not in calls, f"{path.relative_to(src)} reads the raw checkpoint dict"


def test_read_checkpoint_names_the_fields_and_defaults_what_earlier_versions_lacked(tmp_path):
    from wmse.checkpoint import Checkpoint, read_checkpoint, write_checkpoint

    ckpt = Checkpoint(config={"lr": 0.1}, method={"w": torch.ones(2)}, backbone={"c": torch.zeros(1, 3, 1, 1)},
                      optimizer={"state": {}}, epoch=1, batch=2, step=5, rng_ranks=[{"a": 1}, {"a": 2}],
                      nonfinite_total=3, train_seconds=9.5, mean=(0.5,), std=(0.25,))
    path = write_checkpoint(ckpt, tmp_path / "last.pt")
    raw = load_checkpoint(path)
    assert raw["rng"] == {"a": 1} and raw["world_size"] == 2 and "initial_method" not in raw
    back = read_checkpoint(path)
    assert back.world_size == 2 and back.mean == (0.5,) and back.step == 5 and back.train_seconds == 9.5
    assert torch.equal(back.method["w"], torch.ones(2))
    for key in ("rng_ranks", "world_size", "nonfinite_total", "train_seconds", "mean", "std"):
        del raw[key]  # a checkpoint of an earlier version: one process, no counts, no normalisation
    save_atomic(raw, path)
    old = read_checkpoint(path)
    assert old.rng_ranks == [{"a": 1}] and old.nonfinite_total == 0 and old.train_seconds == 0.0
    assert old.mean is None and old.initial_method is None
    del raw["optimizer"]
    save_atomic(raw, path)
    with pytest.raises(ValueError, match="not a complete wmse checkpoint.*'optimizer'"):
        read_checkpoint(path)
