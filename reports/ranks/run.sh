#!/bin/bash
# The rank sweep of plain LoRA (issue 25's protocol, step one): ranks 1, 2, 4, 8 and 16 on one GLUE task,
# seeds 1-3, stored as trained, fp32 training (the precision of the compress study these rows are shared with).
# One study invocation per rank, appending to reports/compress/<task>/study.csv, so a rerun resumes (finished
# runs come back from DVC's run cache) and the frontier rows serve both studies.
#
#   reports/ranks/run.sh mrpc                         # from the repository root
#   OMP_NUM_THREADS=1 reports/ranks/run.sh rte         # as run here: two tasks at once, one per checkout
#
# Validation: 2,000 examples carved from train where the training set leaves the 4,000 training examples
# (SST-2, CoLA) or most of them (STS-B: 3,749); MRPC (3,668 train) and RTE (2,490) keep the default 400.
# Then the report of every task's sweep (only the rank rows of those study.csv files):
#   python -m flows.study --report reports/compress/{sst2,cola,stsb,mrpc,rte}/study.csv -S train.precision=fp32 \
#       --methods "lora[adapter.rank=1]" "lora[adapter.rank=2]" "lora[adapter.rank=4]" lora "lora[adapter.rank=16]" \
#       --out reports/ranks
set -u -f
task=${1:?usage: reports/ranks/run.sh TASK}
out=${OUT:-reports/compress/$task}
python=${PYTHON:-.venv/bin/python}
validation=2000; case $task in mrpc|rte) validation=400;; esac
specs=(lora "lora[adapter.rank=1]" "lora[adapter.rank=16]" "lora[adapter.rank=4]" "lora[adapter.rank=2]")
append=(); [ -f "$out/study.csv" ] && append=(--append "$out/study.csv")
"$python" -m flows.study --tasks "$task" --methods "${specs[@]}" --seeds 1 2 3 --lr-factors 1 \
    -S data.validation_size=$validation -S train.precision=fp32 -S train.fused_adamw=false \
    -S train.cls_only_last_layer=false --out "$out" "${append[@]}" --estimate || exit 2
for spec in "${specs[@]}"; do
  append=(); [ -f "$out/study.csv" ] && append=(--append "$out/study.csv")
  echo "=== $(date +%T) $task: $spec"
  "$python" -m flows.study --tasks "$task" --methods "$spec" --seeds 1 2 3 --lr-factors 1 \
      -S data.validation_size=$validation -S train.precision=fp32 -S train.fused_adamw=false -S train.cls_only_last_layer=false --out "$out" "${append[@]}" || echo "=== $spec failed (rc $?)"
  git checkout -q params.yaml  # the flows leave the last run's overrides in the workspace
done
