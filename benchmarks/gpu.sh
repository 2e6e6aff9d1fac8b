#!/usr/bin/env bash
# Every GPU check in one go, for a machine with one CUDA GPU and PyTorch already installed:
# the CUDA tests, the loss / augmentation / train-step benchmarks on the GPU, two epochs of
# `wmse pretrain --preset cifar10-wmse2` on CIFAR-10-sized data (random pixels in the official
# pickle format: seconds per epoch), and the quick preset on CUDA.
#
#     bash benchmarks/gpu.sh OUT_DIR [FASHION_MNIST_DIR]
#
# Writes OUT_DIR/gpu.log and the benchmarks' JSON files; each step has its own time limit so one
# that hangs does not take the others with it.
set -u
OUT=${1:?usage: gpu.sh OUT_DIR [FASHION_MNIST_DIR]}
FMNIST=${2:-}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/gpu.log"
: > "$LOG"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
}

step info 30 bash -c "nvidia-smi -L; $PY -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\")'"
step tests 150 "$PY" -m pytest tests -p no:cacheprovider -k "cuda or pinned"
step loss 120 "$PY" benchmarks/loss.py --device "$DEVICE" --out "$OUT/loss.json"
step augment-512 90 "$PY" benchmarks/augment.py --device "$DEVICE" --rounds 2 --reps 20 --tv-images 256 \
    --out "$OUT/augment_512.json"
step augment-4096 90 "$PY" benchmarks/augment.py --device "$DEVICE" --rounds 2 --reps 10 --tv-images 256 \
    --batch 4096 --out "$OUT/augment_4096.json"
step train-step 180 "$PY" benchmarks/train_step.py --device "$DEVICE" --synthetic --workers 12 --steps 20 \
    --warmup 5 --precision fp32 bf16 --out "$OUT/train_step.json"

# CIFAR-10-sized data in the official pickle format (random pixels: a throughput check, not accuracy).
CIFAR=$(mktemp -d)
"$PY" - "$CIFAR" <<'EOF'
import pickle, sys
from pathlib import Path
import numpy as np
folder = Path(sys.argv[1]) / "cifar-10-batches-py"
folder.mkdir(parents=True)
rng = np.random.default_rng(0)
for name, n in [(f"data_batch_{i}", 10000) for i in range(1, 6)] + [("test_batch", 10000)]:
    entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": rng.integers(0, 10, n).tolist()}
    (folder / name).write_bytes(pickle.dumps(entry))
(folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
EOF
step cifar10-epochs 240 "$PY" -m wmse pretrain --preset cifar10-wmse2 --data_dir "$CIFAR" --device "$DEVICE" \
    --epochs 2 --final_eval false --eval_max_train 5000 --out_dir "$OUT/runs" --run_name cifar10
if [ -n "$FMNIST" ]; then
    step quick 240 "$PY" -m wmse pretrain --preset quick --data_dir "$FMNIST" --device "$DEVICE" \
        --out_dir "$OUT/runs" --run_name quick
fi
cp "$OUT"/runs/quick/final_eval.json "$OUT/quick_final_eval.json" 2>/dev/null
rm -rf "$OUT/runs" "$CIFAR"
echo "done" | tee -a "$LOG"
