"""SmolLM2-135M LoRA training step: the model's own loss against the chunked loss, fp32 and bf16.

The causal LM of the pipeline (SmolLM2-135M, GQA, 576 x 49,152 output projection tied to the embeddings),
LoRA r 8 / alpha 16 on every linear target, Alpaca prompts tokenized as the pipeline does it
(stages.common.lm.tokenize_lm: right padding to ``--max-length``, no loss on padding) and batched as the
training loop does it (lora_ops.data.BatchSource, length-grouped, each batch cut to its longest prompt;
``--fixed-padding``: every batch at ``--max-length``, as a loop without dynamic padding would run), AdamW. Variants, each in its own subprocess (so peak RSS is its own), alternating over ``--rounds``:

  own     ``model(**batch).loss``: transformers' logits for every position (padding included), then the loss
  chunk   lora_ops.training.lm_loss.causal_lm_loss: the decoder's hidden states, projection and cross-entropy
          on target positions only, ``--chunk`` rows at a time, no full logits tensor

in fp32 and under bf16 autocast. Printed: median seconds per optimizer step, the ratio to ``own`` at the same
precision measured in the same run, peak RSS, and the first step's loss of each (the two must agree).

    python benchmarks/bench_lm_loss.py --rounds 3                  # quiet machine, 2 threads
    python benchmarks/bench_lm_loss.py --rounds 1 --steps 1 --batch 2 --max-length 64   # smoke test
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
VARIANTS = ("own", "chunk")


def child(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    from lora_ops.methods import AdapterConfig, MethodContext, get_method
    from lora_ops.targets import find_targets, freeze_all_but
    from lora_ops.training.lm_loss import causal_lm_loss
    from stages.common.lm import LM_TASKS, load_instructions, tokenize_lm
    from stages.common.models import resolve_model

    logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    path = resolve_model("smollm2-135m").path
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token
    texts = load_instructions(LM_TASKS["alpaca"], REPO.parent / "shared" / "data")["text"].tolist()
    from lora_ops.data import BatchSource

    feats = tokenize_lm(texts[:args.batch * 50 * 2], tok, args.max_length)  # two length-grouped buckets
    source = BatchSource(feats, args.batch, shuffle=True, seed=0, group_by_length=True,
                         dynamic_padding=not args.fixed_padding)
    batches = list(source.batches())[:args.warmup + args.steps]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path).float()
    method = get_method("lora")
    ctx = MethodContext(adapter=AdapterConfig(rank=8, alpha=16, dropout=0.0), params=method.params_model(), seed=0)
    targets = find_targets(model, "all")
    method.build(model, targets, method.decide([], targets, ctx), ctx)
    freeze_all_but(model, [])  # the base (and the tied embedding / projection) frozen, the LoRA factors trained
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    chunked = args.variant == "chunk"
    times, first_loss = [], None
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = causal_lm_loss(model, batch, args.chunk) if chunked else model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
        if first_loss is None:
            first_loss = loss.item()
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    print(json.dumps({"step_s": statistics.median(times), "first_loss": first_loss,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "real_token_share": real / sum(b["attention_mask"].numel() for b in batches),
                      "tokens_per_step": sum(b["attention_mask"].numel() for b in batches) / len(batches)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fixed-padding", action="store_true", help="every batch at --max-length (no dynamic padding)")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--precision", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        child(args)
        return
    from benchmarks.common import table

    runs: dict[tuple[str, str], list[dict]] = {(p, v): [] for p in args.precisions for v in VARIANTS}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    for r in range(args.rounds):
        for key in runs:
            cmd = [sys.executable, __file__, "--variant", key[1], "--precision", key[0], "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--batch", str(args.batch), "--max-length", str(args.max_length),
                   "--chunk", str(args.chunk), "--threads", str(args.threads)] + \
                (["--fixed-padding"] if args.fixed_padding else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            runs[key].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1} {key[0]} {key[1]}: {runs[key][-1]['step_s']:.2f} s/step", flush=True)
    rows = []
    for (prec, variant), rs in runs.items():
        step = statistics.median(x["step_s"] for x in rs)
        base = statistics.median(x["step_s"] for x in runs[(prec, "own")])
        rows.append((prec, variant, f"{step:.2f}", f"{step / base:.2f}x", f"{max(x['peak_rss_mb'] for x in rs):.0f}",
                     f"{rs[0]['first_loss']:.5f}"))
    first = next(iter(runs.values()))[0]
    padding = "fixed at --max-length" if args.fixed_padding else "length-grouped, dynamic"
    print(f"\nSmolLM2-135M, LoRA r 8 on all linear targets, batch {args.batch}, max length {args.max_length}, "
          f"padding {padding}: {first['tokens_per_step']:.0f} tokens per step, {100 * first['real_token_share']:.0f} % "
          f"real; chunk {args.chunk} rows, {args.threads} threads, median of {args.rounds} rounds x {args.steps} steps\n")
    print(table(rows, ("precision", "loss", "s/step", "vs own", "peak RSS MiB", "first-step loss")))


if __name__ == "__main__":
    main()
