#!/usr/bin/env bash
# Every GPU check, as prepared commands for a machine with one CUDA GPU and PyTorch installed. Real data
# travels as one archive: `bash benchmarks/cifar10_zip.sh` makes benchmarks/data/cifar10-train.zip (the
# CIFAR-10 JPEG training folder, ~50 MB; carry that path to the GPU machine).
#
#     bash benchmarks/gpu.sh speed OUT_DIR [ZIP]   # <= 3 min: CUDA tests, the step side by side with the
#                                                  #   official one (img/s, ratio, peak memory, MFU) for each
#                                                  #   GPU option, two real epochs of cifar10-wmse2
#     bash benchmarks/gpu.sh fast OUT_DIR ZIP      # <= 7 min: `wmse pretrain --preset cifar10-fast` on the
#                                                  #   archive (pretraining + final kNN / linear), its report
#     bash benchmarks/gpu.sh baseline OUT_DIR ZIP MINUTES   # cifar10-wmse2 for the same wall time, evaluated
#     bash benchmarks/gpu.sh quick OUT_DIR FASHION_MNIST_DIR  # the quick preset on CUDA
#
# Writes OUT_DIR/gpu.log and the JSON of each step; each step has its own time limit so one that hangs
# does not take the others with it.
set -u
WHAT=${1:?usage: gpu.sh speed|fast|baseline|quick OUT_DIR [ZIP|FASHION_MNIST_DIR] [MINUTES]}
OUT=${2:?usage: gpu.sh speed|fast|baseline|quick OUT_DIR [ZIP|FASHION_MNIST_DIR] [MINUTES]}
DATA=${3:-benchmarks/data/cifar10-train.zip}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 WMSE_CACHE="$OUT/cache"
LOG="$OUT/gpu.log"
echo "=== gpu.sh $* ($(date -u +%FT%TZ))" >> "$LOG"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s)
    echo "=== $name: $*" | tee -a "$LOG"
    timeout "$limit" "$@" >> "$LOG" 2>&1
    rc=$?
    echo "=== $name: exit $rc after $(( $(date +%s) - start )) s" | tee -a "$LOG"
}

run_json() {  # copy a run's JSON results next to the log
    local run=$1 name=$2
    cp "$run/final_eval.json" "$OUT/${name}_final_eval.json" 2>/dev/null
    cp "$run/eval.json" "$OUT/${name}_eval.json" 2>/dev/null
    cp "$run/metrics.jsonl" "$OUT/${name}_metrics.jsonl" 2>/dev/null
    cp "$run/config.json" "$OUT/${name}_config.json" 2>/dev/null
    cp -r "$run/report" "$OUT/${name}_report" 2>/dev/null
}

case "$WHAT" in
speed)
    step info 20 bash -c "nvidia-smi -L; nproc; $PY -c 'import torch, torchvision; print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else \"no cuda\")'"
    step tests 45 "$PY" -m pytest tests -p no:cacheprovider -q -k "cuda or pinned"
    step train-step 100 "$PY" benchmarks/train_step.py --device "$DEVICE" --synthetic --workers 12 --batch 512 \
        --steps 20 --windows 3 --warmup 5 --precision bf16 --variants default sync1 aug8 compile \
        --out "$OUT/train_step.json"
    if [ -f "$DATA" ]; then  # the loop itself on real images: seconds per epoch from metrics.jsonl
        step cifar10-wmse2-epochs 60 "$PY" -m wmse pretrain --preset cifar10-wmse2 --dataset folder \
            --eval_split none --data_dir "$DATA" --device "$DEVICE" --epochs 3 --eval_every 100 \
            --final_eval false --out_dir "$OUT/runs" --run_name wmse2-epochs
        step cifar10-fast-epochs 60 "$PY" -m wmse pretrain --preset cifar10-fast --data_dir "$DATA" \
            --device "$DEVICE" --epochs 3 --eval_every 100 --final_eval false --out_dir "$OUT/runs" \
            --run_name fast-epochs
        for r in wmse2-epochs fast-epochs; do run_json "$OUT/runs/$r" "$r"; done
    fi
    ;;
fast)
    step cifar10-fast 420 "$PY" -m wmse pretrain --preset cifar10-fast --data_dir "$DATA" --device "$DEVICE" \
        --out_dir "$OUT/runs" --run_name fast
    step report 30 "$PY" -m wmse report "$OUT/runs/fast"
    run_json "$OUT/runs/fast" fast
    ;;
baseline)
    MINUTES=${4:?usage: gpu.sh baseline OUT_DIR ZIP MINUTES (the wall time of the fast run)}
    step cifar10-wmse2-timed $(( ${MINUTES%.*} * 60 + 120 )) "$PY" -m wmse pretrain --preset cifar10-wmse2 \
        --dataset folder --eval_split none --data_dir "$DATA" --device "$DEVICE" --max_minutes "$MINUTES" \
        --eval_every 25 --out_dir "$OUT/runs" --run_name wmse2-timed
    step evaluate 120 "$PY" -m wmse evaluate "$OUT/runs/wmse2-timed" --linear_epochs 100 --device "$DEVICE"
    run_json "$OUT/runs/wmse2-timed" wmse2-timed
    ;;
quick)
    step quick 300 "$PY" -m wmse pretrain --preset quick --data_dir "$DATA" --device "$DEVICE" \
        --out_dir "$OUT/runs" --run_name quick
    run_json "$OUT/runs/quick" quick
    ;;
*)
    echo "unknown check $WHAT: speed, fast, baseline or quick" >&2
    exit 2
    ;;
esac
rm -rf "$OUT/runs" "$OUT/cache"
echo "=== done $WHAT" | tee -a "$LOG"
