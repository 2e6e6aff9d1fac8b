"""Clusters as a user meets them, through the `wmse` command in subprocesses: the same command continues a run
(--auto_resume), `--nproc` stops and reports like one process (signals, a lost worker), torchrun's elastic
restart continues exactly, and two nodes (two network namespaces joined by a veth pair) train one model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from wmse.checkpoint import load_checkpoint
from wmse.errors import EXIT_OK, EXIT_STOPPED, EXIT_USAGE, EXIT_WORKER_LOST
from wmse.launch import group_outcome, strip_launcher_args
from wmse.progress import read_metrics
from wmse.run_directory import RunDirectory

TINY = ["--preset", "cifar10-quick", "--dataset", "folder", "--eval_split", "none", "--arch", "small",
        "--image_size", "16", "--emb", "8", "--head_hidden", "32", "--w_size", "16", "--batch_size", "32",
        "--precision", "fp32", "--final_eval", "false", "--threads", "1", "--eval_every", "100", "--log_every", "1",
        "--ckpt_every", "1", "--linear_epochs", "5"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _env(tmp_path, **extra) -> dict:
    return {**os.environ, "WMSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", **extra}


def wmse(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "wmse", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def start(cmd, env) -> subprocess.Popen:
    return subprocess.Popen([str(c) for c in cmd], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_one_line(stderr: str, status_line_start: str) -> None:
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    assert not any(line.startswith("[") for line in stderr.splitlines()), stderr[-3000:]  # gloo's C++ logs
    assert stderr.strip().splitlines()[-1].startswith(status_line_start), stderr[-3000:]


def train_losses(run: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run) if r["kind"] == "train"]
    steps = [r["step"] for r in records]
    assert len(steps) == len(set(steps)), steps  # no step logged twice
    return {r["step"]: r["loss"] for r in records}


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    """Until metrics.jsonl holds a train record at ``step`` or later (fails if ``proc`` ends first)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        try:
            if any(r["kind"] == "train" and r["step"] >= step for r in read_metrics(run)):
                return
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {run} after {timeout}s")


def children(pid: int) -> dict[int, int]:
    """{RANK: pid} of the processes whose parent is ``pid`` and that have a RANK (torchrun's workers)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [e[5:] for e in env if e.startswith(b"RANK=")]
        if ppid == pid and rank:
            out[int(rank[0])] = int(entry.name)
    return out


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------
# --auto_resume: the same command continues


def test_auto_resume_starts_continues_finishes_and_refuses_another_config(tiny_folder, tmp_path):
    env = _env(tmp_path)
    common = ["pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path / "runs", "--run_name", "r",
              "--epochs", "2", "--auto_resume"]
    run = tmp_path / "runs" / "r"
    first = wmse(*common, "--max_steps", "2", env=env)  # the run does not exist: it starts
    assert first.returncode == 0, first.stderr[-3000:]
    assert load_checkpoint(run)["step"] == 2
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    again = wmse(*common, "--max_steps", "2", env=env)  # the same command: nothing left to do for it
    assert again.returncode == 0 and "reached max_steps=2" in again.stderr, again.stderr[-3000:]
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    rest = wmse(*common, env=env)  # a stop condition is the invocation's: the run continues to its end
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "continuing" in rest.stderr and "resumed from" in rest.stderr and "run directory:" in rest.stderr
    assert load_checkpoint(run)["step"] == 6 and sorted(train_losses(run)) == list(range(1, 7))
    done = wmse(*common, env=env)
    assert done.returncode == 0 and "already finished" in done.stderr, done.stderr[-3000:]
    other = wmse(*common, "--lr", "0.01", env=env)
    assert other.returncode == EXIT_USAGE and "Traceback" not in other.stderr
    assert other.stderr.strip().splitlines()[-1].startswith("wmse pretrain: error: --auto_resume")
    assert "lr (run: 0.003, command: 0.01)" in other.stderr


def test_auto_resume_needs_a_name_and_checks_what_it_would_start_over(tiny_folder, tmp_path):
    env = _env(tmp_path)
    runs = tmp_path / "runs"
    common = ["pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", runs, "--epochs", "1", "--auto_resume"]
    proc = wmse(*common, env=env)
    assert proc.returncode == EXIT_USAGE and "needs --run_name" in proc.stderr.strip().splitlines()[-1]
    (runs / "foreign").mkdir(parents=True)
    (runs / "foreign" / "notes.txt").write_text("mine")
    proc = wmse(*common, "--run_name", "foreign", env=env)
    assert proc.returncode == EXIT_USAGE and "is not a wmse run" in proc.stderr, proc.stderr[-2000:]
    assert (runs / "foreign" / "notes.txt").read_text() == "mine"
    (runs / "killed").mkdir()  # a run killed before its first checkpoint: only its lock is left
    (runs / "killed" / ".lock").write_text("123\n")
    holder = RunDirectory.existing(runs / "killed")
    holder.lock()  # ... while another process still writes it: refused
    try:
        proc = wmse(*common, "--run_name", "killed", env=env)
        assert proc.returncode == EXIT_USAGE and "being written" in proc.stderr, proc.stderr[-2000:]
    finally:
        holder.close()
    proc = wmse(*common, "--run_name", "killed", "--max_steps", "1", env=env)
    assert proc.returncode == 0 and "starting it over" in proc.stderr, proc.stderr[-2000:]
    assert load_checkpoint(runs / "killed")["step"] == 1


def test_checkpoints_by_time_resume_exactly_after_a_kill(tiny_folder, tmp_path):
    """ckpt_minutes writes checkpoints inside an epoch (ckpt_every alone would write none here); after kill -9,
    the same command (--auto_resume) continues from the last one and every step's loss equals an
    uninterrupted run's."""
    env = _env(tmp_path)
    args = ["pretrain", *TINY, "--data_dir", tiny_folder, "--epochs", "4", "--ckpt_every", "100",
            "--ckpt_minutes", "0.0005", "--run_name", "r", "--auto_resume"]
    base = wmse(*args, "--out_dir", tmp_path / "base", env=env)
    assert base.returncode == 0, base.stderr[-3000:]
    run = tmp_path / "killed" / "r"
    proc = start([sys.executable, "-m", "wmse", *args, "--out_dir", tmp_path / "killed"], env)
    wait_for_step(run, 5, proc)
    proc.kill()
    proc.communicate()
    step = load_checkpoint(run)["step"]
    assert 1 <= step < 12 and step % 3  # written by time inside an epoch (3 steps each), before the end
    rest = wmse(*args, "--out_dir", tmp_path / "killed", env=env)
    assert rest.returncode == 0 and f"checkpoint at step {step}" in rest.stderr, rest.stderr[-3000:]
    assert train_losses(run) == train_losses(tmp_path / "base" / "r")
    assert sorted(train_losses(run)) == list(range(1, 13))


