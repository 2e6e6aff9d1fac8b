"""Optional mirrors of the metrics records: Weights & Biases (``--wandb_project NAME``, off by default).

RUN/metrics.jsonl and TensorBoard are written by :class:`wmse.progress.MetricsLog` as always; a mirror gets
every record it writes (``write``) and, at the end of a run with a final evaluation, the final table
(``final``). W&B needs the optional extra: ``pip install 'wmse[wandb]'``; ``WANDB_MODE=offline`` keeps the
run on disk (``RUN/wandb/``) for a later ``wandb sync``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

__all__ = ["WandbMirror", "open_mirrors", "wandb_available", "check_loggers"]

WANDB_MISSING = "wandb_project needs the wandb package: pip install 'wmse[wandb]' (or pip install wandb)"


def wandb_available() -> bool:
    try:
        import wandb  # noqa: F401
    except ImportError:
        return False
    return True


def check_loggers(wandb_project: str | None) -> None:
    """ValueError (one line, with the fix) before a run starts when a requested logger is not installed."""
    if wandb_project and not wandb_available():
        raise ValueError(WANDB_MISSING)


def _scalars(kind: str, values: dict[str, Any]) -> dict[str, float]:
    """``{"kind/key": value}`` of the finite numbers among ``values`` (lists such as spectra are left out,
    as in TensorBoard)."""
    return {f"{kind}/{k}": v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class WandbMirror:
    """One W&B run per run directory. Its id comes from the directory's path, so ``--resume`` continues the
    same W&B run; its files go to RUN/wandb."""

    def __init__(self, project: str, run_dir: Path, config: dict) -> None:
        import wandb

        run_dir = Path(run_dir)
        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.wandb = wandb
        self.run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir),
                              config=config)

    def write(self, record: dict) -> None:
        """A metrics.jsonl record (kind, step, values) as scalars ``kind/key`` at its step."""
        values = {k: v for k, v in record.items() if k not in ("kind", "step")}
        data = _scalars(str(record["kind"]), values)
        if data:
            self.run.log(data, step=int(record["step"]))

    def final(self, results: dict, note: str) -> None:
        """The final evaluation: a table (encoder, kNN top-1, linear top-1/top-5) and ``final/...`` summary values."""
        columns = ["encoder", "knn_top1", "linear_top1", "linear_top5"]
        rows = [[name] + [r.get(c) for c in columns[1:]] for name, r in results.items()]
        self.run.log({"final_eval": self.wandb.Table(columns=columns, data=rows)})
        for name, r in results.items():
            self.run.summary.update(_scalars(f"final/{name}", r))
        self.run.summary["final/note"] = note

    def close(self) -> None:
        self.run.finish()


def open_mirrors(cfg, run_dir: Path) -> list:
    """The mirrors ``cfg`` asks for (empty by default)."""
    if not cfg.wandb_project:
        return []
    check_loggers(cfg.wandb_project)
    return [WandbMirror(cfg.wandb_project, run_dir, cfg.to_dict())]
