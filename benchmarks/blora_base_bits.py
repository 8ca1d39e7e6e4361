"""How few bits MiniLM's frozen path tolerates: B-LoRA's ``quantize_base`` quantisers on a trained LoRA.

B-LoRA with ``quantize_base: true`` fake-quantises, in every adapted layer, the base weight and bias
(``Q_W``), the base output (``Q_h``) and the layer's output (``Q_o``), each per tensor with learned bit
gates. On CoLA its runs end at the majority class. This asks what the bit widths those gates reach cost
a model that did learn the task: it trains plain LoRA with the pipeline's recipe (no quantiser in
training; the last state, no best-epoch selection), then scores it with the adapted layers' frozen path
run through the very same quantiser
(:class:`lora_ops.quant.BayesianBitsQuantizer`, gates fixed at one bit width of its grid; ``Q_W``'s range
from the weight, ``Q_h`` / ``Q_o`` from min/max over the calibration sample, as B-LoRA's calibrate stage
sets them, then fixed: B-LoRA trains its ranges, which this does not) and reports validation and dev against the unquantised model, paired by seed (dev
differences with a hierarchical bootstrap interval over seeds and examples). The adapter branch stays
in float: only what ``quantize_base`` adds is quantised.

Needs ``data/prepare`` for the same data overrides (``dvc exp run -S ... prepare`` first)::

    dvc exp run -S task.name=cola -S data.validation_size=2000 prepare
    python benchmarks/blora_base_bits.py -S task.name=cola -S data.validation_size=2000 --seeds 1 2

Writes ``results/blora_base_bits.{json,md}``; a run already in the json is not trained again.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import table  # noqa: E402
from benchmarks.recipe_ablation import parse, train_variant  # noqa: E402
from lora_ops.adapters.base import AdapterLayer, adapter_layers  # noqa: E402
from lora_ops.quant import BayesianBitsQuantizer  # noqa: E402
from lora_ops.stats import SeedRun, format_interval, paired_difference, task_metric  # noqa: E402
from stages.common.calibration import calibration_sample  # noqa: E402
from stages.common.context import task_of  # noqa: E402
from stages.common.evaluation import predict  # noqa: E402
from stages.common.features import tokenize  # noqa: E402
from stages.common.io import read_parquet  # noqa: E402
from stages.common.params import load_params  # noqa: E402
from stages.common.paths import Paths  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
#: which of quantize_base's quantisers each variant switches on
PARTS = {"W": ("W",), "h+o": ("h", "o"), "W+h+o": ("W", "h", "o")}


def fail(message: str) -> NoReturn:
    """Bad input: one line on stderr and exit code 2, before anything is written."""
    print(f"blora_base_bits: {message}", file=sys.stderr)
    raise SystemExit(2)


def fixed_quantizer(bits: Sequence[int], width: int) -> BayesianBitsQuantizer:
    """B-LoRA's quantiser with its gates pinned so the deterministic read-out is ``width`` bits."""
    if width not in bits:
        fail(f"{width} bits is not on B-LoRA's grid {list(bits)}")
    q = BayesianBitsQuantizer(bits, learn_range=False)
    on = list(bits).index(width)  # gates z_4.. up to this level on, the rest off
    with torch.no_grad():
        q.log_alpha.copy_(torch.tensor([20.0 if k < on else -20.0 for k in range(len(bits) - 1)]))
    return q.eval()


