"""wmse.report: the files exist and are valid PNG (magic bytes, PIL decodes them) and HTML
(html.parser, every <img> points at a file that exists)."""

from __future__ import annotations

import json
import math
import random
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from wmse.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _make_run(run: Path, epochs: int = 40, steps_per_epoch: int = 25, eval_json: bool = True) -> None:
    """A synthetic run directory in the format of `wmse pretrain` / `wmse evaluate`."""
    rnd = random.Random(0)
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(
        {"dataset": "cifar10", "arch": "resnet18", "lr": 3e-3, "epochs": epochs, "w_size": 128,
         "augment": {"crop_scale": [0.2, 1.0], "jitter": 0.4}}))
    lines = []
    total = epochs * steps_per_epoch
    for step in range(0, total, 5):
        lr = 3e-3 * min(1.0, (step + 1) / 100) * (0.2 if step > 0.9 * total else 1.0)
        loss = 0.3 + 1.7 * math.exp(-step / 200) + rnd.gauss(0, 0.05)
        lines.append({"kind": "train", "step": step, "epoch": step // steps_per_epoch,
                      "loss": loss, "lr": lr, "img_per_s": 900.0})
    for epoch in range(5, epochs + 1, 5):
        acc = 90 - 60 * math.exp(-epoch / 10)
        lines.append({"kind": "eval", "epoch": epoch, "step": epoch * steps_per_epoch,
                      "knn_top1": acc})
        decay = 1 + 2 * math.exp(-epoch / 10)  # spectra flatten as training goes on
        lines.append({"kind": "diagnostics", "epoch": epoch, "step": epoch * steps_per_epoch,
                      "feature_eff_rank": 100.0,
                      "spectrum_features": [(i + 1) ** -decay for i in range(512)],
                      "spectrum_embeddings": [(i + 1) ** (-decay / 2) for i in range(64)]})
    text = "\n".join(json.dumps(r) for r in lines) + "\n" + '{"kind": "train", "st'  # truncated
    (run / "metrics.jsonl").write_text(text)
    if eval_json:
        (run / "eval.json").write_text(json.dumps(
            {"epoch": epochs, "knn": {"k": 5, "top1": 88.1},
             "weighted_knn": {"k": 200, "top1": 89.0, "top5": 99.1},
             "linear": {"top1": 91.2, "top5": 99.7}, "note": "held-out split <45000/5000>",
             "diagnostics": {"feature_eff_rank": 120.0, "spectrum_features": [1.0, 0.5]}}))


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag not in ("meta",):
            self.stack.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1:]}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text())
    page.close()
    assert page.stack == [], f"unclosed tags {page.stack}"
    return page


def test_report_writes_valid_pngs_and_html(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _make_run(run)
    index = write_report(run)
    assert index == run / "report" / "index.html"
    page = _parse(index)
    assert sorted(page.imgs) == ["knn.png", "loss_lr.png", "spectrum.png"]
    for src in page.imgs:
        png = index.parent / src
        assert png.read_bytes()[:8] == PNG_MAGIC
        with Image.open(png) as im:
            im.load()  # decodes the whole image
            assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200
    text = " ".join(page.text)
    assert "resnet18" in text and "w_size" in text and "augment.crop_scale" in text  # config
    assert "91.20" in text and "88.10" in text  # final metrics of eval.json
    assert "held-out split <45000/5000>" in text  # escaped, shown as text
    assert "1 unreadable line" in text  # the truncated last line is reported, not fatal


def test_report_skips_missing_plots_with_a_note(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dataset": "stl10"}))
    (run / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 0, "epoch": 0,
                                                   "loss": 1.0, "lr": 0.1}) + "\n")
    index = write_report(run)
    page = _parse(index)
    assert page.imgs == ["loss_lr.png"]
    text = " ".join(page.text)
    assert "knn.png skipped" in text and "spectrum.png skipped" in text
    assert "no eval.json" in text
    assert not (run / "report" / "knn.png").exists()


def test_report_rejects_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="run directory"):
        write_report(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        write_report(tmp_path)
