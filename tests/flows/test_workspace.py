"""A flow run applies its overrides to params.yaml and keeps the configured file aside; a killed run leaves
both behind. What the next run reads and writes then (the study planned a resumed row at 0.5x an lr that
was already 0.5x the recipe's when it read the overridden file)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from support.helpers import REPO, SHARED_DATA, set_params

import flows.pipeline as pipeline
from flows.pipeline import FLOW_BACKUP, STATE_DIR, validate_overrides, workspace
from flows.study import recipe_lr


@pytest.fixture
def interrupted(tmp_path: Path) -> Path:
    """A workspace a flow run died in: params.yaml with the run's overrides, the configured file kept aside.
    The data mirror stays at its relative default (``../shared/data``): found from the workspace, not from
    the folder the kept file is in."""
    root = tmp_path / "repo"
    root.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(SHARED_DATA)
    shutil.copy2(REPO / "params.yaml", root / "params.yaml")
    set_params(root, {"train.lr": 1e-3, "seed": 42})
    (root / STATE_DIR).mkdir()
    shutil.copy2(root / "params.yaml", root / STATE_DIR / FLOW_BACKUP)
    set_params(root, {"train.lr": 5e-4, "seed": 2})  # the killed run's overrides
    return root


def test_overrides_are_validated_against_the_configured_params(interrupted):
    params = validate_overrides(interrupted, {"method.name": "lora"})
    assert recipe_lr(params) == 1e-3 and params.seed == 42
    (interrupted / STATE_DIR / FLOW_BACKUP).unlink()  # no flow holds the file: params.yaml is the configuration
    assert recipe_lr(validate_overrides(interrupted, {"method.name": "lora"})) == 5e-4


def test_workspace_puts_the_configured_params_back_before_applying_overrides(interrupted, monkeypatch):
    monkeypatch.setattr(pipeline, "get_run_logger", lambda: logging.getLogger("test"))
    configured = (interrupted / STATE_DIR / FLOW_BACKUP).read_bytes()
    with workspace(interrupted, {"seed": 7}):
        applied = validate_overrides(interrupted, {})  # read while the overrides are in params.yaml
        in_file = pipeline.load_params(interrupted / "params.yaml")
        assert (in_file.seed, in_file.train.lr) == (7, 1e-3)  # the killed run's lr is gone, this run's seed in
        assert (applied.seed, applied.train.lr) == (42, 1e-3)
    assert (interrupted / "params.yaml").read_bytes() == configured
    assert not (interrupted / STATE_DIR / FLOW_BACKUP).exists()
