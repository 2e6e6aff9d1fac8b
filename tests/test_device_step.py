"""The step without a host read (sync_every > 1: the GPU path, run here on the CPU): skipping non-finite steps
on the device gives exactly the run that skips them on the host, and the abort comes at the same step."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from wmse import train
from wmse.checkpoint import load_checkpoint
from wmse.errors import TrainingError
from wmse.methods import METHODS, ONE_PROCESS, BYOL
from wmse.seeding import derive_seed
from wmse.progress import read_metrics


@pytest.fixture
def fused_everywhere(monkeypatch):
    """Host-skipping runs with the same fused Adam kernel the device path uses, so both can be compared."""
    build = train.build_optimizer
    monkeypatch.setattr(train, "build_optimizer", lambda params, cfg, fused=False: build(params, cfg, fused=True))


@dataclass(frozen=True)
class _Options:
    nan_steps: tuple[int, ...] = ()


@pytest.fixture
def nan_byol():
    """BYOL (its on_step moves the target network) whose loss is NaN at given steps."""

    @METHODS.register("byol_nan")
    class NanByol(BYOL):
        Options = _Options

        @classmethod
        def from_config(cls, cfg, backbone):
            m = BYOL.from_config.__func__(cls, cfg, backbone)
            m.nan_steps, m.calls = set(cfg.nan_steps), 0
            return m

        def loss(self, views, ctx=ONE_PROCESS):
            self.calls += 1
            loss = super().loss(views, ctx)
            return loss * float("nan") if self.calls in self.nan_steps else loss

    yield
    METHODS.remove("byol_nan")


def _run(make_config, folder, out, **kw):
    cfg = make_config(folder, out, method="byol_nan", epochs=3, log_every=3, eval_every=100, **kw)
    run = train.pretrain(cfg, log=lambda m: None)
    return [(r["step"], r["loss"], r["nonfinite_skipped"]) for r in read_metrics(run) if r["kind"] == "train"], \
        load_checkpoint(run)


def test_device_skipping_equals_host_skipping(nan_byol, fused_everywhere, tiny_folder, tmp_path, make_config):
    host, host_ckpt = _run(make_config, tiny_folder, tmp_path / "host", nan_steps=(2, 4, 5), sync_every=1)
    dev, dev_ckpt = _run(make_config, tiny_folder, tmp_path / "dev", nan_steps=(2, 4, 5), sync_every=3)
    assert [r[0] for r in dev] == [3, 6, 9] and dev[-1][2] == 3  # 3 skipped steps, counted
    assert [(s, k) for s, _, k in dev] == [(s, k) for s, _, k in host]
    for (_, a, _), (_, b, _) in zip(host, dev):
        assert a == b or (a != a and b != b)
    for k, v in host_ckpt["method"].items():  # weights, BatchNorm statistics and BYOL's target
        torch.testing.assert_close(dev_ckpt["method"][k], v, rtol=0, atol=0, msg=k)
    assert dev_ckpt["optimizer"]["state"][0]["step"] == host_ckpt["optimizer"]["state"][0]["step"] == 6


def test_device_abort_is_exact(nan_byol, fused_everywhere, tiny_folder, tmp_path, make_config):
    nan = tuple(range(4, 30))  # NaN from step 4 on: the limit of 2 is reached at step 5
    for sync_every in (1, 4):
        with pytest.raises(TrainingError, match=r"non-finite for 2 steps in a row \(step 5\)"):
            _run(make_config, tiny_folder, tmp_path / f"s{sync_every}", nan_steps=nan, sync_every=sync_every,
                 nonfinite_limit=2, ckpt_every=1)
        assert load_checkpoint(tmp_path / f"s{sync_every}" / "run")["step"] == 3  # epoch 1's, a finite state


def test_batches_augmented_together_resume_exactly(tiny_folder, tmp_path, make_config):
    """augment_batches 2: two batches augmented in one call; a resume inside a chunk gives the same run."""
    kw = dict(epochs=2, augment_batches=2, eval_every=100)
    full = train.pretrain(make_config(tiny_folder, tmp_path / "a", **kw), log=lambda m: None)
    part = make_config(tiny_folder, tmp_path / "b", max_steps=4, **kw)  # 3 batches an epoch: step 4 splits a chunk
    train.pretrain(part, log=lambda m: None)
    train.pretrain(part.replace(max_steps=None), resume=tmp_path / "b" / "run", log=lambda m: None)
    losses = [[r["loss"] for r in read_metrics(run) if r["kind"] == "train"] for run in (full, tmp_path / "b" / "run")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
    one = train.pretrain(make_config(tiny_folder, tmp_path / "c", epochs=2, eval_every=100), log=lambda m: None)
    assert [r["loss"] for r in read_metrics(one) if r["kind"] == "train"][1] != losses[0][1]  # other draws


def test_a_chunk_is_one_augmentation_call_split_by_batch(tiny_folder, tmp_path, make_config):
    cfg = make_config(tiny_folder, tmp_path, augment_batches=2)
    from wmse.splits import load_run_data

    data = load_run_data(cfg, log=lambda m: None)
    job = train.build_job(cfg, train.distributed.setup(cfg), data, tmp_path, lambda m: None)
    views = list(train.epoch_views(job, 0))
    batches = [b for b, _ in job.loader.epoch(0)]
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "augment chunk", 0, 0, 0))
    want = job.augment(torch.cat(batches[:2]), 2, generator=gen)
    assert len(views) == 3 and torch.equal(views[1][0], want[0][32:]) and torch.equal(views[0][1], want[1][:32])
    assert [len(v[0]) for v in views] == [32, 32, 32]
