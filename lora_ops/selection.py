"""Selection rules that turn importance into structure."""

from __future__ import annotations


def normalize(scores: dict[str, float]) -> dict[str, float]:
    """Scores as shares of their sum (uniform if all are zero)."""
    total = sum(scores.values())
    if total <= 0:
        return {k: 1.0 / len(scores) for k in scores}
    return {k: v / total for k, v in scores.items()}


def cumulative_threshold(importance: dict[str, float], threshold: float) -> list[str]:
    """Shortest prefix of the descending ranking whose cumulative importance reaches ``threshold``.

    Ties are broken by name so the result is deterministic.
    """
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    if not importance:
        return []
    ranked = sorted(importance.items(), key=lambda kv: (-kv[1], kv[0]))
    total = sum(v for _, v in ranked)
    kept: list[str] = []
    cumulative = 0.0
    for name, value in ranked:
        kept.append(name)
        cumulative += value
        # relative tolerance: T = 1 must keep everything but not fail on rounding
        if cumulative >= threshold * total * (1 - 1e-9):
            break
    return kept