def test_max_restarts_needs_nproc_and_a_way_to_continue(tmp_path):
    env = _env(tmp_path)
    proc = wmse("pretrain", "--max_restarts", "1", "--run_name", "x", "--auto_resume", env=env)
    assert proc.returncode == EXIT_USAGE and "--max_restarts needs --nproc" in proc.stderr
    proc = wmse("pretrain", "--nproc", "2", "--max_restarts", "1", env=env)
    assert proc.returncode == EXIT_USAGE and "needs --auto_resume" in proc.stderr
    assert strip_launcher_args(["pretrain", "--nproc", "2", "--max_restarts=1", "--auto_resume"]) == \
        ["pretrain", "--auto_resume"]


def test_group_outcome_reports_the_most_severe_status_once():
    stopped = (EXIT_STOPPED, "wmse pretrain: stopped by SIGTERM at step 4")
    assert group_outcome({0: (0, None), 1: (0, None)}, {}, 2) == (EXIT_OK, None)
    assert group_outcome({0: stopped, 1: stopped}, {}, 2) == stopped
    assert group_outcome({0: stopped, 1: (EXIT_USAGE, "bad")}, {}, 2) == (EXIT_USAGE, "bad")
    status, line = group_outcome({0: (EXIT_WORKER_LOST, "lost another")}, {1: -9, 0: 76}, 2, "the same command")
    assert status == EXIT_WORKER_LOST and "rank 1" in line and "SIGKILL" in line and "the same command" in line
    status, line = group_outcome({}, {}, 2)  # nobody reported (killed after the shutdown timeout)
    assert status == EXIT_WORKER_LOST and "rank 0" in line


# ---------------------------------------------------------------------------------------------------------
# --nproc: signals and statuses as one process


def test_nproc_signals_stop_every_worker_once_and_leave_nothing_running(tiny_folder, tmp_path):
    """SIGINT (Ctrl-C) and SIGTERM to `wmse pretrain --nproc 2`: checkpoint, exit 75, one "stopped by" line,
    no worker left, the lock released; the same command (--auto_resume) then continues."""
    env = _env(tmp_path)
    run = tmp_path / "runs" / "r"
    cmd = [sys.executable, "-m", "wmse", "pretrain", "--nproc", "2", *TINY, "--data_dir", tiny_folder,
           "--out_dir", tmp_path / "runs", "--run_name", "r", "--epochs", "50", "--auto_resume"]
    at = 0  # the step of the checkpoint the next round starts from
    for sig in (signal.SIGINT, signal.SIGTERM):
        proc = start(cmd, env)
        wait_for_step(run, at + 2, proc)
        workers = children(proc.pid)
        assert sorted(workers) == [0, 1]
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=240)
        assert proc.returncode == EXIT_STOPPED, err[-3000:]
        assert_one_line(err, f"wmse pretrain: stopped by {sig.name}")
        assert err.count("stopped by") == 1, err[-3000:]
        assert not any(alive(pid) for pid in workers.values())
        holder = RunDirectory.existing(run)
        holder.lock()  # released: no process holds the run
        holder.close()
        step = load_checkpoint(run)["step"]
        assert step >= at + 2 and sorted(train_losses(run)) == list(range(1, step + 1))
        at = step
    assert "continuing" in err


