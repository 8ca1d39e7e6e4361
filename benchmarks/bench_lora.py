"""Training-step cost of our LoRA vs the frozen floor and vs PEFT's LoRA, and the calibration pass.

MiniLM, batch 32 x 64 tokens, LoRA r=8 on all six linear types of every layer.
  floor   = the same model, frozen, forward + backward with input gradients only
  ours    = lora_ops LoRA (fused autograd node per layer) + AdamW step
  peft    = PEFT LoRA with identical rank, targets and dropout + AdamW step
Run:  python benchmarks/bench_lora.py [--rounds 10] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import fixed_batch, interleaved, minilm, table  # noqa: E402
from lora_ops.importance.output_energy import OutputEnergyRecorder  # noqa: E402
from lora_ops.methods import AdapterConfig, MethodContext, get_method  # noqa: E402
from lora_ops.targets import find_targets, freeze_all_but  # noqa: E402

PEFT_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def ours(base, dropout: float):
    model = copy.deepcopy(base)
    m = get_method("lora")
    ctx = MethodContext(adapter=AdapterConfig(rank=8, alpha=16, dropout=dropout), params=m.params_model())
    targets = find_targets(model, "all")
    layers = m.build(model, targets, m.decide([], targets, ctx), ctx)
    freeze_all_but(model, [])
    return model, layers


def peft_lora(base, dropout: float):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                           target_modules=PEFT_TARGETS))
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    return model


def step_fn(model, batch, embeds=False):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    model.train()

    def step() -> None:
        if embeds:
            x = model.bert.embeddings.word_embeddings(batch["input_ids"]).detach().requires_grad_(True)
            out = model(inputs_embeds=x, attention_mask=batch["attention_mask"], labels=batch["labels"])
        else:
            out = model(**batch)
        out.loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = minilm()
    batch = fixed_batch()
    frozen = copy.deepcopy(base)
    for p in frozen.parameters():
        p.requires_grad_(False)
    rows = []
    for dropout in (0.0, 0.1):
        ours_model, _ = ours(base, dropout)
        peft_model = peft_lora(base, dropout)
        frozen.config.hidden_dropout_prob = base.config.hidden_dropout_prob
        t = interleaved({"floor": step_fn(frozen, batch, embeds=True), "ours": step_fn(ours_model, batch),
                         "peft": step_fn(peft_model, batch)}, rounds=args.rounds)
        rows.append((f"{dropout:g}", f"{t['floor'] * 1e3:.0f}", f"{t['ours'] * 1e3:.0f}", f"{t['peft'] * 1e3:.0f}",
                     f"{t['ours'] / t['floor']:.2f}x", f"{t['peft'] / t['floor']:.2f}x", f"{t['ours'] / t['peft']:.2f}x"))
    print(f"MiniLM, batch 32x64, LoRA r=8 on all six linear types; torch threads={torch.get_num_threads()}; "
          f"median of {args.rounds} interleaved rounds")
    print(table(rows, ("dropout", "floor ms", "ours ms", "peft ms", "ours/floor", "peft/floor", "ours/peft")))

    # calibration pass (LoRA-drop output energy) vs a plain forward of the same adapted model
    model, layers = ours(base, 0.0)
    for layer in layers.values():
        torch.nn.init.normal_(layer.lora.B, std=0.01)
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def plain() -> None:
        with torch.no_grad():
            model(**inputs)

    def hooked() -> None:
        recorder = OutputEnergyRecorder(layers)  # 36 hook registrations: negligible next to a forward
        recorder.set_token_mask(inputs["attention_mask"])
        with torch.no_grad():
            model(**inputs)
        recorder.remove()

    t = interleaved({"plain": plain, "hooked": hooked}, rounds=args.rounds)
    t_plain, t_hooked = t["plain"], t["hooked"]
    print(f"\ncalibration pass: plain forward {t_plain * 1e3:.0f} ms, with output-energy hooks "
          f"{t_hooked * 1e3:.0f} ms -> {t_hooked / t_plain:.2f}x")


if __name__ == "__main__":
    main()
