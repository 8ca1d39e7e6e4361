"""Where a training step's time goes: one torch.profiler trace per precision on the default model.

MiniLM (all-MiniLM-L6-v2), LoRA r 8 / alpha 16 on all six linear types, classification head trained,
the default batch (32) at ``--seq`` tokens, the training loop's step (forward under the precision's
autocast, backward, gradient clipping at 1.0, AdamW, zero_grad). Each phase runs inside a named
``record_function`` range; every profiled op's *self* time is sorted into

* ``gemm``        matrix products (mm, addmm, bmm, linear's kernels, oneDNN matmuls),
* ``attention``   the fused scaled-dot-product attention kernels (GEMMs and softmax together),
* ``elementwise`` every other ATen kernel (adds, GELU, layer norm, dropout RNG, casts, copies...),

and ``python/autograd`` is the rest of the phase's wall time: the Python of the model and the loop,
the dispatcher and autograd engine between kernels. ``optimiser`` is the whole AdamW + clipping +
zero_grad range. *Threading* is measured separately, untraced: the median step at 1 thread against
``--threads`` threads (the parallel speed-up; OpenMP wake-ups and waits hide inside every op's time).

    python benchmarks/profile_step.py                       # fp32 and bf16, 2 threads, prints the tables
    python benchmarks/profile_step.py --trace-dir /tmp/tr   # also the Chrome traces (large)
    python benchmarks/profile_step.py --model smollm2-135m --batch 4 --seq 256 --steps 4 --warmup 1 \
        --out benchmarks/results/profile_step_smollm2          # the causal LM (LoRA on all seven roles)
    ... --model smollm2-135m --lm-loss-chunk 1024            # with the chunked loss (lora_ops/training/lm_loss.py)

For the causal LM the output projection (576 x 49,152, tied to the embeddings) and the loss after it run
inside a ``lm_head+loss`` range of their own, so the table shows what they cost apart from the decoder.

Writes benchmarks/results/profile_step.md and .json (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

PHASES = ("forward", "lm_head+loss", "backward", "optimiser")  # lm_head+loss: inside forward
GEMM = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation",
        "aten::mkldnn_linear", "aten::_mkldnn_matmul", "aten::mkldnn_matmul", "mkldnn::", "aten::_weight_int8pack_mm")
ATTENTION = ("aten::_scaled_dot_product", "aten::_efficient_attention", "aten::_flash_attention")


def category(name: str) -> str:
    if name.startswith(ATTENTION):
        return "attention"
    if name.startswith(GEMM) or name in GEMM:
        return "gemm"
    return "elementwise"


def build(seq: int, batch: int, rank: int, model_name: str = "minilm"):  # type: ignore[no-untyped-def]
    from common import fixed_batch, minilm

    from lora_ops.methods import AdapterConfig, MethodContext, get_method
    from lora_ops.targets import find_targets, freeze_all_but

    torch.manual_seed(42)
    causal = model_name != "minilm"
    if causal:
        from transformers import AutoModelForCausalLM

        from stages.common.models import resolve_model

        model = AutoModelForCausalLM.from_pretrained(resolve_model(model_name).path).float()
    else:
        model = minilm()
    method = get_method("lora")
    ctx = MethodContext(adapter=AdapterConfig(rank=rank, alpha=2 * rank), params=method.params_model(), seed=42)
    targets = find_targets(model, "all")
    method.build(model, targets, method.decide([], targets, ctx), ctx)
    freeze_all_but(model, [] if causal else ["classifier"])
    if causal:
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        return model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    data = fixed_batch(batch, seq)
    data["token_type_ids"] = torch.zeros_like(data["input_ids"])
    return model, data


class _Range:
    """A profiler range opened and closed from hooks (forward hooks cannot hold a ``with`` block)."""

    def __init__(self, name: str) -> None:
        self.name, self.active = name, None

    def enter(self, *_) -> None:  # type: ignore[no-untyped-def]
        self.active = record_function(self.name)
        self.active.__enter__()

    def leave(self, *_) -> None:  # type: ignore[no-untyped-def]
        if self.active is not None:
            self.active.__exit__(None, None, None)
            self.active = None


def make_step(model, data, precision: str, fused: bool, lm_loss_chunk: int = 0):  # type: ignore[no-untyped-def]
    from lora_ops.training import precision as amp
    from lora_ops.training.lm_loss import causal_lm_loss, chunked_loss_unsupported

    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, fused=True) if fused else torch.optim.AdamW(trainable, lr=1e-4)
    model.train()

    head_range = _Range("lm_head+loss")  # causal LMs: from the output projection to the loss, in forward
    causal = not chunked_loss_unsupported(model)  # a decoder + plain output projection: a causal LM
    if causal and not lm_loss_chunk:
        model.get_output_embeddings().register_forward_pre_hook(head_range.enter)
        model.register_forward_hook(head_range.leave)  # the model's forward returns after its loss

    def loss_of() -> torch.Tensor:
        if lm_loss_chunk:  # the decoder runs inside causal_lm_loss: the range starts when it returns
            decoder_done = model.get_decoder().register_forward_hook(head_range.enter)
            try:
                return causal_lm_loss(model, data, lm_loss_chunk)
            finally:
                head_range.leave()
                decoder_done.remove()
        return model(**data).loss

    def step() -> None:
        with record_function("forward"), amp.autocast(precision, "cpu"):
            loss = loss_of()
        with record_function("backward"):
            loss.backward()
        with record_function("optimiser"):
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def median_step(step, n: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(n):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(prof, steps: int) -> dict:  # type: ignore[no-untyped-def]
    """Per phase: wall ms and self ms per category, all per step."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    ranges = {e.id: e.name for e in events if e.name in PHASES}
    out = {p: {"wall": 0.0, "gemm": 0.0, "attention": 0.0, "elementwise": 0.0} for p in PHASES}
    ops: dict[str, float] = {}
    for e in events:
        if e.name in PHASES:
            out[e.name]["wall"] += e.cpu_time_total / 1e3
            continue
        if not e.name.startswith(("aten::", "mkldnn::")):
            continue
        parent, phase = e.cpu_parent, None
        while parent is not None:
            if parent.id in ranges:
                phase = ranges[parent.id]
                break
            parent = parent.cpu_parent
        if phase is None:  # backward ops run in the autograd engine: outside the range's parent chain
            phase = "backward"
        out[phase][category(e.name)] += e.self_cpu_time_total / 1e3
        ops[e.name] = ops.get(e.name, 0.0) + e.self_cpu_time_total / 1e3
    out["forward"]["wall"] -= out["lm_head+loss"]["wall"]  # the nested range's time counted once, in its own row
    for p in PHASES:
        row = out[p]
        row["python/autograd"] = max(0.0, row["wall"] - row["gemm"] - row["attention"] - row["elementwise"])
        for k in row:
            row[k] /= steps
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:15]
    return {"phases": out, "top_ops": [(n, t / steps) for n, t in top]}


