#!/usr/bin/env bash
# The four side-by-side benchmarks of issue 20 on one CUDA GPU, in about 5 minutes, each writing its JSON to
# docs/results/benchmarks/ (and its table to a .md beside it). Sizes are chosen for a GPU: the real SD1.5 UNet
# configuration where the claim is about real size, random weights throughout (nothing is downloaded).
#
#   scripts/gpu_bench.sh [python]      # default: .venv/bin/python if present, else python
#
# Each benchmark runs under its own time limit, so one that stalls cannot eat the others' time.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
OUT=docs/results/benchmarks
mkdir -p "$OUT"
failed=0
THREADS="${THREADS:-8}"  # CPU threads for what stays on the CPU (model construction, the host side)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

run() {  # run NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  if timeout "$limit" "$PY" "$@" --device cuda --threads "$THREADS" --json "$OUT/$name-cuda.json" \
    | tee "$OUT/$name-cuda.md"; then
    echo "== $name: $((SECONDS - start)) s"
  else
    echo "== $name FAILED or ran past ${limit}s (after $((SECONDS - start)) s); going on with the next" >&2
    failed=1
  fi
}

"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
# 1. DDPO: softalign, its TRL adapter, trl 0.23.1 (3 variants x 2 interleaved processes)
run bench_ddpo 100 benchmarks/bench_ddpo.py --size medium --resolution 64 --steps 10 --sample-batch 8 \
  --batches 2 --train-batch 8 --epochs 2 --repeats 2
# 2. Diffusion-DPO against the two-UNet reference, real SD1.5 UNet, 64x64 latents
run bench_diffusion_dpo 90 benchmarks/bench_diffusion_dpo.py --size sd15 --resolution 128 --batch 4 --pairs 16 \
  --steps 10 --repeats 2
# 3. hook overhead per real-size denoiser call, 64x64 latents
run bench_inference_real 40 benchmarks/bench_inference.py --real-size --batch 2 --repeats 30
# 4. the AGSM step at real size, B 4 and 16, gradient checkpointing off and on
run bench_softalign_step_real 110 benchmarks/bench_softalign_step.py --real-size --size 32 --steps 2
echo "JSON and tables in $OUT/"
exit "$failed"
