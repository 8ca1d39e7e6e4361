"""The merged model as an MLflow Model that ``pyfunc``, ``mlflow models serve`` and the MLflow UI
can use: a ``transformers`` pipeline of the task's kind (text classification with label names for
GLUE classification, a raw score for regression, text generation for causal LMs), with a signature
and an input example, plus the model card that becomes the registry version's description.

Pruned models whose layers differ in width (LoRAPrune's heads and MLP channels) cannot be rebuilt by
``from_pretrained`` (a Hugging Face config holds one width): they are logged as a ``pyfunc`` model that
loads through :func:`lora_ops.pruning.load_pruned_model` and answers like the transformers flavour does
(generated text for a causal LM; ``label``/``score`` rows for a classifier or regressor).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pandas as pd

from stages.common.tasks import Task, is_lm

# GLUE's label names, in label-id order (as the Hugging Face "glue" dataset features define them)
LABEL_NAMES: dict[str, list[str]] = {
    "sst2": ["negative", "positive"],
    "cola": ["unacceptable", "acceptable"],
    "mrpc": ["not_equivalent", "equivalent"],
    "qqp": ["not_duplicate", "duplicate"],
    "rte": ["entailment", "not_entailment"],
    "qnli": ["entailment", "not_entailment"],
    "wnli": ["not_entailment", "entailment"],
    "mnli": ["entailment", "neutral", "contradiction"],
}
REGRESSION_LABEL = "score"
# greedy, short, new tokens only: what the registered model does unless a request passes other params
# (every key is also a signature param: params in a request replace the saved config, so each
# one needs its default in the signature or it would be lost)
GENERATION = {"max_new_tokens": 32, "do_sample": False, "return_full_text": False}
GENERATION_EXAMPLE = "### Instruction:\nGive three tips for staying healthy.\n\n### Response:\n"


@dataclass
class Served:
    """What gets logged: the object, the MLflow task, signature, example, inference config."""

    hf_task: str
    pipeline: Any  # a transformers Pipeline, or None for a pruned model's pyfunc
    signature: Any
    input_example: Any
    model_config: dict[str, Any]
    pruned: bool = False  # per-layer widths: logged as a pyfunc that loads through lora_ops
    label_settings: dict[str, Any] | None = None  # a pruned classifier's: its pyfunc sets them at load time


def label_names(task: Task) -> list[str]:
    if task.is_regression:
        return [REGRESSION_LABEL]
    return LABEL_NAMES.get(task.name, [f"LABEL_{i}" for i in range(task.num_labels)])


def input_example(task: Task, dev: pd.DataFrame | None) -> Any:
    """Two real dev rows where the prepare stage left them (one fixed prompt for causal LMs)."""
    if is_lm(task):
        return [GENERATION_EXAMPLE]
    if dev is not None and len(dev) >= 2 and all(f in dev.columns for f in task.fields):
        rows = dev.head(2)
    else:
        rows = pd.DataFrame({f: ["a gorgeous, witty film", "dull and lifeless"] for f in task.fields})
    if len(task.fields) == 1:
        return [str(t) for t in rows[task.fields[0]]]
    # sentence pairs: the text-classification pipeline's {"text", "text_pair"} form
    return [{"text": str(a), "text_pair": str(b)} for a, b in zip(rows[task.fields[0]], rows[task.fields[1]])]


def signature(task: Task) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    if is_lm(task):
        params = ParamSchema([ParamSpec("max_new_tokens", "long", GENERATION["max_new_tokens"]),
                              ParamSpec("do_sample", "boolean", GENERATION["do_sample"]),
                              ParamSpec("return_full_text", "boolean", GENERATION["return_full_text"])])
        return ModelSignature(Schema([ColSpec("string")]), Schema([ColSpec("string")]), params)
    if len(task.fields) == 1:
        inputs = Schema([ColSpec("string")])
    else:
        inputs = Schema([ColSpec("string", "text"), ColSpec("string", "text_pair")])
    return ModelSignature(inputs, Schema([ColSpec("string", "label"), ColSpec("double", "score")]))


def needs_pruned_loader(model_dir: Path) -> bool:
    config = json.loads((model_dir / "config.json").read_text())
    info = config.get("lora_sieve_pruning")
    return bool(info) and not info.get("stock_loadable", False)


def build(model_dir: Path, task: Task, dev: pd.DataFrame | None = None) -> Served:
    """Load the merged folder (stock transformers) and wrap it in the task's pipeline."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        pipeline,
    )

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    example, sig = input_example(task, dev), signature(task)
    if is_lm(task):
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        if needs_pruned_loader(model_dir):
            return Served("text-generation", None, sig, example, dict(GENERATION), pruned=True)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), use_safetensors=True).eval()
        pipe = pipeline("text-generation", model=model, tokenizer=tokenizer)
        return Served("text-generation", pipe, sig, example, dict(GENERATION))
    if needs_pruned_loader(model_dir):
        _check_outputs(model_dir, AutoConfig.from_pretrained(str(model_dir)).num_labels, task)
        return Served("text-classification", None, sig, example, {}, pruned=True,
                      label_settings=label_settings(label_names(task)))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir), use_safetensors=True).eval()
    _check_outputs(model_dir, model.config.num_labels, task)
    for key, value in label_settings(label_names(task)).items():
        setattr(model.config, key, value)
    pipe = pipeline("text-classification", model=model, tokenizer=tokenizer)
    return Served("text-classification", pipe, sig, example, {})