def profile_precision(precision: str, args: argparse.Namespace) -> dict:
    model, data = build(args.seq, args.batch, args.rank, args.model)
    step = make_step(model, data, precision, args.fused_adamw, args.lm_loss_chunk)
    torch.set_num_threads(args.threads)
    for _ in range(args.warmup):
        step()
    wall = median_step(step, args.steps)
    torch.set_num_threads(1)
    wall_1 = median_step(step, max(3, args.steps // 2))
    torch.set_num_threads(args.threads)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    if args.trace_dir:
        Path(args.trace_dir).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(args.trace_dir) / f"profile_step_{precision}.json"))
    result = breakdown(prof, args.steps)
    result.update({"step_ms": 1e3 * wall, "step_ms_1_thread": 1e3 * wall_1, "threads": args.threads,
                   "thread_speedup": wall_1 / wall})
    return result


def markdown(results: dict[str, dict], args: argparse.Namespace) -> str:
    from common import table

    what = ("MiniLM, LoRA r {r} on all six linear types" if args.model == "minilm" else
            f"{args.model}, LoRA r {{r}} on all seven roles, " +
            (f"chunked loss ({args.lm_loss_chunk} rows)" if args.lm_loss_chunk else "the model's own loss"))
    lines = [f"# Training step profile: {what.format(r=args.rank)}, batch {args.batch} x "
             f"{args.seq} tokens, {args.threads} threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}, "
             f"AdamW {'fused' if args.fused_adamw else 'loop'}, torch {torch.__version__}", ""]
    if args.note:
        lines += [f"**{args.note}**", ""]
    cats = ("wall", "gemm", "attention", "elementwise", "python/autograd")
    for prec, r in results.items():
        lines += [f"## {prec}: {r['step_ms']:.1f} ms per step untraced ({r['step_ms_1_thread']:.1f} ms on 1 thread: "
                  f"{r['thread_speedup']:.2f}x from {r['threads']} threads)", ""]
        shown = [p for p in PHASES if p != "lm_head+loss" or r["phases"][p]["wall"] > 0]  # causal LMs only
        rows = [(p, *(f"{r['phases'][p][c]:.1f}" for c in cats)) for p in shown]
        tot = {c: sum(r["phases"][p][c] for p in PHASES) for c in cats}
        rows.append(("step (traced)", *(f"{tot[c]:.1f}" for c in cats)))
        rows.append(("share of step", *(f"{100 * tot[c] / tot['wall']:.0f} %" for c in cats)))
        lines += [table(rows, ("phase, ms/step", *cats)), "", "top ops by self time (ms/step): " +
                  ", ".join(f"{n} {t:.1f}" for n, t in r["top_ops"][:10]), ""]
    lines.append("Categories: module docstring of benchmarks/profile_step.py. Traced times include the "
                 "profiler's own overhead; the untraced step time is the reference.")
    return "\n".join(lines) + "\n"


def _relative(path: str) -> str:
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else resolved.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--seq", type=int, default=32, help="tokens per example (SST-2 batches grouped by length "
                                                        "average about 30 at max_length 64)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--fused-adamw", action="store_true")
    ap.add_argument("--model", default="minilm", choices=["minilm", "smollm2-135m"])
    ap.add_argument("--lm-loss-chunk", type=int, default=0, help="causal LM: the chunked loss, this many rows")
    ap.add_argument("--trace-dir", default=None)
    ap.add_argument("--note", default="", help="a line printed under the title (e.g. the machine's state)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "profile_step"))
    args = ap.parse_args()
    results = {p: profile_precision(p, args) for p in args.precisions}
    text = markdown(results, args)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text(text)
    shown = {**vars(args), "out": _relative(args.out)}  # no machine paths in committed results
    Path(args.out + ".json").write_text(json.dumps({"args": shown, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
