"""Recipe ablations: train one method on the prepared split with param overrides, report validation.

The quick way to see what a recipe setting does before a study: the finetune stage's model, data,
recipe and controller, without DVC, MLflow or files. It needs ``data/prepare`` (run
``dvc exp run -S ... prepare`` with the same data overrides first) and prints one JSON line per variant::

    python benchmarks/recipe_ablation.py --method adalora --steps 189 -S data.train_size=2000 \\
        --variant 'adalora.recipe.group_lr={}' --variant 'adalora.recipe.group_lr={gates: 5.0e-2}'

Each variant is a ``;``-separated list of ``key=value`` overrides (values are YAML). Every run is
seeded from params (same head, adapter, data order), so variants differ only by their overrides.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lora_ops.data import BatchSource  # noqa: E402
from lora_ops.targets import find_targets  # noqa: E402
from lora_ops.training import train  # noqa: E402
from stages.common import runtime  # noqa: E402
from stages.common.adapted import build_adapted, load_base  # noqa: E402
from stages.common.context import method_context, select_metric, task_of  # noqa: E402
from stages.common.evaluation import evaluate_features  # noqa: E402
from stages.common.features import tokenize  # noqa: E402
from stages.common.io import read_parquet  # noqa: E402
from stages.common.params import load_params  # noqa: E402
from stages.common.paths import Paths  # noqa: E402


def parse(pairs: list[str]) -> dict:
    out = {}
    for item in pairs:
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


@dataclass
class TrainedVariant:
    """A variant trained as the finetune stage would (no files): its model and what it was scored with."""

    params: Any
    method: Any
    adapted: Any
    controller: Any
    result: Any
    seconds: float


def train_variant(overrides: dict, steps: int | None) -> TrainedVariant:
    """Train ``overrides`` on the prepared split; ``steps=None`` keeps the params' own budget."""
    params = load_params(overrides=overrides)
    method, ctx = method_context(params)
    if method.needs_calibration:
        raise SystemExit(f"{method.name} needs its calibrate stage: use the pipeline (dvc exp run) instead")
    base = load_base(params)
    plan = method.decide([], find_targets(base.model, params.adapter.targets), ctx)
    adapted = build_adapted(params, plan)
    task, tok = task_of(params), adapted.loaded.tokenizer
    train_f = tokenize(read_parquet(Paths.train), task, tok, params.model.max_length)
    data = BatchSource(train_f, params.train.batch_size, seed=runtime.derive_seed(params.seed, "data") % 2**31,
                       group_by_length=params.train.group_by_length)
    cfg = adapted.ctx.train
    cfg.progress, cfg.select_metric = False, select_metric(params)
    if steps is not None:
        cfg.max_steps = steps
        cfg.epochs = max(cfg.epochs, -(-steps // len(data)))
    controller = method.controller(adapted.model, plan, adapted.ctx)
    runtime.seed_everything(runtime.derive_seed(params.seed, "dropout", 0))
    started = time.perf_counter()
    result = train(adapted.model, data, cfg, controller=controller)
    return TrainedVariant(params, method, adapted, controller, result, round(time.perf_counter() - started, 1))


def run_variant(overrides: dict, steps: int) -> dict:
    run = train_variant(overrides, steps)
    params, adapted, result = run.params, run.adapted, run.result
    task = task_of(params)
    val_f = tokenize(read_parquet(Paths.validation), task, adapted.loaded.tokenizer, params.model.max_length)
    scoring_started = time.perf_counter()
    metrics = evaluate_features(adapted.model, val_f, task, params.evaluate.batch_size, adapted.ctx.device)
    summary = run.controller.summary()
    seconds = run.seconds + time.perf_counter() - scoring_started  # training and scoring, as before the split
    out = {"validation": metrics, "steps": result.steps, "seconds": round(seconds, 1),
           "final_loss_mean_last10": sum(r["loss"] for r in result.history[-10:]) / min(10, len(result.history)),
           "parameters": run.method.parameter_counts(adapted.model)}
    if "bops" in summary:
        out.update(bops_ratio_adapter=summary["bops"]["ratio_adapter"], mean_rank=summary["mean_rank"])
    if "active_components" in summary:
        out["active_components"] = summary["active_components"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--method", required=True)
    ap.add_argument("--steps", type=int, default=189)
    ap.add_argument("-S", "--set", action="append", default=[], help="override for every variant")
    ap.add_argument("--variant", action="append", default=[], help="';'-separated overrides of one variant")
    args = ap.parse_args()
    common = {**parse(args.set), "method.name": args.method}
    for variant in args.variant or [""]:
        extra = parse([v for v in variant.split(";") if v.strip()])
        res = run_variant({**common, **extra}, args.steps)
        print(json.dumps({"method": args.method, "variant": extra, **res}, default=str), flush=True)


if __name__ == "__main__":
    main()
