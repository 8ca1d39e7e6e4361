"""Register the scheduled pipeline deployment (cron from ``params.yaml`` ``schedule:``) and serve it.

This process is the worker: it creates/updates the deployment ``lora-sieve-pipeline/<deployment>``
on the Prefect API it is pointed at (``PREFECT_API_URL``), then polls for its scheduled or manually
triggered runs and executes them until stopped (Ctrl-C pauses the schedule; rerun to resume)::

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m flows.serve
    prefect deployment run lora-sieve-pipeline/nightly          # trigger once, from another shell
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from flows.pipeline import EXIT_BAD_INPUT, ROOT, configured_params, pipeline, validate_overrides
from stages.common.params import ConfigError, Params


def schedule_params(repo: Path) -> Params:
    """params.yaml with its ``schedule.overrides`` validated (a broken schedule fails now, not at 2 am)."""
    params = configured_params(repo)
    validate_overrides(repo, dict(params.schedule.overrides))
    return params


def build_deployment(repo: Path, params: Params, retries: int = 2) -> Any:
    """The pipeline flow as a deployment with the cron schedule and the scheduled run's parameters."""
    from prefect.schedules import Cron

    sched = params.schedule
    return pipeline.to_deployment(
        name=sched.deployment,
        schedules=[Cron(sched.cron, timezone=sched.timezone)],
        parameters={"overrides": dict(sched.overrides), "repo": str(repo), "retries": retries},
        tags=["lora-sieve", "scheduled"],
        description=f"lora-sieve pipeline on {repo} ({sched.cron} {sched.timezone}); "
                    "params.yaml + schedule.overrides, saved as a DVC experiment each run",
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Serve the scheduled lora-sieve pipeline deployment.")
    ap.add_argument("--repo", default=str(ROOT), help="workspace the scheduled runs use")
    ap.add_argument("--limit", type=int, default=1, help="concurrent runs (the workspace runs one at a time)")
    ap.add_argument("--retries", type=int, default=2, help="retries of a stage after a transient failure")
    args = ap.parse_args(argv)
    repo = Path(args.repo).resolve()
    try:
        params = schedule_params(repo)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    from prefect import serve

    deployment = build_deployment(repo, params, args.retries)
    print(f"serving lora-sieve-pipeline/{params.schedule.deployment}: cron '{params.schedule.cron}' "
          f"({params.schedule.timezone}), overrides {dict(params.schedule.overrides) or 'none'}", flush=True)
    serve(deployment, limit=args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
