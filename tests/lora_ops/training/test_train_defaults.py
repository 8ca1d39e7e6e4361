"""One set of training defaults: the loop's TrainConfig; the schema derives its own, params.yaml states them."""

from __future__ import annotations

import dataclasses

import yaml
from support.helpers import REPO

from lora_ops.training import TrainConfig
from stages.common.context import SHARED_TRAIN_FIELDS, train_config
from stages.common.params import TrainParams, load_params

#: where the pipeline deliberately differs from the library: select_metric is resolved per task by the stages;
#: precision is the machine's fastest exact-enough choice in the pipeline, fp32 (the same bytes on every
#: machine) for a library caller; the fast paths (exact to rounding, not to the bit) are on in the pipeline
PIPELINE_OWN = {"select_metric", "precision", "fused_adamw", "cls_only_last_layer"}


def test_schema_defaults_are_the_loops():
    loop, schema = TrainConfig(), TrainParams()
    differing = {f: (getattr(schema, f), getattr(loop, f)) for f in SHARED_TRAIN_FIELDS
                 if f not in PIPELINE_OWN and getattr(schema, f) != getattr(loop, f)}
    assert not differing


def test_pipeline_trains_in_the_machines_precision_and_the_library_in_fp32():
    assert (TrainParams().precision, TrainConfig().precision) == ("auto", "fp32")


def test_pipeline_takes_the_fast_paths_and_the_library_does_not():
    pipeline, loop = TrainParams(), TrainConfig()
    assert (pipeline.fused_adamw, pipeline.cls_only_last_layer) == (True, True)
    assert (loop.fused_adamw, loop.cls_only_last_layer) == (False, False)


def test_params_yaml_states_the_defaults():
    stated = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    defaults = TrainParams().model_dump()
    assert {k: v for k, v in stated.items() if defaults[k] != v} == {}


def test_train_config_takes_every_shared_field_from_params():
    params = load_params(REPO / "params.yaml", {"train.epochs": 3, "train.lr": 2e-3, "train.max_steps": 7,
                                               "train.cls_only_last_layer": False, "train.lm_loss_chunk": 256})
    cfg = dataclasses.asdict(train_config(params))
    assert {f: cfg[f] for f in SHARED_TRAIN_FIELDS - {"select_metric"}} == \
        params.train.model_dump(include=set(SHARED_TRAIN_FIELDS - {"select_metric"}))
    assert cfg["select_metric"] == "accuracy"  # "main" resolved for SST-2
