"""evaluate: task metric of the merged model (loaded with stock transformers), unmerged-vs-merged
output difference, adapter parameters (and ratio to plain LoRA), latency; metrics.json and plots.

A method whose artifact is its own layers as trained (``Method.scored_unmerged_reason``: B-LoRA's
fake-quantised layers) is scored unmerged instead, with the float merge's metrics beside it
(``float_merge_*``); ``scored_model`` in metrics.json says which was scored."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import pandas as pd
import torch

from stages.common import runtime
from stages.common.context import task_of
from stages.common.evaluation import latency_per_batch, lm_loss, median_forward_seconds, predict, task_metrics
from stages.common.features import tokenize
from stages.common.io import (
    check_model_folder,
    read_json,
    read_parquet,
    write_json,
    write_parquet,
)
from stages.common.params import load_params
from stages.common.paths import Paths
from stages.common.plots import plot_importance, plot_loss, plot_placeholder, plot_structure
from stages.common.product import load_product
from stages.common.tracking import StageRun

TIMING_KEYS = ("latency_merged_ms", "latency_unmerged_ms", "latency_dense_ms", "latency_ratio_to_dense",
               "train_seconds", "peak_rss_mb")
DIFF_EXAMPLES = 256  # unmerged-vs-merged comparison sample (the full dev set adds time, not information)


def load_merged(path: Path, auto_class) -> tuple[torch.nn.Module, bool]:
    """The merged model and whether it needs lora_ops' loader: a structurally pruned folder whose layers
    differ in width (heads, MLP channels) has no stock config that describes it, and ``auto_class``
    (``AutoModelFor...``) refuses its weights; everything else loads stock."""

    from lora_ops.pruning import load_pruned_model

    config = json.loads((path / "config.json").read_text())
    if "lora_sieve_pruning" in config:
        return load_pruned_model(path), not config["lora_sieve_pruning"].get("stock_loadable", False)
    return auto_class.from_pretrained(str(check_model_folder(path)), use_safetensors=True), False


def evaluate_lm(params, plan: dict, device: str) -> dict:
    """Perplexity on WikiText-2 and PTB test at a pinned protocol, sizes and latency, dense vs merged."""

    from transformers import AutoModelForCausalLM

    from lora_ops.lm_eval import perplexity
    from stages.common.adapted import load_base
    from stages.common.lm import corpus_tokens, load_corpus
    from stages.common.params import mirror_path

    pe = params.lm_eval
    merged, needs_loader = load_merged(Paths.merged_model, AutoModelForCausalLM)
    merged.to(device).eval()
    adapted = load_product(params, plan).adapted  # what merge folded in: the product adapter
    tok = adapted.loaded.tokenizer
    need = pe.window * pe.windows
    corpora = {name: corpus_tokens(load_corpus(name, mirror_path(params)), tok, need) for name in ("wikitext2", "ptb")}
    metrics: dict = {"ppl_window": pe.window, "ppl_windows": pe.windows, "needs_lora_sieve_loader": needs_loader}
    validation = tokenize(read_parquet(Paths.validation), task_of(params), tok, params.model.max_length)
    metrics.update({f"validation_{k}": v for k, v in
                    lm_loss(merged, validation, params.evaluate.batch_size, device).items()})
    for name, ids in corpora.items():
        metrics[f"{name}_ppl"] = perplexity(merged, ids, pe.window, pe.windows, device=device)["ppl"]
    probe = corpora["wikitext2"][: pe.window].unsqueeze(0).to(device)
    with torch.no_grad():
        diff = (adapted.model(input_ids=probe).logits - merged(input_ids=probe).logits).abs().max().item()
    metrics["max_abs_diff_unmerged_vs_merged"] = diff
    latency_input = {"input_ids": probe}
    metrics["params_merged"] = sum(p.numel() for p in merged.parameters())
    metrics["latency_merged_ms"] = 1000 * median_forward_seconds(merged, [latency_input] * 4, device)
    # the unadapted base model is the trivial predictor of a causal LM: always measured
    dense = load_base(params).model.to(device).eval()
    for name, ids in corpora.items():
        metrics[f"dense_{name}_ppl"] = perplexity(dense, ids, pe.window, pe.windows, device=device)["ppl"]
    metrics["trivial_predictor"] = "the unadapted base model"
    metrics["trivial_score"] = metrics["dense_wikitext2_ppl"]
    if pe.dense_baseline:
        metrics["params_dense"] = sum(p.numel() for p in dense.parameters())
        metrics["latency_dense_ms"] = 1000 * median_forward_seconds(dense, [latency_input] * 4, device)
        metrics["params_ratio_to_dense"] = metrics["params_merged"] / metrics["params_dense"]
        metrics["latency_ratio_to_dense"] = metrics["latency_merged_ms"] / metrics["latency_dense_ms"]
    metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return metrics


def trivial_baseline(task, logits: torch.Tensor, train_labels: torch.Tensor, labels: torch.Tensor) -> dict:
    """The trivial predictor on the reported split and whether the model is any better than it.

    Classification: always the training split's majority class; regression: always the training
    mean (a constant has no correlation with anything: its Pearson/Spearman count as 0). Also
    flags a model whose predictions are constant, whatever its score.
    """
    if task.is_regression:
        trivial = {name: 0.0 for name in task.metrics}
        pred = logits.squeeze(-1)
        constant = bool(pred.numel() < 2 or float(pred.std()) < 1e-6 * max(1.0, float(pred.abs().mean())))
        description = f"constant training mean {float(train_labels.float().mean()):.4f}"
    else:
        majority = int(torch.bincount(train_labels.long()).argmax())
        trivial = task_metrics(task, torch.nn.functional.one_hot(torch.full_like(labels, majority),
                                                                 task.num_labels).float(), labels)
        pred = logits.argmax(-1)
        constant = bool(torch.unique(pred).numel() < 2)
        description = f"always class {majority} (training majority)"
    main = task.main_metric
    return {"trivial_predictor": description, "trivial_score": trivial[main],
            **{f"trivial_{k}": v for k, v in trivial.items()},
            "constant_predictions": constant}


def prediction_frame(task, logits: torch.Tensor, labels: torch.Tensor) -> pd.DataFrame:
    """One row per dev example, in dev order: ``example`` (its index in the dev split), ``prediction`` (the
    argmax class; for regression the predicted value, float32 as scored) and ``label``: exactly what
    ``task_metrics`` scored, so a study's bootstrap recomputes the reported metric from it."""
    pred = logits.squeeze(-1) if task.is_regression else logits.argmax(-1)
    return pd.DataFrame({"example": range(len(labels)), "prediction": pred.detach().cpu().numpy(),
                         "label": labels.detach().cpu().numpy()})


