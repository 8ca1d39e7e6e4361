"""Champion/challenger promotion in the MLflow model registry (aliases, not the deprecated stages).

Every promoted-or-not model is a new version of one registered model per task and base model.
The new version always gets alias ``challenger``; it takes ``champion`` only when :func:`decide`
says so, and the version it replaces keeps ``previous-champion`` so a rollback is one call.
:func:`decide` is pure (metrics in, decision out) so it is unit-tested without any server.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
import socket
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

CHAMPION = "champion"
CHALLENGER = "challenger"
PREVIOUS = "previous-champion"
# Task metrics where smaller is better; every GLUE main metric is "higher is better".
LOWER_IS_BETTER = ("loss", "perplexity", "ppl")


@dataclass(frozen=True)
class Limits:
    """The promotion gate: score margin over the champion plus efficiency ceilings (None = no limit)."""

    margin: float = 0.0
    max_adapter_params: int | None = None
    max_latency_ms: float | None = None
    #: ceiling on the stored adapter file's payload (metrics' stored_bytes: codes + scales + head)
    max_stored_bytes: int | None = None
    #: the candidate must beat the trivial predictor (majority class, training mean, unadapted base)
    #: by at least this much in its main metric's units; None = only constant predictions are refused
    min_gain_over_trivial: float | None = 0.01


@dataclass
class Decision:
    promote: bool
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def higher_is_better(metric: str) -> bool:
    return not any(word in metric.lower() for word in LOWER_IS_BETTER)


def _number(metrics: Mapping[str, Any] | None, key: str) -> float | None:
    value = (metrics or {}).get(key)
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def adapter_params(metrics: Mapping[str, Any]) -> float | None:
    """What the adapter costs to ship: stored parameters (shared tensors once), else trainable."""
    stored = _number(metrics, "stored_params")
    return stored if stored is not None else _number(metrics, "trainable_params")


def decide(candidate: Mapping[str, Any], champion: Mapping[str, Any] | None, limits: Limits,
           metric: str = "score", higher_better: bool = True) -> Decision:
    """Should ``candidate`` (its metrics) replace ``champion`` (its metrics, or None when there is none)?

    It must pass every efficiency limit and beat the champion's ``metric`` by more than
    ``limits.margin`` (strictly: a tie keeps the champion). Every check leaves a reason.
    """
    reasons: list[str] = []
    ok = True
    score = _number(candidate, metric)
    if score is None:
        return Decision(False, [f"candidate has no {metric!r} metric: not promotable"])

    # a model that learned nothing is never crowned, not even when there is no champion yet
    if str(candidate.get("constant_predictions", "")).lower() in ("true", "1", "1.0"):
        ok = False
        reasons.append("predictions are constant (one class / one value for every example): not promotable")
    if limits.min_gain_over_trivial is not None:
        gain = _number(candidate, "gain_over_trivial")
        trivial = _number(candidate, "trivial_score")
        if gain is None:
            ok = False
            reasons.append("no gain over the trivial predictor was measured: not promotable")
        elif gain < limits.min_gain_over_trivial:
            ok = False
            reasons.append(f"{metric} gains {gain:+.4f} over the trivial predictor ({trivial}), below "
                           f"min_gain_over_trivial {limits.min_gain_over_trivial:g}: not promotable")
        else:
            reasons.append(f"{metric} gains {gain:+.4f} over the trivial predictor (>= {limits.min_gain_over_trivial:g})")

    size = adapter_params(candidate)
    if limits.max_adapter_params is not None:
        if size is None:
            ok = False
            reasons.append("adapter parameter count unknown but max_adapter_params is set")
        elif size > limits.max_adapter_params:
            ok = False
            reasons.append(f"adapter params {size:,.0f} exceed max_adapter_params {limits.max_adapter_params:,}")
        else:
            reasons.append(f"adapter params {size:,.0f} <= max_adapter_params {limits.max_adapter_params:,}")
    if limits.max_stored_bytes is not None:
        stored = _number(candidate, "stored_bytes")
        if stored is None:
            ok = False
            reasons.append("stored adapter bytes unknown but max_stored_bytes is set")
        elif stored > limits.max_stored_bytes:
            ok = False
            reasons.append(f"stored bytes {stored:,.0f} exceed max_stored_bytes {limits.max_stored_bytes:,}")
        else:
            reasons.append(f"stored bytes {stored:,.0f} <= max_stored_bytes {limits.max_stored_bytes:,}")
    latency = _number(candidate, "latency_merged_ms")
    if limits.max_latency_ms is not None:
        if latency is None:
            ok = False
            reasons.append("latency unknown but max_latency_ms is set")
        elif latency > limits.max_latency_ms:
            ok = False
            reasons.append(f"latency {latency:.2f} ms exceeds max_latency_ms {limits.max_latency_ms:g}")
        else:
            reasons.append(f"latency {latency:.2f} ms <= max_latency_ms {limits.max_latency_ms:g}")

    if champion is None:
        reasons.append(f"no current champion: {metric} {score:.4f} takes the title" if ok else
                       f"no current champion, but {metric} {score:.4f} fails the checks above")
    else:
        version = champion.get("version", "?")
        best = _number(champion, metric)
        if best is None:
            reasons.append(f"champion v{version} has no {metric!r} metric: any scored candidate beats it")
        else:
            gain = score - best if higher_better else best - score
            if gain > limits.margin:
                reasons.append(f"{metric} {score:.4f} beats champion v{version} ({best:.4f}) by {gain:+.4f} "
                               f"> margin {limits.margin:g}")
            else:
                ok = False
                reasons.append(f"{metric} {score:.4f} does not beat champion v{version} ({best:.4f}) by more "
                               f"than margin {limits.margin:g} (gain {gain:+.4f})")
    return Decision(ok, reasons)


# --------------------------------------------------------------------------- MLflow side

def default_name(task: str, model: str) -> str:
    """``<task>-<model>``; a model given as a path or hub id contributes its last component."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").split("/")[-1]).strip("-.") or "model"
    return f"{task}-{base}"


