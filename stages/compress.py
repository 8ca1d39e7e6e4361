"""compress: the trained adapter made smaller -- rank trimming by singular components and low-bit factors,
chosen on the validation split (never dev). Writes the product adapter that merge, evaluate, the
exports, the registry and serving use.

* ``compress.rank: none`` and ``compress.bits: none``, or a method whose layers have no LoRA form
  (``Method.compress_skip_reason``): the finetuned adapter's exact bytes pass through.
* otherwise: input statistics of the trained adapter on the calibration sample (forward hooks, padding
  excluded), every pair decomposed once (a pair shared by several modules once, over all of them),
  the kept components chosen by the budget (searched on validation, or fixed), factors quantised, and
  a compact safetensors written (codes + scales + head + one JSON metadata key).
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pandas as pd
import torch
from safetensors.torch import save_file

from lora_ops.adapters.base import adapter_layers
from lora_ops.compress import (
    decompose_output,
    decompose_svd,
    ranks_at_global_budget,
    ranks_at_global_threshold,
    ranks_at_module_energy,
)
from lora_ops.compress.adapter import (
    CompressedAdapter,
    StatsRecorder,
    StoredPair,
    pair_bytes,
    pair_sites,
    store_pair,
)
from lora_ops.compress.recover import recover, steps_config
from lora_ops.compress.search import Candidate, search_bits, search_budget, within_tolerance
from lora_ops.compress.trim import Decomposition
from lora_ops.data import BatchSource
from lora_ops.methods import get_method
from lora_ops.stats import SeedRun, paired_difference, task_metric
from lora_ops.targets import unload
from lora_ops.training import load_trainable_state
from stages.common import runtime
from stages.common.adapted import build_adapted
from stages.common.calibration import calibration_sample
from stages.common.context import select_metric, task_of
from stages.common.evaluation import evaluate_features, predict, task_metrics
from stages.common.features import tokenize
from stages.common.io import atomic_path, read_json, read_parquet, read_safetensors, write_json
from stages.common.params import CompressParams, Params, load_params
from stages.common.paths import Paths
from stages.common.product import tensor_bytes
from stages.common.tracking import StageRun

CURVE_COLUMNS = ["components", "bits", "stored_bytes", "metric", "metric_bound", "within", "recovered", "chosen"]
BOUND_DRAWS = 1000  # bootstrap draws per candidate's paired bound (~0.1 s on 400 validation examples)
WIDTHS = (8, 4, 0)  # bits searched (0 = float32 factors), in lora_ops.compress.search.WALK_ORDER


def bits_value(bits: int | str) -> int:
    return 0 if bits == "none" else int(bits)


def head_tensors(state: dict[str, torch.Tensor], plan: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The trained tensors outside the planned adapter modules (the task head)."""
    modules = tuple(f"{m}." for m in plan["modules"])
    return {k: v for k, v in state.items() if not k.startswith(modules)}


