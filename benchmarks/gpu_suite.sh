#!/usr/bin/env bash
# The GPU suite: CUDA tests, then the GPU benchmarks, in one run of under 8 minutes on one GPU
# (each part is capped by timeout: 200 s tests + 250 s benchmarks).
#
#   bash benchmarks/fetch_gpu_wheels.sh     # here, once: pydantic's wheels into .whl/ (the GPU machine is offline)
#   bash benchmarks/gpu_suite.sh            # on the GPU machine, from the repository root (.whl/ carried along)
#   bash benchmarks/gpu_suite.sh --dry-run  # on any CPU machine: the same code paths on tiny shapes
#
# The GPU machine's own Python (a CUDA build of torch, transformers, peft, pytest, safetensors) runs
# everything; lora_ops also needs pydantic, installed from .whl/ with --no-index into a private
# folder. Nothing imports stages/, DVC, MLflow or Prefect. The log and the JSON of every number go
# to $OUT (or benchmarks/results/) as gpu_suite.log and gpu_suite.json.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
OUTDIR="${OUT:-benchmarks/results}"
mkdir -p "$OUTDIR"
LOG="$OUTDIR/gpu_suite.log"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
       HF_HUB_DISABLE_TELEMETRY=1 OMP_WAIT_POLICY=PASSIVE TRANSFORMERS_NO_ADVISORY_WARNINGS=1
PY=python3
[[ $DRY == 1 && -x .venv/bin/python ]] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
echo "== gpu_suite $(date -u +%FT%TZ) dry_run=$DRY git=$(git rev-parse --short HEAD 2>/dev/null || echo '?')"
if ! $PY -c "import pydantic" 2>/dev/null; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lora-sieve-site \
      .whl/*.whl || { echo "error: installing .whl/*.whl failed"; exit 2; }
    export PYTHONPATH="$PYTHONPATH:/tmp/lora-sieve-site"
  else
    echo "error: pydantic is missing and .whl/ has no wheels: run benchmarks/fetch_gpu_wheels.sh first, carry .whl"
    exit 2
  fi
fi
$PY - <<'PY' || exit 2
import sys, torch, transformers, peft, pydantic
print(f"python {sys.version.split()[0]}, torch {torch.__version__} (cuda {torch.version.cuda}), "
      f"transformers {transformers.__version__}, peft {peft.__version__}, pydantic {pydantic.__version__}")
print("gpus:", [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] or "none")
PY
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

echo; echo "== 1/2 pytest -m cuda tests/lora_ops/training/test_cuda.py"
START=$SECONDS
timeout 200 $PY -m pytest -m cuda -rs -q -p no:cacheprovider tests/lora_ops/training/test_cuda.py
TEST_RC=$?
echo "pytest exit $TEST_RC after $((SECONDS - START)) s"
if [[ $DRY == 1 ]]; then
  # no GPU here: the cuda tests were skipped above; run their bodies on the CPU instead
  timeout 300 $PY benchmarks/gpu_dry_run.py || TEST_RC=1
fi

echo; echo "== 2/2 benchmarks/bench_gpu.py"
START=$SECONDS
if [[ $DRY == 1 ]]; then
  timeout 300 $PY benchmarks/bench_gpu.py --device cpu --dry-run --out "$OUTDIR/gpu_suite.json"
else
  timeout 250 $PY benchmarks/bench_gpu.py --out "$OUTDIR/gpu_suite.json"
fi
BENCH_RC=$?
echo "bench exit $BENCH_RC after $((SECONDS - START)) s"
echo "== done: pytest $TEST_RC, bench $BENCH_RC"
[[ $TEST_RC == 0 && $BENCH_RC == 0 ]]
} 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