def metrics_from_tags(tags: Mapping[str, str]) -> dict[str, float]:
    """Version tags ``metric.<k>`` back into a metrics dict (how a champion's score is read)."""
    out: dict[str, float] = {}
    for k, v in tags.items():
        if k.startswith("metric."):
            try:
                out[k.removeprefix("metric.")] = float(v)
            except ValueError:
                pass
    return out


def metric_tags(metrics: Mapping[str, Any]) -> dict[str, str]:
    return {f"metric.{k}": repr(float(v)) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


def aliases(client: Any, name: str) -> dict[str, str]:
    """alias -> version of ``name`` ({} when the registered model does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        # versions as strings whatever the store returns (sqlite gives ints, the REST API strings)
        return {alias: str(v) for alias, v in client.get_registered_model(name).aliases.items()}
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return {}
        raise


def ensure_registered_model(client: Any, name: str, description: str = "") -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=description or None)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _set_aliases(client: Any, name: str, wanted: dict[str, str | None]) -> None:
    for alias, version in wanted.items():
        if version is None:
            client.delete_registered_model_alias(name, alias)
        else:
            client.set_registered_model_alias(name, alias, version)


def _restore(client: Any, name: str, before: dict[str, str], touched: list[str]) -> None:
    """Best effort: put the aliases we touched back where they were (the registry may be gone)."""
    for alias in touched:
        try:
            if alias in before:
                client.set_registered_model_alias(name, alias, before[alias])
            else:
                client.delete_registered_model_alias(name, alias)
        except Exception:  # noqa: BLE001 - the original error is the one to report
            pass


LOCK_SUFFIX = ".promotion-lock"
LOCK_LEASE_S = 120.0  # a lock older than this was left by a promoter that died: it may be taken over


@contextlib.contextmanager
def promotion_lock(client: Any, name: str, timeout_s: float = 300.0, poll_s: float = 0.5) -> Iterator[str]:
    """One promotion at a time into registered model ``name``, across processes and machines.

    Promotion reads the champion, decides and moves aliases; two pipelines doing that at once would
    both compare against the same old champion and the slower one would win ``champion`` whatever
    its score. The registry has no compare-and-set, but creating a registered model is atomic on
    every store (the name is unique), so a registered model ``<name>.promotion-lock`` is the mutex;
    its ``expires`` tag lets a later promoter take over the lock of one that died."""
    from mlflow.exceptions import MlflowException

    lock = f"{name}{LOCK_SUFFIX}"
    holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + timeout_s
    held: dict[str, str] = {}
    while True:
        try:
            client.create_registered_model(lock, tags={"holder": holder, "expires": repr(time.time() + LOCK_LEASE_S)},
                                           description=f"held while a promotion into {name} runs")
            break
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        try:
            held = client.get_registered_model(lock).tags
            if float(held.get("expires", "0")) < time.time():  # its holder died: take over
                if client.get_registered_model(lock).tags.get("holder") == held.get("holder"):
                    client.delete_registered_model(lock)
                continue
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                continue  # released meanwhile
            raise
        if time.monotonic() > deadline:
            raise MlflowException(f"promotion lock {lock!r} held by {held.get('holder')} for over {timeout_s:.0f}s; "
                                  f"if no promotion is running, delete registered model {lock!r}")
        time.sleep(poll_s * (0.5 + random.random()))  # jitter: waiters do not retry in lockstep
    try:
        yield holder
    finally:
        for attempt in range(3):  # best effort: a lock left behind expires after LOCK_LEASE_S
            try:
                if client.get_registered_model(lock).tags.get("holder") == holder:
                    client.delete_registered_model(lock)
                break
            except Exception:  # noqa: BLE001 - registry away: try again shortly, then leave it to expire
                if attempt < 2:
                    time.sleep(2.0)


def register_and_decide(client: Any, name: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """:func:`register_unlocked` under the registered model's :func:`promotion_lock`: concurrent
    promotions into one model apply one after another, each against the champion the last one left."""
    with promotion_lock(client, name):
        return register_unlocked(client, name, *args, **kwargs)


def register_unlocked(client: Any, name: str, source: str, run_id: str | None, metrics: Mapping[str, Any],
                      tags: Mapping[str, str], limits: Limits, metric: str = "score",
                      description: str = "", model_id: str | None = None,
                      model_description: str | None = None) -> dict[str, Any]:
    """Create a version of ``name`` from ``source``, decide, and move the aliases.

    Returns the decision record (also stored as version tags). The champion is read *before*
    the version is created, so a failure anywhere leaves ``champion`` untouched; the aliases
    moved so far are restored on error (best effort) and the new version is tagged
    ``decision=failed``.
    """
    # the registered model's own description (set once, at creation) is not one version's card
    ensure_registered_model(client, name, description if model_description is None else model_description)
    before = aliases(client, name)
    champion_version = before.get(CHAMPION)
    champion: dict[str, Any] | None = None
    if champion_version is not None:
        mv = client.get_model_version(name, champion_version)
        champion = {**metrics_from_tags(mv.tags), "version": champion_version}
    decision = decide(metrics, champion, limits, metric, higher_is_better(metric))
    version_tags = {**tags, **metric_tags(metrics), "decision": "pending",
                    "decision.reasons": json.dumps(decision.reasons)}
    # model_id links the version to the MLflow 3 LoggedModel it was made from (source models:/<model_id>)
    mv = client.create_model_version(name, source, run_id=run_id, tags=version_tags, description=description,
                                     model_id=model_id)
    version = str(mv.version)
    wanted: dict[str, str | None] = {CHALLENGER: version}
    if decision.promote:
        # previous-champion first: if we die between the two calls, champion is still the old one
        wanted = {PREVIOUS: champion_version, CHAMPION: version, CHALLENGER: version}
    touched: list[str] = []
    try:
        for alias, target in wanted.items():
            if target is None:
                if alias in before:
                    client.delete_registered_model_alias(name, alias)
                    touched.append(alias)
                continue
            touched.append(alias)
            client.set_registered_model_alias(name, alias, target)
        if decision.promote and champion_version is not None:
            client.set_model_version_tag(name, version, "previous_champion", champion_version)
        client.set_model_version_tag(name, version, "decision", "promoted" if decision.promote else "rejected")
    except Exception:
        _restore(client, name, before, touched)
        try:
            client.set_model_version_tag(name, version, "decision", "failed")
        except Exception:  # noqa: BLE001
            pass
        raise
    return {"name": name, "version": version, "promoted": decision.promote, "reasons": decision.reasons,
            "metric": metric, "score": metrics.get(metric), "previous_champion": champion_version,
            "champion": version if decision.promote else champion_version,
            "champion_score": (champion or {}).get(metric)}


def rollback(client: Any, name: str) -> dict[str, Any]:
    """Give ``champion`` back to ``previous-champion``; the chain goes one step further back
    (the restored version's own ``previous_champion`` tag) so repeated rollbacks keep working."""
    current = aliases(client, name)
    if PREVIOUS not in current:
        raise LookupError(f"registered model {name!r} has no {PREVIOUS!r} alias: nothing to roll back to "
                          f"(aliases: {current or 'none'})")
    target = current[PREVIOUS]
    demoted = current.get(CHAMPION)
    earlier = client.get_model_version(name, target).tags.get("previous_champion")
    _set_aliases(client, name, {CHAMPION: target})
    if earlier and earlier != target:
        _set_aliases(client, name, {PREVIOUS: earlier})
    else:
        _set_aliases(client, name, {PREVIOUS: None})
    if demoted:
        client.set_model_version_tag(name, demoted, "decision", f"rolled back to v{target}")
    return {"name": name, "champion": target, "demoted": demoted, "previous_champion": earlier or None}


def status(client: Any, name: str) -> dict[str, Any]:
    """Aliases and every version with its score and decision (newest first)."""
    versions = client.search_model_versions(f"name = '{name}'")
    rows = []
    for mv in sorted(versions, key=lambda m: int(m.version), reverse=True):
        rows.append({"version": str(mv.version), "method": mv.tags.get("method", ""),
                     "score": metrics_from_tags(mv.tags).get("score"), "decision": mv.tags.get("decision", ""),
                     "created": mv.creation_timestamp})
    return {"name": name, "aliases": aliases(client, name), "versions": rows}
