"""Which data a run trained on, recorded in its checkpoints, so ``--resume`` on other data is refused.

The fingerprint is one 64-bit hash per image (its decoded pixels and its label) of the training split and
the evaluation images, plus the image count and the class names. It holds whatever changed the data: files
added, removed or edited, a class renamed, another ``--resize``; and two fingerprints tell how many images
were added and removed. Hashing reads the images in chunks (no second copy of the dataset).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .data.loader import ImageView

__all__ = ["data_fingerprint", "fingerprint_change", "run_fingerprint", "check_resume_data"]

_CHUNK = 4096  # images hashed at once: bounds the temporary to a few MB whatever the dataset's size


def _weights(words: int) -> np.ndarray:
    """Fixed odd 64-bit multipliers, one per 8-byte word of an image (the same in every process and version)."""
    return np.random.default_rng(0x5EED).integers(1, 2**63, size=words, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def _image_hashes(images: Tensor | ImageView, labels: Tensor) -> np.ndarray:
    """(N,) uint64: a multiply-and-add hash of each uint8 image's bytes, mixed with its label. ``images``: a uint8
    (N, C, H, W) tensor or an index view of one (read a chunk at a time)."""
    n = len(images)
    size = int(np.prod(images.shape[1:]))
    pad = (-size) % 8
    words = (size + pad) // 8
    w = _weights(words + 1)
    out = np.empty(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for start in range(0, n, _CHUNK):
            chunk = images[start:start + _CHUNK].reshape(-1, size).cpu().numpy()
            if pad:
                chunk = np.pad(chunk, ((0, 0), (0, pad)))
            x = np.ascontiguousarray(chunk).view(np.uint64)
            h = (x * w[:words]).sum(axis=1, dtype=np.uint64)  # wraps modulo 2**64
            lab = labels[start:start + _CHUNK].cpu().numpy().astype(np.int64).view(np.uint64)
            out[start:start + _CHUNK] = h ^ (lab * w[words]) ^ (h >> np.uint64(29))
    return out


def data_fingerprint(sets: list[tuple[Tensor, Tensor]], classes: list[str] | None) -> dict:
    """The fingerprint of the (uint8 images, labels) sets a run uses, for its checkpoint."""
    hashes = np.concatenate([_image_hashes(images, labels) for images, labels in sets] or [np.empty(0, np.uint64)])
    return {"n": int(len(hashes)), "classes": list(classes) if classes else None,
            "items": torch.from_numpy(np.sort(hashes).view(np.int64).copy())}


def fingerprint_change(old: dict, new: dict) -> str | None:
    """What differs between two fingerprints, in words (None when they are the same data)."""
    a, b = old["items"].numpy().view(np.uint64), new["items"].numpy().view(np.uint64)
    au, ac = np.unique(a, return_counts=True)
    bu, bc = np.unique(b, return_counts=True)
    _, ia, ib = np.intersect1d(au, bu, assume_unique=True, return_indices=True)
    same = int(np.minimum(ac[ia], bc[ib]).sum())
    added, removed = len(b) - same, len(a) - same
    parts = []
    if added or removed:
        parts.append(f"{added} image(s) added, {removed} removed ({len(a)} -> {len(b)}; an edited image counts "
                     "as both)")
    if old.get("classes") != new.get("classes"):
        parts.append(f"classes {_short(old.get('classes'))} -> {_short(new.get('classes'))}")
    return "; ".join(parts) or None


def _short(classes) -> str:
    if not classes:
        return "none"
    return f"[{', '.join(map(str, classes[:4]))}{', ...' if len(classes) > 4 else ''}] ({len(classes)})"


def run_fingerprint(data) -> dict:
    """The fingerprint of a run's data (``splits.RunData``): its training images and the images it is scored on."""
    sets = [(data.train.images, data.train.labels)]
    if data.eval_test_images is not None:
        sets.append((data.eval_test_images, data.eval_test_labels))
    return data_fingerprint(sets, getattr(data.train, "classes", None))


def check_resume_data(ckpt, data, allow_change: bool, log) -> dict:
    """The fingerprint of ``data``; on a resume (``ckpt``, a ``checkpoint.Checkpoint``), ValueError when it is not
    the data the checkpoint recorded, unless ``allow_change`` (then a note). A checkpoint of an earlier wmse
    records none: a note."""
    fingerprint = run_fingerprint(data)
    if ckpt is None:
        return fingerprint
    if ckpt.data is None:
        log("note: the checkpoint records no data fingerprint (written by an earlier wmse), so the data cannot be "
            "checked against the run's")
        return fingerprint
    change = fingerprint_change(ckpt.data, fingerprint)
    if change and not allow_change:
        raise ValueError(f"the data differ from the data this run trained on: {change}; resuming would train on "
                         "other data (and may score images it trained on). Point --data_dir at the run's data, or "
                         "pass --allow_data_change to continue on these")
    if change:
        log(f"note: continuing on changed data (--allow_data_change): {change}")
    return fingerprint
