"""End-to-end fine-tuning against the anchor a user would otherwise run.

The same data (SST-2, 4,000 stratified training examples, the full 872-example dev set), the same
budget (2 epochs of batch 32, AdamW lr 1e-3, weight decay 0.01, 6 % warm-up then linear decay,
gradient clipping at 1.0), the same model (MiniLM, LoRA r 8 / alpha 16 on all six linear types,
classification head trained), in these variants:

  (a)    ours, fixed padding      lora_ops' loop, every batch padded to model.max_length (64), fp32
  (b)    ours, dynamic + grouped  lora_ops' loop, length-grouped batches padded to their longest example, fp32
  (b16)  ours as (b), precision bf16 (autocast; frozen weights cast to bf16 once, adapters/optimiser fp32)
  (b16f) ours as (b16) with fused AdamW
  (bcls) ours as (b) with the [CLS]-only last layer (lora_ops/training/cls_only.py)
  (b16cls) ours as (b16f) with the [CLS]-only last layer
  (c)    Trainer + PEFT           transformers.Trainer on a PEFT LoRA model, DataCollatorWithPadding,
                                  train_sampling_strategy="group_by_length", fp32
  (c16)  Trainer + PEFT as (c) with bf16=True (CPU autocast; Trainer's default fused AdamW)

Each row also prints its achieved GFLOP/s and share of the estimated peak: FLOPs are estimated from
the model's shapes and each batch's padded width (benchmarks/flops.py: frozen GEMMs forward and
input-gradient, LoRA factor GEMMs, attention), and the peak is *measured* in the same run, in its own
process with the same thread count: F.linear at MiniLM's shapes (384->384, 384->1536, 1536->384) on
2,048 tokens, in fp32 and in bf16. A row's share is against the rate of its own precision. The
[CLS]-only rows are credited with the full layer's FLOPs: their rate is the effective one (work a
full computation would have needed, per second).

Each variant runs in its own subprocess (so peak RSS is its own) with the same thread count;
the variants alternate in order over ``--repeats`` rounds and the median wall time is reported.
Only training is timed (no evaluation inside it); dev accuracy is measured afterwards.

    python benchmarks/bench_finetune.py                        # b, b16, c, c16: one round + ratios
    python benchmarks/bench_finetune.py --repeats 3 --variants a,b,b16,b16f,c,c16
    python benchmarks/bench_finetune.py --quick                # 10 % of the data, 1 epoch: smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

VARIANTS = {"a": "ours, fixed padding (64), fp32", "b": "ours, dynamic padding + length grouping, fp32",
            "b16": "ours, dynamic + grouping, bf16", "b16f": "ours, dynamic + grouping, bf16, fused AdamW",
            "bcls": "ours, dynamic + grouping, fp32, [CLS]-only last layer",
            "b16cls": "ours, dynamic + grouping, bf16, fused AdamW, [CLS]-only last layer",
            "c": "Trainer + PEFT, group_by_length, fp32", "c16": "Trainer + PEFT, group_by_length, bf16=True"}
PRECISION = {"a": "fp32", "b": "fp32", "b16": "bf16", "b16f": "bf16", "bcls": "fp32", "b16cls": "bf16", "c": "fp32",
             "c16": "bf16"}
LR, EPOCHS, BATCH, MAX_LEN, TRAIN, SEED, RANK = 1e-3, 2, 32, 64, 4000, 42, 8
DEV: int | None = None  # the full dev set


def _quick() -> None:
    """--quick: a tenth of the training data, one epoch, 200 dev examples (a smoke test, not a result)."""
    global EPOCHS, TRAIN, DEV
    EPOCHS, TRAIN, DEV = 1, 400, 200


def _flops(widths_and_rows: list[tuple[int, int]]) -> float:
    from flops import batch_flops

    return batch_flops(widths_and_rows, hidden=384, ffn=1536, layers=6, rank=RANK)


def _data(mirror: Path):
    import torch

    from lora_ops.data import stratified_indices
    from stages.common.glue import TASKS, load_split

    task = TASKS["sst2"]
    train = load_split(task, "train", mirror)
    train = train.iloc[stratified_indices(torch.tensor(train["label"].to_numpy()), TRAIN, SEED).numpy()]
    dev = load_split(task, "dev", mirror)
    if DEV is not None:
        dev = dev.iloc[:DEV]
    return train.reset_index(drop=True), dev.reset_index(drop=True)


def _accuracy(model, tok, dev) -> float:
    import torch

    from stages.common.evaluation import predict

    enc = tok(dev["sentence"].tolist(), max_length=MAX_LEN, truncation=True, padding="max_length", return_tensors="pt")
    logits = predict(model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                             "token_type_ids": enc["token_type_ids"]}, 64, "cpu")
    return float((logits.argmax(-1) == torch.tensor(dev["label"].to_numpy())).float().mean())


def run_ours(dynamic: bool, mirror: Path, precision: str = "fp32", fused_adamw: bool = False,
             cls_only: bool = False) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_ops.data import BatchSource
    from lora_ops.methods import AdapterConfig, MethodContext, get_method
    from lora_ops.targets import find_targets, freeze_all_but
    from lora_ops.training import TrainConfig, train
    from stages.common.models import resolve_model

    train_df, dev = _data(mirror)
    path = resolve_model("minilm").path
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).float()
    method = get_method("lora")
    ctx = MethodContext(adapter=AdapterConfig(rank=8, alpha=16), params=method.params_model(), seed=SEED)
    targets = find_targets(model, "all")
    method.build(model, targets, method.decide([], targets, ctx), ctx)
    freeze_all_but(model, ["classifier"])
    enc = tok(train_df["sentence"].tolist(), max_length=MAX_LEN, truncation=True, padding="max_length",
              return_tensors="pt")
    feats = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    feats["labels"] = torch.tensor(train_df["label"].to_numpy())
    data = BatchSource(feats, BATCH, seed=SEED, group_by_length=dynamic, dynamic_padding=dynamic)
    cfg = TrainConfig(epochs=EPOCHS, lr=LR, weight_decay=0.01, warmup_ratio=0.06, grad_clip=1.0, progress=False,
                      precision=precision, fused_adamw=fused_adamw, cls_only_last_layer=cls_only)
    shapes = [tuple(b["attention_mask"].shape[::-1]) for e in range(EPOCHS) for b in data.batches(e)]
    tokens = sum(w * n for w, n in shapes)
    start = time.perf_counter()
    result = train(model, data, cfg)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "computed_tokens": tokens, "flops": _flops(shapes),
            "precision": result.precision, "dev_accuracy": _accuracy(model, tok, dev)}


def run_trainer(mirror: Path, bf16: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from stages.common.models import resolve_model

    train_df, dev = _data(mirror)
    path = resolve_model("minilm").path
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(SEED)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).float()
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="SEQ_CLS",
                        target_modules=["query", "key", "value", "attention.output.dense", "intermediate.dense",
                                        "output.dense"])
    model = get_peft_model(model, config)
    ds = Dataset.from_pandas(train_df[["sentence", "label"]]).map(
        lambda b: tok(b["sentence"], max_length=MAX_LEN, truncation=True), batched=True, remove_columns=["sentence"])
    ds = ds.rename_column("label", "labels")
    ds = ds.map(lambda b: {"length": [len(x) for x in b["input_ids"]]}, batched=True)
    args = TrainingArguments(output_dir=str(Path(os.environ.get("TMPDIR", "/tmp")) / "bench-finetune-trainer"),
                             per_device_train_batch_size=BATCH, num_train_epochs=EPOCHS, learning_rate=LR,
                             weight_decay=0.01, warmup_steps=round(0.06 * EPOCHS * -(-TRAIN // BATCH)),
                             lr_scheduler_type="linear", max_grad_norm=1.0,
                             train_sampling_strategy="group_by_length", length_column_name="length",
                             save_strategy="no", eval_strategy="no", report_to=[], logging_strategy="no",
                             disable_tqdm=True, use_cpu=True, bf16=bf16, seed=SEED, dataloader_num_workers=0,
                             dataloader_pin_memory=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=DataCollatorWithPadding(tok))
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    lengths = list(ds["length"])
    loader = trainer.get_train_dataloader()
    batches = getattr(loader, "batch_sampler", None)
    shapes = [(max(lengths[i] for i in b), len(b)) for b in batches] * EPOCHS if batches is not None else None
    tokens = sum(w * n for w, n in shapes) if shapes else None
    return {"seconds": seconds, "computed_tokens": tokens, "flops": _flops(shapes) if shapes else None,
            "precision": "bf16" if bf16 else "fp32", "optimizer": str(getattr(args.optim, "value", args.optim)),
            "dev_accuracy": _accuracy(model.eval(), tok, dev)}


def child(variant: str, mirror: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    if variant == "gemm":  # the peak estimate: this machine's F.linear rate at MiniLM's shapes
        from flops import gemm_rate

        print("RESULT " + json.dumps({p: gemm_rate(384, 1536, dt) for p, dt in
                                      (("fp32", torch.float32), ("bf16", torch.bfloat16))}))
        return
    if variant.startswith("c"):
        result = run_trainer(mirror, bf16=variant == "c16")
    else:
        result = run_ours(variant != "a", mirror, PRECISION[variant], fused_adamw=variant in ("b16f", "b16cls"),
                          cls_only=variant.endswith("cls"))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--mirror", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--variants", default="b,b16,c,c16", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--quick", action="store_true", help="a tenth of the data, one epoch: a smoke test")
    ap.add_argument("--wait-policy", default="unset", choices=["unset", "PASSIVE", "ACTIVE"],
                    help="OMP_WAIT_POLICY for every variant (unset: libgomp's default, what the stages run with)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        _quick()
    if args.child:
        child(args.child, Path(args.mirror), args.threads)
        return
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    # every variant under the same OpenMP wait policy: libgomp's default unless --wait-policy says otherwise
    # (the stages no longer force PASSIVE: benchmarks/bench_step_overhead.py)
    env.pop("OMP_WAIT_POLICY", None)
    if args.wait_policy != "unset":
        env["OMP_WAIT_POLICY"] = args.wait_policy
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        sys.exit(f"unknown variant(s) {unknown}; choose from {', '.join(VARIANTS)}")

    def run_child(v: str) -> dict:
        cmd = [sys.executable, __file__, "--child", v, "--mirror", args.mirror, "--threads", str(args.threads)]
        proc = subprocess.run(cmd + (["--quick"] if args.quick else []), env=env, capture_output=True, text=True)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"variant {v} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        return json.loads(line[-1][7:])

    runs: dict[str, list[dict]] = {v: [] for v in variants}
    rates: list[dict] = []
    for r in range(args.repeats):
        rates.append(run_child("gemm"))
        print(f"round {r + 1} F.linear GFLOP/s at MiniLM shapes: fp32 {rates[-1]['fp32']:.0f}, "
              f"bf16 {rates[-1]['bf16']:.0f}", flush=True)
        for v in variants:
            runs[v].append(run_child(v))
            print(f"round {r + 1} ({v}) {VARIANTS[v]}: {runs[v][-1]['seconds']:.1f}s", flush=True)
    from common import table

    med = {v: statistics.median(x["seconds"] for x in rs) for v, rs in runs.items()}
    peak = {p: statistics.median(r[p] for r in rates) for p in ("fp32", "bf16")}
    rows = []
    for v, rs in runs.items():
        last = rs[-1]
        prec = PRECISION[v]
        gflops = last["flops"] / med[v] / 1e9 if last.get("flops") else None
        rows.append((f"({v}) {VARIANTS[v]}", f"{med[v]:.1f}", f"{EPOCHS * TRAIN / med[v]:.1f}",
                     f"{max(x['peak_rss_mb'] for x in rs):.0f}", f"{100 * last['dev_accuracy']:.2f}",
                     f"{last['computed_tokens']:,}" if last.get("computed_tokens") else "-",
                     f"{gflops:.0f}" if gflops else "-", f"{100 * gflops / peak[prec]:.0f} % of {prec}"
                     if gflops else "-"))
    print(f"\nSST-2 {TRAIN} examples, {EPOCHS} epochs, batch {BATCH}, LoRA r {RANK} on all six linear types, "
          f"{args.threads} threads, median of {args.repeats} round(s)"
          f"{' (--quick: a smoke test, not a result)' if args.quick else ''}")
    print(f"estimated peak = measured F.linear at MiniLM's shapes, 2,048 tokens, same threads, median over rounds: "
          f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s\n")
    print(table(rows, ("variant", "train wall s", "examples/s", "peak RSS MiB", "dev acc %", "tokens computed",
                       "GFLOP/s", "share of peak")))
    ours = [v for v in runs if not v.startswith("c")]
    anchors = [v for v in runs if v.startswith("c")]
    if ours and anchors:
        fastest = min(anchors, key=med.__getitem__)
        print(f"\nagainst the faster Trainer row ({fastest}, {med[fastest]:.1f}s): " +
              ", ".join(f"({v}) {med[v] / med[fastest]:.2f}x" for v in ours))
    if {"a", "b"} <= set(runs):
        print(f"(b)/(a): {med['b'] / med['a']:.2f}x")


if __name__ == "__main__":
    main()
