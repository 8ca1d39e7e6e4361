"""What one pipeline run produced, told where users look: a Prefect markdown artifact on the flow run and
the MLflow parent run's description (``mlflow.note.content``).

Both say the same things: the main metric against the trivial predictor, the adapter's stored parameters
and bytes against plain LoRA's, the promotion decision with its reasons, and links to the MLflow run and
the registered model version, built from the tracking URI the run used. :class:`RunStory` is built from
the pipeline flow's result, so compare and study tell each of their runs the same way.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from stages.common.paths import Paths

#: where ``make ui`` (and ``mlflow ui``) serve a local store's UI
LOCAL_UI = "http://127.0.0.1:5000"


# ----------------------------------------------------------------------------- MLflow links

def mlflow_ui(tracking_uri: str) -> tuple[str, str]:
    """(base URL of the MLflow UI for this tracking URI, how to open it when it is not a server)."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/"), ""
    return LOCAL_UI, (f"the tracking store is `{tracking_uri}`, not a server: the links open once "
                      f"`mlflow ui --backend-store-uri {tracking_uri}` runs (this repository's store: `make ui`)")


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    return f"{mlflow_ui(tracking_uri)[0]}/#/experiments/{experiment_id}/runs/{run_id}"


def model_version_url(tracking_uri: str, name: str, version: str) -> str:
    return f"{mlflow_ui(tracking_uri)[0]}/#/models/{quote(name, safe='')}/versions/{version}"


# ----------------------------------------------------------------------------- adapter storage

