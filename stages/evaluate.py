"""evaluate: task metric of the merged model (loaded with stock transformers), unmerged-vs-merged
output difference, adapter parameters (and ratio to plain LoRA), latency; metrics.json and plots."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pandas as pd
import torch

from lora_ops.training import load_trainable_state
from stages.common import runtime
from stages.common.adapted import build_adapted
from stages.common.context import task_of
from stages.common.evaluation import latency_per_batch, lm_loss, predict, task_metrics
from stages.common.features import tokenize
from stages.common.io import (
    atomic_path,
    check_model_folder,
    read_json,
    read_parquet,
    read_safetensors,
    write_json,
)
from stages.common.params import load_params
from stages.common.paths import Paths
from stages.common.tracking import StageRun

TIMING_KEYS = ("latency_merged_ms", "latency_unmerged_ms", "latency_dense_ms", "latency_ratio_to_dense",
               "train_seconds", "peak_rss_mb")
DIFF_EXAMPLES = 256  # unmerged-vs-merged comparison sample (the full dev set adds time, not information)


def _loss_window(history: pd.DataFrame) -> int:
    return max(1, len(history) // 30)


def write_loss_data(history: pd.DataFrame, path: Path) -> None:
    """The training-loss plot's data next to its PNG (``training_loss.csv``): a DVC plot, so
    ``dvc plots diff`` overlays two experiments' curves in one chart."""
    data = pd.DataFrame({"step": history["step"], "loss": history["loss"],
                         "loss_smoothed": history["loss"].rolling(_loss_window(history), min_periods=1).mean()})
    with atomic_path(path) as tmp:
        data.to_csv(tmp, index=False)


def _module_cell(name: str) -> tuple[int, str]:
    """(layer, module kind) of a qualified module name, e.g. (3, "attention.output.dense")."""
    parts = name.split(".")
    layer = next((int(p) for p in parts if p.isdigit()), -1)
    return layer, ".".join(parts[-2:]) if parts[-1] == "dense" else parts[-1]


def write_structure_data(rows: list[dict], path: Path) -> None:
    """The learned-structure plot's data next to its PNG (``structure.json``, one record per module;
    ``[]`` for a method without learned structure, which DVC shows as no bars for that revision)."""
    records = []
    for r in rows:
        layer, kind = _module_cell(r["module"])
        rec = {"module": f"{layer:02d} {kind}", "name": r["module"], "layer": layer, "kind": kind,
               "rank": float(r["rank"])}
        if r.get("bits_B") is not None:
            rec["bits_B"] = r["bits_B"]
        records.append(rec)
    write_json(path, sorted(records, key=lambda x: (x["layer"], x["kind"])))


def plot_loss(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_loss_data(history, path.with_suffix(".csv"))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(history["step"], history["loss"], lw=0.8, alpha=0.4, label="loss")
    window = _loss_window(history)
    ax.plot(history["step"], history["loss"].rolling(window, min_periods=1).mean(), lw=1.8,
            label=f"moving mean ({window} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_importance(scores: pd.DataFrame, plan: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    roles = sorted(scores["role"].unique())
    layers = sorted(scores["layer"].unique())
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.9), 3.8))
    width = 0.8 / max(1, len(roles))
    modes = plan.get("modules", {})
    for i, role in enumerate(roles):
        sub = scores[scores["role"] == role].sort_values("layer")
        bars = ax.bar([lay + i * width for lay in sub["layer"]], sub["importance"], width=width, label=role)
        for bar, module in zip(bars, sub["module"]):
            if modes.get(module, {}).get("mode") == "shared":
                bar.set_hatch("//")
                bar.set_alpha(0.45)
    ax.set_xticks([lay + 0.4 - width / 2 for lay in layers], [str(lay) for lay in layers])
    ax.set_xlabel("layer (hatched: shares the group's LoRA)")
    ax.set_ylabel("share of group output energy")
    ax.legend(ncol=len(roles), fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def plot_placeholder(text: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 1.2))
    ax.axis("off")
    ax.text(0.5, 0.5, text, ha="center", va="center")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def plot_structure(rows: list[dict], method: str, path: Path) -> None:
    """Learned rank per module as a layer x module-type grid (rank allocators); placeholder otherwise."""
    write_structure_data(rows, path.with_suffix(".json"))
    if not rows:
        plot_placeholder(f"{method}: no learned per-module structure", path)
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lora_ops.targets import ROLES

    cells = {_module_cell(r["module"]): r for r in rows}
    layers = sorted({k[0] for k in cells})
    kinds = sorted({k[1] for k in cells}, key=lambda k: next((i for i, r in enumerate(ROLES) if r in k), 99))
    grid = [[cells.get((lay, kind), {}).get("rank", float("nan")) for lay in layers] for kind in kinds]
    fig, ax = plt.subplots(figsize=(max(5, 0.45 * len(layers) + 2), 0.45 * len(kinds) + 1.5))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(layers)), [str(lay) for lay in layers])
    ax.set_yticks(range(len(kinds)), kinds)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if value == value:
                bits = cells.get((layers[j], kinds[i]), {}).get("bits_B")
                ax.text(j, i, f"{value:g}" + (f"\n{bits}b" if bits else ""), ha="center", va="center",
                        color="w", fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"{method}: learned rank per module")
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def load_merged_lm(path: Path):
    """Pruned folders with per-layer widths need lora_ops' loader; everything else loads stock."""

    from transformers import AutoModelForCausalLM

    from lora_ops.pruning import load_pruned_model

    config = json.loads((path / "config.json").read_text())
    if "lora_sieve_pruning" in config:
        return load_pruned_model(path), not config["lora_sieve_pruning"].get("stock_loadable", False)
    return AutoModelForCausalLM.from_pretrained(str(check_model_folder(path)), use_safetensors=True), False


