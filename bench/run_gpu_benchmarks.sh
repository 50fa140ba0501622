#!/usr/bin/env bash
# The GPU figures of the README in one command that fits in about 6 minutes of an H100:
#   bash bench/run_gpu_benchmarks.sh [OUT_DIR]
# 1. bench_pretrain.py: ViT-L/16 at 256^3, batch 8 and 32, baseline / eager / compile / compile+checkpointing,
#    with a 270 s budget (rows that would end later are skipped and listed); JSON written after every row.
# 2. bench_loader.py: first pass and cached loader on this machine's CPUs (the IRCAD CT when ../shared/data is
#    there, else a phantom), 60 s at most.
# 3. bench_checkpoint.py: the stall of a ViT-L + AdamW checkpoint written from the GPU, 60 s at most.
# Wheels of SimpleITK / MONAI for an image without them: put them in .whl/ and they are installed first.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-bench/results_gpu}
mkdir -p "$out"
if ls .whl/*.whl >/dev/null 2>&1; then python -m pip install -q --no-deps .whl/*.whl; fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
timeout 300 python bench/bench_pretrain.py --budget_s 270 --json "$out/pretrain.json" 2>&1 | tee "$out/pretrain.txt"
src=../shared/data/ircadb01/ct.nii.gz
loader_args=$([ -f "$src" ] && echo "--repeats 2 --epochs 2" || echo "--quick")
timeout 60 python bench/bench_loader.py $loader_args --json "$out/loader.json" 2>&1 | tee "$out/loader.txt"
timeout 60 python bench/bench_checkpoint.py --repeats 2 --json "$out/checkpoint.json" 2>&1 | tee "$out/checkpoint.txt"
echo "results in $out/"
