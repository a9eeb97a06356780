#!/usr/bin/env bash
# The CUDA bf16 train step at 0.5B scale with its MFU (gpu.py says what it measures).
#
#   bash benches/gpu/run.sh build   # here: release CUDA builds of the examples into .gpu/
#   bash benches/gpu/run.sh run     # on the GPU machine (no cargo there), .gpu/ carried
#
# One device call: run(command="bash benches/gpu/run.sh run", carry=[".gpu"], timeout_s=600);
# gpu.json and gpu.md come back in $OUT.
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
    test -f .gpu/train_step.gz || { echo "no .gpu/train_step.gz: run 'bash benches/gpu/run.sh build' here first, then carry .gpu" >&2; exit 2; }
    bin=$(mktemp -d)
    for b in train_step peak; do
        gzip -dc ".gpu/$b.gz" > "$bin/$b"
        chmod +x "$bin/$b"
    done
    timeout 30 nvidia-smi || true
    PYTHONUNBUFFERED=1 timeout 580 python3 benches/gpu/gpu.py --bin "$bin" --out "${OUT:-.gpu/out}"
    ;;
*)
    echo "usage: bash benches/gpu/run.sh build|run" >&2
    exit 2
    ;;
esac