def evaluate_lm(params, plan: dict, device: str) -> dict:
    """Perplexity on WikiText-2 and PTB test at a pinned protocol, sizes and latency, dense vs merged."""

    from lora_ops.lm_eval import perplexity
    from stages.common.adapted import load_base
    from stages.common.lm import corpus_tokens, load_corpus
    from stages.common.params import mirror_path

    pe = params.lm_eval
    merged, needs_loader = load_merged_lm(Paths.merged_model)
    merged.to(device).eval()
    adapted = build_adapted(params, plan)
    load_trainable_state(adapted.model, read_safetensors(Paths.adapter))
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
    metrics["latency_merged_ms"] = 1000 * _latency(merged, latency_input)
    # the unadapted base model is the trivial predictor of a causal LM: always measured
    dense = load_base(params).model.to(device).eval()
    for name, ids in corpora.items():
        metrics[f"dense_{name}_ppl"] = perplexity(dense, ids, pe.window, pe.windows, device=device)["ppl"]
    metrics["trivial_predictor"] = "the unadapted base model"
    metrics["trivial_score"] = metrics["dense_wikitext2_ppl"]
    if pe.dense_baseline:
        metrics["params_dense"] = sum(p.numel() for p in dense.parameters())
        metrics["latency_dense_ms"] = 1000 * _latency(dense, latency_input)
        metrics["params_ratio_to_dense"] = metrics["params_merged"] / metrics["params_dense"]
        metrics["latency_ratio_to_dense"] = metrics["latency_merged_ms"] / metrics["latency_dense_ms"]
    metrics["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return metrics


@torch.no_grad()
def _latency(model, inputs: dict, repeats: int = 3) -> float:

    model(**inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


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
            finish(params, plan, task, run, evaluate_lm(params, plan, device))
            return
        merged = AutoModelForSequenceClassification.from_pretrained(
            str(check_model_folder(Paths.merged_model)), use_safetensors=True).to(device).eval()
        adapted = build_adapted(params, plan)
        load_trainable_state(adapted.model, read_safetensors(Paths.adapter))
        tok = adapted.loaded.tokenizer
        dev = tokenize(read_parquet(Paths.dev), task, tok, params.model.max_length)
        validation = tokenize(read_parquet(Paths.validation), task, tok, params.model.max_length)
        # dev is the reported split; validation (carved from train) is what selected the epoch
        logits = predict(merged, dev, bs, device)
        metrics = {f"dev_{k}": v for k, v in task_metrics(task, logits, dev["labels"]).items()}
        val_logits = predict(merged, validation, bs, device)
        metrics.update({f"validation_{k}": v for k, v in task_metrics(task, val_logits, validation["labels"]).items()})
        train_labels = torch.tensor(read_parquet(Paths.train)["label"].to_numpy())
        metrics.update(trivial_baseline(task, logits, train_labels, dev["labels"]))
        sample = {k: v[:DIFF_EXAMPLES] for k, v in dev.items()}
        unmerged_logits = predict(adapted.model, sample, bs, device)
        metrics["max_abs_diff_unmerged_vs_merged"] = (unmerged_logits - logits[:DIFF_EXAMPLES]).abs().max().item()
        metrics["latency_merged_ms"] = 1000 * latency_per_batch(merged, dev, bs, params.evaluate.latency_batches,
                                                                device)
        metrics["latency_unmerged_ms"] = 1000 * latency_per_batch(adapted.model, dev, bs,
                                                                  params.evaluate.latency_batches, device)
        n_sample = len(sample["labels"])
        sample_batches = [{k: v[i:i + bs] for k, v in sample.items()} for i in range(0, n_sample, bs)]
        metrics.update(adapted.method.evaluation_extras(adapted.model, plan, adapted.ctx, sample_batches))
        finish(params, plan, task, run, metrics)


def finish(params, plan: dict, task, run, metrics: dict) -> None:
    """Parameter accounting, metrics.json, plots and MLflow logging (shared by every task kind)."""
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
    run.log_artifact(Paths.plots, "plots")
    shown = ", ".join(f"{k}={metrics[k]:.4f}" for k in task.metrics if k in metrics) or \
        ", ".join(f"dev {k}={metrics['dev_' + k]:.4f}" for k in task.metrics)
    print(f"evaluate: {shown}; trainable {counts['trainable']:,} adapter params "
          f"({metrics['trainable_ratio_to_lora']:.1%} of LoRA); max |unmerged-merged| "
          f"{metrics['max_abs_diff_unmerged_vs_merged']:.2e}")


if __name__ == "__main__":
    runtime.run_stage(main, "evaluate")
