#!/bin/bash
# Issue 25's deep model: SmolLM2-135M (30 layers per module group, where LoRA-drop's sharing has room) as a
# classifier on CoLA, the task of the rank sweep where adapter capacity matters (reports/ranks). Plain LoRA
# at two ranks against LoRA-drop with and without the compress stage; seeds 1-6, 1,520 training examples x
# 2 epochs at batch 16 = 190 optimizer steps; validation 1,000 carved from train; each method's recipe lr
# (no lr grid: at ~15 CPU min per run the grid would triple the cost). One study invocation per row,
# appending to reports/deep/cola/study.csv, so a rerun resumes (finished runs come back from DVC's run cache).
#
#   reports/deep/run.sh                                # from the repository root
#   OMP_NUM_THREADS=1 reports/deep/run.sh               # one thread: beside another study
#   SPECS="lora lora+compress[rank=none,bits=4]" OUT=reports/deep/cola-a reports/deep/run.sh  # a share of the
#       rows for one of two checkouts (a compress row beside the row whose training it reuses); merge the
#       shares with --report reports/deep/cola-a/study.csv <the other share's csv> ... --out reports/deep/cola
# Then: python -m flows.study --report reports/deep/cola/study.csv -S model.name=smollm2-135m ... --out reports/deep/cola
set -u -f
out=${OUT:-reports/deep/cola}
python=${PYTHON:-.venv/bin/python}
read -r -a specs <<< "${SPECS:-lora lora[adapter.rank=2] lora_drop lora_drop+compress lora+compress[rank=none,bits=4]}"
settings=(-S model.name=smollm2-135m -S data.train_size=1520 -S data.validation_size=1000 -S train.epochs=2
          -S train.batch_size=16 -S calibrate.ratio=0.2)
append=(); [ -f "$out/study.csv" ] && append=(--append "$out/study.csv")
"$python" -m flows.study --tasks cola --methods "${specs[@]}" --seeds 1 2 3 4 5 6 --lr-factors 1 "${settings[@]}" \
    --out "$out" "${append[@]}" --estimate || exit 2
for spec in "${specs[@]}"; do
  append=(); [ -f "$out/study.csv" ] && append=(--append "$out/study.csv")
  echo "=== $(date +%T) cola: $spec"
  "$python" -m flows.study --tasks cola --methods "$spec" --seeds 1 2 3 4 5 6 --lr-factors 1 "${settings[@]}" \
      --out "$out" "${append[@]}" < /dev/null || echo "=== $spec failed (rc $?)"
  git checkout -q params.yaml  # the flows leave the last run's overrides in the workspace
done
