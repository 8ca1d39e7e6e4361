"""Rank budgets across modules: which components of which modules to keep (``shared/spec/compress.md`` §3).

Input everywhere: ``energies[module]`` = the module's component energies ``S_i²`` sorted descending
(:attr:`lora_ops.compress.trim.Decomposition.energies`). Output: ``ranks[module]`` = the number of
leading components kept. A module's components are always kept as a prefix, since within a module
the score is ``S_i²`` divided by one per-module constant.

Rules:

* :func:`ranks_at_module_energy` -- PEFT's per-module energy share (each module on its own).
* :func:`ranks_at_global_threshold` -- one score threshold over all components of all modules,
  so rank moves to where the output needs it. Scores are normalised per module either by the
  adapter's own output energy (``"adapter"``: ``S_i² / Σ_j S_j²``, scale free) or by the base layer's
  output energy on the same tokens (``"base"``: ``S_i² / ‖W X‖²``, supplied by the caller).
* :func:`ranks_at_global_budget` -- the ``budget`` best-scoring components over all modules.

Ties are broken by module name, then component index, so results never depend on dict order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from lora_ops.lowrank import energy_rank

NORMALISATIONS: tuple[str, ...] = ("adapter", "base")

EnergyVector = torch.Tensor | Sequence[float]


def _as_list(name: str, values: EnergyVector) -> list[float]:
    out = [float(v) for v in (values.detach().double().cpu().tolist() if isinstance(values, torch.Tensor)
                              else values)]
    if any(not math.isfinite(v) or v < 0 for v in out):
        raise ValueError(f"energies of module {name!r} must be finite and >= 0")
    if any(later > earlier for earlier, later in zip(out, out[1:])):
        raise ValueError(f"energies of module {name!r} must be sorted descending")
    return out


def ranks_at_module_energy(energies: Mapping[str, EnergyVector], energy: float) -> dict[str, int]:
    """Per module, the smallest rank holding ``energy`` (in (0, 1]) of its own ``Σ S_i²`` (PEFT)."""
    if not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    ranks = {}
    for name in sorted(energies):
        values = _as_list(name, energies[name])
        ranks[name] = energy_rank(torch.tensor(values, dtype=torch.float64).sqrt(), energy) if values else 0
    return ranks


def component_scores(energies: Mapping[str, EnergyVector], normalisation: str = "adapter",
                     base_energy: Mapping[str, float] | None = None) -> dict[str, list[float]]:
    """Every component's normalised score (see module docstring); zero-energy components score 0."""
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
    if normalisation == "base" and base_energy is None:
        raise ValueError("normalisation 'base' needs base_energy[module] = ‖W X‖² on the calibration tokens")
    scores = {}
    for name in sorted(energies):
        values = _as_list(name, energies[name])
        if normalisation == "adapter":
            denominator = sum(values)
        else:
            assert base_energy is not None
            if name not in base_energy:
                raise ValueError(f"base_energy has no entry for module {name!r}")
            denominator = float(base_energy[name])
            if not (math.isfinite(denominator) and denominator > 0):
                raise ValueError(f"base_energy of module {name!r} must be finite and > 0, got {denominator}")
        scores[name] = [v / denominator if denominator > 0 else 0.0 for v in values]
    return scores


def ranks_at_global_threshold(energies: Mapping[str, EnergyVector], threshold: float,
                              normalisation: str = "adapter",
                              base_energy: Mapping[str, float] | None = None) -> dict[str, int]:
    """Keep every component whose normalised score is ``>= threshold`` (``threshold > 0``)."""
    if not (math.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be finite and > 0, got {threshold}")
    scores = component_scores(energies, normalisation, base_energy)
    # scores descend within a module, so counting the passing ones gives a prefix
    return {name: sum(1 for s in values if s >= threshold) for name, values in scores.items()}


def ranks_at_global_budget(energies: Mapping[str, EnergyVector], budget: int,
                           normalisation: str = "adapter",
                           base_energy: Mapping[str, float] | None = None) -> dict[str, int]:
    """Keep the ``budget`` best-scoring components over all modules (total kept rank = ``budget``).

    Zero-energy components are never kept, so fewer are kept only when fewer carry any energy.
    Ties: module name, then component index (which also keeps each module's choice a prefix)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 0:
        raise ValueError(f"budget must be an integer >= 0, got {budget!r}")
    scores = component_scores(energies, normalisation, base_energy)
    ranked = sorted(((-s, name, i) for name, values in scores.items() for i, s in enumerate(values) if s > 0))
    ranks = dict.fromkeys(scores, 0)
    for _, name, _ in ranked[:budget]:
        ranks[name] += 1
    return ranks
