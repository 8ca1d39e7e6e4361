"""Where adapters go: architecture role maps, target discovery, injection and unloading.

Roles are architecture-neutral names for the linear layers of a transformer block:
``q k v o`` (attention) and ``gate up down`` (MLP). Each supported architecture maps
roles to module-path suffixes; adding an architecture is one :func:`register_architecture`
call.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from lora_ops.adapters.base import AdapterLayer

ROLES = ("q", "k", "v", "o", "gate", "up", "down")
ROLE_ALIASES = {
    "query": "q", "key": "k", "value": "v", "q_proj": "q", "k_proj": "k", "v_proj": "v",
    "o_proj": "o", "attn_out": "o", "attention.output": "o", "gate_proj": "gate",
    "up_proj": "up", "intermediate": "up", "down_proj": "down", "output": "down",
}


@dataclass(frozen=True)
class ArchitectureSpec:
    """How one model family names its per-layer linear modules."""

    family: str
    layer_pattern: str  # regex with one group: the transformer-block index
    roles: dict[str, str]  # role -> module-path suffix inside a block
    kind: str  # "encoder" or "causal_lm"


_ARCHITECTURES: dict[str, ArchitectureSpec] = {}


def register_architecture(model_types: Iterable[str], spec: ArchitectureSpec) -> None:
    for model_type in model_types:
        _ARCHITECTURES[model_type] = spec


register_architecture(
    ["bert", "roberta", "xlm-roberta", "electra"],
    ArchitectureSpec(
        family="bert",
        layer_pattern=r"encoder\.layer\.(\d+)\.",
        roles={
            "q": "attention.self.query",
            "k": "attention.self.key",
            "v": "attention.self.value",
            "o": "attention.output.dense",
            "up": "intermediate.dense",
            "down": "output.dense",
        },
        kind="encoder",
    ),
)
register_architecture(
    ["llama", "mistral", "qwen2", "qwen3", "smollm3"],
    ArchitectureSpec(
        family="llama",
        layer_pattern=r"layers\.(\d+)\.",
        roles={
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
        },
        kind="causal_lm",
    ),
)


def supported_model_types() -> list[str]:
    return sorted(_ARCHITECTURES)


def architecture_of(model: nn.Module) -> ArchitectureSpec:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {model_type!r}: lora-sieve knows {', '.join(supported_model_types())}. "
            "Register one with lora_ops.targets.register_architecture()."
        )
    return _ARCHITECTURES[model_type]


def normalize_roles(requested: str | Sequence[str], spec: ArchitectureSpec) -> list[str]:
    """Turn ``"all"`` or a list of role names/aliases into canonical roles the architecture has."""
    if isinstance(requested, str):
        requested = list(spec.roles) if requested == "all" else [requested]
    roles: list[str] = []
    for item in requested:
        role = ROLE_ALIASES.get(item, item)
        if role not in spec.roles:
            raise ValueError(
                f"unknown target {item!r} for {spec.family} models: choose from {', '.join(spec.roles)} or 'all'"
            )
        if role not in roles:
            roles.append(role)
    return roles


@dataclass(frozen=True)
class Target:
    """One adaptable linear module."""

    name: str  # qualified module name, e.g. "bert.encoder.layer.3.attention.self.query"
    role: str
    layer: int
    in_features: int
    out_features: int

    @property
    def group(self) -> str:
        """Modules of one group share role and shape, so they can share a LoRA and be ranked together."""
        return f"{self.role}:{self.out_features}x{self.in_features}"


def find_targets(model: nn.Module, roles: str | Sequence[str]) -> list[Target]:
    """All linear modules of ``model`` playing one of ``roles``, in layer then role order."""
    spec = architecture_of(model)
    wanted = normalize_roles(roles, spec)
    layer_re = re.compile(spec.layer_pattern)
    found: list[Target] = []
    for name, module in model.named_modules():
        base = module.base if isinstance(module, AdapterLayer) else module
        if not isinstance(base, nn.Linear) or ".base" in name:
            continue
        match = layer_re.search(name)
        if match is None:
            continue
        suffix = name[match.end():]
        for role in wanted:
            if suffix == spec.roles[role]:
                found.append(Target(name, role, int(match.group(1)), base.in_features, base.out_features))
    if not found:
        raise ValueError(f"no modules matched targets {wanted} in this {spec.family} model")
    order = {r: i for i, r in enumerate(wanted)}
    found.sort(key=lambda t: (t.layer, order[t.role]))
    return found


def _parent_and_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def inject(
    model: nn.Module,
    targets: Sequence[Target],
    make_layer: Callable[[Target, nn.Linear], AdapterLayer | None],
) -> dict[str, AdapterLayer]:
    """Replace each target's linear module by ``make_layer(target, linear)`` (``None`` keeps it frozen)."""
    layers: dict[str, AdapterLayer] = {}
    for target in targets:
        parent, attr = _parent_and_attr(model, target.name)
        linear = getattr(parent, attr)
        if isinstance(linear, AdapterLayer):
            raise ValueError(f"{target.name} already carries an adapter")
        layer = make_layer(target, linear)
        if layer is None:
            continue
        setattr(parent, attr, layer)
        layers[target.name] = layer
    return layers


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Put plain ``nn.Linear`` modules back; with ``merge`` their weights include the adapter update."""
    for name, layer in list(_adapter_items(model)):
        if merge:
            layer.merge()
        else:
            layer.unmerge()
        parent, attr = _parent_and_attr(model, name)
        setattr(parent, attr, layer.base)
    return model


def _adapter_items(model: nn.Module) -> Iterable[tuple[str, AdapterLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, AdapterLayer)]


def freeze_all_but(model: nn.Module, trainable_prefixes: Sequence[str] = ()) -> None:
    """Freeze every parameter except adapter parameters and modules named in ``trainable_prefixes``."""
    for name, param in model.named_parameters():
        param.requires_grad_(False)
        if any(name == p or name.startswith(p + ".") for p in trainable_prefixes):
            param.requires_grad_(True)
    for layer in model.modules():
        if isinstance(layer, AdapterLayer):
            for _, p in layer.adapter_parameters():
                p.requires_grad_(True)
