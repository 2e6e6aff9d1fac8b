"""The data fingerprint of a run: a per-image hash checked against a naive reference, and the change it
reports for added, removed, edited, relabelled and reordered images."""

from __future__ import annotations

import numpy as np
import torch

from wmse.fingerprint import _image_hashes, _weights, data_fingerprint, fingerprint_change


def _naive_hash(image: torch.Tensor, label: int) -> int:
    data = image.numpy().tobytes()
    data += b"\0" * ((-len(data)) % 8)
    words = [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8)]
    w = [int(x) for x in _weights(len(words) + 1)]
    m = 2**64
    h = sum(x * y for x, y in zip(words, w[:-1])) % m
    return h ^ ((label % m) * w[-1] % m) ^ (h >> 29)


def test_image_hashes_match_a_naive_loop():
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (5, 3, 5, 7), dtype=torch.uint8, generator=g)  # 105 bytes: padded
    labels = torch.tensor([0, 1, 2, -1, 7])
    got = _image_hashes(images, labels)
    assert [int(h) for h in got] == [_naive_hash(images[i], int(labels[i])) for i in range(5)]


def test_the_change_names_what_was_added_removed_and_relabelled():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 2
    base = data_fingerprint([(images[:30], labels[:30])], ["a", "b"])
    assert fingerprint_change(base, data_fingerprint([(images[:30].flip(0), labels[:30].flip(0))], ["a", "b"])) is None
    grown = data_fingerprint([(images[:35], labels[:35])], ["a", "b"])
    assert fingerprint_change(base, grown).startswith("5 image(s) added, 0 removed (30 -> 35")
    edited = images[:30].clone()
    edited[3, 0, 0, 0] ^= 1  # one bit of one image
    assert fingerprint_change(base, data_fingerprint([(edited, labels[:30])], ["a", "b"])).startswith(
        "1 image(s) added, 1 removed")
    relabelled = labels[:30].clone()
    relabelled[0] = 1 - relabelled[0]
    assert "1 removed" in fingerprint_change(base, data_fingerprint([(images[:30], relabelled)], ["a", "b"]))
    assert "classes [a, b] (2) -> [a, c] (2)" in fingerprint_change(base, data_fingerprint(
        [(images[:30], labels[:30])], ["a", "c"]))
    dup = data_fingerprint([(images[:30], labels[:30]), (images[:1], labels[:1])], ["a", "b"])
    assert fingerprint_change(base, dup).startswith("1 image(s) added, 0 removed")  # a duplicate counts
    assert base["items"].dtype == torch.int64 and base["n"] == 30
