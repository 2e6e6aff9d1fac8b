"""DDP with 2 CPU processes (gloo): cross-rank losses and gradients vs the single-process computation,
a short torchrun run of the CLI, and exact resume under DDP.

Exactness tests use networks without BatchNorm (Flatten-Linear-Tanh-Linear), so an embedding depends on its
own image only and the single-process reference on the concatenated batch is well defined; BatchNorm statistics
are per rank under DDP by design (sync_bn is the option that changes that, on CUDA).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from wmse import distributed
from wmse.checkpoint import load_checkpoint
from wmse.distributed import Runtime, check_batch
from wmse.methods import step_generator as slice_generator
from wmse.launch import strip_nproc, torchrun_command
from wmse.losses import nt_xent_loss, wmse_loss
from wmse.methods import BYOL, WMSE, Contrastive

WORLD = 2
N, D_VIEWS, EMB, W_SIZE, SEED = 16, 2, 4, 8, 3  # global batch 16 -> 8 images per rank, one slice per rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nets() -> tuple[nn.Module, nn.Module]:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 12), nn.Tanh())
    head = nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, EMB))
    return backbone, head


def make_method(kind: str, whiten_global: bool = False) -> nn.Module:
    """Identical float64 weights on every rank (seeded), no BatchNorm."""
    torch.manual_seed(0)
    backbone, head = _nets()
    if kind == "wmse":
        m = WMSE(backbone, head, n_views=D_VIEWS, w_size=W_SIZE, w_iter=2, w_global=whiten_global)
    elif kind == "contrastive":
        m = Contrastive(backbone, head, contrastive_temperature=0.5)
    else:
        m = BYOL(backbone, head, nn.Sequential(nn.Linear(EMB, 6), nn.Tanh(), nn.Linear(6, EMB)), byol_tau=0.99)
    return m.double()


def global_views(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(N, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(D_VIEWS)]


def cfg_for(kind: str, whiten_global: bool) -> SimpleNamespace:
    return SimpleNamespace(method=kind, w_global=whiten_global, seed=SEED, batch_size=N, w_size=W_SIZE,
                           sync_bn=False, device="cpu")


def grads(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


def _loss_worker(rank: int, port: int, out_dir: str) -> None:
    """Each rank: forward + backward of its half of the global batch for 2 steps, per case; save loss and grads."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD)
    rt = Runtime(device=torch.device("cpu"), rank=rank, world_size=WORLD)
    n = N // WORLD
    results = {}
    for case, (kind, whiten_global) in {"wmse_global": ("wmse", True), "wmse_local": ("wmse", False),
                                         "contrastive": ("contrastive", False), "byol": ("byol", False)}.items():
        method = make_method(kind, whiten_global)
        module = distributed.wrap(method, cfg_for(kind, whiten_global), rt)
        steps = []
        for step in range(2):
            views = [v[rank * n:(rank + 1) * n] for v in global_views(step)]
            method.zero_grad(set_to_none=True)
            loss = module(views, distributed.process_context(rt, SEED, step))
            loss.backward()
            steps.append({"loss": loss.detach(), "grads": grads(method)})
        results[case] = steps
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    """Per-rank losses and gradients of every case, from one 2-process gloo run (spawning costs seconds)."""
    out = tmp_path_factory.mktemp("ddp")
    mp.start_processes(_loss_worker, args=(free_port(), str(out)), nprocs=WORLD, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def reference(kind: str, loss_fn) -> list[dict]:
    """Single-process float64 loss + gradients; loss_fn(method, global views, step) -> scalar."""
    method = make_method(kind)
    steps = []
    for step in range(2):
        method.zero_grad(set_to_none=True)
        loss = loss_fn(method, global_views(step), step)
        loss.backward()
        steps.append({"loss": loss.detach(), "grads": grads(method)})
    return steps


def assert_close_grads(got: dict, want: dict) -> None:
    assert got.keys() == want.keys() and len(got) > 0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-8, msg=f"gradient of {k}")


def test_whiten_global_equals_single_process_on_concatenated_batch(ddp_results):
    """Loss and parameter gradients of every rank = single-process W-MSE of the global batch, same slices."""
    def loss_fn(m, views, step):  # independent of distributed.py: the method's public pieces only
        return wmse_loss(m.embed(views), W_SIZE, 2, generator=slice_generator(SEED, step))

    want = reference("wmse", loss_fn)
    for rank in range(WORLD):
        for step in range(2):
            got = ddp_results[rank]["wmse_global"][step]
            torch.testing.assert_close(got["loss"], want[step]["loss"], rtol=1e-5, atol=1e-8)
            assert_close_grads(got["grads"], want[step]["grads"])
    # a global slice mixes both ranks' images: the loss differs from the mean of per-rank losses
    local = [ddp_results[r]["wmse_local"][0]["loss"] for r in range(WORLD)]
    assert abs(float(sum(local)) / WORLD - float(want[0]["loss"])) > 1e-6


