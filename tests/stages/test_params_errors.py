"""Every bad-input case: a one-line actionable error, non-zero exit, nothing written."""

import subprocess
import sys

import pytest
from support.helpers import SHARED_DATA, env, scratch_repo, set_params

from stages.common.params import ConfigError, load_params


@pytest.fixture
def repo(tmp_path):
    return scratch_repo(tmp_path / "repo", git=False)


@pytest.mark.parametrize("override, message", [
    ({"method.name": "lora_dropp"}, "unknown method 'lora_dropp'"),
    ({"model.name": "no-such-model"}, "unknown model 'no-such-model'"),
    ({"task.name": "sst3"}, "unknown task 'sst3'"),
    ({"lora_drop.threshold": 0.0}, "lora_drop.threshold"),
    ({"lora_drop.threshold": 1.5}, "lora_drop.threshold"),
    ({"adapter.rank": 0}, "adapter.rank"),
    ({"calibrate.ratio": 0.0}, "ratio must lie in (0, 1]"),
    ({"calibrate.ratio": 1.5}, "ratio must lie in (0, 1]"),
    ({"data.train_size": 1.5}, "train_size as a ratio must lie in (0, 1]"),
    ({"data.mirror": "/nonexistent/mirror"}, "has no GLUE sst2"),
    ({"train.lr": -1}, "train.lr"),
    ({"typo_section": {"a": 1}}, "unknown section 'typo_section'"),
    ({"train.epoch": 3}, "train.epoch"),
])
def test_schema_rejects_bad_params(repo, monkeypatch, override, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    set_params(repo, override)
    with pytest.raises(ConfigError) as err:
        load_params(repo / "params.yaml")
    text = str(err.value)
    assert message in text and "\n" not in text


def test_default_params_are_valid(repo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    p = load_params(repo / "params.yaml")
    assert p.method.name == "lora_drop" and p.method_params().threshold == 0.9
    assert SHARED_DATA.is_dir()


@pytest.mark.parametrize("override", [{"method.name": "nope"}, {"data.mirror": "/nonexistent/mirror"},
                                      {"model.name": "./missing-folder"}])
def test_stage_exits_nonzero_with_one_line_and_writes_nothing(repo, override):
    set_params(repo, override)
    proc = subprocess.run([sys.executable, "-m", "stages.prepare"], cwd=repo, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error")]
    assert len(lines) == 1 and lines[0].startswith("error [prepare]: ")
    assert not (repo / "data" / "prepare").exists()
    assert not (repo / "mlflow.db").exists()


def test_corrupt_plan_is_reported_not_crashed(repo, tmp_path):
    from stages.common.io import read_json

    bad = tmp_path / "plan.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        read_json(bad)
    with pytest.raises(FileNotFoundError, match="dvc repro"):
        read_json(tmp_path / "missing.json")