def _check_outputs(model_dir: Path, outputs: int, task: Task) -> None:
    names = label_names(task)
    if outputs != len(names):
        raise ValueError(f"{model_dir} has {outputs} outputs but task {task.name} has "
                         f"{len(names)} labels: rerun merge for this task")


def label_settings(names: list[str]) -> dict[str, Any]:
    """Model-config settings that name the task's labels; one output named ``score`` is a regressor, whose
    pipeline then returns the raw output (no sigmoid) as the score. Plain data: the pruned pyfunc carries it."""
    settings: dict[str, Any] = {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}
    if names == [REGRESSION_LABEL]:
        settings["problem_type"] = "regression"
    return settings


def pip_requirements() -> list[str]:
    """Pinned from this environment: skips MLflow's slow requirement inference."""

    return [f"{p}=={version(p)}" for p in ("mlflow", "torch", "transformers", "safetensors")]


def _pruned_causal_lm() -> Any:
    """Defined here so that importing this module does not import MLflow."""
    import mlflow.pyfunc

    class _PrunedCausalLM(mlflow.pyfunc.PythonModel):
        """Greedy generation from a pruned folder with per-layer widths (new tokens only, as the
        transformers flavour returns them)."""

        def load_context(self, context: Any) -> None:
            from transformers import AutoTokenizer

            from lora_ops.pruning import load_pruned_model

            self.model = load_pruned_model(Path(context.artifacts["model"])).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["model"])

        # no type hints here on purpose: MLflow would derive a second, conflicting schema from them
        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
            import torch

            cfg = {**GENERATION, **(params or {})}
            keep_prompt = bool(cfg["return_full_text"])
            prompts = model_input.iloc[:, 0].tolist() if isinstance(model_input, pd.DataFrame) else list(model_input)
            out = []
            with torch.no_grad():
                for prompt in prompts:
                    # token_type_ids: some tokenizers return them, causal LMs' generate() refuses them
                    enc = self.tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
                    ids = self.model.generate(**enc, max_new_tokens=int(cfg["max_new_tokens"]),
                                              do_sample=bool(cfg["do_sample"]))
                    start = 0 if keep_prompt else enc["input_ids"].shape[1]
                    out.append(self.tokenizer.decode(ids[0, start:], skip_special_tokens=True))
            return out

    return _PrunedCausalLM()


def _pruned_classifier(settings: dict[str, Any]) -> Any:
    """A pruned classifier (or regressor) behind the transformers text-classification pipeline, built at
    load time from lora_ops' loader: the same ``label``/``score`` rows as the transformers flavour."""
    import mlflow.pyfunc

    class _PrunedClassifier(mlflow.pyfunc.PythonModel):
        def __init__(self, settings: dict[str, Any]) -> None:
            self.settings = settings

        def load_context(self, context: Any) -> None:
            from transformers import AutoTokenizer, pipeline

            from lora_ops.pruning import load_pruned_model

            model = load_pruned_model(Path(context.artifacts["model"])).eval()
            for key, value in self.settings.items():
                setattr(model.config, key, value)
            tokenizer = AutoTokenizer.from_pretrained(context.artifacts["model"])
            self.pipeline = pipeline("text-classification", model=model, tokenizer=tokenizer)

        def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201 (see _PrunedCausalLM)
            if isinstance(model_input, pd.DataFrame):
                if {"text", "text_pair"} <= set(model_input.columns):
                    inputs = model_input[["text", "text_pair"]].astype(str).to_dict("records")
                else:
                    inputs = model_input.iloc[:, 0].astype(str).tolist()
            else:
                inputs = list(model_input)
            return pd.DataFrame(self.pipeline(inputs), columns=["label", "score"])

    return _PrunedClassifier(settings)