def pass_through(reason: str, run: Any, plan: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
    """The finetuned adapter, byte for byte, as the product."""
    with atomic_path(Paths.compressed) as tmp:
        shutil.copyfile(Paths.adapter, tmp)
    state = read_safetensors(Paths.compressed)
    stored = tensor_bytes(state)
    write_curve([], None)
    write_json(Paths.compress_summary, {**(extra or {}), "applied": False, "reason": reason, "stored_bytes": stored,
                                        "head_bytes": tensor_bytes(head_tensors(state, plan))})
    run.log_metrics({"compress.stored_bytes": stored, "compress.applied": 0})
    print(f"compress: {reason}; the finetuned adapter passes through unchanged ({stored:,} bytes)")


def write_curve(curve: list[Candidate], chosen: Candidate | None) -> None:
    rows = [{**c.row(), "chosen": c == chosen} for c in curve]
    with atomic_path(Paths.compress_curve) as tmp:
        pd.DataFrame(rows, columns=CURVE_COLUMNS).to_csv(tmp, index=False)


class NotCompressible(Exception):
    """The trained adapter has layers without a LoRA form: the stage passes it through and says why."""


class Compressor:
    """The trained adapter's pairs, their decompositions, and candidates evaluated on validation."""

    def __init__(self, params: Params, plan: dict[str, Any], state: dict[str, torch.Tensor]) -> None:
        self.params, self.cp = params, params.compress
        adapted = build_adapted(params, plan)
        load_trainable_state(adapted.model, state)
        self.model = adapted.model.eval()
        self.device = adapted.ctx.device
        self.tokenizer, self.train_cfg = adapted.loaded.tokenizer, adapted.ctx.train
        self._recovered: dict[tuple[tuple[str, int], ...], CompressedAdapter] = {}
        self.recovery_seconds, self.recoveries = 0.0, 0
        self.head = {k: v.contiguous() for k, v in sorted(head_tensors(state, plan).items())}
        formless = [n for n, layer in adapter_layers(self.model).items() if not hasattr(layer, "as_lora")]
        if formless:
            raise NotCompressible(f"{formless[0]} ({type(adapter_layers(self.model)[formless[0]]).__name__}) has no "
                                  "LoRA form (as_lora) to trim or quantise")
        self.sites = pair_sites(self.model)
        self.tokens = 0
        needs_stats = self.cp.rank == "output" or (self.cp.normalisation == "base" and self.cp.budget != "energy")
        grams, self.base_energy = self._statistics(adapted.loaded.tokenizer) if needs_stats else ({}, {})
        self.decompositions: dict[str, Decomposition] = {
            s.key: (decompose_output(s.a, s.b, s.scale, grams[s.key], self.cp.ridge) if self.cp.rank == "output"
                    else decompose_svd(s.a, s.b, s.scale)) for s in self.sites}
        self.energies = {k: d.energies for k, d in self.decompositions.items()}
        self.total = sum(d.max_rank for d in self.decompositions.values())
        # the evaluated models: the base linears with merged weights, exactly as merge folds them
        layers = adapter_layers(self.model)
        with torch.no_grad():
            self.reference_weights = {n: layer.merged_weight(layer.base.weight.data).clone()
                                      for n, layer in layers.items()}
        unload(self.model, merge=False)
        modules = dict(self.model.named_modules())
        self.linears = {n: modules[n] for n in layers}
        self.base_weights = {n: lin.weight.detach().clone() for n, lin in self.linears.items()}
        task = task_of(params)
        self.task, self.metric_name = task, select_metric(params)
        self.validation = tokenize(read_parquet(Paths.validation), task, adapted.loaded.tokenizer,
                                   params.model.max_length)
        self.evaluations = 0

    def _statistics(self, tokenizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        sample, _ = calibration_sample(self.params, tokenizer)
        recorder = StatsRecorder(self.model, self.sites, base_energy=self.cp.normalisation == "base")
        try:
            with torch.no_grad():
                for batch in sample.batches(0):
                    batch = {k: v.to(self.device) for k, v in batch.items()}
                    recorder.set_token_mask(batch.get("attention_mask"))
                    self.model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            recorder.remove()
        self.tokens = max((g.tokens for g in recorder.grams.values()), default=0)
        return {k: g.gram for k, g in recorder.grams.items()}, recorder.base_energy

    # ---------------------------------------------------------------- ranks and pairs
    def ranks_for(self, components: int | None) -> dict[str, int]:
        """Kept rank per site: the global budget ``components``, or the fixed rule of the params."""
        cp = self.cp
        if cp.rank == "none":
            return {k: d.max_rank for k, d in self.decompositions.items()}
        base = self.base_energy if cp.normalisation == "base" else None
        if components is not None:
            return ranks_at_global_budget(self.energies, components, cp.normalisation, base)
        if cp.budget == "energy":
            return ranks_at_module_energy(self.energies, cp.energy)
        if cp.budget == "threshold":
            return ranks_at_global_threshold(self.energies, cp.threshold, cp.normalisation, base)
        return ranks_at_global_budget(self.energies, cp.components, cp.normalisation, base)

    def pairs(self, ranks: dict[str, int], bits: int) -> list[StoredPair]:
        out = []
        for site in self.sites:
            a, b = self.decompositions[site.key].factors(ranks[site.key], site.scale)
            out.append(store_pair(site.modules, a, b, site.scale, bits, self.cp.group_size))
        return out

    # ---------------------------------------------------------------- recovery
    def recovered(self, ranks: dict[str, int]) -> CompressedAdapter:
        """The float pairs at ``ranks`` and the head after ``recovery_steps`` steps on the training split
        (lora_ops.compress.recover), once per distinct set of ranks; the bit widths are applied after it."""
        key = tuple(sorted(ranks.items()))
        if key not in self._recovered:
            start = time.perf_counter()
            with torch.no_grad():  # the base model as merge would see it before folding: base weights back
                for name, lin in self.linears.items():
                    lin.weight.copy_(self.base_weights[name])
            base = copy.deepcopy(self.model)
            float_pairs = CompressedAdapter(pairs=self.pairs(ranks, 0), head=dict(self.head))
            data = BatchSource(self._train_features(), self.params.train.batch_size,
                               seed=runtime.derive_seed(self.params.seed, "recovery") % 2**31,
                               group_by_length=self.params.train.group_by_length,
                               pad_to_multiple_of=self.params.train.pad_to_multiple_of)
            cfg = steps_config(self.train_cfg, self.cp.recovery_steps, len(data), self.cp.recovery_lr)
            runtime.seed_everything(runtime.derive_seed(self.params.seed, "recovery-dropout"))
            head_modules = sorted({name.rsplit(".", 1)[0] for name in self.head})
            self._recovered[key] = recover(base, float_pairs, head_modules, data, cfg, self.device)
            self.recoveries += 1
            self.recovery_seconds += time.perf_counter() - start
        return self._recovered[key]

    def recovered_pairs(self, ranks: dict[str, int], bits: int) -> tuple[list[StoredPair], dict[str, torch.Tensor]]:
        rec = self.recovered(ranks)
        pairs = [store_pair(p.modules, p.a, p.b, p.scale, bits, self.cp.group_size) for p in rec.pairs]
        return pairs, rec.head

    def _train_features(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_train_f"):
            self._train_f = tokenize(read_parquet(Paths.train), self.task, self.tokenizer,
                                     self.params.model.max_length)
        return self._train_f

    def size(self, ranks: dict[str, int], bits: int) -> int:
        return tensor_bytes(self.head) + sum(
            pair_bytes(ranks[s.key], s.a.shape[1], s.b.shape[0], bits, self.cp.group_size) for s in self.sites)

    # ---------------------------------------------------------------- validation
    @property
    def paired(self) -> bool:
        """Candidates are judged by a paired lower bound (a classification or regression metric that the
        per-example predictions reproduce), not by a loss."""
        return self.cp.confidence is not None and self.metric_name != "loss"

    def _metric(self, weights: dict[str, torch.Tensor]) -> float:
        with torch.no_grad():
            for name, lin in self.linears.items():
                lin.weight.copy_(weights[name])
        self.evaluations += 1
        if not self.paired:
            metrics = evaluate_features(self.model, self.validation, self.task, self.params.evaluate.batch_size,
                                        self.device)
            return float(metrics[self.metric_name])
        logits = predict(self.model, self.validation, self.params.evaluate.batch_size, self.device)
        self.last_predictions = logits.squeeze(-1) if self.task.is_regression else logits.argmax(-1)
        return float(task_metrics(self.task, logits, self.validation["labels"])[self.metric_name])

    def reference_metric(self) -> float:
        metric = self._metric(self.reference_weights)
        if self.paired:
            self.reference_predictions = self.last_predictions
        self.reference = metric
        return metric

    def metric_bound(self) -> float | None:
        """Lower confidence bound of the last evaluated candidate's metric: the uncompressed metric plus the
        lower end of a paired bootstrap interval of (candidate - uncompressed) over the validation examples.
        A 0.5-point tolerance on a few hundred examples is a handful of predictions; judging the bound
        keeps a candidate that only passed by luck (many flipped predictions, a few net) from being chosen."""
        if not self.paired:
            return None
        labels = self.validation["labels"].numpy()
        one_sided = self.cp.confidence
        diff = paired_difference([SeedRun(0, self.last_predictions.numpy(), labels)],
                                 [SeedRun(0, self.reference_predictions.numpy(), labels)],
                                 task_metric(self.metric_name), draws=BOUND_DRAWS,
                                 confidence=1 - 2 * (1 - one_sided), seed=0)
        return self.reference + min(diff.low, 0.0)  # a gain is no reason to trust a candidate more

    def metric(self, pairs: list[StoredPair], head: dict[str, torch.Tensor] | None = None) -> float:
        """Validation metric of these pairs (and ``head``, a recovered one; else the trained head)."""
        weights = dict(self.base_weights)
        for pair in pairs:
            if pair.rank:
                delta = pair.delta_weight()
                for m in pair.modules:  # AdapterLayer.merged_weight of a LoRALinear holding this pair
                    weights[m] = self.base_weights[m] + delta.to(self.base_weights[m].dtype)
        if head is None:
            return self._metric(weights)
        self._set_head(head)
        try:
            return self._metric(weights)
        finally:
            self._set_head(self.head)

    def _set_head(self, head: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, value in head.items():
                params[name].copy_(value)

    @property
    def higher_is_better(self) -> bool:
        return self.metric_name != "loss"


def choose(comp: Compressor) -> tuple[Candidate | None, list[Candidate], float, dict[str, int] | None]:
    """The chosen candidate, the walked curve, the reference validation metric and the fixed ranks (if any)."""
    cp = comp.cp
    reference = comp.reference_metric()
    widths = WIDTHS if cp.bits == "search" else (bits_value(cp.bits),)
    if cp.budget == "search" and cp.rank != "none":
        def size(n: int, bits: int) -> int:
            return comp.size(comp.ranks_for(n), bits)

        def evaluate(n: int, bits: int) -> float:
            return comp.metric(comp.pairs(comp.ranks_for(n), bits))

        chosen, curve = search_budget(size, evaluate, comp.total, widths, reference, cp.tolerance,
                                      comp.higher_is_better, bound=lambda _n, _bits: comp.metric_bound())
        if cp.recovery_steps:
            # the same search over recovered candidates, below the budget plain trimming reached: kept only
            # where it stores less than the plain winner within the same tolerance
            def evaluate_recovered(n: int, bits: int) -> float:
                return comp.metric(*comp.recovered_pairs(comp.ranks_for(n), bits))

            top = chosen.components if chosen is not None else comp.total
            rec, rec_curve = search_budget(size, evaluate_recovered, top, widths, reference, cp.tolerance,
                                           comp.higher_is_better, bound=lambda _n, _bits: comp.metric_bound())
            curve += [replace(c, recovered=True) for c in rec_curve]
            if rec is not None and (chosen is None or rec.stored_bytes < chosen.stored_bytes):
                chosen = replace(rec, recovered=True)
        return chosen, curve, reference, None
    ranks = comp.ranks_for(None)
    kept = sum(ranks.values())
    fixed_size: Callable[[int, int], int] = lambda _n, bits: comp.size(ranks, bits)  # noqa: E731
    fixed_eval: Callable[[int, int], float] = lambda _n, bits: comp.metric(comp.pairs(ranks, bits))  # noqa: E731
    if cp.bits == "search":
        chosen, curve = search_bits(fixed_size, fixed_eval, kept, widths, reference, cp.tolerance,
                                    comp.higher_is_better, bound=lambda _n, _bits: comp.metric_bound())
        if cp.recovery_steps and cp.rank != "none":
            rec, rec_curve = search_bits(fixed_size, lambda _n, bits: comp.metric(*comp.recovered_pairs(ranks, bits)),
                                         kept, widths, reference, cp.tolerance, comp.higher_is_better,
                                         bound=lambda _n, _bits: comp.metric_bound())
            curve += [replace(c, recovered=True) for c in rec_curve]
            if rec is not None and (chosen is None or rec.stored_bytes < chosen.stored_bytes):
                chosen = replace(rec, recovered=True)
        return chosen, curve, reference, ranks
    # a fixed setting: no search, no tolerance check; its validation metric is still reported
    def fixed(recovered: bool) -> Candidate:
        metric = (comp.metric(*comp.recovered_pairs(ranks, widths[0])) if recovered
                  else fixed_eval(kept, widths[0]))
        low = comp.metric_bound()
        judged = metric if low is None else low
        return Candidate(kept, widths[0], fixed_size(kept, widths[0]), metric,
                         within_tolerance(judged, reference, cp.tolerance, comp.higher_is_better), low, recovered)

    cand = fixed(False)
    curve = [cand]
    if cp.recovery_steps and cp.rank != "none":
        # recovered or not is chosen on validation: the better judged metric (the bound where there is one)
        rec = fixed(True)
        curve.append(rec)
        score = (lambda c: c.metric if c.metric_bound is None else c.metric_bound)  # noqa: E731
        better = score(rec) > score(cand) if comp.higher_is_better else score(rec) < score(cand)
        cand = rec if better else cand
    return cand, curve, reference, ranks


def settings_of(cp: CompressParams) -> dict[str, Any]:
    return {k: v for k, v in cp.model_dump().items() if k != "tolerance" or cp.searches}


def main() -> None:
    params = load_params()
    plan = read_json(Paths.plan)
    state = read_safetensors(Paths.adapter)  # truncated or foreign: one line, before anything is written
    method = get_method(params.method.name)
    cp = params.compress
    with StageRun("compress", params.model_dump()) as run:
        if cp.off:
            pass_through("compress is off (rank: none, bits: none)", run, plan)
            return
        if method.compress_skip_reason:
            pass_through(f"compress does not apply to {method.name}: {method.compress_skip_reason}", run, plan)
            return
        start = time.perf_counter()
        try:
            comp = Compressor(params, plan, state)
        except NotCompressible as exc:
            pass_through(f"compress does not apply to {method.name}: {exc}", run, plan)
            return
        setup = time.perf_counter() - start
        chosen, curve, reference, fixed = choose(comp)
        write_curve(curve, chosen)
        seconds = time.perf_counter() - start
        common = {"method": method.name, "settings": settings_of(cp), "metric": comp.metric_name,
                  "validation_reference": reference, "evaluations": comp.evaluations,
                  "total_components": comp.total, "calibration_tokens": comp.tokens,
                  "curve": [c.row() for c in curve]}
        # timings go to MLflow and the log line, never into the outputs (reruns are byte-identical)
        run.log_metrics({"compress.seconds": seconds, "compress.evaluations": comp.evaluations,
                         "compress.validation_reference": reference, "compress.recoveries": comp.recoveries,
                         "compress.recovery_seconds": comp.recovery_seconds})
        run.log_artifact(Paths.compress_curve)
        if chosen is None:
            pass_through(f"no compressed candidate kept validation {comp.metric_name} within {cp.tolerance} "
                         f"point(s) of the uncompressed {reference:.4f}", run, plan, common)
            return
        ranks = fixed if fixed is not None else comp.ranks_for(chosen.components)
        pairs, head = comp.recovered_pairs(ranks, chosen.bits) if chosen.recovered else \
            (comp.pairs(ranks, chosen.bits), comp.head)
        settings = {"method": method.name, "criterion": cp.rank, "budget": cp.budget,
                    "normalisation": cp.normalisation, "components": chosen.components, "bits": chosen.bits,
                    "group_size": cp.group_size}
        if chosen.recovered:  # only then: an adapter without recovery keeps the metadata it always had
            settings["recovery_steps"] = cp.recovery_steps
        adapter = CompressedAdapter(pairs=pairs, head=head, settings=settings)
        tensors, metadata = adapter.to_tensors()
        with atomic_path(Paths.compressed) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        uncompressed = tensor_bytes(state)
        summary = {**common, "applied": True, "components": chosen.components, "bits": chosen.bits,
                   "validation": chosen.metric, "within_tolerance": chosen.within,
                   "ranks": adapter.ranks(), "stored_params": adapter.stored_params,
                   "stored_bytes": adapter.stored_bytes(), "adapter_bytes": adapter.adapter_bytes(),
                   "head_bytes": adapter.head_bytes(), "uncompressed_bytes": uncompressed,
                   "shared_pairs": sum(len(p.modules) > 1 for p in pairs), "recovered": chosen.recovered,
                   "recoveries": comp.recoveries, "recovery_steps_run": comp.recoveries * cp.recovery_steps}
        write_json(Paths.compress_summary, summary)
        run.log_metrics({"compress.stored_bytes": summary["stored_bytes"], "compress.applied": 1,
                         "compress.stored_params": adapter.stored_params, "compress.bits": chosen.bits,
                         "compress.components": chosen.components, "compress.validation": chosen.metric})
        run.log_artifact(Paths.compress_summary)
        print(f"compress: {cp.rank} criterion, {chosen.components} of {comp.total} components, "
              f"{chosen.bits or 32}-bit factors: {summary['stored_bytes']:,} bytes "
              f"({summary['stored_bytes'] / uncompressed:.1%} of the finetuned adapter's {uncompressed:,}); "
              f"validation {comp.metric_name} {chosen.metric:.4f} vs {reference:.4f} uncompressed; "
              f"{comp.evaluations} evaluations; {seconds:.1f}s ({setup:.1f}s model, statistics and decompositions"
              + (f", {comp.recovery_seconds:.1f}s in {comp.recoveries} recoveries of {cp.recovery_steps} steps"
                 f" ({'kept' if chosen.recovered else 'not kept'})" if comp.recoveries else "") + ")")


if __name__ == "__main__":
    runtime.run_stage(main, "compress")
