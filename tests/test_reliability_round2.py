"""Faults of the second reliability round (issue 19), as a user meets them: through the `wmse` command in a
subprocess, with files on disk. A failed embed keeps the previous one; a run name is blocked only by a run;
full disks name the file and leave no partial files; config faults fail before the first step; the final
evaluation is never lost; a diverged run does not exit 0; resuming on changed data is refused."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_reliability import TINY, _file_size_limit, assert_one_line_error, wmse

EMBED = ("backbone.json", "features.npy", "labels.npy", "paths.txt", "backbone.safetensors")


@pytest.fixture
def env(tmp_path):
    return {"WMSE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _pretrain(tiny_folder, tmp_path, env, *extra, name="r"):
    proc = wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", name, *extra,
                env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path / name


# ---------------------------------------------------------------------------------------------------------
# item 1: the files of one embed appear together or not at all


def test_a_failed_embed_keeps_the_previous_embed_whole(tiny_folder, tmp_path, env):
    run = _pretrain(tiny_folder, tmp_path, env, "--epochs", "2", "--max_steps", "1")
    out = run / "embed" / "train"
    assert wmse("embed", run, env=env).returncode == 0
    before = _files(out)
    assert set(before) == set(EMBED)
    assert wmse("pretrain", "--resume", run, env=env).returncode == 0  # trained on: a new embed differs
    # a file size limit between the small files and the backbone: the backbone's write fails last
    small = max(len(before[n]) for n in ("features.npy", "labels.npy", "paths.txt"))
    limit = small + 1024
    assert limit < len(before["backbone.safetensors"])
    proc = wmse("embed", run, env=env, preexec_fn=_file_size_limit(limit))
    assert_one_line_error(proc, 2, str(out / "backbone.safetensors"), "File too large")
    assert _files(out) == before  # all four, as they were
    assert sorted(p.name for p in out.parent.iterdir()) == ["train"]  # no temporary folder left
    assert wmse("embed", run, env=env).returncode == 0
    after = _files(out)
    assert set(after) == set(EMBED) and after["features.npy"] != before["features.npy"]


def test_an_embed_killed_at_the_swap_keeps_the_previous_one(tiny_folder, tmp_path, env, monkeypatch):
    """In-process: the swap itself fails (as a kill at that point would stop it), and the system without an
    atomic exchange (two renames) replaces the whole set too."""
    from wmse import fileio
    from wmse.trained import embed_run

    run = _pretrain(tiny_folder, tmp_path, env, "--epochs", "1", "--max_steps", "1")
    out = tmp_path / "emb"
    embed_run(run, out_dir=out, device="cpu", log=lambda m: None)
    before = _files(out)

    def killed(new, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio, "_swap_in", killed)
    with pytest.raises(KeyboardInterrupt):
        embed_run(run, out_dir=out, head=True, device="cpu", log=lambda m: None)
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    monkeypatch.undo()
    monkeypatch.setattr(fileio, "_exchange", lambda a, b: False)
    embed_run(run, out_dir=out, head=True, device="cpu", log=lambda m: None)
    after = _files(out)
    assert set(after) == set(before) and after["features.npy"] != before["features.npy"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".emb.")]


def test_embed_never_replaces_a_folder_holding_the_users_files(tiny_folder, tmp_path, env):
    run = _pretrain(tiny_folder, tmp_path, env, "--epochs", "1", "--max_steps", "1")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "draft.v2.tmp").write_text("mine too")  # named like a temporary, but not of an embed's file
    (tmp_path / "list.2024.tmp").write_text("mine")
    assert_one_line_error(wmse("embed", run, "--out", out, env=env), 2, str(out), "notes.txt")
    assert sorted(p.name for p in out.iterdir()) == ["draft.v2.tmp", "notes.txt"]
    assert (tmp_path / "list.2024.tmp").read_text() == "mine"


def test_orphan_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tiny_folder, tmp_path, env):
    run = _pretrain(tiny_folder, tmp_path, env, "--epochs", "1", "--max_steps", "1")
    assert wmse("embed", run, env=env).returncode == 0
    emb = run / "embed"
    dead = [emb / "train" / "features.npy.k1ll3d.tmp", emb / ".train.d3ad.tmp", run / "eval.json.x9.tmp"]
    dead[0].write_bytes(b"partial")
    dead[1].mkdir()
    (dead[1] / "features.npy").write_bytes(b"partial")
    dead[2].write_bytes(b"")
    live = emb / ".train.l1ve.tmp"  # the folder of an embed still being written: its writer holds the lock
    live.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert wmse("embed", run, env=env).returncode == 0
        assert wmse("evaluate", run, "--no_linear", env=env).returncode == 0
        assert not any(p.exists() for p in dead)
        assert live.exists()
    finally:
        os.close(fd)
    assert sorted(p.name for p in (emb / "train").iterdir()) == sorted(EMBED)


# ---------------------------------------------------------------------------------------------------------
# item 11: a directory that holds no run does not block its name


def test_a_run_killed_while_loading_does_not_block_its_name(tiny_folder, tmp_path, env):
    from wmse.run_directory import RunDirectory

    run = tmp_path / "r"
    (run / "checkpoints").mkdir(parents=True)  # what a kill during data loading leaves: the lock, empty folders
    (run / ".lock").write_text("999999\n")
    common = [*TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r", "--epochs", "1",
              "--max_steps", "1"]
    proc = wmse("pretrain", "--resume", run, env=env)
    assert_one_line_error(proc, 2, "no checkpoint", "start it anew")
    holder = RunDirectory.existing(run)
    holder.lock()  # a live process still holding it: refused
    try:
        assert_one_line_error(wmse("pretrain", *common, env=env), 2, "being written by another wmse process")
    finally:
        holder.close()
    proc = wmse("pretrain", *common, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / "checkpoints" / "last.pt").is_file() and (run / "config.json").is_file()


def test_a_directory_holding_any_file_still_blocks_its_name(tiny_folder, tmp_path, env):
    run = tmp_path / "r"
    (run / "sub").mkdir(parents=True)
    (run / ".lock").write_text("")
    (run / "sub" / "notes.txt").write_text("the user's")
    proc = wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r", env=env)
    assert_one_line_error(proc, 2, "already exists")
    assert (run / "sub" / "notes.txt").read_text() == "the user's"


# ---------------------------------------------------------------------------------------------------------
# item 12: a full disk names the file, prints no traceback and leaves no partial file


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (root only): ``fill(left)`` fills it up to ``left`` free bytes."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root): the full-disk cases need a small filesystem")

    def fill(left: int) -> None:
        st = os.statvfs(disk)
        (disk / "filler").write_bytes(b"x" * max(0, st.f_bavail * st.f_frsize - left))

    yield disk, fill
    subprocess.run(["umount", str(disk)], check=True)


def test_a_disk_filling_up_during_training_is_one_line_naming_the_file(tiny_folder, small_disk, env):
    disk, fill = small_disk
    fill(24 * 1024)  # room for the config and a few metrics, not for a checkpoint
    proc = wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", disk, "--run_name", "r", "--epochs",
                "30", "--ckpt_every", "100", env=env)
    assert_one_line_error(proc, 2, str(disk / "r"), "No space left on device")
    assert "Traceback" not in proc.stderr and "Exception in thread" not in proc.stderr


def test_a_failing_tensorboard_writer_is_one_error_naming_its_folder(tmp_path, capfd):
    """The events are written by TensorBoard's thread: its failure is raised by the next write, naming RUN/tb,
    with no thread traceback on stderr."""
    import errno
    import time

    from wmse.progress import MetricsLog

    class Full:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        flush = write

        def close(self):
            pass

    log = MetricsLog(tmp_path)
    log.tb._get_file_writer().event_writer._async_writer._writer._writer = Full()
    with pytest.raises(OSError) as err:
        for step in range(200):
            log.write("train", step, loss=1.0)
            time.sleep(0.01)
    log.close()
    assert err.value.filename == str(tmp_path / "tb") and err.value.errno == errno.ENOSPC
    assert capfd.readouterr().err == ""


def test_report_on_a_full_disk_names_the_file_and_leaves_no_empty_file(tiny_folder, tmp_path, small_disk, env):
    import shutil

    disk, fill = small_disk
    run = _pretrain(tiny_folder, tmp_path, env, "--epochs", "2")
    shutil.copytree(run, disk / "r", ignore=shutil.ignore_patterns("checkpoints"))
    fill(8 * 1024)
    proc = wmse("report", disk / "r", env=env)
    assert_one_line_error(proc, 2, str(disk / "r" / "report"), "No space left on device")
    assert [p.name for p in (disk / "r" / "report").iterdir() if p.stat().st_size == 0] == []
    assert not list((disk / "r" / "report").glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------
# item 13: what a config can be checked for is checked before the first step


def test_an_evaluation_crop_that_cannot_fit_fails_before_training(tiny_folder, tmp_path, env):
    common = [*TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path / "runs", "--run_name", "r", "--epochs", "1"]
    # --resize makes the images 8 px: a 32 px evaluation crop cannot fit (known from the config alone)
    proc = wmse("pretrain", *common, "--resize", "8", "--image_size", "32", env=env)
    assert_one_line_error(proc, 2, "--eval_resize 32", "8x8")
    assert "step 1/" not in proc.stderr
    # the folder's images are 16 px (known once they are loaded): still before the first step
    proc = wmse("pretrain", *common, "--eval_size", "20", env=env)
    assert_one_line_error(proc, 2, "--eval_resize 20", "16x16")
    assert "step 1/" not in proc.stderr and not (tmp_path / "runs").exists()
    proc = wmse("pretrain", *common, "--eval_max_train", "3", env=env)
    assert_one_line_error(proc, 2, "eval_max_train (3)", "knn_k (5)")
    proc = wmse("pretrain", *common, "--eval_size", "20", "--eval_resize", "20", "--max_steps", "1", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]  # a resize that makes it fit: trains and evaluates


# ---------------------------------------------------------------------------------------------------------
# item 5: the final evaluation is never lost


def test_sigterm_during_the_final_evaluation_and_resume_runs_it(tiny_folder, tmp_path, env):
    run = tmp_path / "r"
    args = ["pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r", "--epochs", "1",
            "--final_eval", "true", "--linear_epochs", "3000"]
    proc = subprocess.Popen([sys.executable, "-m", "wmse", *map(str, args)], env={**os.environ, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in proc.stderr:  # the random-init encoder is scored first; stop while the trained one is
        seen.append(line)
        if line.startswith("final eval [random_init]"):
            proc.send_signal(15)
            break
    out, err = proc.communicate(timeout=300)
    err = "".join(seen) + err
    assert proc.returncode == 75, err[-2000:]
    assert "Traceback" not in err and "--resume" in err.strip().splitlines()[-1]
    assert not (run / "final_eval.json").exists() and not list(run.glob("*.tmp"))
    proc = wmse("pretrain", "--resume", run, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "final evaluation is missing" in proc.stderr and "kNN gain over random init" in proc.stdout
    assert json.loads((run / "final_eval.json").read_text())["trained"]["linear_top1"] is not None
    proc = wmse("pretrain", "--resume", run, env=env)
    assert proc.returncode == 0 and "already finished" in proc.stderr  # now it is


def test_a_full_disk_at_the_final_evaluation_leaves_no_partial_file(tiny_folder, tmp_path, small_disk, env):
    import shutil

    disk, fill = small_disk
    run = _pretrain(tiny_folder, tmp_path, env, "--epochs", "1", "--final_eval", "true")
    (run / "final_eval.json").unlink()  # as a run whose final evaluation could not be written
    shutil.copytree(run, disk / "r", ignore=shutil.ignore_patterns("tb", "metrics.jsonl"))
    fill(0)
    proc = wmse("pretrain", "--resume", disk / "r", env=env)
    assert_one_line_error(proc, 2, str(disk / "r" / "final_eval.json"), "No space left on device")
    assert not (disk / "r" / "final_eval.json").exists() and not list((disk / "r").glob("*.tmp"))
    (disk / "filler").unlink()
    proc = wmse("pretrain", "--resume", disk / "r", env=env)
    assert proc.returncode == 0 and "kNN gain over random init" in proc.stdout, proc.stderr[-2000:]
    assert json.loads((disk / "r" / "final_eval.json").read_text())["trained"]["knn_top1"] is not None


# ---------------------------------------------------------------------------------------------------------
# item 6: a diverged run does not exit 0


def test_a_diverged_run_without_a_checkpoint_exits_1_and_says_so(tiny_folder, tmp_path, env):
    proc = wmse("pretrain", *TINY, "--data_dir", tiny_folder, "--out_dir", tmp_path, "--run_name", "r",
                "--lr", "1e30", "--epochs", "1", env=env)
    assert_one_line_error(proc, 1, "no checkpoint")
    assert "the previous checkpoint stays" not in proc.stderr
    assert not (tmp_path / "r" / "checkpoints" / "last.pt").exists()


@pytest.fixture
def huge_loss_method():
    """W-MSE plus sqrt(0): the loss is finite, its gradient is not, so the update makes the weights non-finite."""
    from wmse.methods import METHODS, ONE_PROCESS, WMSE

    @METHODS.register("wmse_huge")
    class Huge(WMSE):
        def loss(self, views, ctx=ONE_PROCESS):
            w = next(self.parameters())
            return super().loss(views, ctx) + (w - w.detach()).sum().sqrt()  # value 0, gradient infinite

    yield Huge
    METHODS.remove("wmse_huge")


@pytest.mark.parametrize("sync_every", [1, 3])  # the step skipped on the host, and on the device
def test_an_update_that_makes_the_weights_non_finite_is_a_non_finite_step(huge_loss_method, tiny_folder, tmp_path,
                                                                           make_config, sync_every):
    from wmse.errors import TrainingError
    from wmse.progress import read_metrics
    from wmse.train import pretrain

    cfg = make_config(tiny_folder, tmp_path, method="wmse_huge", epochs=1, max_steps=1, sync_every=sync_every,
                      warmup_iters=0)
    with pytest.raises(TrainingError, match="no checkpoint was written"):
        pretrain(cfg, log=lambda m: None)
    first = [r for r in read_metrics(tmp_path / "run") if r["kind"] == "train"][0]
    assert np.isfinite(first["loss"]) and first["nonfinite_skipped"] == 1
    assert not (tmp_path / "run" / "checkpoints" / "last.pt").exists()


def test_a_learning_rate_beyond_float32_is_refused_before_training(tmp_path, env):
    assert_one_line_error(wmse("pretrain", "--preset", "quick", "--lr", "1e39", env=env), 2, "lr", "1e+39")


# ---------------------------------------------------------------------------------------------------------
# item 2: resuming on other data is refused


def test_resuming_on_changed_data_is_refused_unless_allowed(tiny_folder, tmp_path, env):
    import shutil

    from wmse.checkpoint import load_checkpoint, save_atomic

    data = tmp_path / "data"
    shutil.copytree(tiny_folder, data)
    run = tmp_path / "r"
    proc = wmse("pretrain", *TINY, "--data_dir", data, "--out_dir", tmp_path, "--run_name", "r", "--epochs", "3",
                "--max_steps", "1", env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rng = np.random.default_rng(5)
    for c in ("red", "blue"):
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(data / c / f"new{i}.png")
    (data / "red" / "000.png").unlink()
    before = load_checkpoint(run)["step"]
    proc = wmse("pretrain", "--resume", run, "--max_steps", "2", env=env)
    assert_one_line_error(proc, 2, "10 image(s) added, 1 removed", "--allow_data_change")
    assert load_checkpoint(run)["step"] == before
    proc = wmse("pretrain", "--resume", run, "--max_steps", "2", "--allow_data_change", env=env)
    assert proc.returncode == 0 and "continuing on changed data" in proc.stderr, proc.stderr[-2000:]
    ckpt = load_checkpoint(run)
    assert ckpt["step"] == 2 and ckpt["data"]["n"] == 128 + 10 - 1
    del ckpt["data"]  # a checkpoint of an earlier wmse
    save_atomic(ckpt, run / "checkpoints" / "last.pt")
    proc = wmse("pretrain", "--resume", run, "--max_steps", "3", env=env)
    assert proc.returncode == 0 and "records no data fingerprint" in proc.stderr, proc.stderr[-2000:]
