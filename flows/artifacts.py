"""Prefect artifacts on the flow runs: a markdown summary on every pipeline, compare and study run, and a
table (one row per run) on compare and study runs.

Keys are ``<flow>-<deployment>-<kind>`` (``lora-sieve-pipeline-nightly-summary``; ``local`` for a run
started without a deployment): the same key on every run of a deployment, so the UI's Artifacts page shows
its history across nightly runs. A run inside another flow (a compare's pipelines) takes its parent's
deployment.
"""

from __future__ import annotations

import math
import re
from typing import Any

SUMMARY = "summary"
RUNS_TABLE = "runs"


def artifact_key(kind: str) -> str:
    """The stable key of this flow run's ``kind`` artifact (Prefect allows lowercase letters, digits, dashes)."""
    from prefect.runtime import deployment, flow_run

    raw = f"{flow_run.flow_name or 'flow'}-{deployment.name or 'local'}-{kind}"
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]+", "-", raw.lower())).strip("-")


def json_cell(value: Any) -> Any:
    """A table cell Prefect can store as JSON: NaN and numpy scalars become None and plain numbers."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def publish_markdown(markdown: str, description: str, kind: str = SUMMARY) -> str:
    """The markdown artifact of this flow run; returns its key."""
    from prefect.artifacts import create_markdown_artifact

    key = artifact_key(kind)
    create_markdown_artifact(markdown=markdown, key=key, description=description)
    return key


def publish_table(rows: list[dict[str, Any]], description: str, kind: str = RUNS_TABLE) -> str:
    """The table artifact of this flow run (one dict per row); returns its key."""
    from prefect.artifacts import create_table_artifact

    key = artifact_key(kind)
    table = [{k: json_cell(v) for k, v in row.items()} for row in rows]
    create_table_artifact(table=table, key=key, description=description)
    return key
