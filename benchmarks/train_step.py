"""Images/s of a whole W-MSE pretraining step (augment, forward, backward, optimizer), wmse vs the official step.

ResNet-18 at 32 px, d = 2 views, N = 256 images per step, on CIFAR-10 images (the JPEG folder in
../shared/datasets, or random images with --synthetic).

- official: a faithful re-implementation of the official training step: float32, NCHW, torchvision PIL
  transforms (ColorJitter, RandomGrayscale, RandomResizedCrop bicubic, flip, ToTensor, Normalize) applied
  per sample in DataLoader worker processes, the CIFAR ResNet-18, the head, the per-slice whitening loop of
  benchmarks/loss.py, Adam.
- wmse: uint8 images in memory, batched augmentation (wmse.augment), wmse.methods.WMSE, channels_last,
  bf16 autocast or float32 (--precision), Adam (fused on CUDA), the skip of non-finite steps.

Each implementation runs in its own subprocess so peak memory (max RSS, or CUDA max allocated) is its own.

    .venv/bin/python benchmarks/train_step.py [--steps 4] [--precision fp32 bf16] [--workers 2] [--device cpu]
    python benchmarks/train_step.py --device cuda --workers 12 --variants default sync1 aug8 compile

The wmse side runs the training loop's own step (wmse.train.train_step on wmse.train.epoch_views), so the
GPU options (--variants: sync_every, augment_batches, compile) are measured as training uses them; MFU is
the step's matmul/conv FLOPs (torch's FlopCounterMode) per second over the GPU's dense bf16 peak.
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


def cpu_name() -> str:
    """The CPU model and whether it has AVX512-BF16 (bf16 autocast is emulated without it)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    return f"{model} ({'avx512_bf16' if 'avx512_bf16' in info else 'no avx512_bf16'})"


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
    """The shipped step: wmse.train.train_step on the views of wmse.train.epoch_views (the loop's own code)."""
    import tempfile

    from wmse import train
    from wmse.config import get_preset
    from wmse.data import ImageDataset
    from wmse.distributed import Runtime
    from wmse.splits import RunData
    from wmse.stopping import StopFlag

    device = torch.device(args.device)
    cfg = get_preset("cifar10-wmse2").replace(
        batch_size=args.batch, precision=args.precision, device=args.device, log_every=10**9, epochs=10**6,
        sync_every=args.sync_every, augment_batches=args.augment_batches, compile=args.compile)
    uint8 = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    data = RunData(ImageDataset(uint8, torch.zeros(len(uint8), dtype=torch.int64), [], None, "bench"),
                   None, None, None, None, MEAN, STD, "benchmark")
    torch.manual_seed(0)
    job = train.build_job(cfg, Runtime(device), data, Path(tempfile.mkdtemp()), log=lambda m: None)
    job.stop = StopFlag(announce=False)
    state = train.TrainState()

    def all_views():
        epoch = 0
        while True:
            yield from train.epoch_views(job, epoch)
            epoch += 1

    it = all_views()
    result = timed(lambda: train.train_step(job, state, next(it)), args, device)
    result["flops_per_step"] = step_flops(job, next(it))
    result["sync_every"], result["augment_batches"] = job.sync_every, cfg.augment_batches
    return result


def step_flops(job, views) -> float:
    """Forward + backward FLOPs of one step (matmuls and convolutions, torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast(job.device.type, dtype=torch.bfloat16, enabled=job.cfg.precision == "bf16"):
            loss = job.method.loss(views)
        loss.backward()
    job.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def timed(step, args, device: torch.device) -> dict:
    """Median seconds per step over windows of ``args.steps`` steps (one synchronisation per window, so a
    step that does not wait for the GPU is timed as it runs in training)."""
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    windows = []
    for _ in range(args.windows):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        windows.append((time.perf_counter() - t0) / args.steps)
    sec = float(np.median(windows))
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"sec_per_step": sec, "img_per_s": args.batch / sec, "peak_mem_mib": peak / 2**20,
            "steps": args.steps * args.windows}


def child(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    images = load_images(max(16 * args.batch, 2048), args.synthetic)  # full chunks of augment_batches 8
    result = run_official(images, args) if args.impl == "official" else run_wmse(images, args)
    print("RESULT " + json.dumps(result))


def spawn(impl: str, args, precision: str = "fp32", variant: str = "") -> dict:
    cmd = [sys.executable, __file__, "--impl", impl, "--precision", precision, "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--batch", str(args.batch), "--workers", str(args.workers),
           "--windows", str(args.windows), "--device", args.device] + (["--synthetic"] if args.synthetic else []) + (
           ["--threads", str(args.threads)] if args.threads else []) + VARIANTS.get(variant, [])
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise SystemExit(f"{impl} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[-1][7:])


# Options of the wmse step measured side by side (--variants): the loop's defaults, then each GPU option.
VARIANTS = {
    "default": [],
    "sync1": ["--sync_every", "1"],  # a host read every step (the CPU's way)
    "aug8": ["--augment_batches", "8"],  # eight batches augmented per call
    "compile": ["--compile"],  # torch.compile of the backbone
    "aug8+compile": ["--augment_batches", "8", "--compile"],
}
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peaks


def peak_tflops(device: str) -> float | None:
    if device == "cpu" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


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
    p.add_argument("--windows", type=int, default=3, help="timing windows of --steps steps (median taken)")
    p.add_argument("--variants", nargs="+", default=["default"], choices=list(VARIANTS),
                   help="wmse step options to measure (GPU: default sync1 aug8 compile aug8+compile)")
    p.add_argument("--sync_every", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--augment_batches", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(HERE / "results" / "train_step.json"))
    args = p.parse_args()
    if args.impl:
        args.precision = args.precision[0]
        child(args)
        return
    rows = {"official (fp32, NCHW, PIL workers)": spawn("official", args)}
    for prec in args.precision:
        for variant in args.variants:
            rows[f"wmse ({prec}, {variant})"] = spawn("wmse", args, prec, variant)
    base = rows["official (fp32, NCHW, PIL workers)"]["img_per_s"]
    peak = peak_tflops(args.device)
    print(f"ResNet-18, 32 px, d=2, N={args.batch}, device={args.device}, CPU {cpu_name()}, "
          f"threads={args.threads or torch.get_num_threads()}")
    print(f"{'implementation':<36}{'img/s':>10}{'s/step':>9}{'peak MiB':>10}{'speed-up':>10}{'MFU':>8}")
    for name, r in rows.items():
        mfu = r.get("flops_per_step", 0) / r["sec_per_step"] / (peak * 1e12) if peak and "flops_per_step" in r else None
        r["mfu_bf16_peak"] = mfu
        print(f"{name:<36}{r['img_per_s']:>10.1f}{r['sec_per_step']:>9.3f}{r['peak_mem_mib']:>10.0f}"
              f"{r['img_per_s'] / base:>9.2f}x{'' if mfu is None else f'{100 * mfu:>7.1f}%':>8}")
    epoch = {name: 50000 / r["img_per_s"] for name, r in rows.items()}
    print("seconds per CIFAR-10 epoch (50,000 images): " + ", ".join(f"{n}: {t:.1f}" for n, t in epoch.items()))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
            "cpu": cpu_name(), "torch": torch.__version__, "batch": args.batch, "peak_bf16_tflops": peak,
            "images": "synthetic" if args.synthetic or not CIFAR_DIR.is_dir() else str(CIFAR_DIR)}
    out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
