"""`wmse pretrain --auto_resume --run_name NAME`: the same command, run again, continues its run.

A requeued cluster job (SLURM ``--requeue``, a spot machine) and a process group that torchrun restarts
(``--max_restarts``) run the same command line again. With ``--auto_resume`` that command, for the run
``out_dir/NAME``:

- starts the run when the directory does not exist;
- continues it from ``checkpoints/last.pt`` exactly, as ``--resume`` does, when the command's config equals
  the run's; the stop conditions (``max_steps``, ``max_minutes``) are not compared but taken from the
  command, as they belong to one invocation;
- exits at once (status 0, with a note) when the run is finished: all its epochs done, or the command's
  ``max_steps`` reached;
- is refused (one line naming the fields and both values) when any other field differs: that is another
  run, or a deliberate change that ``--resume RUN --field value`` makes;
- starts over a directory that holds no checkpoint yet (a run stopped before its first one: its logs hold
  steps that will be trained again identically), after checking that it is this command's run and that no
  process is writing it.

Under torchrun rank 0 decides and every rank follows its decision (one broadcast), so the ranks agree even
while rank 0 creates the directory.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, validate

if TYPE_CHECKING:
    from .checkpoint import Checkpoint

__all__ = ["plan", "decide", "Decision", "STOP_CONDITIONS"]

# Fields of one invocation: the same command may set new ones (as with --resume).
STOP_CONDITIONS = ("max_steps", "max_minutes")
# Fields a run resolves when it starts (None: the images' own side); None in the command matches any value.
_RESOLVED_AT_START = ("image_size",)
# What a run directory holds before its first checkpoint (and the temporary files of an atomic write).
_RUN_FILES = {".lock", "config.json", "metrics.jsonl", "tb", "checkpoints"}


@dataclass
class Decision:
    """What the command does: ``action`` "new" | "resume" | "finished" | "refused"; ``message`` for the user."""

    action: str
    message: str = ""
    config: dict | None = None  # "resume": the run's config with the command's stop conditions


def differing_fields(command: Config, run: Config) -> dict[str, tuple]:
    """{field: (run's value, command's value)} for the fields --auto_resume compares."""
    mine, theirs = command.values(), run.values()
    return {k: (theirs[k], v) for k, v in mine.items()
            if k not in STOP_CONDITIONS and theirs[k] != v and not (k in _RESOLVED_AT_START and v is None)}


def _refusal(path: Path, diff: dict[str, tuple]) -> Decision:
    shown = ", ".join(f"{k} (run: {a!r}, command: {b!r})" for k, (a, b) in diff.items())
    return Decision("refused", f"--auto_resume: the command's config differs from the run {path}'s in {shown}; "
                               f"give the run's values, another --run_name for a new run, or change the run "
                               f"deliberately with `wmse pretrain --resume {path} --field value`")


def _finished_note(path: Path, ckpt: Checkpoint, cfg: Config) -> str | None:
    """Why the run has nothing left to do for this command, or None."""
    if cfg.max_steps is not None and ckpt.step >= cfg.max_steps:
        return (f"{path} has reached max_steps={cfg.max_steps} (step {ckpt.step}); nothing to do. "
                "A larger --max_steps (or none) continues it")
    if ckpt.epoch >= cfg.epochs and not (cfg.final_eval and not (path / "final_eval.json").is_file()):
        return f"{path} is already finished (epoch {ckpt.epoch} of {cfg.epochs}); nothing to do"
    return None


def _without_checkpoint(path: Path, cfg: Config) -> Decision:
    """A directory with no checkpoint: started over when it is this command's run and nobody writes it."""
    from .run_directory import RunDirectory

    foreign = sorted(p.name for p in path.iterdir() if p.name not in _RUN_FILES and not p.name.endswith(".tmp"))
    if foreign:
        return Decision("refused", f"--auto_resume: {path} exists and is not a wmse run (it holds {foreign[:3]}); "
                                   "pick another --run_name or --out_dir")
    config_json = path / "config.json"
    if config_json.is_file():
        saved = {k: v for k, v in json.loads(config_json.read_text()).items() if not k.startswith("_")}
        diff = differing_fields(cfg, Config.from_dict(saved))
        if diff:
            return _refusal(path, diff)
    holder = RunDirectory.existing(path)
    holder.lock()  # refused (ValueError, one line) while a process writes it
    try:
        shutil.rmtree(path)
    finally:
        holder.close()
    return Decision("new", f"--auto_resume: {path} held no checkpoint (stopped before its first one): "
                           "starting it over")


def decide(cfg: Config) -> Decision:
    """What ``--auto_resume`` does for ``cfg`` (see the module docstring); run by one process (rank 0)."""
    from .checkpoint import read_checkpoint

    path = Path(cfg.out_dir).expanduser() / cfg.run_name
    if not path.exists():
        return Decision("new")
    if not (path / "checkpoints" / "last.pt").is_file():
        return _without_checkpoint(path, cfg)
    ckpt = read_checkpoint(path)
    run_cfg = Config.from_dict(ckpt.config)
    diff = differing_fields(cfg, run_cfg)
    if diff:
        return _refusal(path, diff)
    note = _finished_note(path, ckpt, cfg)
    if note is not None:
        return Decision("finished", note)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    why = f" (restart {restart} of the process group)" if restart else ""
    resumed = run_cfg.replace(**{k: getattr(cfg, k) for k in STOP_CONDITIONS})
    return Decision("resume", f"--auto_resume: continuing {path} from its checkpoint at step {ckpt.step}{why}",
                    resumed.to_dict())


def plan(cfg: Config) -> tuple[Config, Path | None] | None:
    """The config and the run to resume (None: a new run) for ``cfg`` under ``--auto_resume``; None when the
    run is finished (the note is printed). Under torchrun every rank gets rank 0's decision.

    Raises:
        ValueError: the command's config differs from the run's, or its directory is not a run or is in use.
    """
    from . import distributed

    if cfg.run_name is None:
        raise ValueError("--auto_resume needs --run_name NAME: the name the same command finds its run by")
    validate(cfg)
    rt = distributed.setup(cfg)
    decision = None
    if rt.is_main:
        try:
            decision = decide(cfg)
        except (ValueError, OSError) as err:  # another process writes it, a checkpoint that cannot be read
            decision = Decision("refused", str(err))
    decision = distributed.broadcast_object(decision, rt)
    if decision.message and rt.is_main and decision.action != "refused":
        print(f"wmse pretrain: {decision.message}", file=sys.stderr)
    if decision.action in ("refused", "finished"):
        distributed.cleanup(rt)
        if decision.action == "refused":
            raise ValueError(decision.message)
        return None
    if decision.action == "resume":
        return Config.from_dict(decision.config), Path(cfg.out_dir).expanduser() / cfg.run_name
    return cfg, None
