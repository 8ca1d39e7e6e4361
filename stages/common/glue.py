"""GLUE tasks: schema, official metrics, and one loader for a local mirror or the Hugging Face hub.

A local mirror is laid out like ``../shared/data/glue/<DIR>/``, with per split either
``hf_parquet/<train|validation>/*.parquet`` (the hub's schema) or ``<train|dev>.tsv``
(the original GLUE files). Parquet wins where both exist. Without a mirror the same
tables come from ``datasets.load_dataset("nyu-mll/glue", task)``.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class GlueTask:
    name: str
    dir: str
    fields: tuple[str, ...]  # text columns in the hub's schema
    num_labels: int  # 1 = regression
    metrics: tuple[str, ...]
    main_metric: str
    # TSV: column of each hub field (name, or position when headerless), and label mapping
    tsv_columns: dict[str, str | int] = field(default_factory=dict)
    tsv_header: bool = True
    label_map: dict[str, int] | None = None
    dev_split: str = "validation"

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1


_NLI = {"entailment": 0, "not_entailment": 1}
TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        GlueTask("sst2", "SST-2", ("sentence",), 2, ("accuracy",), "accuracy",
                 {"sentence": "sentence", "label": "label"}),
        GlueTask("mrpc", "MRPC", ("sentence1", "sentence2"), 2, ("f1", "accuracy"), "f1",
                 {"sentence1": "#1 String", "sentence2": "#2 String", "label": "Quality"}),
        GlueTask("rte", "RTE", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy",
                 {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}, label_map=_NLI),
        GlueTask("cola", "CoLA", ("sentence",), 2, ("matthews", "accuracy"), "matthews",
                 {"sentence": 3, "label": 1}, tsv_header=False),
        GlueTask("stsb", "STS-B", ("sentence1", "sentence2"), 1, ("pearson", "spearman"), "pearson",
                 {"sentence1": "sentence1", "sentence2": "sentence2", "label": "score"}),
        GlueTask("qnli", "QNLI", ("question", "sentence"), 2, ("accuracy",), "accuracy",
                 {"question": "question", "sentence": "sentence", "label": "label"}, label_map=_NLI),
        GlueTask("qqp", "QQP", ("question1", "question2"), 2, ("f1", "accuracy"), "f1",
                 {"question1": "question1", "question2": "question2", "label": "is_duplicate"}),
        GlueTask("mnli", "MNLI", ("premise", "hypothesis"), 3, ("accuracy",), "accuracy",
                 {"premise": "sentence1", "hypothesis": "sentence2", "label": "gold_label"},
                 label_map={"entailment": 0, "neutral": 1, "contradiction": 2}, dev_split="validation_matched"),
        GlueTask("wnli", "WNLI", ("sentence1", "sentence2"), 2, ("accuracy",), "accuracy",
                 {"sentence1": "sentence1", "sentence2": "sentence2", "label": "label"}),
    ]
}


class DataUnavailable(RuntimeError):
    """Neither the mirror nor the hub could provide the data."""


def get_task(name: str) -> GlueTask:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}: choose one of {', '.join(sorted(TASKS))}")
    return TASKS[name]


def mirror_has_task(mirror: Path, task: GlueTask) -> bool:
    return _split_source(mirror, task, "train") is not None and _split_source(mirror, task, "dev") is not None


def _split_source(mirror: Path, task: GlueTask, split: str) -> Path | None:
    base = mirror / "glue" / task.dir
    hf_split = "train" if split == "train" else task.dev_split
    parquet = sorted((base / "hf_parquet" / hf_split).glob("*.parquet"))
    if parquet:
        return parquet[0].parent
    tsv_name = "train.tsv" if split == "train" else ("dev_matched.tsv" if task.name == "mnli" else "dev.tsv")
    tsv = base / tsv_name
    return tsv if tsv.is_file() else None


def _read_tsv(path: Path, task: GlueTask) -> pd.DataFrame:
    raw = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, encoding="utf-8-sig", dtype=str,
                      header=0 if task.tsv_header else None, keep_default_na=False)
    out = pd.DataFrame({hf: raw[col] for hf, col in task.tsv_columns.items()})
    if task.label_map is not None:
        out["label"] = out["label"].map(task.label_map)
        if out["label"].isna().any():
            raise ValueError(f"{path}: labels outside {sorted(task.label_map)}")
    return _typed(out, task)


def _typed(df: pd.DataFrame, task: GlueTask) -> pd.DataFrame:
    df = df[[*task.fields, "label"]].copy()
    for f in task.fields:
        df[f] = df[f].astype(str)
    df["label"] = df["label"].astype("float32" if task.is_regression else "int64")
    return df.reset_index(drop=True)


def load_split(task: GlueTask, split: str, mirror: Path | None) -> pd.DataFrame:
    """``split`` is ``train`` or ``dev``. Mirror first; the hub only when the mirror lacks the task."""
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    if mirror is not None:
        source = _split_source(Path(mirror), task, split)
        if source is not None:
            if source.is_dir():
                return _typed(pd.concat([pd.read_parquet(p) for p in sorted(source.glob("*.parquet"))]), task)
            return _read_tsv(source, task)
    return _from_hub(task, split)


def _from_hub(task: GlueTask, split: str) -> pd.DataFrame:
    try:
        import datasets

        hf_split = "train" if split == "train" else task.dev_split
        ds = datasets.load_dataset("nyu-mll/glue", task.name, split=hf_split)
    except Exception as exc:  # offline, missing package, hub error: one actionable message
        raise DataUnavailable(
            f"GLUE {task.name}/{split} is not in the data mirror and the Hugging Face hub is unreachable "
            f"({type(exc).__name__}). Set data.mirror in params.yaml to a folder laid out like "
            f"../shared/data (glue/{task.dir}/...), or run with internet access."
        ) from exc
    return _typed(ds.to_pandas(), task)
