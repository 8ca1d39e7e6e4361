"""Prunable structure of a transformer: which modules form a head group or an MLP channel group,
which layers are exempt, and the grid of ratios the architecture can honour.

Pruning units
-------------
* **MLP channels**: one unit per intermediate channel, tied across gate/up (output rows) and
  down (input columns). BERT: intermediate.dense rows and output.dense columns.
* **Attention**, two GQA modes (the stock HF attention needs ``num_attention_heads`` to be a
  multiple of ``num_key_value_heads`` and query head ``h`` to read KV head ``h // n_rep``):

  - ``kv_group`` (default): a unit is one KV head together with the ``n_rep`` query heads that
    read it (rows of q/k/v, columns of o). The pruned model keeps ``n_rep``; the grid is
    ``1 / num_key_value_heads``. K/V projections (and the KV cache) shrink too.
  - ``query_in_group``: a unit is one query head; every KV group loses the same number of query
    heads, KV heads are all kept. The grid is ``1 / n_rep``. k/v are not pruned and do not enter
    the tied score (their score is constant within a KV group, so it could not rank heads there).

  For multi-head attention (BERT, ``n_rep == 1``) both modes are plain per-head pruning with
  q/k/v/o tied.

Units are laid out as ``blocks x size``: the schedule prunes the same count in every block
(one block except ``query_in_group``, which has one block per KV group).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from torch import nn

from lora_ops.targets import architecture_of, find_targets

GQAMode = Literal["kv_group", "query_in_group"]
Rounding = Literal["nearest", "down", "up", "strict"]

HEAD_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class UnitSpec:
    """``blocks`` independent blocks of ``size`` units; each block prunes the same count."""

    kind: str  # "heads" or "mlp"
    blocks: int
    size: int

    @property
    def total(self) -> int:
        return self.blocks * self.size


@dataclass(frozen=True)
class LayerStructure:
    """The prunable modules of one transformer block and their widths."""

    layer: int
    modules: dict[str, str]  # role -> qualified module name
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    exempt: bool

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads


@dataclass(frozen=True)
class PruneStructure:
    family: str
    kind: str  # "causal_lm" or "encoder"
    gqa_mode: str
    prune_heads: bool
    prune_mlp: bool
    layers: list[LayerStructure] = field(default_factory=list)

    @property
    def prunable(self) -> list[LayerStructure]:
        return [ls for ls in self.layers if not ls.exempt]

    def units(self, ls: LayerStructure) -> dict[str, UnitSpec]:
        """The unit layout of one layer, for each enabled kind."""
        out: dict[str, UnitSpec] = {}
        if self.prune_heads:
            if self.gqa_mode == "kv_group":
                out["heads"] = UnitSpec("heads", 1, ls.n_kv_heads)
            else:
                out["heads"] = UnitSpec("heads", ls.n_kv_heads, ls.n_rep)
        if self.prune_mlp:
            out["mlp"] = UnitSpec("mlp", 1, ls.intermediate)
        return out

    def roles_for(self, kind: str) -> tuple[str, ...]:
        """Roles whose scores are tied for ``kind`` and whose modules carry masks."""
        if kind == "heads":
            return HEAD_ROLES if self.gqa_mode == "kv_group" else ("q", "o")
        return tuple(r for r in MLP_ROLES if self.family != "bert" or r != "gate")

    def required_roles(self) -> list[str]:
        roles: list[str] = []
        if self.prune_heads:
            roles += self.roles_for("heads")
        if self.prune_mlp:
            roles += self.roles_for("mlp")
        return roles

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exempt_layers(num_layers: int, first_fraction: float, last: bool) -> set[int]:
    """Official LoRAPrune default: the first ``floor(0.1 L)`` layers and the last one."""
    exempt = set(range(int(math.floor(first_fraction * num_layers + 1e-9))))
    if last and num_layers > 0:
        exempt.add(num_layers - 1)
    return exempt


def discover_structure(
    model: nn.Module,
    gqa_mode: GQAMode = "kv_group",
    exempt_first_fraction: float = 0.1,
    exempt_last: bool = True,
    prune_heads: bool = True,
    prune_mlp: bool = True,
    exempt: list[int] | None = None,
) -> PruneStructure:
    """Read head counts and widths from the model and group its linear modules per layer.

    Raises ``ValueError`` for an unsupported architecture or inconsistent shapes.
    ``exempt`` (explicit layer indices) overrides the fraction/last rule.
    """
    if gqa_mode not in ("kv_group", "query_in_group"):
        raise ValueError(f"gqa_mode must be 'kv_group' or 'query_in_group', got {gqa_mode!r}")
    if not (prune_heads or prune_mlp):
        raise ValueError("nothing to prune: both prune_heads and prune_mlp are off")
    spec = architecture_of(model)  # clear error for unsupported model types
    cfg = model.config
    n_heads = int(cfg.num_attention_heads)
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or n_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads)
    if n_heads % n_kv:
        raise ValueError(f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}")
    num_layers = int(cfg.num_hidden_layers)
    skip = set(exempt) if exempt is not None else exempt_layers(num_layers, exempt_first_fraction, exempt_last)
    by_layer: dict[int, dict[str, str]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for t in find_targets(model, "all"):
        by_layer.setdefault(t.layer, {})[t.role] = t.name
        shapes[t.name] = (t.out_features, t.in_features)
    layers: list[LayerStructure] = []
    for idx in range(num_layers):
        mods = by_layer.get(idx, {})
        up_name = mods.get("up")
        intermediate = shapes[up_name][0] if up_name else 0
        for role, expect in (("q", n_heads * head_dim), ("k", n_kv * head_dim), ("v", n_kv * head_dim)):
            if role in mods and shapes[mods[role]][0] != expect:
                raise ValueError(
                    f"layer {idx}: {role} has {shapes[mods[role]][0]} outputs, expected {expect} "
                    f"({n_heads} heads / {n_kv} kv heads x head_dim {head_dim}); is the model already pruned? "
                    "load it with lora_ops.pruning.load_pruned_model"
                )
        layers.append(LayerStructure(idx, dict(mods), n_heads, n_kv, head_dim, intermediate, idx in skip))
    structure = PruneStructure(spec.family, spec.kind, gqa_mode, prune_heads, prune_mlp, layers)
    if not structure.prunable:
        raise ValueError(f"every layer is exempt from pruning (exempt={sorted(skip)} of {num_layers} layers)")
    return structure


def _round_count(x: float, rounding: Rounding) -> int:
    eps = 1e-9
    if rounding == "down":
        return math.floor(x + eps)
    if rounding == "up":
        return math.ceil(x - eps)
    if rounding == "strict":
        k = round(x)
        if abs(k - x) > 1e-6:
            raise ValueError("off-grid")
        return k
    return math.ceil(x - 0.5 - eps)  # nearest, ties towards pruning less


def pruning_grid(structure: PruneStructure, ratio: float, rounding: Rounding = "nearest") -> dict[str, Any]:
    """Achievable per-layer ratios for ``ratio`` on the architecture's grid, before any training.

    Returns ``{"requested": ratio, "kinds": {kind: {...}}, "layers": {"<idx>": {kind: {...}}}}`` (string
    keys, so the dict survives a JSON round trip).
    Raises ``ValueError`` when the ratio cannot be honoured: outside [0, 1), off-grid with
    ``rounding="strict"``, rounding to zero units (nothing pruned) or to every unit of a block.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"pruning ratio must be in (0, 1), got {ratio}")
    layers: dict[str, dict[str, Any]] = {}
    kinds: dict[str, Any] = {}
    for ls in structure.layers:
        entry: dict[str, Any] = {"exempt": ls.exempt}
        for kind, unit in structure.units(ls).items():
            what = _unit_words(structure, kind, ls)
            try:
                count = _round_count(ratio * unit.size, rounding)
            except ValueError:
                raise ValueError(
                    f"ratio {ratio} is not on the {kind} grid of layer {ls.layer}: {what} allows multiples of "
                    f"1/{unit.size} (e.g. {_grid_examples(unit.size)}); choose one or use grid rounding "
                    "'nearest'/'down'/'up'"
                ) from None
            if count <= 0:
                raise ValueError(
                    f"ratio {ratio} rounds to 0 {what} in layer {ls.layer} (grid step 1/{unit.size}): nothing "
                    f"would be pruned. Use a ratio >= {0.5 / unit.size + 1e-6:.4g}, rounding 'up', or switch off "
                    f"{'prune_heads' if kind == 'heads' else 'prune_mlp'}"
                )
            if count >= unit.size:
                raise ValueError(
                    f"ratio {ratio} rounds to all {unit.size} {what} in layer {ls.layer}: the layer would lose "
                    "its whole attention/MLP. Use a smaller ratio"
                )
            if ls.exempt:
                entry[kind] = {"units": unit.total, "pruned": 0, "ratio": 0.0}
                continue
            info = {"units": unit.total, "blocks": unit.blocks, "block_size": unit.size,
                    "pruned_per_block": count, "pruned": count * unit.blocks, "ratio": count / unit.size,
                    "grid_step": 1.0 / unit.size}
            if kind == "heads":
                info.update(_head_counts(structure, ls, count))
            entry[kind] = info
            kinds.setdefault(kind, {"grid_step": 1.0 / unit.size, "achieved": count / unit.size,
                                    "unit": what})
        layers[str(ls.layer)] = entry
    return {"requested": ratio, "rounding": rounding, "gqa_mode": structure.gqa_mode, "kinds": kinds,
            "layers": layers}


def _unit_words(structure: PruneStructure, kind: str, ls: LayerStructure) -> str:
    if kind == "mlp":
        return "MLP channels"
    if structure.gqa_mode == "kv_group" and ls.n_rep > 1:
        return f"KV groups ({ls.n_kv_heads} groups of {ls.n_rep} query heads)"
    if ls.n_rep > 1:
        return f"query heads per KV group ({ls.n_rep} per group)"
    return "attention heads"


def _grid_examples(size: int) -> str:
    return ", ".join(f"{k}/{size}={k / size:.4g}" for k in range(1, min(size, 4)))


def _head_counts(structure: PruneStructure, ls: LayerStructure, count: int) -> dict[str, int]:
    if structure.gqa_mode == "kv_group":
        kv = ls.n_kv_heads - count
        return {"q_heads": kv * ls.n_rep, "kv_heads": kv}
    return {"q_heads": ls.n_kv_heads * (ls.n_rep - count), "kv_heads": ls.n_kv_heads}
