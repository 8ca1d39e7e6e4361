#!/bin/bash
# The compress study of reports/compress/: every row of specs.txt on one task, seeds 1-5, one study
# invocation per row appending to the task's study.csv, so the report grows row by row and a rerun
# resumes (finished runs come back from DVC's run cache; the finetune of a `+compress` row is shared
# with its uncompressed row, since the finetune stage does not read the compress section).
#
#   reports/compress/run.sh cola            # from the repository root; writes reports/compress/cola/
#   OMP_NUM_THREADS=1 reports/compress/run.sh sst2   # as run here: one task per checkout, two in parallel
#
# Then merge the tasks into one report:
#   python -m flows.study --report reports/compress/cola/study.csv reports/compress/sst2/study.csv \
#       -S data.validation_size=2000 -S train.precision=fp32 --out reports/compress
#
# The study trains in fp32 (the default when it ran; `train.precision: auto` since): its bf16 rows say so.
set -u -f
task=${1:?usage: reports/compress/run.sh TASK}
here=$(cd "$(dirname "$0")" && pwd)
out=${OUT:-reports/compress/$task}
python=${PYTHON:-.venv/bin/python}
specs=(); while read -r spec; do case "$spec" in ""|"#"*) ;; *) specs+=("$spec");; esac; done < "$here/specs.txt"
append=(); [ -f "$out/study.csv" ] && append=(--append "$out/study.csv")
"$python" -m flows.study --tasks "$task" --methods "${specs[@]}" --seeds 1 2 3 4 5 --lr-factors 1 \
    -S data.validation_size=2000 -S train.precision=fp32 -S train.fused_adamw=false \
    -S train.cls_only_last_layer=false --out "$out" "${append[@]}" --estimate || exit 2
for spec in "${specs[@]}"; do
  append=(); [ -f "$out/study.csv" ] && append=(--append "$out/study.csv")
  echo "=== $(date +%T) $task: $spec"
  "$python" -m flows.study --tasks "$task" --methods "$spec" --seeds 1 2 3 4 5 --lr-factors 1 \
      -S data.validation_size=2000 -S train.precision=fp32 -S train.fused_adamw=false -S train.cls_only_last_layer=false --out "$out" "${append[@]}" || echo "=== $spec failed (rc $?)"
  git checkout -q params.yaml  # the flows leave the last run's overrides in the workspace
done
