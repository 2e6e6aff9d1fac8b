"""Forward + backward time of wmse.wmse_loss against the official per-slice loop, in one process.

The baseline re-implements the official W-MSE loss (htdt/self-supervised, methods/w_mse.py and
methods/whitening.py): a Python loop over w_iter, slices and views; per slice the covariance by mm,
Cholesky, the inverse of the factor by a triangular solve against the identity, whitening as a 1x1
conv2d, results scattered back into batch order, then the normalised MSE of every view pair.

    .venv/bin/python benchmarks/loss.py [--repeats 50] [--threads N] [--device cpu|cuda]

Prints a table (ms per forward+backward and the speed-up) and writes benchmarks/results/loss.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from wmse import wmse_loss

CASES = [
    dict(d=2, N=512, D=64, w_size=128, w_iter=1),
    dict(d=4, N=256, D=64, w_size=128, w_iter=1),
    dict(d=2, N=512, D=128, w_size=256, w_iter=4),
]


def official_whitening(x: torch.Tensor) -> torch.Tensor:
    """Whitening2d.forward of the official code for a (w, D) slice, eps = 0."""
    D = x.shape[1]
    x = x.unsqueeze(2).unsqueeze(3)
    m = x.mean(0).view(D, -1).mean(-1).view(1, -1, 1, 1)
    xn = x - m
    T = xn.permute(1, 0, 2, 3).contiguous().view(D, -1)
    f_cov = torch.mm(T, T.permute(1, 0)) / (T.shape[-1] - 1)
    eye = torch.eye(D, dtype=f_cov.dtype, device=f_cov.device)
    inv_sqrt = torch.linalg.solve_triangular(torch.linalg.cholesky(f_cov), eye, upper=False)
    inv_sqrt = inv_sqrt.contiguous().view(D, D, 1, 1)
    return F.conv2d(xn, inv_sqrt).squeeze(2).squeeze(2)


def norm_mse_loss(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    x0, x1 = F.normalize(x0), F.normalize(x1)
    return 2 - 2 * (x0 * x1).sum(dim=-1).mean()


def official_loss(h: torch.Tensor, d: int, N: int, w_size: int, w_iter: int) -> torch.Tensor:
    """The official W_MSE.forward after the encoder: h is (d * N, D), views stacked along the batch."""
    loss, pairs = 0.0, 0
    for _ in range(w_iter):
        z = torch.empty_like(h)
        perm = torch.randperm(N, device=h.device).view(-1, w_size)
        for idx in perm:
            for i in range(d):
                z[idx + i * N] = official_whitening(h[idx + i * N])
        for i in range(d - 1):
            for j in range(i + 1, d):
                loss = loss + norm_mse_loss(z[i * N : (i + 1) * N], z[j * N : (j + 1) * N])
                pairs += 1
    return loss / pairs


def time_ms(fn, repeats: int, device: str) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e3 * times[len(times) // 2]  # median: robust to a busy neighbour


def run_case(case: dict, repeats: int, device: str) -> dict:
    d, N, D, w_size, w_iter = case["d"], case["N"], case["D"], case["w_size"], case["w_iter"]
    h = torch.randn(d * N, D, device=device, requires_grad=True)

    def ours():
        h.grad = None
        wmse_loss(h.view(d, N, D), w_size, w_iter=w_iter).backward()

    def official():
        h.grad = None
        official_loss(h, d, N, w_size, w_iter).backward()

    t_off = time_ms(official, repeats, device)
    t_ours = time_ms(ours, repeats, device)
    return dict(case, official_ms=t_off, wmse_ms=t_ours, speedup=t_off / t_ours)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loss.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [run_case(c, args.repeats, args.device) for c in CASES]
    print(f"{'case':<36} {'official ms':>12} {'wmse ms':>9} {'speed-up':>9}")
    for r in rows:
        name = f"d={r['d']} N={r['N']} D={r['D']} w={r['w_size']} w_iter={r['w_iter']}"
        print(f"{name:<36} {r['official_ms']:>12.2f} {r['wmse_ms']:>9.2f} {r['speedup']:>8.1f}x")
    meta = dict(
        device=args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        threads=torch.get_num_threads(), torch=torch.__version__, machine=platform.processor() or platform.machine(),
        repeats=args.repeats,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