class QuantizedBasePath(nn.Module):
    """``y = Q_o(Q_h(x Q_W(W)^T + Q_W(b)) + s B A x)``: the layer as ``quantize_base`` computes it, with
    the adapter branch in float. A part left out of ``quantizers`` is the identity."""

    def __init__(self, layer: AdapterLayer, quantizers: dict[str, BayesianBitsQuantizer]) -> None:
        super().__init__()
        self.base = layer.base
        a, b, scale = layer.as_lora()
        self.register_buffer("A", a.detach().clone())
        self.register_buffer("B", b.detach().clone())
        self.scale = float(scale)
        self.quantizers = nn.ModuleDict(quantizers)
        if "W" in quantizers:  # the frozen weight and bias, quantised once (their range comes from W)
            qw = quantizers["W"]
            with torch.no_grad():
                self.weight_q = qw(self.base.weight, deterministic=True)
                bias = self.base.bias
                self.bias_q = None if bias is None else qw(bias, deterministic=True)
        else:
            self.weight_q, self.bias_q = self.base.weight, self.base.bias
        #: while True the frozen weight runs in float: activation ranges are observed on the float path
        self.calibrating = False

    def _q(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.quantizers[name](x, deterministic=True) if name in self.quantizers else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = (self.base.weight, self.base.bias) if self.calibrating else (self.weight_q, self.bias_q)
        h = self._q("h", F.linear(x, w, b))
        return self._q("o", h + self.scale * ((x @ self.A.t()) @ self.B.t()))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@contextmanager
def quantized_base(model: nn.Module, parts: Sequence[str], bits: Sequence[int], width: int,
                   calibration: Iterable[dict[str, torch.Tensor]]) -> Iterator[None]:
    """Swap every adapter layer for its :class:`QuantizedBasePath` at ``width`` bits; activation ranges
    are observed on ``calibration`` first (float forward, as B-LoRA's calibrate stage)."""
    layers = adapter_layers(model)
    swapped = {name: QuantizedBasePath(layer, {p: fixed_quantizer(bits, width).to(layer.base.weight.device)
                                               for p in parts})
               for name, layer in layers.items()}
    for name, module in swapped.items():
        _set_module(model, name, module)
    activations = [q for m in swapped.values() for p, q in m.quantizers.items() if p != "W"]
    try:
        if activations:
            for q in activations:
                q.observing = True
            for m in swapped.values():
                m.calibrating = True
            with torch.no_grad():
                model.eval()
                for batch in calibration:
                    model(**{k: v for k, v in batch.items() if k != "labels"})
            for m in swapped.values():
                m.calibrating = False
            for q in activations:
                q.observing = False
                if q.observed is None:
                    raise RuntimeError("a quantiser saw no calibration input")
                q.set_range(*q.observed)
        yield
    finally:
        for name, layer in layers.items():
            _set_module(model, name, layer)


def variant_keys(widths: Sequence[int]) -> list[str]:
    """The variants scored per seed, in report order: ``<parts>@<bits>``."""
    return [f"{parts}@{width}" for parts in PARTS for width in widths]


def run_seed(overrides: dict, seed: int, widths: Sequence[int], steps: int | None) -> dict:
    """Train LoRA at ``seed``, then predict validation and dev for the float model and every variant."""
    run = train_variant({**overrides, "seed": seed}, steps=steps)
    params, model = run.params, run.adapted.model
    task, tok = task_of(params), run.adapted.loaded.tokenizer
    if task.is_regression:
        fail("this ablation scores classification tasks (argmax predictions)")
    splits = {name: tokenize(read_parquet(path), task, tok, params.model.max_length)
              for name, path in (("validation", Paths.validation), ("dev", Paths.dev))}
    device, batch = run.adapted.ctx.device, params.evaluate.batch_size
    bits = tuple(params.model_dump()["blora"]["bits"])  # B-LoRA's grid, as params.yaml sets it

    def predictions() -> dict[str, list[int]]:
        return {name: predict(model, f, batch, device).argmax(-1).tolist() for name, f in splits.items()}

    out = {"seed": seed, "train_seconds": run.seconds, "steps": run.result.steps,
           "labels": {name: f["labels"].tolist() for name, f in splits.items()},
           "float": predictions(), "variants": {}}
    sample, _ = calibration_sample(params, tok)  # tokenised and batched once, observed by every variant
    calibration = [{k: v.to(device) for k, v in sample.collate(idx).items()} for idx in sample.batch_indices()]
    for key in variant_keys(widths):
        parts_name, width = key.split("@")
        with quantized_base(model, PARTS[parts_name], bits, int(width), calibration):
            out["variants"][key] = predictions()
        print(f"seed {seed}: {parts_name} at {width} bits done", flush=True)
    return out


def report(runs: list[dict], metric_name: str) -> str:
    metric = task_metric(metric_name)
    rows = []
    labels = {r["seed"]: {k: np.asarray(v) for k, v in r["labels"].items()} for r in runs}

    def seed_runs(key: str | None, split: str) -> list[SeedRun]:
        return [SeedRun(r["seed"], np.asarray(r["float"][split] if key is None else r["variants"][key][split]),
                        labels[r["seed"]][split]) for r in runs]

    def mean_score(key: str | None, split: str) -> float:
        return 100 * float(np.mean([metric(s.predictions, s.labels) for s in seed_runs(key, split)]))

    rows.append(("float (no quantiser)", "-", f"{mean_score(None, 'validation'):.2f}",
                 f"{mean_score(None, 'dev'):.2f}", "-"))
    for key in runs[0]["variants"]:
        parts, width = key.split("@")
        diff = paired_difference(seed_runs(key, "dev"), seed_runs(None, "dev"), metric, scale=100)
        rows.append((parts, width, f"{mean_score(key, 'validation'):.2f}", f"{mean_score(key, 'dev'):.2f}",
                     format_interval(diff)))
    seeds = ", ".join(str(r["seed"]) for r in runs)
    head = (f"Trained LoRA (seeds {seeds}; {runs[0]['steps']} steps) scored with B-LoRA's `quantize_base` "
            f"quantisers fixed at one width. {metric_name} ×100, mean over seeds; dev difference against the "
            "float model paired by seed, 95 % hierarchical bootstrap interval.\n\n")
    return head + table(rows, ("quantised", "bits", f"validation {metric_name}", f"dev {metric_name}",
                                "dev − float [95 % CI]")) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-S", "--set", action="append", default=[], help="param override (as dvc exp run -S)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 8, 4, 2])
    ap.add_argument("--steps", type=int, default=None, help="training steps (default: the params' budget)")
    ap.add_argument("--out", type=Path, default=RESULTS / "blora_base_bits")
    args = ap.parse_args()
    overrides = {**parse(args.set), "method.name": "lora", "steps": args.steps}
    params_overrides = {k: v for k, v in overrides.items() if k != "steps"}
    path = args.out.with_suffix(".json")
    stored = json.loads(path.read_text()) if path.exists() else {"overrides": overrides, "runs": []}
    if stored["overrides"] != overrides:
        fail(f"{path} holds runs with other overrides {stored['overrides']}: pass another --out")
    params = load_params(overrides=params_overrides)
    for width in args.widths:  # an off-grid width fails now, not after a training run
        fixed_quantizer(tuple(params.model_dump()["blora"]["bits"]), width)
    wanted = variant_keys(args.widths)
    for run in stored["runs"]:
        if run["seed"] in args.seeds and list(run["variants"]) != wanted:
            fail(f"{path}: seed {run['seed']} was scored at other widths "
                             f"({sorted({int(k.split('@')[1]) for k in run['variants']})}): pass those --widths or another --out")
    for seed in args.seeds:
        if any(r["seed"] == seed for r in stored["runs"]):
            continue
        stored["runs"].append(run_seed(params_overrides, seed, args.widths, args.steps))
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(stored))
        tmp.replace(path)  # a killed run keeps the seeds already done
    runs = sorted((r for r in stored["runs"] if r["seed"] in args.seeds), key=lambda r: r["seed"])
    metric_name = task_of(params).main_metric
    text = report(runs, metric_name)
    sets = " ".join("-S " + item for item in args.set)
    command = (f"dvc exp run {sets} prepare\npython benchmarks/blora_base_bits.py {sets} "
               f"--seeds {' '.join(map(str, args.seeds))}{'' if args.steps is None else f' --steps {args.steps}'}")
    args.out.with_suffix(".md").write_text(f"# B-LoRA's base quantisers on a trained LoRA\n\n```bash\n{command}\n```\n\n"
                                           f"{text}")
    print(text)


if __name__ == "__main__":
    main()
