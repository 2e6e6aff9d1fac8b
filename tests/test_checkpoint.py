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
