#!/usr/bin/env bash
# The CUDA bf16 train step at 0.5B scale with its MFU (gpu.py says what it measures).
#
# 1. Where cargo is (no GPU needed):  bash benches/gpu/run.sh build
#    builds the CUDA examples in release mode and puts them, stripped and gzipped, in .gpu/.
#    Without a CUDA toolkit there, name the GPU machine's CUDA version for the driver API
#    bindings (cudarc): CUDARC_CUDA_VERSION=13000 for 13.0, 12080 for 12.8. The build honours
#    CARGO_TARGET_DIR.
# 2. Copy the checkout with .gpu/ in it to a Linux machine with an NVIDIA GPU, its driver and
#    Python 3 with torch (CUDA build) and transformers; cargo is not needed there.
# 3. There, from the repository root:  bash benches/gpu/run.sh run [OUT_DIR [GPU.PY FLAGS]]
#    writes gpu.json and gpu.md to OUT_DIR (default .gpu/out) and prints the table; it takes
#    under 10 minutes (gpu.py --budget). The LoRA step at the Qwen2.5-Omni-3B thinker's shapes:
#      bash benches/gpu/run.sh run .gpu/lora3b --config benches/gpu/qwen2.5-omni-3b.json --lora 64 Python is $OMNIOPSD_PYTHON, else python3 on PATH; to make one:
#      python3 -m venv .venv && .venv/bin/pip install torch transformers safetensors
#    then OMNIOPSD_PYTHON=.venv/bin/python bash benches/gpu/run.sh run
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
build)
    cargo build --release -p omniopsd-benches --features cuda --example train_step --example peak
    mkdir -p .gpu
    target="${CARGO_TARGET_DIR:-target}"
    for b in train_step peak; do
        # Stripped and gzipped (about 6 MB each): the carried tree is limited to 64 MiB.
        strip --strip-all -o ".gpu/$b" "$target/release/examples/$b"
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
    out="${2:-.gpu/out}"
    shift $(( $# < 2 ? $# : 2 ))
    PYTHONUNBUFFERED=1 timeout 590 "${OMNIOPSD_PYTHON:-python3}" benches/gpu/gpu.py --bin "$bin" --out "$out" "$@"
    ;;
suite)
    # One device call of under 10 minutes: the 0.5B full step with the matmul peaks, then the
    # LoRA r=64 bf16-mixed step at the Qwen2.5-Omni-3B thinker's shapes (MFU against the first
    # run's peak); each writes its own folder under OUT_DIR. The 7B LoRA step takes a call of
    # its own:  bash benches/gpu/run.sh run OUT --config benches/gpu/qwen2.5-omni-7b.json \
    #   --lora 64 --precision bf16-mixed
    out="${2:-.gpu/out}"
    bash "$0" run "$out/full" --steps 2 --budget "${FULL_BUDGET:-250}" --burn-peak-limit 60 || true
    peak=$("${OMNIOPSD_PYTHON:-python3}" -c 'import json, sys
print(json.load(open(sys.argv[1]))["torch_peak"].get("tflops", ""))' "$out/full/gpu.json" 2>/dev/null || true)
    bash "$0" run "$out/lora3b" --config benches/gpu/qwen2.5-omni-3b.json --lora 64 --steps 2 \
        --precision bf16-mixed --skip-peak ${peak:+--peak-tflops "$peak"} \
        --budget "${LORA_BUDGET:-290}"
    ;;
*)
    echo "usage: bash benches/gpu/run.sh build | run [OUT_DIR [GPU.PY FLAGS]] | suite [OUT_DIR]" >&2
    exit 2
    ;;
esac
