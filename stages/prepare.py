"""prepare: materialise the task data (subsampled, stratified) and the model reference."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from stages.common import runtime, shapes
from stages.common.context import task_of
from stages.common.glue import load_split
from stages.common.io import write_json, write_parquet
from stages.common.lm import load_instructions
from stages.common.models import resolve_model
from stages.common.params import load_params, mirror_path
from stages.common.paths import Paths
from stages.common.tasks import is_lm
from stages.common.tracking import StageRun


def _subsample(df, size, seed):
    from lora_ops.data import stratified_indices

    if size is None:
        return df
    labels = torch.tensor(df["label"].to_numpy())
    return df.iloc[stratified_indices(labels, size, seed).numpy()].reset_index(drop=True)


def carve_validation(df, size, seed):
    """(validation, rest): a stratified, seeded selection split taken out of the training split.

    Model selection (best epoch, early stopping, lr sweeps) uses it; the task's dev split is only
    ever reported. The rest is what ``train_size`` is drawn from, so the two never overlap.
    """
    from lora_ops.data import stratified_indices

    if len(df) < 2:
        raise ValueError(f"the training split has {len(df)} rows: too few to carve a validation split")
    labels = torch.tensor(df["label"].to_numpy())
    count = round(size * len(df)) if isinstance(size, float) else int(size)
    if count >= len(df):
        raise ValueError(f"data.validation_size {size} takes all {len(df)} training rows: lower it")
    chosen = stratified_indices(labels, size, seed)
    keep = torch.ones(len(df), dtype=torch.bool)
    keep[chosen] = False
    return (df.iloc[chosen.numpy()].reset_index(drop=True),
            df.iloc[torch.nonzero(keep).flatten().numpy()].reset_index(drop=True))


def _fingerprint(path: str) -> str:
    """Identity of a local model folder (config + weight file sizes) so DVC sees a changed model."""
    p = Path(path)
    if not p.is_dir():
        return path
    h = hashlib.sha1()
    for f in sorted(p.glob("*")):
        if f.is_file() and f.suffix in {".json", ".safetensors", ".bin", ".txt", ".model"}:
            h.update(f.name.encode())
            h.update(str(f.stat().st_size).encode())
            if f.name == "config.json":
                h.update(f.read_bytes())
    return h.hexdigest()


def label_prior(train, task) -> dict | None:
    """What the trivial predictor knows of the training labels: the new head starts there."""
    if is_lm(task):
        return None
    if task.is_regression:
        return {"mean": float(train["label"].astype(float).mean())}
    counts = train["label"].value_counts()
    return {"class_shares": [float(counts.get(c, 0)) / len(train) for c in range(task.num_labels)]}


def main() -> None:
    params = load_params()
    task = task_of(params)
    ref = resolve_model(params.model.name)
    shapes.check_model_shapes(params, ref.path)  # impossible for this model: fail before anything is written
    with StageRun("prepare", params.model_dump()) as run:
        mirror = mirror_path(params)
        if is_lm(task):
            # instruction data has no dev split: hold out a fixed, seeded share
            rows = load_instructions(task, mirror).sample(frac=1.0, random_state=params.seed)
            n_dev = max(1, len(rows) // 20)
            dev_rows, train_rows = rows.iloc[:n_dev].reset_index(drop=True), rows.iloc[n_dev:].reset_index(drop=True)
        else:
            train_rows, dev_rows = load_split(task, "train", mirror), load_split(task, "dev", mirror)
        validation, rest = carve_validation(train_rows, params.data.validation_size,
                                            runtime.derive_seed(params.seed, "validation") % 2**31)
        train = _subsample(rest, params.data.train_size, params.seed)
        dev = _subsample(dev_rows, params.data.dev_size, params.seed + 1)
        write_parquet(Paths.train, train)
        write_parquet(Paths.validation, validation)
        write_parquet(Paths.dev, dev)
        info = {"name": ref.name, "path": ref.path, "source": ref.source, "fingerprint": _fingerprint(ref.path),
                "task": task.name, "kind": getattr(task, "kind", "classification"), "num_labels": task.num_labels, "fields": list(task.fields),
                "metrics": list(task.metrics), "main_metric": task.main_metric,
                "train_rows": len(train), "validation_rows": len(validation), "dev_rows": len(dev),
                "label_prior": label_prior(train, task)}
        write_json(Paths.model_ref, info)
        run.log_metrics({"train_rows": len(train), "validation_rows": len(validation), "dev_rows": len(dev)})
        if not task.is_regression and not is_lm(task):
            run.log_metrics({f"train_label_share_{k}": v for k, v in
                             train["label"].value_counts(normalize=True).items()})
        print(f"prepare: {task.name} train={len(train)} validation={len(validation)} (selection) "
              f"dev={len(dev)} (reported only); model {ref.name} ({ref.source})")


if __name__ == "__main__":
    runtime.run_stage(main, "prepare")