def test_default_mode_whitens_each_ranks_own_slices(ddp_results):
    """Each rank's loss = single-process W-MSE of its own images; gradients = the mean over ranks of those."""
    n = N // WORLD
    per_rank = []
    for rank in range(WORLD):
        def loss_fn(m, views, step, rank=rank):
            mine = [v[rank * n:(rank + 1) * n] for v in views]
            return wmse_loss(m.embed(mine), W_SIZE, 2, generator=slice_generator(SEED, step, rank))

        per_rank.append(reference("wmse", loss_fn))
    for step in range(2):
        mean_grads = {k: sum(r[step]["grads"][k] for r in per_rank) / WORLD for k in per_rank[0][step]["grads"]}
        for rank in range(WORLD):
            got = ddp_results[rank]["wmse_local"][step]
            torch.testing.assert_close(got["loss"], per_rank[rank][step]["loss"], rtol=1e-5, atol=1e-8)
            assert_close_grads(got["grads"], mean_grads)


def test_contrastive_gathers_negatives_from_all_ranks(ddp_results):
    """Contrastive loss and gradients = single-process NT-Xent on the global batch (negatives of both ranks).

    Each rank computes only its own anchors' rows: its loss is the mean over them, and the mean over
    ranks (what the training loop reports) is the global loss."""
    want = reference("contrastive", lambda m, views, step: nt_xent_loss(*m.embed(views), temperature=0.5))
    n = N // WORLD
    for step in range(2):
        per_rank = [ddp_results[rank]["contrastive"][step]["loss"] for rank in range(WORLD)]
        torch.testing.assert_close(sum(per_rank) / WORLD, want[step]["loss"], rtol=1e-5, atol=1e-8)
        for rank in range(WORLD):
            mine = reference("contrastive", lambda m, views, _: nt_xent_loss(
                *m.embed(views), temperature=0.5, anchors=slice(rank * n, (rank + 1) * n)))
            torch.testing.assert_close(per_rank[rank], mine[step]["loss"], rtol=1e-5, atol=1e-8)
            assert_close_grads(ddp_results[rank]["contrastive"][step]["grads"], want[step]["grads"])


def test_byol_gradient_is_the_global_batch_gradient(ddp_results):
    """BYOL is unchanged: DDP's gradient average of per-rank means = the single-process gradient."""
    want = reference("byol", lambda m, views, step: m.loss(views))
    for rank in range(WORLD):
        for step in range(2):
            assert_close_grads(ddp_results[rank]["byol"][step]["grads"], want[step]["grads"])
    assert "target_head.0.weight" not in ddp_results[0]["byol"][0]["grads"]


def test_check_batch_errors_name_batch_size_w_size_and_nproc():
    cfg = SimpleNamespace(method="wmse", w_global=False, batch_size=384, w_size=128, sync_bn=False,
                          device="cpu")
    with pytest.raises(ValueError, match=r"batch_size/nproc = 384/2 = 192.*w_size \(128\)"):
        check_batch(cfg, 2)
    check_batch(SimpleNamespace(**{**vars(cfg), "w_global": True}), 2)  # global slices: fine
    check_batch(cfg, 3)  # 128 per process
    with pytest.raises(ValueError, match=r"batch_size \(384\) must be a multiple of nproc \(5\)"):
        check_batch(cfg, 5)
    with pytest.raises(ValueError, match="sync_bn needs CUDA"):
        check_batch(SimpleNamespace(**{**vars(cfg), "sync_bn": True}), 3)
    check_batch(SimpleNamespace(**{**vars(cfg), "method": "byol"}), 2)  # no slices outside W-MSE


def test_single_process_helpers_are_identities():
    rt = Runtime(device=torch.device("cpu"))
    m = make_method("wmse")
    assert distributed.wrap(m, cfg_for("wmse", True), rt) is m
    x = torch.randn(3, 2)
    assert distributed.gather_cat(x) is x
    assert distributed.agree(torch.tensor(1.5), True, rt) == (1.5, True)
    assert distributed.gather_objects({"a": 1}, rt) == [{"a": 1}]
    g1, g2 = slice_generator(1, 5), slice_generator(1, 5)
    assert torch.equal(torch.randperm(50, generator=g1), torch.randperm(50, generator=g2))
    assert not torch.equal(torch.randperm(50, generator=slice_generator(1, 5, 0)),
                           torch.randperm(50, generator=slice_generator(1, 5, 1)))


def test_launch_command_line():
    argv = ["pretrain", "--nproc", "2", "--epochs", "1", "--nproc=3"]
    assert strip_nproc(argv) == ["pretrain", "--epochs", "1"]
    cmd = torchrun_command(2, argv)
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--nproc_per_node=2" in cmd and cmd[-5:] == ["-m", "wmse", "pretrain", "--epochs", "1"]