def no_predictions() -> pd.DataFrame:
    """A causal LM is scored by perplexity on corpora, not per dev example: its predictions file is empty."""
    return pd.DataFrame({"example": pd.Series(dtype="int64"), "prediction": pd.Series(dtype="float64"),
                         "label": pd.Series(dtype="float64")})


def main() -> None:
    from transformers import AutoModelForSequenceClassification

    from stages.common.tasks import is_lm

    params = load_params()
    plan = read_json(Paths.plan)
    task = task_of(params)
    device = runtime.device()
    bs = params.evaluate.batch_size
    with StageRun("evaluate", params.model_dump()) as run:
        if not (Paths.merged_model / "config.json").is_file():
            raise FileNotFoundError(f"{Paths.merged_model} is missing: run the merge stage")
        if is_lm(task):
            finish(params, plan, task, run, evaluate_lm(params, plan, device), no_predictions())
            return
        merged, _ = load_merged(Paths.merged_model, AutoModelForSequenceClassification)
        merged.to(device).eval()
        product = load_product(params, plan)  # what merge folded in: the product adapter, unmerged
        adapted = product.adapted
        tok = adapted.loaded.tokenizer
        dev = tokenize(read_parquet(Paths.dev), task, tok, params.model.max_length)
        validation = tokenize(read_parquet(Paths.validation), task, tok, params.model.max_length)
        # dev is the reported split; validation (carved from train) is what selected the epoch
        merged_logits = logits = predict(merged, dev, bs, device)
        val_logits = predict(merged, validation, bs, device)
        metrics: dict = {"scored_model": "merged"}
        reason = adapted.method.scored_unmerged_reason if product.compressed is None else ""
        if reason:  # the method's own layers are its artifact: they are scored, the float merge is shown beside
            metrics.update({f"float_merge_dev_{k}": v for k, v in task_metrics(task, logits, dev["labels"]).items()})
            metrics.update({f"float_merge_validation_{k}": v
                            for k, v in task_metrics(task, val_logits, validation["labels"]).items()})
            logits = predict(adapted.model, dev, bs, device)
            val_logits = predict(adapted.model, validation, bs, device)
            metrics["scored_model"] = f"unmerged: {reason}"
        metrics.update({f"dev_{k}": v for k, v in task_metrics(task, logits, dev["labels"]).items()})
        metrics.update({f"validation_{k}": v for k, v in task_metrics(task, val_logits, validation["labels"]).items()})
        train_labels = torch.tensor(read_parquet(Paths.train)["label"].to_numpy())
        metrics.update(trivial_baseline(task, logits, train_labels, dev["labels"]))
        sample = {k: v[:DIFF_EXAMPLES] for k, v in dev.items()}
        # scored unmerged, the dev logits of both models are at hand already
        unmerged_logits = logits[:DIFF_EXAMPLES] if reason else predict(adapted.model, sample, bs, device)
        diff = unmerged_logits - merged_logits[:DIFF_EXAMPLES]
        metrics["max_abs_diff_unmerged_vs_merged"] = diff.abs().max().item()
        metrics["latency_merged_ms"] = 1000 * latency_per_batch(merged, dev, bs, params.evaluate.latency_batches,
                                                                device)
        metrics["latency_unmerged_ms"] = 1000 * latency_per_batch(adapted.model, dev, bs,
                                                                  params.evaluate.latency_batches, device)
        n_sample = len(sample["labels"])
        sample_batches = [{k: v[i:i + bs] for k, v in sample.items()} for i in range(0, n_sample, bs)]
        if product.compressed is None:  # the method's own figures describe its own layers, not the compressed pairs
            metrics.update(adapted.method.evaluation_extras(adapted.model, plan, adapted.ctx, sample_batches))
        if hasattr(merged.config, "lora_sieve_pruning"):  # structurally pruned, whether or not stock-loadable
            metrics.update(pruned_size(merged, adapted.model.config))
        finish(params, plan, task, run, metrics, prediction_frame(task, logits, dev["labels"]))


