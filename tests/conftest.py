"""Shared fixtures: a tiny labelled image folder and a matching tiny training config."""

import numpy as np
import pytest
import torch
from PIL import Image

from wmse.config import get_preset


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """128 RGB 16 px images in 2 classes that differ in colour, as PNG files in class subfolders."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["red", "blue"]):
        (root / name).mkdir()
        for i in range(64):
            img = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
            img[..., 0 if c == 0 else 2] += 150
            Image.fromarray(img).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """One torch / BLAS thread for the whole suite: the tests use small tensors, where two threads per op
    spend more time synchronising than computing (8-30x slower measured on a busy 2-core machine), and
    the thread count changes no result."""
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("WMSE_CACHE", str(tmp_path / "cache"))


def tiny_config(folder, out_dir, **kw):
    base = dict(
        dataset="folder", data_dir=str(folder), eval_split=None, holdout=0.1, arch="small", image_size=16,
        emb=8, head_hidden=32, w_size=16, batch_size=32, epochs=2, lr=1e-3, warmup_iters=2, schedule="step",
        precision="fp32", channels_last=False, eval_every=1, ckpt_every=1, log_every=1, eval_max_train=None,
        out_dir=str(out_dir), run_name="run", linear_epochs=5, threads=1, byol_predictor_hidden=32,
    )
    base.update(kw)
    return get_preset("cifar10-wmse2").replace(**base)




@pytest.fixture
def make_config():
    """tiny_config as a fixture, for test modules (conftest is not importable as a module)."""
    return tiny_config
