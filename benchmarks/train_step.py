"""Images/s of a whole W-MSE pretraining step (augment, forward, backward, optimizer), wmse vs the official step.

ResNet-18 at 32 px, d = 2 views, N = 256 images per step, on CIFAR-10 images (the JPEG folder in
../shared/datasets, or random images with --synthetic).

- official: a faithful re-implementation of the official training step: float32, NCHW, torchvision PIL
  transforms (ColorJitter, RandomGrayscale, RandomResizedCrop bicubic, flip, ToTensor, Normalize) applied
  per sample in DataLoader worker processes, the CIFAR ResNet-18, the head, the per-slice whitening loop of
  benchmarks/loss.py, Adam.
- wmse: uint8 images in memory, batched augmentation (wmse.augment), wmse.methods.WMSE, channels_last,
  bf16 autocast or float32 (--precision), Adam.

Each implementation runs in its own subprocess so peak memory (max RSS, or CUDA max allocated) is its own.

    .venv/bin/python benchmarks/train_step.py [--steps 4] [--precision fp32 bf16] [--workers 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CIFAR_DIR = HERE.parent.parent / "shared" / "datasets" / "cifar10-jpeg" / "train"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)


def load_images(n: int, synthetic: bool) -> np.ndarray:
    """(n, 32, 32, 3) uint8 CIFAR-10 images from the JPEG folder (first n files in sorted order)."""
    if synthetic or not CIFAR_DIR.is_dir():
        return np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    from PIL import Image

    files = sorted(p for p in CIFAR_DIR.rglob("*.jpg"))[:: max(1, 50000 // n)][:n]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])


# ----------------------------------------------------------------------------------------------------
# The official step
# ----------------------------------------------------------------------------------------------------
class MultiViewPIL(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, views: int) -> None:
        import torchvision.transforms as T
        from PIL import Image

        self.images = [Image.fromarray(a) for a in images]
        self.views = views
        self.transform = T.Compose([
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.1),
            T.RandomResizedCrop(32, scale=(0.2, 1.0), ratio=(0.75, 4 / 3), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return [self.transform(self.images[i]) for _ in range(self.views)], 0


def official_model(emb: int = 64) -> torch.nn.Module:
    import torch.nn as nn
    import torchvision

    model = torchvision.models.resnet18(weights=None)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    head = nn.Sequential(nn.Linear(512, 1024), nn.BatchNorm1d(1024), nn.ReLU(), nn.Linear(1024, emb))
    return nn.Sequential(model, head)


def run_official(images: np.ndarray, args) -> dict:
    sys.path.insert(0, str(HERE))
    from loss import official_loss

    device = torch.device(args.device)
    d, N = 2, args.batch
    loader = torch.utils.data.DataLoader(MultiViewPIL(images, d), batch_size=N, shuffle=True, drop_last=True,
                                         num_workers=args.workers, persistent_workers=args.workers > 0)
    model = official_model().to(device)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1e-6)

    def batches():
        while True:
            yield from loader

    it = batches()

    def step():
        views, _ = next(it)
        h = model(torch.cat([v.to(device) for v in views]))
        loss = official_loss(h, d, N, w_size=128, w_iter=1)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step, args, device)


# ----------------------------------------------------------------------------------------------------
# The wmse step
# ----------------------------------------------------------------------------------------------------
def run_wmse(images: np.ndarray, args) -> dict:
    from wmse.augment import AugmentConfig, Augmenter
    from wmse.config import get_preset
    from wmse.data.loader import BatchLoader
    from wmse.methods import build_method

    device = torch.device(args.device)
    cfg = get_preset("cifar10-wmse2").replace(batch_size=args.batch, precision=args.precision)
    uint8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    loader = BatchLoader(uint8, cfg.batch_size, seed=0, device=device)
    method = build_method(cfg, 3).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(method.trainable_parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    augment = Augmenter(AugmentConfig(size=32), MEAN, STD)
    gen = torch.Generator(device=device).manual_seed(0)

    def batches():
        epoch = 0
        while True:
            yield from loader.epoch(epoch)
            epoch += 1

    it = batches()

    def step():
        x, _ = next(it)
        views = [v.contiguous(memory_format=torch.channels_last) for v in augment(x, 2, generator=gen)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = method(views)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, args, device)


def timed(step, args, device: torch.device) -> dict:
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"sec_per_step": sec, "img_per_s": args.batch / sec, "peak_mem_mib": peak / 2**20, "steps": args.steps}


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    images = load_images(max(4 * args.batch, 2048), args.synthetic)
    result = run_official(images, args) if args.impl == "official" else run_wmse(images, args)
    print("RESULT " + json.dumps(result))


def spawn(impl: str, args, precision: str = "fp32") -> dict:
    cmd = [sys.executable, __file__, "--impl", impl, "--precision", precision, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--workers", str(args.workers),
           "--device", args.device] + (["--synthetic"] if args.synthetic else []) + (
           ["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise SystemExit(f"{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][7:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["official", "wmse"], help=argparse.SUPPRESS)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], help="wmse precisions to measure")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers of the official step")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--synthetic", action="store_true", help="random images instead of the CIFAR-10 folder")
    p.add_argument("--out", default=str(HERE / "results" / "train_step.json"))
    args = p.parse_args()
    if args.impl:
        args.precision = args.precision[0]
        child(args)
        return
    rows = {"official (fp32, NCHW, PIL workers)": spawn("official", args)}
    for prec in args.precision:
        rows[f"wmse ({prec}, channels_last, batched aug)"] = spawn("wmse", args, prec)
    base = rows["official (fp32, NCHW, PIL workers)"]["img_per_s"]
    print(f"ResNet-18, 32 px, d=2, N={args.batch}, device={args.device}, threads={args.threads or torch.get_num_threads()}")
    print(f"{'implementation':<42}{'img/s':>9}{'s/step':>9}{'peak MiB':>10}{'speed-up':>10}")
    for name, r in rows.items():
        print(f"{name:<42}{r['img_per_s']:>9.1f}{r['sec_per_step']:>9.2f}{r['peak_mem_mib']:>10.0f}"
              f"{r['img_per_s'] / base:>9.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "batch": args.batch,
            "images": "synthetic" if args.synthetic or not CIFAR_DIR.is_dir() else str(CIFAR_DIR)}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
