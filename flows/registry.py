"""Registry CLI: show the champion/challenger state of a registered model, or roll back.

    python -m flows.registry status   --name sst2-minilm
    python -m flows.registry rollback --name sst2-minilm      # champion := previous-champion

The tracking/registry store is ``MLFLOW_TRACKING_URI`` (or ``--tracking-uri``), else the
repository's ``mlflow.db``, the same rule the stages use. ``--name`` defaults to params.yaml's
``registry.name`` or ``<task>-<model>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stages.common.registry import CHAMPION, default_name, rollback, status
from stages.common.tracking import tracking_uri

ROOT = Path(__file__).resolve().parents[1]


def _default_name(repo: Path) -> str:
    from stages.common.params import load_params

    params = load_params(repo / "params.yaml")
    return params.registry.name or default_name(params.task.name, params.model.name)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="lora-sieve model registry: status and rollback.")
    ap.add_argument("command", choices=["status", "rollback"])
    ap.add_argument("--name", help="registered model (default: params.yaml registry.name or <task>-<model>)")
    ap.add_argument("--tracking-uri", help="MLflow tracking/registry URI (default: MLFLOW_TRACKING_URI or "
                                           "sqlite:///<repo>/mlflow.db)")
    ap.add_argument("--repo", default=str(ROOT))
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    args = ap.parse_args(argv)
    from mlflow.tracking import MlflowClient

    repo = Path(args.repo).resolve()
    uri = args.tracking_uri or tracking_uri(repo)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = args.name or _default_name(repo)
    try:
        result = rollback(client, name) if args.command == "rollback" else status(client, name)
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif args.command == "rollback":
        print(f"{name}: champion is now v{result['champion']} (was v{result['demoted']}); "
              f"previous-champion: {('v' + result['previous_champion']) if result['previous_champion'] else 'none'}")
    else:
        al = result["aliases"]
        print(f"{name} ({uri}): " + (", ".join(f"{a}=v{v}" for a, v in sorted(al.items())) or "no aliases"))
        for r in result["versions"]:
            marks = ",".join(a for a, v in sorted(al.items()) if v == r["version"])
            score = "–" if r["score"] is None else f"{r['score']:.4f}"
            print(f"  v{r['version']:>3}  {r['method']:<10} score {score}  {r['decision']:<10} {marks}")
        if not result["versions"]:
            print("  (no versions)")
        if CHAMPION not in al:
            print("  no champion yet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