@dataclass(frozen=True)
class Storage:
    """What the adapter costs to store, against plain LoRA of the same rank and targets."""

    stored_params: float | None
    lora_params: float | None
    stored_bytes: float | None
    lora_bytes: float | None
    dtype: str = ""  #: the stored tensors' dtypes, when the bytes were read from the file
    lora_basis: str = ""  #: how LoRA's bytes were priced

    @property
    def pct_of_lora(self) -> float | None:
        if self.stored_params is None or not self.lora_params:
            return None
        return 100 * self.stored_params / self.lora_params

    def as_dict(self) -> dict[str, Any]:
        return {"stored_params": self.stored_params, "lora_params": self.lora_params,
                "stored_bytes": self.stored_bytes, "lora_bytes": self.lora_bytes, "dtype": self.dtype,
                "lora_basis": self.lora_basis}


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def safetensors_payload(path: Path) -> tuple[int, int, list[str]] | None:
    """(tensor bytes, tensor elements, dtypes) of a safetensors file, from its header alone; None if unreadable."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return None
    tensors = [v for k, v in header.items() if k != "__metadata__"]
    nbytes = sum(end - start for start, end in (t["data_offsets"] for t in tensors))
    elements = sum(math.prod(t["shape"]) for t in tensors)
    return nbytes, elements, sorted({t["dtype"] for t in tensors})


#: metrics that price plain LoRA's bytes when the evaluate stage measured them, and what each means
LORA_BYTES_METRICS = {"lora_fp32_bytes": "plain LoRA in fp32 (metrics)"}


def adapter_storage(root: Path, metrics: dict[str, Any]) -> Storage:
    """Stored parameters from the metrics; bytes from the metrics when the evaluate stage measured them
    (``stored_bytes``, :data:`LORA_BYTES_METRICS`), else from the merge stage's adapter tensors on disk, with
    LoRA's at the adapter's own bytes per element."""
    stored = _number(metrics.get("stored_params"))
    lora = _number(metrics.get("plain_lora_params"))
    stored_bytes = _number(metrics.get("stored_bytes"))
    lora_bytes, basis = None, ""
    for key, meaning in LORA_BYTES_METRICS.items():
        if _number(metrics.get(key)) is not None:
            lora_bytes, basis = _number(metrics[key]), meaning
            break
    dtype = ""
    payload = safetensors_payload(root / Paths.compact / "adapter.safetensors")
    if stored_bytes is None and payload and payload[1]:
        stored_bytes, dtype = float(payload[0]), "/".join(payload[2]).lower()
        if lora_bytes is None and lora is not None:
            lora_bytes, basis = lora * payload[0] / payload[1], f"plain LoRA at the adapter's precision ({dtype})"
    return Storage(stored, lora, stored_bytes, lora_bytes, dtype, basis)


def fmt_bytes(value: float | None) -> str:
    if value is None:
        return "–"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def fmt_count(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"


# ----------------------------------------------------------------------------- the story of one run

@dataclass
class RunStory:
    """One pipeline run: what it measured, what it stores, what the registry decided, where to look."""

    method: str
    task: str
    model: str
    metrics: dict[str, Any]
    storage: Storage
    decision: dict[str, Any]
    tracking_uri: str
    experiment_id: str
    run_id: str
    stages: dict[str, str] = field(default_factory=dict)
    dvc_experiment: str | None = None

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> RunStory:
        """From the dict :func:`flows.pipeline.pipeline` returns."""
        tracking = result["tracking"]
        return cls(method=tracking["method"], task=tracking["task"], model=tracking["model"],
                   metrics=result.get("metrics") or {}, storage=Storage(**result["storage"]),
                   decision=result.get("decision") or {}, tracking_uri=tracking["uri"],
                   experiment_id=tracking["experiment_id"], run_id=result["mlflow_run_id"],
                   stages=result.get("stages") or {}, dvc_experiment=result.get("experiment"))

    # -- pieces
    @property
    def metric(self) -> str:
        return str(self.metrics.get("main_metric", "score"))

    @property
    def run_link(self) -> str:
        return run_url(self.tracking_uri, self.experiment_id, self.run_id)

    @property
    def version_link(self) -> str | None:
        d = self.decision
        return model_version_url(self.tracking_uri, d["name"], str(d["version"])) if d.get("version") else None

    def score_text(self) -> str:
        score, trivial = _number(self.metrics.get("score")), _number(self.metrics.get("trivial_score"))
        split = self.metrics.get("score_split", "dev")
        if score is None:
            return f"no {self.metric} measured"
        text = f"{split} {self.metric} {score:.4f}"
        if trivial is not None:
            gain = _number(self.metrics.get("gain_over_trivial"))
            text += (f" vs {trivial:.4f} for the trivial predictor ({self.metrics.get('trivial_predictor', 'trivial')})"
                     + (f", a gain of {gain:+.4f}" if gain is not None else ""))
        return text

    def storage_text(self) -> str:
        s = self.storage
        text = f"stores {fmt_count(s.stored_params)} adapter parameters"
        if s.pct_of_lora is not None:
            text += f" ({s.pct_of_lora:.1f}% of plain LoRA's {fmt_count(s.lora_params)})"
        if s.stored_bytes is not None:
            text += f" in {fmt_bytes(s.stored_bytes)}"
            if s.lora_bytes is not None:
                text += f" against LoRA's {fmt_bytes(s.lora_bytes)}"
            if s.dtype:
                text += f" ({s.dtype} tensors)"
        return text

    def decision_text(self) -> str:
        d = self.decision
        if not d:
            return "no promotion decision (the promote stage did not run)"
        if not d.get("enabled", True):
            return "not registered (registry.enabled is false)"
        if d.get("promoted"):
            return f"registered as {d['name']} v{d['version']} and promoted to champion"
        return f"registered as {d['name']} v{d['version']}, a challenger: champion stays v{d.get('champion')}"

    @property
    def decision_label(self) -> str:
        """promoted / challenger / not registered / no decision (a table cell)."""
        d = self.decision
        if not d:
            return "no decision"
        if not d.get("enabled", True):
            return "not registered"
        return "promoted" if d.get("promoted") else "challenger"

    # -- the two tellings
    def paragraph(self) -> str:
        """One paragraph: the MLflow parent run's description."""
        reasons = "; ".join(self.decision.get("reasons") or [])
        ran = [s for s, status in self.stages.items() if status == "ran"]
        return (f"{self.method} on {self.task} ({self.model}): {self.score_text()}; {self.storage_text()}; "
                f"{self.decision_text()}" + (f" ({reasons})" if reasons else "") + ". "
                + (f"Stages run: {', '.join(ran) or 'none (every stage unchanged, skipped by DVC)'}"
                   if self.stages else "")
                + (f"; saved as DVC experiment {self.dvc_experiment}." if self.dvc_experiment else "."))

    def markdown(self) -> str:
        """The flow run's markdown artifact."""
        m, s = self.metrics, self.storage
        ui_note = mlflow_ui(self.tracking_uri)[1]
        lines = [f"# {self.method} on {self.task} ({self.model})", "",
                 f"**{self.decision_text()}**", "",
                 "| | this run | trivial predictor / plain LoRA |", "|---|---|---|",
                 f"| {m.get('score_split', 'dev')} {self.metric} | {_cell(m.get('score'))} | "
                 f"{_cell(m.get('trivial_score'))} ({m.get('trivial_predictor', '–')}) |",
                 f"| gain over trivial | {_cell(m.get('gain_over_trivial'), '+.4f')} | |",
                 f"| validation {self.metric} (selected epoch) | {_cell(m.get('best_validation'))} | |",
                 f"| stored parameters | {fmt_count(s.stored_params)} | {fmt_count(s.lora_params)}"
                 + (f" ({s.pct_of_lora:.1f}% of LoRA)" if s.pct_of_lora is not None else "") + " |",
                 f"| stored bytes{f' ({s.dtype})' if s.dtype else ''} | {fmt_bytes(s.stored_bytes)} | "
                 f"{fmt_bytes(s.lora_bytes)}{f' ({s.lora_basis})' if s.lora_basis else ''} |"]
        reasons = self.decision.get("reasons") or []
        if reasons:
            lines += ["", "Promotion reasons:", "", *(f"- {r}" for r in reasons)]
        lines += ["", f"- MLflow run: [{self.run_id}]({self.run_link})"]
        if self.version_link:
            d = self.decision
            lines.append(f"- Model version: [{d['name']} v{d['version']}]({self.version_link})")
        if ui_note:
            lines.append(f"- ({ui_note})")
        if self.dvc_experiment:
            lines.append(f"- DVC experiment: `{self.dvc_experiment}` (`dvc exp show`, `dvc exp apply "
                         f"{self.dvc_experiment}`)")
        if self.stages:
            lines.append("- Stages: " + ", ".join(f"{k} {v}" for k, v in self.stages.items()))
        return "\n".join(lines) + "\n"

    def table_fields(self) -> dict[str, Any]:
        """What a compare/study table row adds: bytes, the decision and the MLflow link."""
        return {"stored_bytes": self.storage.stored_bytes, "lora_bytes": self.storage.lora_bytes,
                "decision": self.decision_label, "mlflow_run": self.run_link}


def _cell(value: Any, spec: str = ".4f") -> str:
    number = _number(value)
    return "–" if number is None else format(number, spec)
