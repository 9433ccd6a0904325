#!/usr/bin/env bash
# The GPU check: the CUDA tests (tests/test_cuda.py, marked `cuda`), then the GPU benchmark.
# Run from the repository root on a machine with a CUDA GPU and clipcli importable;
# about 6 minutes on one H100/H200. Logs and the benchmark's JSON go to ${OUT:-benchmarks/out}.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee "$out/gpu.txt"
"$python" -c "import torch, clipcli; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'clipcli', clipcli.__version__)" \
    2>&1 | tee -a "$out/gpu.txt"

start=$SECONDS
"$python" -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider -q -ra --durations 8 2>&1 | tee "$out/cuda-tests.log"
tests=${PIPESTATUS[0]}
echo "cuda tests: exit $tests in $((SECONDS - start)) s"

start=$SECONDS
"$python" benchmarks/gpu.py --out "$out/gpu.json" 2>&1 | tee "$out/gpu-bench.log"
bench=${PIPESTATUS[0]}
echo "gpu benchmark: exit $bench in $((SECONDS - start)) s"
exit $((tests || bench))