def test_a_killed_worker_restarts_the_group_then_gets_its_own_status(tiny_folder, tmp_path):
    """`--nproc 2 --max_restarts 1 --auto_resume`: a worker killed with SIGKILL is replaced once (the group
    continues from the checkpoint); killed again, the run ends with 76 and one line naming it."""
    env = _env(tmp_path)
    run = tmp_path / "runs" / "r"
    proc = start([sys.executable, "-m", "wmse", "pretrain", "--nproc", "2", "--max_restarts", "1", *TINY,
                  "--data_dir", tiny_folder, "--out_dir", tmp_path / "runs", "--run_name", "r", "--epochs", "60",
                  "--auto_resume"], env)
    wait_for_step(run, 4, proc)
    first = children(proc.pid)
    os.kill(first[1], signal.SIGKILL)
    end = time.monotonic() + 240
    while not (set(children(proc.pid).values()) - set(first.values())) and time.monotonic() < end:
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    resumed_at = load_checkpoint(run)["step"]
    while load_checkpoint(run)["step"] <= resumed_at:  # the restarted group trains (a checkpoint every epoch)
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    os.kill(children(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_WORKER_LOST, err[-3000:]
    assert_one_line(err, "wmse pretrain: process rank 1 of the run was killed by SIGKILL")
    assert "restart 1 of the process group" in err
    assert not any(alive(pid) for pid in children(proc.pid).values())


# ---------------------------------------------------------------------------------------------------------
# torchrun's elastic restart continues exactly


def test_elastic_restart_continues_from_the_checkpoint_exactly(tiny_folder, tmp_path):
    """Under `torchrun --nproc_per_node 2 --max_restarts 1`, kill -9 one worker mid-epoch: torchrun restarts the
    group, --auto_resume finds the checkpoint, the run ends with 0, and every step's loss equals an
    uninterrupted run's."""
    env = _env(tmp_path, TORCH_CPP_LOG_LEVEL="ERROR")
    args = ["pretrain", *TINY, "--data_dir", tiny_folder, "--epochs", "5", "--run_name", "r", "--auto_resume"]
    base = wmse(*args, "--nproc", "2", "--out_dir", tmp_path / "base", env=env)
    assert base.returncode == 0, base.stderr[-3000:]
    run = tmp_path / "elastic" / "r"
    proc = start([*TORCHRUN, "--standalone", "--nproc_per_node", "2", "--max_restarts", "1", "-m", "wmse", *args,
                  "--out_dir", tmp_path / "elastic"], env)
    wait_for_step(run, 5, proc)  # mid-epoch 2 (3 steps an epoch), after the checkpoint of epoch 1
    os.kill(children(proc.pid)[1], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "restart 1 of the process group" in err
    want, got = train_losses(tmp_path / "base" / "r"), train_losses(run)
    assert sorted(got) == list(range(1, 16)) and got == want
    a, b = load_checkpoint(tmp_path / "base" / "r"), load_checkpoint(run)
    for k, v in a["method"].items():
        torch.testing.assert_close(b["method"][k], v, rtol=0, atol=0, msg=k)


# ---------------------------------------------------------------------------------------------------------
# Two nodes: two network namespaces joined by a veth pair


def _namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs the `ip` command (iproute2)"
    probe = subprocess.run(["ip", "netns", "add", f"wmse-probe-{os.getpid()}"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", f"wmse-probe-{os.getpid()}"], capture_output=True)
    return None


@pytest.fixture
def two_nodes():
    """Two network namespaces joined by a veth pair, 10.200.0.1/30 and 10.200.0.2/30 (a private range, used only
    inside them); yields [(namespace, interface, address)] for node 0 and node 1; removed afterwards."""
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    tag = f"{os.getpid() % 100000}"
    nodes = [(f"wmse-n{i}-{tag}", f"wmv{i}-{tag}", f"10.200.0.{i + 1}") for i in range(2)]
    try:
        for ns, _, _ in nodes:
            subprocess.run(["ip", "netns", "add", ns], check=True)
        subprocess.run(["ip", "link", "add", nodes[0][1], "type", "veth", "peer", "name", nodes[1][1]], check=True)
        for ns, dev, addr in nodes:
            for cmd in (["ip", "link", "set", dev, "netns", ns],
                        ["ip", "-n", ns, "addr", "add", f"{addr}/30", "dev", dev],
                        ["ip", "-n", ns, "link", "set", dev, "up"], ["ip", "-n", ns, "link", "set", "lo", "up"]):
                subprocess.run(cmd, check=True)
        yield nodes
    finally:
        for ns, _, _ in nodes:  # deleting a namespace deletes its end of the pair, and with it the other end
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def on_both_nodes(nodes, args: list, env: dict, port: int, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """torchrun on each node (one process each, c10d rendezvous on node 0's address), run at once."""
    procs = []
    for i, (ns, dev, addr) in enumerate(nodes):
        cmd = ["ip", "netns", "exec", ns, *TORCHRUN, "--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"{nodes[0][2]}:{port}", "--rdzv_id", f"wmse-{port}",
               # the namespaces share one host name, which resolves to neither veth address: name them
               "--rdzv_conf", f"is_host={int(i == 0)}", "--local_addr", addr,
               *map(str, args)]
        procs.append(start(cmd, {**env, "GLOO_SOCKET_IFNAME": dev}))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


_GRADIENT_SCRIPT = """
import os, sys, torch
from types import SimpleNamespace
from torch import nn
from wmse import distributed
from wmse.methods import WMSE
torch.manual_seed(0)
method = WMSE(nn.Sequential(nn.Flatten(), nn.Linear(48, 12), nn.Tanh()),
              nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4)), n_views=2, w_size=8, w_iter=2,
              w_global=True).double()
cfg = SimpleNamespace(method="wmse", w_global=True, seed=3, batch_size=16, w_size=8, sync_bn=False, device="cpu")
rt = distributed.setup(cfg)
g = torch.Generator().manual_seed(100)
views = [torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]
module = distributed.wrap(method, cfg, rt)
module([v[rt.rank * 8:(rt.rank + 1) * 8] for v in views], distributed.process_context(rt, 3, 0)).backward()
torch.save({k: p.grad for k, p in method.named_parameters()}, sys.argv[1] + f"/grads{rt.rank}.pt")
distributed.cleanup(rt)
"""


def test_two_nodes_train_one_model_and_resume_on_both(two_nodes, tiny_folder, tmp_path):
    """Two nodes, one process each, gloo over the veth link: the gradient equals one process on the global
    batch, the run trains with rank 0 alone writing, and the same command continues it on both nodes."""
    from wmse.losses import wmse_loss
    from wmse.methods import WMSE, step_generator

    env = _env(tmp_path, TORCH_CPP_LOG_LEVEL="ERROR")
    script = tmp_path / "grads.py"
    script.write_text(textwrap.dedent(_GRADIENT_SCRIPT))
    res = on_both_nodes(two_nodes, [script, tmp_path], env, 29411)
    assert [r.returncode for r in res] == [0, 0], res[0].stderr[-2000:] + res[1].stderr[-2000:]
    torch.manual_seed(0)  # the single-process reference: the same weights, the whole batch, the same slices
    from torch import nn

    ref = WMSE(nn.Sequential(nn.Flatten(), nn.Linear(48, 12), nn.Tanh()),
               nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 4)), n_views=2, w_size=8, w_iter=2).double()
    g = torch.Generator().manual_seed(100)
    views = [torch.randn(16, 3, 4, 4, generator=g, dtype=torch.float64) for _ in range(2)]
    wmse_loss(ref.embed(views), 8, 2, generator=step_generator(3, 0)).backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"grads{rank}.pt", weights_only=True)
        for k, p in ref.named_parameters():
            torch.testing.assert_close(got[k], p.grad, rtol=1e-5, atol=1e-8, msg=f"rank {rank}: gradient of {k}")

    args = ["-m", "wmse", "pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path / "runs",
            "--run_name", "r", "--epochs", "2", "--auto_resume"]
    run = tmp_path / "runs" / "r"
    part = on_both_nodes(two_nodes, [*args, "--max_steps", "2"], env, 29412)
    assert [r.returncode for r in part] == [0, 0], part[0].stderr[-2000:] + part[1].stderr[-2000:]
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 2 and ckpt["world_size"] == 2
    assert "run directory:" in part[0].stderr and "run directory:" not in part[1].stderr  # rank 0 alone logs
    rest = on_both_nodes(two_nodes, args, env, 29413)
    assert [r.returncode for r in rest] == [0, 0], rest[0].stderr[-2000:] + rest[1].stderr[-2000:]
    assert "continuing" in rest[0].stderr and "resumed from" in rest[0].stderr
    assert load_checkpoint(run)["step"] == 6 and sorted(train_losses(run)) == list(range(1, 7))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
