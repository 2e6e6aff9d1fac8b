"""Augmentation throughput: wmse's batched Augmenter vs torchvision.transforms.v2 per sample on PIL.

Images/s counts source images, each turned into ``--views`` views (d = 2 by default), so both
sides do the same work. The torchvision side is the official recipe applied image by image to
PIL images (what DataLoader workers run in the official code), timed in the same process.

    python benchmarks/augment.py --threads 1            # one-core figures
    python benchmarks/augment.py                        # torch's default thread count
    python benchmarks/augment.py --device cuda          # GPU (torchvision side stays on the CPU)

Prints the CPU it ran on, a table, and writes benchmarks/results/augment.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from wmse.augment import AugmentConfig, Augmenter

CIFAR_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cifar10-jpeg" / "train"
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2430, 0.2610)


def real_images(n: int, side: int) -> torch.Tensor:
    """n real CIFAR-10 images (uint8 (n, 3, side, side)), upscaled when side > 32; random if absent."""
    if CIFAR_DIR.is_dir():
        from wmse.data import load
        imgs = load("folder", root=CIFAR_DIR).images[:n]
    else:
        print(f"note: {CIFAR_DIR} not found, using random images", file=sys.stderr)
        imgs = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8)
    if side != imgs.shape[-1]:
        imgs = torch.nn.functional.interpolate(imgs.float(), size=side, mode="bicubic", antialias=True)
        imgs = imgs.round().clamp(0, 255).to(torch.uint8)
    return imgs.contiguous()


def cpu_info() -> dict:
    """The CPU's model name and whether it has native bf16 (avx512_bf16), from /proc/cpuinfo (Linux)."""
    name, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if name != "unknown" and flags:
                break
    except OSError:
        pass
    return {"cpu": name, "avx512_bf16": "avx512_bf16" in flags}


def torchvision_pipeline(cfg: AugmentConfig):
    import torchvision.transforms.v2 as T
    return T.Compose([
        T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
        T.RandomGrayscale(p=cfg.grayscale_p),
        T.RandomResizedCrop(cfg.size, scale=cfg.crop_scale, ratio=cfg.crop_ratio,
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=cfg.flip_p),
        T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(MEAN, STD),
    ])


def time_torchvision(pil: list, tf, views: int) -> float:
    start = time.perf_counter()
    for im in pil:
        torch.stack([tf(im) for _ in range(views)])
    return len(pil) / (time.perf_counter() - start)


def time_wmse(aug: Augmenter, x: torch.Tensor, gen: torch.Generator, views: int, reps: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        aug(x, views, gen)
    sync()
    return x.shape[0] * reps / (time.perf_counter() - start)


def measure(images: torch.Tensor, cfg: AugmentConfig, args) -> tuple[float, float]:
    """Best-of-rounds images/s for both sides, rounds interleaved so load changes hit both alike."""
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images[:args.tv_images]]
    tf = torchvision_pipeline(cfg)
    aug = Augmenter(cfg, MEAN, STD)
    x = images[:args.batch].to(args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    for im in pil[:32]:  # warm-up both
        tf(im)
    aug(x, args.views, gen)
    tv, ours = [], []
    for _ in range(args.rounds):
        tv.append(time_torchvision(pil, tf, args.views))
        ours.append(time_wmse(aug, x, gen, args.views, args.reps))
    return max(tv), max(ours)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--reps", type=int, default=4, help="batches timed for wmse per round")
    ap.add_argument("--tv-images", type=int, default=512, help="images timed for torchvision per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best of each side is kept")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "augment.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [("32px (CIFAR)", 32, 32), ("64px (Tiny IN)", 64, 64), ("96->64px (STL-10)", 96, 64)]
    rows = []
    for label, side, size in cases:
        cfg = AugmentConfig(size=size)
        images = real_images(max(args.batch, args.tv_images), side)
        tv, ours = measure(images, cfg, args)
        rows.append({"case": label, "input": side, "size": size, "torchvision_img_s": round(tv, 1),
                     "wmse_img_s": round(ours, 1), "speedup": round(ours / tv, 2)})
    cpu = cpu_info()
    print(f"augmentation, d={args.views} views, batch {args.batch}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"CPU: {cpu['cpu']} ({os.cpu_count()} cores), avx512_bf16: {'yes' if cpu['avx512_bf16'] else 'no'}")
    print(f"{'case':<20}{'torchvision img/s':>20}{'wmse img/s':>14}{'speedup':>10}")
    for r in rows:
        print(f"{r['case']:<20}{r['torchvision_img_s']:>20,.0f}{r['wmse_img_s']:>14,.0f}{r['speedup']:>9.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "device": args.device, "batch": args.batch, "views": args.views,
            "rounds": args.rounds, "reps": args.reps, "tv_images": args.tv_images,
            "torch": torch.__version__, **cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
