"""Faults as a user meets them, through the `wmse` command in a subprocess: run directories are never reused
or written by two processes, exit statuses say what happened, a diverging run keeps its last finite
checkpoint, filesystem faults are one line, resume never duplicates metrics."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from wmse.checkpoint import load_checkpoint
from wmse.methods import METHODS, ONE_PROCESS, WMSE
from wmse.progress import read_metrics
from wmse.run_directory import RunDirectory

TINY = ["--preset", "cifar10-quick", "--arch", "small", "--image_size", "16", "--emb", "8", "--head_hidden", "32",
        "--w_size", "16", "--batch_size", "32", "--precision", "fp32", "--final_eval", "false", "--threads", "1",
        "--eval_every", "1", "--log_every", "1", "--linear_epochs", "5"]


def wmse(*args, env=None, timeout=300, preexec_fn=None, cwd=None):
    """Run `python -m wmse ARGS`; returns the CompletedProcess (text)."""
    env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "wmse", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn, cwd=cwd)


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def assert_one_line_error(proc, status: int, *words: str) -> None:
    assert proc.returncode == status, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    line = last_line(proc)
    assert line.startswith("wmse "), proc.stderr[-2000:]
    for w in words:
        assert w in line, line


@pytest.fixture
def env(tmp_path):
    return {"WMSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def train_losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run) if r["kind"] == "train"]


# ---------------------------------------------------------------------------------------------------------
# 1. mixed sizes: --resize


def test_mixed_size_folder_needs_and_takes_resize(tmp_path, env):
    folder = tmp_path / "mixed"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(40):
            h, w = (20, 30) if i % 2 else (24, 18)
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / c / f"{i}.png")
    common = [*TINY, "--data_dir", folder, "--out_dir", tmp_path / "runs", "--max_steps", "1"]
    proc = wmse("pretrain", *common, "--run_name", "nosize", env=env)
    assert_one_line_error(proc, 2, "different sizes", "--resize")
    proc = wmse("pretrain", *common, "--run_name", "sized", "--resize", "16", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert load_checkpoint(tmp_path / "runs" / "sized")["config"]["resize"] == 16
    proc = wmse("pretrain", "--preset", "quick", "--resize", "20", "--out_dir", tmp_path / "runs", env=env)
    assert_one_line_error(proc, 2, "resize", "fashion_mnist")


def test_imagenet100_presets_resize_their_images():
    from wmse.config import get_preset

    for name in ("imagenet100-wmse2", "imagenet100-wmse4"):
        cfg = get_preset(name)
        assert cfg.resize is not None and cfg.resize >= cfg.image_size and cfg.eval_resize == cfg.resize


# ---------------------------------------------------------------------------------------------------------
# 2. run directories: never reused, one writer at a time


def test_a_reused_run_name_is_refused_and_the_first_run_is_untouched(tiny_folder, tmp_path, env):
    common = [*TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r", "--epochs", "1"]
    assert wmse("pretrain", *common, env=env).returncode == 0
    run = tmp_path / "r"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    proc = wmse("pretrain", *common, "--lr", "1e-2", env=env)
    assert_one_line_error(proc, 2, "already exists", "--resume")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_a_run_directory_being_written_is_locked(tiny_folder, tmp_path, env):
    common = [*TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r", "--epochs", "1"]
    assert wmse("pretrain", *common, "--max_steps", "1", env=env).returncode == 0
    holder = RunDirectory.existing(tmp_path / "r")
    holder.lock()  # as a training process holds it
    try:
        proc = wmse("pretrain", "--resume", tmp_path / "r", env=env)
        assert_one_line_error(proc, 2, "being written by another wmse process", f"pid {os.getpid()}")
    finally:
        holder.close()
    assert wmse("pretrain", "--resume", tmp_path / "r", env=env).returncode == 0  # released: resumes


def test_two_runs_started_at_once_get_two_directories(tiny_folder, tmp_path, env):
    """Without --run_name the name is a time stamp: two runs of one second get distinct directories."""
    args = ["pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--max_steps", "1"]
    procs = [subprocess.Popen([sys.executable, "-m", "wmse", *map(str, args)], env={**os.environ, **env},
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    runs = sorted(p for p in tmp_path.iterdir() if p.name.startswith("cifar10-quick-"))
    assert len(runs) == 2
    for r in runs:
        assert len(train_losses(r)) == 1  # each holds its own single step


def test_a_startup_error_leaves_no_run_directory(tmp_path, env):
    proc = wmse("pretrain", *TINY, "--data_dir", tmp_path / "missing", "--out_dir", tmp_path / "runs",
                "--run_name", "r", env=env)
    assert_one_line_error(proc, 2, "--data_dir")
    assert not (tmp_path / "runs").exists()  # neither the run directory nor the --out_dir made for it


# ---------------------------------------------------------------------------------------------------------
# 3. exit statuses and the printed resume command


def test_the_printed_continue_command_continues(tiny_folder, tmp_path, env):
    proc = wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r",
                "--epochs", "2", "--max_steps", "2", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    command = last_line(proc).split("continue with: ")[1].split()
    assert command[:3] == ["wmse", "pretrain", "--resume"]
    proc = wmse(*command[1:], env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = load_checkpoint(tmp_path / "r")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 6  # to the end, not one more step


def test_resuming_a_finished_run_does_nothing(tiny_folder, tmp_path, env):
    run = tmp_path / "r"
    assert wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r",
                "--epochs", "1", env=env).returncode == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    proc = wmse("pretrain", "--resume", run, env=env)
    assert proc.returncode == 0 and "already finished (epoch 1 of 1)" in proc.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == before
    proc = wmse("pretrain", "--resume", run, "--out_dir", tmp_path / "elsewhere", env=env)
    assert_one_line_error(proc, 2, "--out_dir", "--resume")


def test_exit_statuses_are_distinct(tmp_path, env):
    assert wmse("--version").stdout.startswith("wmse ")
    assert_one_line_error(wmse("pretrain", "--nproc", "-1"), 2, "--nproc")
    assert_one_line_error(wmse("pretrain", "--preset", "quick", "--lr", "nan"), 2, "lr", "finite")


# ---------------------------------------------------------------------------------------------------------
# 4. divergence


def test_a_huge_learning_rate_aborts_with_one_line_and_no_checkpoint_damage(tiny_folder, tmp_path, env):
    proc = wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r",
                "--lr", "1e30", "--epochs", "3", "--ckpt_every", "1", "--nonfinite_limit", "4", env=env)
    assert_one_line_error(proc, 1, "non-finite for 4 steps", "learning rate")
    assert "LinAlgError" not in proc.stderr
    line = last_line(proc)
    assert "w_size" not in line  # w_size 16 = 2 * emb 8: not a cause here
    ckpt_dir = tmp_path / "r" / "checkpoints"
    if (ckpt_dir / "last.pt").exists():  # only a finite state is ever saved
        ckpt = load_checkpoint(tmp_path / "r")
        assert all(torch.isfinite(v).all() for v in ckpt["method"].values() if v.is_floating_point())
    assert not list(ckpt_dir.glob("*.tmp")) if ckpt_dir.exists() else True


@dataclass(frozen=True)
class _NanOptions:
    nan_steps: tuple[int, ...] = ()  # the steps (1-based) whose loss is NaN


@pytest.fixture
def nan_method():
    """W-MSE whose loss is NaN at given steps (the forward pass still moves BatchNorm statistics); it keeps
    a copy of its whole state at the start of every step in ``snapshots``."""

    @METHODS.register("wmse_nan")
    class NanAt(WMSE):
        Options = _NanOptions
        snapshots: list[dict] = []

        @classmethod
        def from_config(cls, cfg, backbone):
            m = cls(backbone, cls.default_head(cfg, backbone), cfg.n_views, cfg.w_size)
            m.nan_steps, m.calls = set(cfg.nan_steps), 0
            return m

        @classmethod
        def validate_config(cls, cfg):
            pass

        def loss(self, views, ctx=ONE_PROCESS):
            self.snapshots.append({k: v.clone() for k, v in self.state_dict().items()})
            self.calls += 1
            loss = super().loss(views, ctx)
            return loss * float("nan") if self.calls in self.nan_steps else loss

    yield NanAt
    METHODS.remove("wmse_nan")


def test_skipped_steps_leave_the_model_exactly_as_it_was(nan_method, tiny_folder, tmp_path, make_config):
    from wmse.train import pretrain

    cfg = make_config(tiny_folder, tmp_path, method="wmse_nan", nan_steps=(5, 6), epochs=4, max_steps=7)
    pretrain(cfg, log=lambda m: None)
    after_4, after_6 = nan_method.snapshots[4], nan_method.snapshots[6]  # states at the start of steps 5 and 7
    assert any("running_mean" in k for k in after_4)
    for k, v in after_4.items():  # BatchNorm statistics and num_batches_tracked included
        torch.testing.assert_close(after_6[k], v, rtol=0, atol=0, msg=k)
    assert not torch.equal(nan_method.snapshots[3]["head.1.running_mean"], after_4["head.1.running_mean"])


def test_an_abort_keeps_the_last_finite_checkpoint(nan_method, tiny_folder, tmp_path, make_config):
    from wmse.errors import TrainingError
    from wmse.train import pretrain

    # 3 steps an epoch, a checkpoint every epoch: epoch 1 finite (checkpoint at step 3), NaN from step 5 on;
    # epoch 2 ends inside the streak (no checkpoint), the 3rd NaN in a row aborts in epoch 3
    cfg = make_config(tiny_folder, tmp_path, method="wmse_nan", nan_steps=tuple(range(5, 20)), epochs=4,
                      ckpt_every=1, nonfinite_limit=3)
    with pytest.raises(TrainingError, match=r"non-finite for 3 steps.*last finite checkpoint \(step 3\)") as err:
        pretrain(cfg, log=lambda m: None)
    assert "w_size" not in str(err.value)  # w_size 16 = 2 * emb 8
    kept = load_checkpoint(tmp_path / "run")
    assert kept["step"] == 3
    for k, v in nan_method.snapshots[3].items():  # the state of step 3, BatchNorm statistics included
        torch.testing.assert_close(kept["method"][k], v, rtol=0, atol=0, msg=k)
    small = cfg.replace(w_size=16, emb=12)
    from wmse.methods import WMSE as W

    assert any("w_size (16) below 2*emb (24)" in h for h in W.nonfinite_hints(small))


# ---------------------------------------------------------------------------------------------------------
# 5. filesystem faults


def test_an_out_dir_that_cannot_be_made_is_one_line(tiny_folder, tmp_path, env):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", blocker / "runs", env=env)
    assert_one_line_error(proc, 2, str(blocker))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories; the not-a-directory "
                                               "case above covers the unwritable path as root")
def test_a_read_only_out_dir_is_one_line(tiny_folder, tmp_path, env):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    proc = wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", ro, "--run_name", "r", env=env)
    assert_one_line_error(proc, 2, str(ro))


def _file_size_limit(limit: int):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG, as on a full disk (ENOSPC)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(tiny_folder, tmp_path, env):
    run = tmp_path / "r"
    assert wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r",
                "--epochs", "1", env=env).returncode == 0
    good = (run / "checkpoints" / "last.pt").read_bytes()
    assert len(good) > 200_000
    proc = wmse("pretrain", "--resume", run, "--epochs", "2", env=env, preexec_fn=_file_size_limit(100_000))
    assert_one_line_error(proc, 2, str(run / "checkpoints"))
    assert (run / "checkpoints" / "last.pt").read_bytes() == good
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # no partial file


def test_embed_on_a_full_disk_leaves_no_partial_files(tiny_folder, tmp_path, env):
    run = tmp_path / "r"
    assert wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r",
                "--epochs", "1", "--max_steps", "1", env=env).returncode == 0
    out = tmp_path / "emb"
    proc = wmse("embed", run, "--out", out, env=env, preexec_fn=_file_size_limit(20_000))
    assert_one_line_error(proc, 2, str(out), "File too large")
    assert not out.exists() or not [p for p in out.iterdir()]
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_one_line_error(wmse("embed", run, "--out", blocker / "emb", env=env), 2, str(blocker))


def test_orphan_temporary_files_are_removed_on_resume(tiny_folder, tmp_path, env):
    run = tmp_path / "r"
    assert wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r",
                "--epochs", "2", "--max_steps", "1", env=env).returncode == 0
    orphan = run / "checkpoints" / "last.pt.k1ll3d.tmp"  # what a kill -9 during torch.save leaves
    orphan.write_bytes(b"partial")
    assert wmse("pretrain", "--resume", run, env=env).returncode == 0
    assert not orphan.exists()


# ---------------------------------------------------------------------------------------------------------
# 6. no duplicate metrics after a resume


def test_resume_drops_what_a_killed_run_logged_after_its_checkpoint(tiny_folder, tmp_path, env):
    from torch.utils.tensorboard import SummaryWriter
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    common = [*TINY, "--data_dir", tiny_folder, "--epochs", "2"]
    assert wmse("pretrain", *common, "--out_dir", tmp_path / "a", "--run_name", "r", env=env).returncode == 0
    full = train_losses(tmp_path / "a" / "r")
    run = tmp_path / "b" / "r"
    assert wmse("pretrain", *common, "--out_dir", tmp_path / "b", "--run_name", "r", "--max_steps", "3",
                env=env).returncode == 0
    # what a run killed -9 in step 6 leaves after its checkpoint of step 3: steps 4-5 logged, a cut line
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"kind": "train", "step": 4, "loss": 9.0}\n{"kind": "train", "step": 5, "loss": 9.0}\n'
                '{"kind": "train", "step": 6, "lo')
    tb = SummaryWriter(str(run / "tb"))
    for step in (4, 5):
        tb.add_scalar("train/loss", 9.0, step)
    tb.close()
    assert wmse("pretrain", "--resume", run, env=env).returncode == 0
    assert train_losses(run) == full  # every step once, with the values of an uninterrupted run
    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [s for s, _ in logged] == [s for s, _ in full]
    assert all(v != 9.0 for _, v in logged)


# ---------------------------------------------------------------------------------------------------------
# 8. without --preset: the paper's recipe for the dataset, said and recorded


def test_without_a_preset_a_folder_gets_the_papers_recipe_at_its_image_size(tiny_folder, tmp_path, env):
    proc = wmse("pretrain", "--dataset", "folder", "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name",
                "r", "--max_steps", "1", "--batch_size", "32", "--w_size", "16", "--emb", "8", "--precision", "fp32",
                "--threads", "1", "--epochs", "1", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no --preset given: using folder-wmse2" in proc.stderr
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert saved["_based_on_preset"] == "folder-wmse2"
    assert saved["crop_scale"] == [0.2, 1.0] and saved["grayscale_p"] == 0.1 and saved["arch"] == "resnet18"
    assert saved["image_size"] == 16  # the images' side
    assert saved["_changed_from_preset"]["batch_size"] == 32 and "crop_scale" not in saved["_changed_from_preset"]
    assert "differs from it in: " in proc.stderr and "batch_size=32" in proc.stderr


def test_without_a_preset_a_named_dataset_gets_its_table1_recipe():
    from wmse.config import preset_for_dataset

    assert preset_for_dataset("stl10") == "stl10-wmse2" and preset_for_dataset(None) == "cifar10-wmse2"
    assert preset_for_dataset("fashion_mnist") == "quick"


# ---------------------------------------------------------------------------------------------------------
# 9. small ones


def test_a_holdout_that_cannot_be_evaluated_fails_before_training(tmp_path, env):
    folder = tmp_path / "few"
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(20 if c == "a" else 5):
            Image.fromarray(np.full((16, 16, 3), 40 * i % 255, np.uint8)).save(folder / c / f"{i}.png")
    t0 = time.time()
    proc = wmse("pretrain", *TINY, "--data_dir", folder, "--holdout", "0.9", "--batch_size", "2", "--w_size", "2",
                "--emb", "1", "--out_dir", tmp_path / "runs", "--run_name", "r", env=env)
    assert_one_line_error(proc, 2, "holdout=0.9", "knn_k")
    assert not (tmp_path / "runs" / "r").exists() and time.time() - t0 < 60


def test_evaluate_uses_the_runs_probe_epochs_by_default(tiny_folder, tmp_path, env):
    run = tmp_path / "r"
    assert wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r",
                "--epochs", "1", "--linear_epochs", "7", env=env).returncode == 0
    proc = wmse("evaluate", run, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "eval.json").read_text())["linear"]["epochs"] == 7
    assert "linear probe: 7 epochs" in proc.stderr


def test_a_checkpoint_of_the_earlier_format_resumes_and_evaluates(tiny_folder, tmp_path, env):
    """Checkpoints written before the config gained fields (resize, optimizer, ...), before train_seconds and
    before the method fields took their method's prefix (tau -> byol_tau, ...) load with the new fields at
    their defaults and the renamed ones at their values: resume and evaluate work."""
    from wmse.checkpoint import save_atomic
    from wmse.config import RunFields, all_fields

    run = tmp_path / "r"
    assert wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r",
                "--epochs", "2", "--max_steps", "2", "--w_whitening", "zca", env=env).returncode == 0
    ckpt = load_checkpoint(run)
    old_fields = ("resize", "eval_data_dir", "optimizer", "momentum", "head_layers", "lr_end_factor", "solarize_p",
                  "sync_every", "augment_batches", "max_minutes")
    assert set(old_fields) <= set(all_fields()) and "w_size" not in {f for f in vars(RunFields())}
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in old_fields}
    former = {"w_whitening": "whitening", "w_global": "whiten_global", "contrastive_temperature": "temperature",
              "byol_tau": "tau", "byol_predictor_hidden": "predictor_hidden", "vicreg_sim_weight": "sim_weight",
              "vicreg_var_weight": "var_weight", "vicreg_cov_weight": "cov_weight", "barlow_lambd": "lambd"}
    ckpt["config"] = {former.get(k, k): v for k, v in ckpt["config"].items()}
    assert ckpt["config"]["whitening"] == "zca" and "byol_tau" not in ckpt["config"]
    del ckpt["train_seconds"]
    save_atomic(ckpt, run / "checkpoints" / "last.pt")
    assert wmse("pretrain", "--resume", run, env=env).returncode == 0
    resumed = load_checkpoint(run)
    assert resumed["step"] == 6 and resumed["config"]["w_whitening"] == "zca" and "whitening" not in resumed["config"]
    assert wmse("evaluate", run, "--linear_epochs", "2", env=env).returncode == 0


def test_a_folder_dataset_scores_on_its_own_test_archive(tiny_folder, tmp_path, env):
    """--eval_data_dir: the classifiers fit on all of --data_dir and are scored on the named test folder or
    archive, in the final evaluation and in `wmse evaluate` alike; misuse is one line."""
    import zipfile

    archive = tmp_path / "test.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(tiny_folder.rglob("*.png"))[::4]:
            z.write(p, f"test/{p.parent.name}/{p.name}")
    run = tmp_path / "r"
    proc = wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--eval_data_dir", archive, "--out_dir", tmp_path,
                "--run_name", "r", "--epochs", "1", "--final_eval", "true", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    note = json.loads((run / "final_eval.json").read_text())["note"]
    assert f"scored on {archive} (32 images)" in note and "(128 labelled images)" in note
    proc = wmse("evaluate", run, "--linear_epochs", "2", env=env)
    assert proc.returncode == 0 and f"scored on {archive}" in json.loads((run / "eval.json").read_text())["note"]
    assert_one_line_error(wmse("pretrain", "--preset", "quick", "--eval_data_dir", archive, env=env), 2,
                          "eval_data_dir", "fashion_mnist")
    assert_one_line_error(wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--eval_data_dir", archive,
                               "--eval_split", "train", env=env), 2, "eval_data_dir", "eval_split")
