#!/bin/bash
# The method study's main protocol (issue 25, step two) on one task: every row of specs.txt with the lr grid
# {0.5, 1, 2}x of its recipe on seeds 1-2 (the factor with the best mean validation score is chosen), then
# seeds 3-5 at that factor; a 2,000-example validation split carved from train; the pipeline's defaults
# otherwise (bf16 where native, fused AdamW, [CLS]-only last layer). One study invocation per row, appending
# to reports/protocol/<task>/runs/study.csv (predictions.parquet beside it stays out of git: on a fresh
# machine make it with `--restore-predictions reports/protocol/<task>/runs/study.csv --out reports/protocol/<task>/runs`).
# A rerun resumes: a row whose five seeds runs/study.csv already holds is skipped (delete its rows to run it
# again), and on the machine that ran them finished runs come back from DVC's run cache. Before the first row,
# the estimated CPU time of the rows left is printed (`flows.study --estimate`).
# The PEFT-style SVD trim is the row `lora+compress[rank=svd,budget=energy,energy=0.9,bits=none]`: derived from
# the same LoRA runs (the compress stage on LoRA's cached adapters), which `svd_trim` would train again.
# `lora+compress[confidence=null]` is the ablation of the search's acceptance rule: each candidate judged on
# its validation point estimate instead of a one-sided 95 % paired bound (the default, which no int4 adapter
# passed on CoLA's noisy Matthews correlation).
# Bone and Bat have no factor form to trim or quantise, and LoRAPrune's product is the pruned base (its LoRA
# lives at the pruned shapes): the compress stage passes all three through, so they have no `+compress` row.
#
#   reports/protocol/run.sh cola                       # from the repository root
#   OMP_NUM_THREADS=1 reports/protocol/run.sh cola      # as run here: two checkouts, each a share of specs.txt
#   SPECS=my-rows.txt reports/protocol/run.sh sst2      # some rows only
#
# Then the report (rows paired by seed against `lora`, Holm over the targets, the LoRA-by-rank frontier), from
# runs/ (several checkouts: one runs/study.csv each, all given to --report):
#   python -m flows.study --report reports/protocol/cola/runs/study.csv -S data.validation_size=2000 --out reports/protocol/cola
# and, for the (task, method) pairs whose verdicts stay inconclusive, up to 10 seeds:
#   python -m flows.study --extend-inconclusive reports/protocol/cola/runs/study.csv \
#       -S data.validation_size=2000 --out reports/protocol/cola/runs
# (the new seeds only, at each pair's chosen lr factor; the predictions of its earlier seeds must be in runs/)
set -u -f
task=${1:?usage: reports/protocol/run.sh TASK}
out=${OUT:-reports/protocol/$task/runs}
python=${PYTHON:-.venv/bin/python}
specs=${SPECS:-reports/protocol/specs.txt}
done_in_csv() {  # whether runs/study.csv holds the row at five selected seeds
  [ -f "$out/study.csv" ] && "$python" -c 'import sys, pandas as pd
rows = pd.read_csv(sys.argv[1]); row = rows[(rows["task"] == sys.argv[2]) & (rows["method"] == sys.argv[3])]
sys.exit(0 if row[row["selected"].astype(str).str.lower() == "true"]["seed"].nunique() >= 5 else 1)' \
    "$out/study.csv" "$task" "$1"
}
left=()
while IFS= read -r spec; do
  [ -z "$spec" ] && continue
  if done_in_csv "$spec"; then echo "=== $task: $spec is in $out/study.csv (five seeds): skipped"; else left+=("$spec"); fi
done < "$specs"
[ ${#left[@]} -eq 0 ] && { echo "=== $task: every row of $specs is in $out/study.csv"; exit 0; }
append=(); [ -f "$out/study.csv" ] && append=(--append "$out/study.csv")
echo "=== $task: ${#left[@]} rows left"
"$python" -m flows.study --tasks "$task" --methods "${left[@]}" --seeds 1 2 3 4 5 --lr-factors 0.5 1 2 --sweep-seeds 2 \
    -S data.validation_size=2000 --out "$out" "${append[@]}" --estimate || exit 2
for spec in "${left[@]}"; do
  append=(); [ -f "$out/study.csv" ] && append=(--append "$out/study.csv")
  echo "=== $(date +%T) $task: $spec"
  "$python" -m flows.study --tasks "$task" --methods "$spec" --seeds 1 2 3 4 5 --lr-factors 0.5 1 2 --sweep-seeds 2 \
      -S data.validation_size=2000 --out "$out" "${append[@]}" < /dev/null || echo "=== $spec failed (rc $?)"
  git checkout -q params.yaml  # the flows leave the last run's overrides in the workspace
done
