"""The whitening family as methods: each trains from a config, its loss is its wmse.losses function of the
embeddings, and under DDP it gathers exactly what its authors gather (gradients vs one process, 2 CPU ranks)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from wmse import distributed
from wmse.checkpoint import load_checkpoint
from wmse.distributed import Runtime
from wmse.losses import barlow_twins_loss, cwrgp_loss, dbn_loss, intl_loss, vicreg_loss
from wmse.methods import CWRGP, INTL, BarlowTwins, ShuffledDBN, VICReg, step_generator
from wmse.progress import read_metrics
from wmse.train import pretrain

FAMILY = ("cwrgp", "intl", "dbn", "vicreg", "barlow")
# Per method: the fields its tiny run needs (CW-RGP whitens emb / cw_groups channels against w_size images).
TINY_FIELDS = {"cwrgp": dict(emb=32, w_size=8, cw_groups=2), "intl": {}, "dbn": dict(dbn_groups=2), "vicreg": {},
               "barlow": {}}


@pytest.mark.parametrize("name", FAMILY)
def test_each_method_trains_from_its_config(name, tiny_folder, tmp_path, make_config):
    cfg = make_config(tiny_folder, tmp_path, method=name, epochs=1, **TINY_FIELDS[name])
    run = pretrain(cfg, log=lambda m: None)
    losses = [r["loss"] for r in read_metrics(run) if r["kind"] == "train"]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    assert load_checkpoint(run)["config"]["method"] == name


def _nets(emb: int) -> tuple[nn.Module, nn.Module]:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 24), nn.Tanh())
    head = nn.Sequential(nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, emb))
    return backbone, head


EMB, N, WORLD, SEED = 20, 16, 2, 5


def make(name: str) -> nn.Module:
    """Identical float64 weights on every rank, no BatchNorm (an embedding depends on its own image only)."""
    torch.manual_seed(0)
    backbone, head = _nets(EMB)
    m = {"cwrgp": lambda: CWRGP(backbone, head, w_size=8, cw_groups=2),
         "intl": lambda: INTL(backbone, head),
         "dbn": lambda: ShuffledDBN(backbone, head, dbn_groups=4),
         "vicreg": lambda: VICReg(backbone, head),
         "barlow": lambda: BarlowTwins(backbone, head)}[name]()
    return m.double()


def views(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(50 + step)
    return [torch.randn(N, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]


# The loss of a method written with the standalone functions (independent of the method classes' code).
def reference_loss(name, m, v, generator):
    z = m.embed(v)
    if name == "cwrgp":
        return cwrgp_loss(z, 8, 2, generator=generator)
    if name == "intl":
        return intl_loss(z)
    if name == "dbn":
        return dbn_loss(*z, num_groups=4, generator=generator)
    if name == "vicreg":
        return vicreg_loss(*z)
    return barlow_twins_loss(*z)


@pytest.mark.parametrize("name", FAMILY)
def test_a_methods_loss_is_its_loss_function_of_the_embeddings(name):
    m = make(name)
    v = views(0)
    torch.manual_seed(3)
    got = m.loss(v)
    torch.manual_seed(3)
    want = reference_loss(name, m, v, None)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=WORLD)
    rt = Runtime(device=torch.device("cpu"), rank=rank, world_size=WORLD)
    cfg = type("Cfg", (), dict(method="vicreg", seed=SEED, batch_size=N, sync_bn=False, device="cpu", w_size=8))
    results = {}
    for name in FAMILY:
        method = make(name)
        module = distributed.wrap(method, cfg, rt)
        n = N // WORLD
        method.zero_grad(set_to_none=True)
        loss = module([v[rank * n:(rank + 1) * n] for v in views(0)], distributed.process_context(rt, SEED, 0))
        loss.backward()
        results[name] = {"loss": loss.detach(), "grads": {k: p.grad.clone() for k, p in method.named_parameters()}}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_family")
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, start_method="fork")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single(name, loss_fn):
    m = make(name)
    loss = loss_fn(m)
    loss.backward()
    return loss.detach(), {k: p.grad for k, p in m.named_parameters()}


@pytest.mark.parametrize("name", ("intl", "vicreg", "barlow"))
def test_gathering_methods_give_the_single_process_gradient_of_the_whole_batch(ddp, name):
    """VICReg, Barlow Twins and INTL compute their loss on the gathered batch, as their authors (Barlow Twins'
    all-reduced cross-correlation, VICReg's and INTL's FullGatherLayer): loss and gradients of every rank equal
    one process on the concatenated batch."""
    want_loss, want_grads = _single(name, lambda m: reference_loss(name, m, views(0), None))
    for rank in range(WORLD):
        torch.testing.assert_close(ddp[rank][name]["loss"], want_loss, rtol=1e-6, atol=1e-10)
        for k, g in want_grads.items():
            torch.testing.assert_close(ddp[rank][name]["grads"][k], g, rtol=1e-6, atol=1e-10, msg=k)


@pytest.mark.parametrize("name", ("cwrgp", "dbn"))
def test_per_process_methods_whiten_each_ranks_own_batch(ddp, name):
    """CW-RGP and Shuffled-DBN whiten each process's local batch, as their authors' DDP code: each rank's loss is
    the single-process loss of its own images (its own random partition), the gradient the mean over ranks."""
    n = N // WORLD
    per_rank = [_single(name, lambda m, r=r: reference_loss(
        name, m, [v[r * n:(r + 1) * n] for v in views(0)], step_generator(SEED, 0, r))) for r in range(WORLD)]
    for rank in range(WORLD):
        torch.testing.assert_close(ddp[rank][name]["loss"], per_rank[rank][0], rtol=1e-6, atol=1e-10)
        for k in per_rank[0][1]:
            mean = sum(p[1][k] for p in per_rank) / WORLD
            torch.testing.assert_close(ddp[rank][name]["grads"][k], mean, rtol=1e-6, atol=1e-10, msg=k)
