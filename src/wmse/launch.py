"""`wmse pretrain --nproc K`: start K processes on this machine with torchrun (DDP), one per GPU or CPU share.

Equivalent to ``torchrun --standalone --nproc_per_node K -m wmse pretrain ...`` without the ``--nproc`` flag.
For several machines call torchrun yourself (see the README's multi-GPU section).
"""

from __future__ import annotations

import os
import subprocess
import sys

from .config import Config
from .distributed import check_batch

__all__ = ["launch", "torchrun_command", "strip_nproc"]


def strip_nproc(argv: list[str]) -> list[str]:
    """Remove ``--nproc K`` / ``--nproc=K`` so the launched processes do not launch again."""
    out: list[str] = []
    skip = False
    for tok in argv:
        if skip:
            skip = False
        elif tok == "--nproc":
            skip = True
        elif not tok.startswith("--nproc="):
            out.append(tok)
    return out


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command line :func:`launch` runs: torchrun (single node, free port) of ``python -m wmse argv``."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "wmse", *strip_nproc(argv)]


def launch(nproc: int, argv: list[str], cfg: Config) -> int:
    """Run ``wmse <argv>`` in ``nproc`` processes under torchrun and return its exit status.

    Args:
        nproc: processes on this machine (one per GPU on CUDA; on CPU each takes ``--threads`` cores).
        argv: the command line after ``wmse`` (``pretrain ... --nproc K``); ``--nproc`` is dropped.
        cfg: the config that command line gives (checked here once, not once per process).

    Raises:
        ValueError: ``nproc`` < 1, or the batch cannot be split over ``nproc`` processes.
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    check_batch(cfg, nproc)
    env = dict(os.environ)
    # torchrun would set 1 thread per process with a warning; say it here, --threads overrides it in the loop
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(torchrun_command(nproc, argv), env=env)
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:  # Ctrl-C reached torchrun and the workers too: they checkpoint and stop
            continue
