"""How much the ``output`` criterion changes what rank trimming keeps, measured as output error.

Reads the default run's products in the working tree (``dvc repro`` first; ``-S`` overrides as for the
stages, e.g. another task's run made with ``dvc exp run``): the trained adapter (``data/finetune``), its plan,
the calibration sample the compress stage uses, and the validation split. For global budgets of K kept
components, ranks chosen the stage's way (one threshold over every component's normalised energy, in each
criterion's own basis), it prints the relative output error of the trimmed adapter

    err(K) = Σ_pairs ‖(ΔW − ΔW_K) X‖² / Σ_pairs ‖ΔW X‖²

for ``svd`` (plain singular values of ``ΔW``) and ``output`` (SVD of ``ΔW`` whitened by the module's input
second moment), on the calibration tokens the output criterion was fitted to and on the validation tokens
it never saw. Factor space only: ``ΔW − ΔW_K`` lies in the row space of ``A``, so with ``G = Σ (A x)(A x)ᵀ``
the error is ``tr(P G Pᵀ)`` where ``ΔW − ΔW_K = P A``; no dense ``X`` is kept.

    python benchmarks/output_vs_svd.py --budgets 8 16 32 64 128
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def grams_on(model, sites, batches, device) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    """``G`` per pair over the non-padding tokens of ``batches``."""
    from lora_ops.compress.adapter import StatsRecorder

    recorder = StatsRecorder(model, sites, base_energy=False)
    try:
        with torch.no_grad():
            for batch in batches:
                batch = {k: v.to(device) for k, v in batch.items()}
                recorder.set_token_mask(batch.get("attention_mask"))
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        recorder.remove()
    return {k: g.gram for k, g in recorder.grams.items()}


def output_error(site, decomposition, rank: int, gram: torch.Tensor) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(‖(ΔW − ΔW_rank) X‖², ‖ΔW X‖²) in factor space, float64."""
    a, b = site.a.detach().double(), site.b.detach().double()
    delta = site.scale * b @ a
    ka, kb = decomposition.factors(rank, site.scale)
    residual = delta - site.scale * kb.double() @ ka.double()
    # residual = P A (it lies in A's row space): least squares, so a rank-deficient A (zeroed rows) works too
    p = torch.linalg.lstsq(a.t(), residual.t()).solution.t()
    full = site.scale * b
    return float(torch.trace(p @ gram @ p.t())), float(torch.trace(full @ gram @ full.t()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--budgets", nargs="+", type=int, default=[8, 16, 32, 64, 128])
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()

    from benchmarks.common import table
    from flows.pipeline import parse_override
    from lora_ops.compress import decompose_output, decompose_svd, ranks_at_global_budget
    from lora_ops.compress.adapter import pair_sites
    from lora_ops.data import BatchSource
    from lora_ops.training import load_trainable_state
    from stages.common.adapted import build_adapted
    from stages.common.calibration import calibration_sample
    from stages.common.context import task_of
    from stages.common.features import tokenize
    from stages.common.io import read_json, read_parquet, read_safetensors
    from stages.common.params import load_params
    from stages.common.paths import Paths

    params = load_params(overrides=dict(parse_override(s) for s in args.set)) if args.set else load_params()
    plan = read_json(Paths.plan)
    adapted = build_adapted(params, plan)
    load_trainable_state(adapted.model, read_safetensors(Paths.adapter))
    model, device = adapted.model.eval(), adapted.ctx.device
    sites = pair_sites(model)
    sample, _ = calibration_sample(params, adapted.loaded.tokenizer)
    calibration = grams_on(model, sites, sample.batches(0), device)
    validation_features = tokenize(read_parquet(Paths.validation), task_of(params), adapted.loaded.tokenizer,
                                   params.model.max_length)
    validation = grams_on(model, sites, BatchSource({k: v for k, v in validation_features.items() if k != "labels"},
                                                    64, shuffle=False).batches(), device)
    ridge = params.compress.ridge
    decompositions = {
        "svd": {s.key: decompose_svd(s.a, s.b, s.scale) for s in sites},
        "output": {s.key: decompose_output(s.a, s.b, s.scale, calibration[s.key], ridge) for s in sites},
    }
    total = sum(d.max_rank for d in decompositions["svd"].values())
    rows = []
    for budget in [b for b in args.budgets if b <= total]:
        errors = {}
        for criterion, decs in decompositions.items():
            ranks = ranks_at_global_budget({k: d.energies for k, d in decs.items()}, budget,
                                           params.compress.normalisation, None)
            for split, grams in (("calibration", calibration), ("validation", validation)):
                pairs = [output_error(s, decs[s.key], ranks[s.key], grams[s.key]) for s in sites]
                errors[(criterion, split)] = sum(e for e, _ in pairs) / sum(f for _, f in pairs)
            errors[(criterion, "modules")] = sum(1 for r in ranks.values() if r > 0)
        rows.append((str(budget), *(f"{100 * errors[(c, s)]:.2f} %" for s in ("calibration", "validation")
                                    for c in ("svd", "output")),
                     (f"{errors[('output', 'validation')] / errors[('svd', 'validation')]:.3f}"
                      if errors[("svd", "validation")] else "-"),
                     f"{errors[('svd', 'modules')]} / {errors[('output', 'modules')]}"))
    print(f"{params.model.name}, {params.task.name}, method {params.method.name}, {len(sites)} pairs, {total} "
          f"components; calibration tokens: the compress stage's sample; validation: "
          f"{len(validation_features['labels'])} examples never used by the statistics\n")
    print(table(rows, ("kept K", "svd err (calib.)", "output err (calib.)", "svd err (valid.)",
                       "output err (valid.)", "output / svd (valid.)", "pairs kept svd / output")))


if __name__ == "__main__":
    main()