def pruned_size(merged: torch.nn.Module, base_config) -> dict:
    """A structurally pruned classifier's parameters against the dense base (``base_config``: the unpruned
    model's; a uniformly pruned folder's own config holds the narrowed widths): what LoRAPrune saves is in
    the base (heads, MLP channels), which the adapter's byte columns do not show."""
    from transformers import AutoModelForSequenceClassification

    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        dense = AutoModelForSequenceClassification.from_config(base_config)
    n_merged, n_dense = (sum(p.numel() for p in m.parameters()) for m in (merged, dense))
    return {"params_merged": n_merged, "params_dense": n_dense, "params_ratio_to_dense": n_merged / n_dense}


def storage_metrics(plan: dict, compressed: dict) -> dict:
    """What the product adapter stores (compress summary) beside plain LoRA's fp32 and 16-bit bytes. LoRA's
    bytes count its factors plus the same head, so the ratio compares two shippable files."""
    lora_params = plan["parameters"]["plain_lora"]
    stored = int(compressed["stored_bytes"])
    head = int(compressed.get("head_bytes", 0))
    lora_fp32, lora_16 = 4 * lora_params + head, 2 * lora_params + head
    out = {"stored_bytes": stored, "lora_fp32_bytes": lora_fp32, "lora_16bit_bytes": lora_16,
           "stored_bytes_ratio_to_lora_fp32": stored / lora_fp32, "compressed": bool(compressed.get("applied"))}
    if compressed.get("applied"):
        out.update(stored_params=int(compressed["stored_params"]), compress_bits=int(compressed["bits"]),
                   compress_components=int(compressed["components"]), head_bytes=head,
                   stored_adapter_bytes=int(compressed["adapter_bytes"]),
                   stored_adapter_bytes_ratio_to_lora_fp32=int(compressed["adapter_bytes"]) / (4 * lora_params),
                   compress_validation_reference=compressed["validation_reference"])
    return out


