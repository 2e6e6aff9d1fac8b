"""The pretraining loop end to end on a tiny image folder: every method runs, resume is exact, the run
directory holds config, metrics and checkpoint, and the CLI turns user errors into one line + exit 2."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from wmse.checkpoint import load_checkpoint
from wmse.cli import main
from wmse.progress import read_metrics
from wmse.stopping import StopFlag
from wmse.train import pretrain


def losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir) if r["kind"] == "train"]


@pytest.mark.parametrize("method,extra", [("wmse", {"n_views": 2}), ("wmse", {"n_views": 4, "w_iter": 2}),
                                          ("contrastive", {}), ("byol", {})])
def test_each_method_trains_and_writes_a_run_directory(tiny_folder, tmp_path, method, extra, make_config):
    cfg = make_config(tiny_folder, tmp_path, method=method, **extra)
    run = pretrain(cfg, log=lambda m: None)
    assert json.loads((run / "config.json").read_text())["method"] == method
    records = read_metrics(run)
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 * 3 and all(np.isfinite(r["loss"]) for r in train)  # 115 images // 32 = 3 steps/epoch
    assert [r["epoch"] for r in records if r["kind"] == "eval"] == [1, 2]
    assert any(r["kind"] == "diagnostics" for r in records)
    ckpt = load_checkpoint(run)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6 and ckpt["config"]["method"] == method
    assert set(ckpt["backbone"]) == {k.removeprefix("backbone.") for k in ckpt["method"] if k.startswith("backbone.")}
    assert list((run / "tb").iterdir())


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tiny_folder, tmp_path, make_config):
    full = pretrain(make_config(tiny_folder, tmp_path / "a", epochs=3), log=lambda m: None)
    cfg = make_config(tiny_folder, tmp_path / "b", epochs=3, max_steps=4)  # stops inside epoch 2
    part = pretrain(cfg, log=lambda m: None)
    assert len(losses(part)) == 4 and load_checkpoint(part)["batch"] == 1
    pretrain(cfg.replace(max_steps=None), resume=part, log=lambda m: None)
    assert losses(part) == losses(full)
    a, b = load_checkpoint(full)["method"], load_checkpoint(part)["method"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_nonfinite_loss_aborts_with_a_clear_message(tiny_folder, tmp_path, make_config):
    from wmse.errors import TrainingError

    cfg = make_config(tiny_folder, tmp_path, lr=1e30, warmup_iters=0, nonfinite_limit=2)
    with pytest.raises(TrainingError, match="non-finite for 2 steps.*learning rate"):
        pretrain(cfg, log=lambda m: None)


def test_final_eval_compares_with_random_init(tiny_folder, tmp_path, capsys, make_config):
    cfg = make_config(tiny_folder, tmp_path, final_eval=True, epochs=1)
    run = pretrain(cfg, log=lambda m: None)
    result = json.loads((run / "final_eval.json").read_text())
    for name in ("trained", "random_init"):
        assert 0.0 <= result[name]["knn_top1"] <= 100.0 and 0.0 <= result[name]["linear_top1"] <= 100.0
    assert "kNN gain over random init" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv,match",
    [
        (["pretrain", "--preset", "nope"], "unknown preset"),
        (["pretrain", "--preset", "quick", "--no_such_field", "1"], "no_such_field"),
        (["pretrain", "--preset", "quick", "--lr", "fast"], "lr"),
        (["pretrain", "--preset", "quick", "--lr"], "needs a value"),
        (["pretrain", "--preset", "cifar10-wmse2", "--batch_size", "100"], "w_size"),
        (["pretrain", "--preset", "cifar10-quick", "--data_dir", "/nonexistent/folder"], "nonexistent"),
        (["pretrain", "--resume", "/nonexistent/run"], "nonexistent"),
        (["presets", "--show", "nope"], "unknown preset"),
    ],
)
def test_cli_user_errors_are_one_line_and_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(match, err, flags=re.IGNORECASE), err


def test_cli_presets_lists_every_table1_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("quick", "cifar10-quick", "cifar10-wmse4", "stl10-byol", "tiny_imagenet-contrastive", "imagenet100-wmse2"):
        assert name in out


def test_python_m_wmse_runs_the_cli():
    out = subprocess.run([sys.executable, "-m", "wmse", "presets", "--show", "quick"], capture_output=True, text=True)
    assert out.returncode == 0 and "fashion_mnist" in out.stdout


def test_sigterm_saves_a_checkpoint_and_exits_with_the_resumable_status(tiny_folder, tmp_path):
    env = {**os.environ, "WMSE_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "wmse", "pretrain", "--preset", "cifar10-quick", "--data_dir", str(tiny_folder),
            "--arch", "small", "--image_size", "16", "--emb", "8", "--head_hidden", "32", "--w_size", "16",
            "--batch_size", "32", "--epochs", "1000", "--precision", "fp32", "--final_eval", "false",
            "--eval_every", "1000", "--log_every", "1", "--out_dir", str(tmp_path), "--run_name", "sig", "--threads", "1"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "sig" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err  # stopped, resumable: not 0, so `pretrain && evaluate` does not go on
    assert f"continue with: wmse pretrain --resume {tmp_path / 'sig'}" in err.splitlines()[-1]
    ckpt = load_checkpoint(tmp_path / "sig")
    assert 0 < ckpt["step"] < 1000 * 3


def test_stop_flag_is_announced_by_the_main_rank_only(capsys):
    quiet, loud = StopFlag(announce=False), StopFlag()
    quiet(signal.SIGTERM, None)
    assert quiet.signal == signal.SIGTERM and capsys.readouterr().err == ""
    loud(signal.SIGINT, None)
    assert loud.signal == signal.SIGINT and "SIGINT: saving a checkpoint" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):  # a second signal gives up at once
        loud(signal.SIGINT, None)


def test_the_cpu_loop_is_the_plain_sequence_of_steps(tiny_folder, tmp_path, make_config):
    """The training loop on the CPU is exactly: seed, build, then per batch the lr of the schedule, d views
    from the augmentation stream, the loss of the step's context, Adam. Written out here without wmse.train, it must give the
    same losses bit for bit (what the loop's machinery - stages, guards, skips, host reads - may not change)."""
    from wmse.augment import AugmentConfig, Augmenter
    from wmse.data.loader import BatchLoader
    from wmse.methods import ProcessContext, build_method
    from wmse.splits import load_run_data
    from wmse.schedule import lr_factor

    cfg = make_config(tiny_folder, tmp_path, epochs=2, eval_every=100)
    logged = losses(pretrain(cfg, log=lambda m: None))
    torch.manual_seed(cfg.seed)
    data = load_run_data(cfg, log=lambda m: None)
    method = build_method(cfg, 3)
    opt = torch.optim.Adam(method.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augment = Augmenter(AugmentConfig(size=cfg.image_size), data.mean, data.std)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = BatchLoader(data.train.images, cfg.batch_size, seed=cfg.seed)
    plain, step = [], 0
    for epoch in range(cfg.epochs):
        for images, _ in loader.epoch(epoch):
            for group in opt.param_groups:
                group["lr"] = cfg.lr * lr_factor(step, len(loader), cfg.epochs, cfg.warmup_iters, cfg.schedule)
            # one process at step `step`: the method's random draws (W-MSE's slices) seeded by (seed, step)
            loss = method(augment(images, cfg.n_views, generator=gen), ProcessContext(step=step, seed=cfg.seed))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            plain.append(loss.item())
            step += 1
    assert plain == logged and len(plain) == 6
