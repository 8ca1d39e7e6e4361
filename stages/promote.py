"""promote: log the merged model as an MLflow Model, register it as a new registry version and
decide champion/challenger.

The merged folder is logged with MLflow's ``transformers`` flavour as a pipeline of the task's kind
(see :mod:`stages.common.serving`), so ``mlflow.pyfunc.load_model("models:/<name>@champion")`` and
``mlflow models serve`` work on the version; the compact, PEFT and serve-safe PEFT adapters are
artifacts of the same run, and the version's description is a short model card. The version
carries its lineage as tags (method, params hash, git commit, DVC lock hash, base model, adapter
and plan hashes, metrics). ``data/promote/decision.json`` is written only after the registry calls
succeeded, so a failed promotion leaves no decision behind.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlflow.exceptions import MlflowException

from stages.common import runtime, serving
from stages.common.context import task_of
from stages.common.io import read_json, read_parquet, write_json
from stages.common.params import load_params
from stages.common.paths import Paths, read_metrics
from stages.common.registry import Limits, default_name, register_and_decide
from stages.common.tracking import StageRun, dvc_stage_hashes, git_commit, params_hash, tracking_uri

DECISION = Paths.decision
SERVE_SAFE = Paths.merge / "peft_serve"  # written by the merge stage (stages/merge.py)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def lineage_tags(params_dump: dict, metrics: dict, meta: dict, root: Path) -> dict[str, str]:
    """Everything needed to say where a registered model came from and to rebuild it."""
    stages = {k: v for k, v in dvc_stage_hashes(root).items() if k != "promote"}
    return {
        "method": meta.get("method", params_dump["method"]["name"]),
        "task": params_dump["task"]["name"],
        "main_metric": str(metrics.get("main_metric", "")),
        "params_hash": params_hash(params_dump),
        "git_commit": git_commit(root),
        "dvc_lock_hash": params_hash(stages) if stages else "none",
        "base_model": meta.get("base_model", params_dump["model"]["name"]),
        "lineage.base_model_path": str(meta.get("base_model_path", "")),
        "lineage.adapter_sha256": sha256(Paths.compact / "adapter.safetensors"),
        "lineage.plan_sha256": sha256(Paths.plan),
        "lineage.adapter_params": json.dumps(meta.get("parameters", {}), sort_keys=True),
        **{f"dvc.stage_hash.{k}": v for k, v in stages.items()},
    }


def adapter_bytes() -> dict[str, int]:
    """On-disk size of each adapter form the merge stage wrote (for the model card)."""
    files = {"compact": Paths.compact / "adapter.safetensors", "peft": Paths.peft / "adapter_model.safetensors",
             "peft_serve": SERVE_SAFE / "adapter_model.safetensors"}
    return {k: p.stat().st_size for k, p in files.items() if p.is_file()}


def main() -> None:
    params = load_params()
    reg = params.registry
    dump = params.model_dump()
    if not reg.enabled:
        with StageRun("promote", dump) as run:  # still a child run: it closes the pipeline's parent run
            run.set_tags({"promotion.decision": "disabled"}, parent=True)
            write_json(DECISION, {"enabled": False, "promoted": False, "reasons": ["registry.enabled is false"]})
        print("promote: registry.enabled is false; nothing registered")
        return
    metrics = read_metrics()
    meta = read_json(Paths.compact / "lora_sieve.json")
    if not (Paths.merged_model / "config.json").is_file():
        raise FileNotFoundError(f"{Paths.merged_model} is missing: run the merge stage")
    name = reg.name or default_name(params.task.name, params.model.name)
    limits = Limits(margin=reg.margin, max_adapter_params=reg.max_adapter_params, max_latency_ms=reg.max_latency_ms,
                    max_stored_bytes=reg.max_stored_bytes, min_gain_over_trivial=reg.min_gain_over_trivial)
    with StageRun("promote", dump) as run:
        tags = lineage_tags(dump, metrics, meta, Path("."))
        # the merged model as an MLflow Model (the version's source); the adapters ride with the run
        task = task_of(params)
        dev = read_parquet(Paths.dev) if Paths.dev.is_file() else None
        served = serving.build(Paths.merged_model, task, dev)
        info = serving.log(served, Paths.merged_model, run.run_id)
        run.log_artifact(Paths.compact, "adapter")
        run.log_artifact(Paths.peft, "peft")
        run.log_artifact(SERVE_SAFE, "peft_serve")
        artifact_uri = run.client.get_run(run.run_id).info.artifact_uri.rstrip("/")
        tags["lineage.adapter_uri"] = f"{artifact_uri}/adapter"
        tags["mlflow.parent_run"] = run.parent_id or ""
        tags["serving.task"] = served.hf_task
        tags["serving.model_id"] = info.model_id
        card = serving.model_card(name, task, tags["method"], tags["base_model"], metrics,
                                  meta.get("parameters", {}), adapter_bytes(), served, run.run_id)
        try:
            record = register_and_decide(
                run.client, name, info.model_uri, run.run_id, metrics, tags, limits, description=card,
                model_id=info.model_id,
                model_description=f"{params.task.name} on {params.model.name}: one version per pipeline run; "
                                  "aliases champion / challenger / previous-champion")
        except MlflowException as exc:
            # the stage boundary prints it as one line and exits 1 (transient: the flow may retry)
            raise MlflowException(f"registry at {tracking_uri(Path('.'))} failed during promotion of {name} "
                                  f"({str(exc)[:300]}); aliases it had moved were put back (best effort)") from None
        run.set_tags({"promotion.name": name, "promotion.version": record["version"],
                      "promotion.decision": "promoted" if record["promoted"] else "rejected",
                      "promotion.reasons": json.dumps(record["reasons"])[:5000]}, parent=True)
        write_json(DECISION, {"enabled": True, **record, "limits": limits.__dict__})
        verdict = "champion" if record["promoted"] else f"challenger (champion stays v{record['champion']})"
        print(f"promote: {name} v{record['version']} is {verdict}: " + "; ".join(record["reasons"]))


if __name__ == "__main__":
    runtime.run_stage(main, "promote")