def test_launch_rejects_a_batch_that_does_not_split(tmp_path):
    from wmse.config import apply_overrides, get_preset
    from wmse.launch import launch

    cfg = apply_overrides(get_preset("cifar10-wmse2"), {"batch_size": "384", "w_size": "128"})
    with pytest.raises(ValueError, match="w_size"):
        launch(2, ["pretrain", "--preset", "cifar10-wmse2", "--batch_size", "384", "--w_size", "128"], cfg)


# ----------------------------------------------------------------------------------------------------------
# End to end: the training loop under DDP


def _overrides(cfg) -> list[str]:
    """tiny_config's scalar fields as CLI overrides (the CLI starts from the same preset)."""
    from wmse.config import get_preset

    base = get_preset("cifar10-wmse2").to_dict()
    out = []
    for k, v in cfg.to_dict().items():
        if v != base.get(k) and not isinstance(v, (list, tuple, dict)):
            out += [f"--{k}", "none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)]
    return out


def test_nproc_cli_run_writes_one_checkpoint(tiny_folder, tmp_path, make_config):
    """`wmse pretrain --nproc 2 ...` (torchrun -m wmse underneath) on CPU: finishes, one run dir, one checkpoint."""
    cfg = make_config(tiny_folder, tmp_path / "runs", epochs=1, eval_every=1, w_global=True,
                      batch_size=32, w_size=16)
    cmd = [sys.executable, "-m", "wmse", "pretrain", "--nproc", "2", "--preset", "cifar10-wmse2", *_overrides(cfg)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WMSE_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == ["run"]
    assert sorted(p.name for p in (runs[0] / "checkpoints").iterdir()) == ["last.pt"]
    ckpt = load_checkpoint(runs[0])
    assert ckpt["world_size"] == 2 and len(ckpt["rng_ranks"]) == 2
    # each rank augmented with its own stream (seed + 1000 * rank)
    assert not torch.equal(ckpt["rng_ranks"][0]["augment"], ckpt["rng_ranks"][1]["augment"])
    assert ckpt["step"] == 3 and ckpt["epoch"] == 1  # 115 training images // 32 = 3 global steps
    assert proc.stderr.count("run directory:") == 1  # rank 0 alone logs


def _train_worker(rank: int, ports: list[int], cfgs: list, resume_index: int) -> None:
    """Run each config in turn as rank ``rank`` of 2 (env:// like torchrun); the one at resume_index resumes."""
    from pathlib import Path

    from wmse.train import pretrain

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1")
    for i, (cfg, port) in enumerate(zip(cfgs, ports)):
        os.environ["MASTER_PORT"] = str(port)
        resume = Path(cfg.out_dir) / cfg.run_name if i == resume_index else None
        pretrain(cfg, resume=resume, log=lambda msg: None)


def test_ddp_resume_is_exact(tiny_folder, tmp_path, make_config):
    """Stop a 2-process run mid-epoch, resume it under DDP: same weights as an uninterrupted 2-process run."""
    # 16 images per rank in 2 slices of 8: the slice permutation after the resume matters
    kw = dict(epochs=2, eval_every=100, ckpt_every=100, final_eval=False, w_global=False, w_size=8,
              batch_size=32, emb=4)
    full = make_config(tiny_folder, tmp_path / "a", **kw)
    part = make_config(tiny_folder, tmp_path / "b", max_steps=4, **kw)
    rest = part.replace(max_steps=None)
    ports = [free_port() for _ in range(3)]
    mp.start_processes(_train_worker, args=(ports, [full, part, rest], 2), nprocs=WORLD, start_method="fork")
    a, b = load_checkpoint(tmp_path / "a" / "run"), load_checkpoint(tmp_path / "b" / "run")
    assert a["step"] == b["step"] == 6
    for k, v in a["method"].items():
        torch.testing.assert_close(b["method"][k], v, rtol=0, atol=0, msg=f"resumed {k}")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["run"]


def test_sync_bn_converts_head_batchnorms_and_keeps_checkpoint_keys(make_config, tiny_folder, tmp_path):
    """sync_bn swaps the head's BatchNorm1d for SyncBatchNorm (CUDA-only kernel, so no forward here) without
    changing state_dict keys: checkpoints of a sync_bn run load into a plain model."""
    from wmse.methods import build_method

    for name in ("wmse", "byol"):
        cfg = make_config(tiny_folder, tmp_path, method=name)
        method = build_method(cfg, 3)
        keys = list(method.state_dict())
        distributed._convert_sync_bn(method)
        assert list(method.state_dict()) == keys
        assert any(isinstance(m, nn.SyncBatchNorm) for m in method.head.modules())
        assert not any(isinstance(m, nn.SyncBatchNorm) for m in method.backbone.modules())
        if name == "byol":
            assert any(isinstance(m, nn.SyncBatchNorm) for m in method.predictor.modules())
        build_method(cfg, 3).load_state_dict(method.state_dict())
