"""Register the pipeline flow on a Prefect *work pool*, so scheduled and triggered runs execute on
workers instead of the machine that scheduled them.

Locally a ``process`` pool does it: every worker started with ``prefect worker start --pool NAME``
on a machine that has this repository checked out at ``--repo`` picks runs up and executes them
in a subprocess. For a cluster, create a ``kubernetes`` or ``docker`` pool instead and give the
deployment an image that contains the project (see README)::

    prefect work-pool create lora-sieve --type process
    python -m flows.deploy --pool lora-sieve                 # deployment lora-sieve-pipeline/<name>
    prefect worker start --pool lora-sieve                   # on each worker machine
    prefect deployment run lora-sieve-pipeline/on-workers
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from flows.pipeline import EXIT_BAD_INPUT, ROOT, configured_params, validate_overrides
from stages.common.params import ConfigError


def deploy(repo: Path, pool: str, name: str, overrides: dict[str, Any], stages: list[str] | None,
           cron: str | None) -> str:
    """Create or update the work-pool deployment; returns its id."""
    from prefect import flow as prefect_flow

    validate_overrides(repo, overrides)  # a broken deployment fails now, not on the worker
    source = prefect_flow.from_source(source=str(repo), entrypoint="flows/pipeline.py:pipeline")
    params = configured_params(repo)
    kwargs: dict[str, Any] = {}
    if cron:
        from prefect.schedules import Cron

        kwargs["schedules"] = [Cron(cron, timezone=params.schedule.timezone)]
    deployment_id = source.deploy(
        name=name, work_pool_name=pool, build=False, push=False, print_next_steps=False,
        # a partial run (--stages) has no complete set of outputs to save as a DVC experiment
        parameters={"overrides": overrides, "repo": str(repo), "stages": stages,
                    "save_as_experiment": stages is None},
        tags=["lora-sieve", "work-pool"], **kwargs)
    return str(deployment_id)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Deploy the lora-sieve pipeline to a Prefect work pool.")
    ap.add_argument("--pool", required=True, help="work pool name (create it with `prefect work-pool create`)")
    ap.add_argument("--name", default="on-workers", help="deployment name")
    ap.add_argument("--repo", default=str(ROOT), help="repository path as seen by the workers")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                    help="dotted param override (JSON values), repeatable")
    ap.add_argument("--stages", nargs="*", default=None, help="run only these stages")
    ap.add_argument("--cron", default=None, help="optional cron schedule (timezone from params.yaml)")
    args = ap.parse_args(argv)
    overrides: dict[str, Any] = {}
    for item in args.set:
        key, _, raw = item.partition("=")
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    try:
        deployment_id = deploy(Path(args.repo).resolve(), args.pool, args.name, overrides, args.stages, args.cron)
    except ConfigError as exc:
        print(f"error [deploy]: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"deployment lora-sieve-pipeline/{args.name} ({deployment_id}) on work pool {args.pool!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
