"""Bad input, everywhere, as one line: damaged artifacts name the file and the stage to rerun;
params that are valid types but impossible for the model fail before any training; a seeded
mutation of params.yaml never produces a traceback (always exit 0 or 2)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file
from support.helpers import REPO, SHARED_DATA, env, set_params

from stages.common import runtime
from stages.common.io import (
    BadArtifact,
    atomic_path,
    check_model_folder,
    read_json,
    read_parquet,
    read_plan,
    read_records,
    read_safetensors,
    write_parquet,
)
from stages.common.params import ConfigError, load_params
from stages.common.shapes import check_model_shapes, validate


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- damaged artifacts

def test_truncated_parquet_names_file_and_stage(tmp_path):
    path = tmp_path / "data" / "prepare" / "train.parquet"
    write_parquet(path, pd.DataFrame({"sentence": ["a", "b"], "label": [0, 1]}))
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(BadArtifact) as err:
        read_parquet(path)
    text = _one_line(err.value)
    assert str(path) in text and "rerun the prepare stage" in text


def test_foreign_file_as_parquet_and_missing_column(tmp_path):
    path = tmp_path / "data" / "score" / "importance.parquet"
    path.parent.mkdir(parents=True)
    path.write_text("module,importance\nq,1\n")  # a CSV under a parquet name
    with pytest.raises(BadArtifact, match="rerun the score stage"):
        read_records(path)
    write_parquet(path, pd.DataFrame({"other": [1]}))
    with pytest.raises(BadArtifact, match=r"lacks column\(s\) \['module'\]"):
        read_parquet(path, columns=["module"])


def test_truncated_safetensors_is_one_line(tmp_path):
    path = tmp_path / "data" / "finetune" / "adapter.safetensors"
    path.parent.mkdir(parents=True)
    save_file({"w": torch.ones(64, 64)}, str(path))
    for cut in (5, 100, path.stat().st_size - 10):  # inside the header length, the header, the data
        data = path.read_bytes()
        path.write_bytes(data[:cut])
        with pytest.raises(BadArtifact) as err:
            read_safetensors(path)
        text = _one_line(err.value)
        assert str(path) in text and "rerun the finetune stage" in text
        save_file({"w": torch.ones(64, 64)}, str(path))
    assert torch.equal(read_safetensors(path)["w"], torch.ones(64, 64))


def test_plan_that_is_not_a_plan(tmp_path):
    path = tmp_path / "data" / "decide" / "plan.json"
    path.parent.mkdir(parents=True)
    for text, what in [("{not json", "not valid JSON"), ("[1, 2]", "JSON list"),
                       ('{"method": "lora"}', "key 'modules'"), ('{"method": "lora", "modules": {"a": 1}}',
                                                                  "module entries"),
                       (b"\xff\xfe\x00garbage", "not valid JSON")]:
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(BadArtifact) as err:
            read_plan(path)
        assert what in _one_line(err.value) and "rerun the decide stage" in str(err.value)
    path.write_text(json.dumps({"method": "lora", "modules": {"m": {"mode": "own"}}}))
    assert read_json(path)["method"] == "lora"
    with pytest.raises(FileNotFoundError, match="rerun the decide stage"):
        read_json(path.with_name("missing.json").parent.parent / "decide" / "nope.json")


def test_model_folder_with_only_pickle_weights_is_refused(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")
    with pytest.raises(BadArtifact) as err:
        check_model_folder(folder)
    assert "only pickle weights (pytorch_model.bin)" in _one_line(err.value)
    assert check_model_folder(folder, allow_pickle=True) == folder  # explicit opt-in only
    save_file({"w": torch.ones(8)}, str(folder / "model.safetensors"))
    assert check_model_folder(folder) == folder
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:-4])
    with pytest.raises(BadArtifact, match="model.safetensors is not a readable safetensors file"):
        check_model_folder(folder)


def test_pickle_only_model_folder_fails_params_validation(tmp_path):
    from stages.common.models import ModelUnavailable, resolve_model

    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (folder / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelUnavailable, match="only pickle weights"):
        resolve_model(str(folder))


def test_boundary_exit_codes(capsys):
    def bad() -> None:
        raise BadArtifact("data/x.parquet is broken: rerun the prepare stage")

    def disk_full() -> None:
        raise OSError(28, "No space left on device", "data/merge/model")

    def bug() -> None:
        raise ZeroDivisionError("a bug keeps its traceback")

    for fn, code in ((bad, 2), (disk_full, 1)):
        with pytest.raises(SystemExit) as ex:
            runtime.run_stage(fn, "merge")
        assert ex.value.code == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error [merge]: "), err
    with pytest.raises(ZeroDivisionError):
        runtime.run_stage(bug, "merge")


def test_atomic_path_keeps_previous_on_failure(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.json"]


# ----------------------------------------------------------------------------- impossible params

@pytest.fixture
def params_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["mirror"] = str(SHARED_DATA)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _with(path: Path, **overrides) -> Path:
    """``path`` (a params.yaml) with ``section__key=value`` overrides applied."""
    set_params(path.parent, {key.replace("__", "."): value for key, value in overrides.items()})
    return path


@pytest.mark.parametrize("overrides, message", [
    ({"method__name": "lora_drop", "adapter__rank": 100000}, "adapter.rank: 100000 is above min(in, out) = 384"),
    ({"method__name": "lora", "adapter__rank": 385}, "choose adapter.rank <= 384"),
    ({"method__name": "blora", "adapter__rank": 1000}, "adapter.rank: 1000"),
    ({"method__name": "dora_dr", "adapter__rank": 300}, "initial rank r0 = 450 is above min(in, out) = 384"),
    ({"method__name": "adalora", "adapter__rank": 8, "adalora__initial_rank": 8}, "nothing to allocate"),
    ({"method__name": "bone", "bone__block_size": 512}, "bone.block_size: Bone block size 512 exceeds"),
    ({"method__name": "bat", "bat__block_size": 100}, "bat.block_size: Bat block size 100 must divide"),
    ({"method__name": "lora", "adapter__targets": ["nope"]}, "adapter.targets"),
])
def test_impossible_params_for_the_model(params_file, overrides, message):
    params = load_params(_with(params_file, **overrides))
    with pytest.raises(ConfigError) as err:
        check_model_shapes(params)
    assert message in _one_line(err.value)


def test_possible_params_pass(params_file):
    for overrides in ({"method__name": "lora", "adapter__rank": 384}, {"method__name": "bone", "bone__block_size": 384},
                      {"method__name": "bat", "bat__block_size": 128}, {"method__name": "dora_dr", "adapter__rank": 8}):
        assert check_model_shapes(load_params(_with(params_file, **overrides))) == 36


def test_loraprune_ratio_that_empties_a_layer(tmp_path, monkeypatch, tiny_llama):
    """A ratio that rounds to every head of a layer is refused on the skeleton, before training."""
    folder = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(folder, safe_serialization=True)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["mirror"] = str(SHARED_DATA)
    raw.update({"model": {"name": str(folder), "max_length": 32}, "task": {"name": "alpaca"},
                "method": {"name": "loraprune"}})
    raw["loraprune"] = {**raw["loraprune"], "ratio": 0.95}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match=r"loraprune: ratio 0.95 rounds to all"):
        check_model_shapes(load_params(path))
    raw["loraprune"]["ratio"] = 0.5
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert check_model_shapes(load_params(path))


def test_prepare_refuses_impossible_rank_and_writes_nothing(tmp_path):
    from support.helpers import scratch_repo

    repo = scratch_repo(tmp_path / "repo", git=False)
    set_params(repo, {"adapter.rank": 100000})
    proc = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=repo, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error [prepare]: params.yaml: adapter.rank: 100000"), lines
    assert not (repo / "data" / "prepare").exists() and not (repo / "mlflow.db").exists()


# ----------------------------------------------------------------------------- params mutation property

_VALUES = [None, True, False, 0, -1, 1, 2, 7, 10**9, -(10**12), 0.0, 0.5, -0.5, 1.0, 1.5, 1e308, math.nan, math.inf,
           -math.inf, "", "x", "all", "lora", "none", "main", "loss", "0 2 * * *", "* * *", "../nonexistent",
           "/", "a" * 300, "é\u202e", [], [1, "a"], ["q", "v"], {}, {"k": 1}, {"nested": {"deep": [None]}}]


def _leaves(node, prefix=()):
    if isinstance(node, dict):
        yield prefix
        for k, v in node.items():
            yield from _leaves(v, prefix + (k,))
    else:
        yield prefix


def _mutate(rng: random.Random, base: dict):
    """One random damage to params.yaml: YAML text (or None) plus a description for the failure message."""
    raw = json.loads(json.dumps(base))
    keys = [k for k in _leaves(raw) if k]
    op = rng.random()
    if op < 0.04:
        text = rng.choice(["", "- a\n- b\n", "42\n", "seed: [\n", "{a: 1}: 2\n", "\t:bad", "null\n", "1: 2\n"])
        return text, f"document {text!r}"
    for _ in range(rng.choice([1, 1, 1, 2, 3])):
        key = rng.choice(keys)
        parent = raw
        for k in key[:-1]:
            parent = parent.get(k) if isinstance(parent, dict) else None
        if not isinstance(parent, dict):
            continue
        r = rng.random()
        if r < 0.55:
            value = rng.choice(_VALUES) if rng.random() < 0.7 else rng.choice([rng.randint(-3, 200000), rng.random() * 3,
                                                                               rng.choice(["lora", "lora_drop", "bone",
                                                                                           "bat", "dora_dr", "adalora",
                                                                                           "blora", "loraprune"])])
            parent[key[-1]] = value
        elif r < 0.7:
            parent.pop(key[-1], None)
        elif r < 0.85:
            parent[rng.choice(["typo", "rank", "epochs", key[-1] + "s", "name"])] = rng.choice(_VALUES)
        else:
            parent[key[-1]] = {"": rng.choice(_VALUES)} if rng.random() < 0.5 else [parent.get(key[-1])]
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), "mutated " + str(raw)[:400]


def test_params_mutations_never_traceback(tmp_path, monkeypatch, capsys):
    """A few hundred seeded mutations through the validation every stage runs (schema, then the
    model's shapes): each exits 0 or 2, and a 2 prints exactly one error line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    base["data"]["mirror"] = str(SHARED_DATA)
    rng = random.Random(20261201)
    path = tmp_path / "params.yaml"
    codes = {0: 0, 2: 0}
    for case in range(300):
        text, what = _mutate(rng, base)
        path.write_text(text)
        code = 0
        try:
            runtime.run_stage(lambda: validate(path), "validate")
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:  # noqa: BLE001 - the property under test: nothing else escapes
            raise AssertionError(f"case {case}: {type(exc).__name__}: {exc}\n{what}") from exc
        err = capsys.readouterr().err
        assert code in (0, 2), f"case {case}: exit {code}\n{err}\n{what}"
        assert "Traceback" not in err, f"case {case}: {err}\n{what}"
        if code == 2:
            lines = [ln for ln in err.strip().splitlines() if ln]
            assert len(lines) == 1 and lines[0].startswith("error [validate]: "), f"case {case}: {lines}\n{what}"
        codes[code] += 1
    assert codes[0] >= 10 and codes[2] >= 100, codes  # the generator reaches both outcomes