def finish(params, plan: dict, task, run, metrics: dict, predictions: pd.DataFrame) -> None:
    """Parameter accounting, metrics.json, predictions.parquet, plots and MLflow logging (every task kind)."""
    counts = plan["parameters"]
    trained = read_json(Paths.finetune_summary)
    metrics.update({
        # stored/active are only final after training (rank allocators prune while they train)
        "trainable_params": counts["trainable"],
        "stored_params": trained["parameters"].get("stored", counts["stored"]),
        "active_params": trained["parameters"].get("active", counts["active"]),
        "plain_lora_params": counts["plain_lora"],
        "trainable_ratio_to_lora": counts["trainable"] / counts["plain_lora"],
        "train_seconds": trained["seconds"],
    })
    metrics.update(storage_metrics(plan, read_json(Paths.compress_summary)))
    metrics["main_metric"] = task.main_metric
    lower_better = getattr(task, "lower_is_better", False)
    metrics["score"] = metrics[task.main_metric if task.main_metric in metrics else f"dev_{task.main_metric}"]
    metrics["score_split"] = "test corpora" if lower_better else "dev"
    metrics["selection_split"] = "validation (carved from train)"
    metrics["best_validation"] = trained.get("best", {}).get("value")
    if metrics.get("trivial_score") is not None:
        gap = metrics["score"] - metrics["trivial_score"]
        metrics["gain_over_trivial"] = -gap if lower_better else gap
        if metrics.get("constant_predictions") or metrics["gain_over_trivial"] <= 0:
            print(f"evaluate: WARNING the model is no better than the trivial predictor "
                  f"({metrics.get('trivial_predictor')}): {task.main_metric} {metrics['score']:.4f} vs "
                  f"{metrics['trivial_score']:.4f}" + ("; its predictions are constant"
                                                       if metrics.get("constant_predictions") else ""))
    # wall-clock and memory readings differ run to run: they go to timings.json so that
    # metrics.json is byte-identical across reruns of the same params on the same machine
    timings = {k: metrics.pop(k) for k in sorted(metrics) if k in TIMING_KEYS}
    write_json(Paths.metrics, metrics)
    write_json(Paths.timings, timings)
    write_parquet(Paths.predictions, predictions)
    metrics = {**metrics, **timings}
    Paths.plots.mkdir(parents=True, exist_ok=True)
    plot_loss(pd.read_csv(Paths.history), Paths.plots / "training_loss.png")
    scores = read_parquet(Paths.importance)
    if len(scores) and "importance" in scores.columns:
        plot_importance(scores, plan, Paths.plots / "importance.png")
    else:
        plot_placeholder(f"{params.method.name}: no per-module importance scores", Paths.plots / "importance.png")
    summary = trained.get("controller", {})
    structure = [r for r in summary.get("modules", []) if "rank" in r] or \
        [{"module": m, "rank": r} for m, r in summary.get("ranks", {}).items()]
    plot_structure(structure, params.method.name, Paths.plots / "structure.png")
    run.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, parent=True)
    run.set_tags({"main_metric": task.main_metric,
                  "no_better_than_trivial": str(bool(metrics.get("constant_predictions"))
                                                or metrics.get("gain_over_trivial", 1.0) <= 0).lower()},
                 parent=True)
    run.log_artifact(Paths.metrics)
    run.log_artifact(Paths.timings)
    run.log_artifact(Paths.predictions)
    run.log_artifact(Paths.plots, "plots")
    shown = ", ".join(f"{k}={metrics[k]:.4f}" for k in task.metrics if k in metrics) or \
        ", ".join(f"dev {k}={metrics['dev_' + k]:.4f}" for k in task.metrics)
    stored = (f"; stored {metrics['stored_bytes']:,} bytes ({metrics['stored_bytes_ratio_to_lora_fp32']:.1%} of "
              f"LoRA's fp32 file)" if "stored_bytes" in metrics else "")
    print(f"evaluate: {shown}; trainable {counts['trainable']:,} adapter params "
          f"({metrics['trainable_ratio_to_lora']:.1%} of LoRA){stored}; max |unmerged-merged| "
          f"{metrics['max_abs_diff_unmerged_vs_merged']:.2e}")


if __name__ == "__main__":
    runtime.run_stage(main, "evaluate")
