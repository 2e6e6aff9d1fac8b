"""Augmentation throughput: wmse's batched Augmenter vs torchvision.transforms.v2 per sample on PIL.

Images/s counts source images, each turned into ``--views`` views (d = 2 by default), so both
sides do the same work. The torchvision side is the official recipe applied image by image to
PIL images (what DataLoader workers run in the official code), timed in the same process.

    python benchmarks/augment.py --threads 1            # one-core figures
    python benchmarks/augment.py                        # torch's default thread count
    python benchmarks/augment.py --device cuda          # GPU (torchvision side stays on the CPU)

Prints a table and writes benchmarks/results/augment.json (or --out).
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


def time_torchvision(images: torch.Tensor, cfg: AugmentConfig, views: int, n_images: int) -> float:
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images[:n_images]]
    tf = torchvision_pipeline(cfg)
    for im in pil[:32]:  # warm-up
        tf(im)
    start = time.perf_counter()
    for im in pil:
        torch.stack([tf(im) for _ in range(views)])
    return len(pil) / (time.perf_counter() - start)


def time_wmse(images: torch.Tensor, cfg: AugmentConfig, views: int, batch: int, reps: int, device: str) -> float:
    aug = Augmenter(cfg, MEAN, STD)
    x = images[:batch].to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    aug(x, views, gen)  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(reps):
        aug(x, views, gen)
    sync()
    return batch * reps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--reps", type=int, default=10, help="batches timed for wmse")
    ap.add_argument("--tv-images", type=int, default=1024, help="images timed for torchvision")
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
        tv = time_torchvision(images, cfg, args.views, args.tv_images)
        ours = time_wmse(images, cfg, args.views, args.batch, args.reps, args.device)
        rows.append({"case": label, "input": side, "size": size, "torchvision_img_s": round(tv, 1),
                     "wmse_img_s": round(ours, 1), "speedup": round(ours / tv, 2)})
    print(f"augmentation, d={args.views} views, batch {args.batch}, device {args.device}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"{'case':<20}{'torchvision img/s':>20}{'wmse img/s':>14}{'speedup':>10}")
    for r in rows:
        print(f"{r['case']:<20}{r['torchvision_img_s']:>20,.0f}{r['wmse_img_s']:>14,.0f}{r['speedup']:>9.1f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"threads": torch.get_num_threads(), "device": args.device, "batch": args.batch, "views": args.views,
            "torch": torch.__version__, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
