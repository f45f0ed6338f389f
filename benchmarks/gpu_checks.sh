#!/bin/bash
# The GPU checks of the LLM decode path, in one go, for a machine with CUDA (run from the repository root):
#   1. the tests marked gpu (tests/unit/test_gpu_decode.py);
#   2. the product's entry point: `python -m guest.workloads run llm --backend fast` on a tiny model, native and int8;
#   3. benchmarks/bench_llm.py on the Llama-1B shape: every path at batch 1, the batch sweep, int8.
# (--noconftest: tests/conftest.py needs libvirt, which a GPU box need not have; these tests use none of it.)
# Usage: benchmarks/gpu_checks.sh OUTDIR   (each step's log goes to OUTDIR; the bench's result file too)
set -u -o pipefail
out=${1:?usage: gpu_checks.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.cuda.get_device_name())' \
    || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader | tee "$out/device.txt"

echo "== 1. tests marked gpu"
timeout 240 python3 -m pytest -q --noconftest -m gpu -rs -p no:cacheprovider tests/unit/test_gpu_decode.py -s 2>&1 \
    | tee "$out/gpu_tests.txt" | grep -v '^W[0-9]'

echo "== 2. python -m guest.workloads run llm --backend fast"
model=$(mktemp -d)/tiny
python3 -m guest.workloads make-tiny-llm "$model" >/dev/null
for weights in native int8; do
    timeout 120 python3 -m guest.workloads run llm --model "$model" --prompt "The keeper" --prompt "Rain" \
        --max-new-tokens 24 --backend fast --weights "$weights" 2>&1 | grep -v '^W[0-9]' | tee -a "$out/guest_cli.txt"
done
rm -rf "$(dirname "$model")"

echo "== 3. bench_llm.py --shape 1b"
python3 benchmarks/bench_llm.py --shape 1b --new-tokens 128 --repeats 3 --out "$out/bench_llm_h200.txt" 2>"$out/bench_stderr.txt"
echo "bench exit $?"