def log(served: Served, model_dir: Path, run_id: str) -> Any:
    """Log the served model under ``run_id`` (artifact name ``model``); returns MLflow's ModelInfo.

    The stage's run is made the active run while logging: MLflow 3 creates the LoggedModel in the
    *active* experiment, and without an active run that is the default one, whose artifacts land
    in ``./mlruns`` instead of the experiment's own artifact location. Leaving the block ends the
    run as FINISHED; the stage's own exit sets the final status (FAILED on any later error).
    """
    import mlflow

    try:
        with mlflow.start_run(run_id=run_id):
            return _log_active(served, model_dir)
    finally:
        # leaving start_run() marked the stage's run FINISHED; it is not finished yet (the registry
        # calls follow): back to RUNNING, so a stage that fails later never shows as FINISHED
        mlflow.tracking.MlflowClient().update_run(run_id, status="RUNNING")


def _log_active(served: Served, model_dir: Path) -> Any:
    import mlflow

    if served.pruned:
        import lora_ops

        python_model = (_pruned_causal_lm() if served.label_settings is None
                        else _pruned_classifier(served.label_settings))
        return mlflow.pyfunc.log_model(
            name="model", python_model=python_model, artifacts={"model": str(model_dir)},
            code_paths=[str(Path(lora_ops.__file__).parent)], signature=served.signature,
            input_example=served.input_example, pip_requirements=pip_requirements())
    import mlflow.transformers

    return mlflow.transformers.log_model(
        served.pipeline, name="model", task=served.hf_task, signature=served.signature,
        input_example=served.input_example, model_config=served.model_config or None,
        pip_requirements=pip_requirements())


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def model_card(name: str, task: Task, method: str, base_model: str, metrics: dict[str, Any],
               parameters: dict[str, Any], adapter_bytes: dict[str, int], served: Served, run_id: str) -> str:
    """The version's description (Markdown, short): what it is, how good, how big, how to load it."""
    # task metrics as evaluate names them (dev_<m>, validation_<m>; plain <m> in older runs), then the
    # trivial predictor's score and latency, so the card says how good the model is against what
    candidates = [f"{split}{m}" for m in task.metrics for split in ("dev_", "validation_", "")]
    candidates += ["score", "trivial_score", "gain_over_trivial", "latency_merged_ms"]
    shown = [m for m in dict.fromkeys(candidates)
             if isinstance(metrics.get(m), (int, float)) and not isinstance(metrics.get(m), bool)]
    main, split = metrics.get("main_metric"), metrics.get("score_split")
    label_score = f"score ({main}{', ' + str(split) if split else ''})" if main else "score"
    kind = ("text generation (greedy, new tokens only)" if served.hf_task == "text-generation"
            else "regression score" if task.is_regression
            else f"text classification ({', '.join(label_names(task))})")
    lines = [
        f"**{name}**: `{method}` adapter merged into `{base_model}`, task `{task.name}` — {kind}.",
        "",
        "| metric | value |", "|---|---:|",
        *[f"| {label_score if m == 'score' else m} | {_fmt(metrics[m])} |" for m in shown],
        "",
        "Adapter: " + ", ".join(f"{k} {_fmt(v)} params" for k, v in parameters.items())
        + ("; files " + ", ".join(f"{k} {_fmt(v)} bytes" for k, v in adapter_bytes.items()) if adapter_bytes else ""),
        "",
        "Load / serve:",
        "```",
        f'mlflow.pyfunc.load_model("models:/{name}@champion").predict({json.dumps(served.input_example[:1])})',
        f"mlflow models serve -m models:/{name}@champion --env-manager local --host 127.0.0.1 --port 5001",
        f"adapters of run {run_id}: artifacts adapter/ (compact), peft/ (PEFT), peft_serve/ (no rank/alpha patterns)",
        "```",
    ]
    return "\n".join(lines)
