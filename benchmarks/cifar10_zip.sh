#!/usr/bin/env bash
# The CIFAR-10 JPEG training folder as one archive (stored, not compressed: the members are JPEGs), for
# `--data_dir` and for carrying real data to a GPU machine in one file (~50 MB).
#
#     bash benchmarks/cifar10_zip.sh [SOURCE_FOLDER] [ARCHIVE]
set -euo pipefail
SRC=${1:-"$(dirname "$0")/../../shared/datasets/cifar10-jpeg/train"}
OUT=${2:-"$(dirname "$0")/data/cifar10-train.zip"}
mkdir -p "$(dirname "$OUT")"
OUT=$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")
rm -f "$OUT"
cd "$(dirname "$SRC")"
python3 - "$(basename "$SRC")" "$OUT" <<'PY'
import os, sys, zipfile
src, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in sorted(files):
            z.write(os.path.join(root, f))
print(out, os.path.getsize(out) // 2**20, "MiB")
PY
