#!/usr/bin/env bash
# The CUDA bf16 train step at 0.5B scale with its MFU (gpu.py says what it measures).
#
# 1. Where cargo is (no GPU needed):  bash benches/gpu/run.sh build
#    builds the CUDA examples in release mode and puts them, stripped and gzipped, in .gpu/.
# 2. Copy the checkout with .gpu/ in it to a Linux machine with an NVIDIA GPU, its driver and
#    Python 3 with torch (CUDA build) and transformers; cargo is not needed there.
# 3. There, from the repository root:  bash benches/gpu/run.sh run [OUT_DIR]
#    writes gpu.json and gpu.md to OUT_DIR (default .gpu/out) and prints the table; it takes
#    under 10 minutes. Python is $OMNIOPSD_PYTHON, else python3 on PATH; to make one:
#      python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
#    then OMNIOPSD_PYTHON=.venv/bin/python bash benches/gpu/run.sh run
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
build)
    cargo build --release -p omniopsd-benches --features cuda --example train_step --example peak
    mkdir -p .gpu
    for b in train_step peak; do
        # Stripped and gzipped (about 6 MB each): the carried tree is limited to 64 MiB.
        strip --strip-all -o ".gpu/$b" "target/release/examples/$b"
        gzip -9 -f ".gpu/$b"
    done
    ls -la .gpu
    ;;
run)
    test -f .gpu/train_step.gz || { echo "no .gpu/train_step.gz: run 'bash benches/gpu/run.sh build' where cargo is, then copy .gpu/ here" >&2; exit 2; }
    bin=$(mktemp -d)
    for b in train_step peak; do
        gzip -dc ".gpu/$b.gz" > "$bin/$b"
        chmod +x "$bin/$b"
    done
    timeout 30 nvidia-smi || true
    PYTHONUNBUFFERED=1 timeout 580 "${OMNIOPSD_PYTHON:-python3}" benches/gpu/gpu.py --bin "$bin" --out "${2:-.gpu/out}"
    ;;
*)
    echo "usage: bash benches/gpu/run.sh build | run [OUT_DIR]" >&2
    exit 2
    ;;
esac
