"""A trained LoRA-family adapter as pairs, their calibration statistics, and its compressed form.

* :func:`pair_sites` -- the model's adapter layers grouped by the LoRA pair they use (read through
  each layer's ``as_lora()``): a pair shared by several modules (LoRA-drop) is ONE site.
* :class:`StatsRecorder` -- forward hooks gathering, per site, ``G = Σ (A x)(A x)ᵀ`` (summed over
  every module of the site) and the base layers' output energy ``Σ ‖W x‖²``, padding excluded.
* :class:`CompressedAdapter` -- the product: per site a trimmed pair, float32 or quantised
  (:class:`~lora_ops.compress.pair.CompressedPair`), plus the head tensors; flat tensors for one
  safetensors file and back (:meth:`to_tensors` / :meth:`from_tensors`), bit-exact.
* :func:`inject_compressed` -- plain ``LoRALinear`` layers at the trimmed ranks (shared pairs stay
  shared) on a base model: what merge, evaluate and the exports use.

Pure torch: no file or tracking I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lora_ops.adapters.base import AdapterLayer, adapter_layers
from lora_ops.adapters.lora import LoRALinear, LoRAPair
from lora_ops.compress.pair import CompressedPair, compress_factors
from lora_ops.compress.trim import GramAccumulator
from lora_ops.targets import find_targets, inject

#: the one safetensors metadata key of a compressed adapter file (its JSON layout)
METADATA_KEY = "lora_sieve_compressed"
FORMAT_VERSION = 1


@dataclass
class PairSite:
    """One LoRA pair of the trained adapter and the modules that use it (``ΔW_m = scale · B A``)."""

    key: str  # the first module using it (sorted names): a stable id
    modules: tuple[str, ...]
    a: torch.Tensor  # r x in
    b: torch.Tensor  # out x r
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


def pair_sites(model: nn.Module) -> list[PairSite]:
    """The model's LoRA pairs, shared ones once (same factor tensors and the same scale)."""
    groups: dict[tuple[int, int, float], list[tuple[str, torch.Tensor, torch.Tensor, float]]] = {}
    kept: list[torch.Tensor] = []  # keep every tensor alive so no data_ptr is reused while grouping
    for name, layer in sorted(adapter_layers(model).items()):
        as_lora = getattr(layer, "as_lora", None)
        if as_lora is None:
            raise TypeError(f"{type(layer).__name__} at {name} has no LoRA form (as_lora): it cannot be compressed")
        a, b, scale = as_lora()
        kept += [a, b]
        groups.setdefault((a.data_ptr(), b.data_ptr(), float(scale)), []).append((name, a, b, float(scale)))
    sites = []
    for members in groups.values():
        name, a, b, scale = members[0]
        sites.append(PairSite(key=name, modules=tuple(m[0] for m in members), a=a.detach(), b=b.detach(),
                              scale=scale))
    return sorted(sites, key=lambda s: s.key)


class StatsRecorder:
    """Per site: ``G`` (r x r) over its modules' non-padding tokens and the base output energy ``Σ ‖W x‖²``."""

    def __init__(self, model: nn.Module, sites: Sequence[PairSite], base_energy: bool = True) -> None:
        layers = adapter_layers(model)
        self.grams = {s.key: GramAccumulator(s.rank, device=s.a.device) for s in sites}
        self.base_energy = dict.fromkeys(self.grams, 0.0)
        self._mask: torch.Tensor | None = None
        self._handles = []
        for site in sites:
            for module in site.modules:
                self._handles.append(layers[module].register_forward_hook(self._hook(site, base_energy)))

    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        """Which tokens count (1) and which are padding (0), shaped like the inputs' leading dims."""
        self._mask = None if mask is None else mask.reshape(-1).bool()

    def _hook(self, site: PairSite, base_energy: bool):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            layer: AdapterLayer = module  # type: ignore[assignment]
            with torch.no_grad():
                x = inputs[0].reshape(-1, layer.in_features)
                if self._mask is not None:
                    x = x[self._mask.to(x.device)]
                if site.rank:
                    self.grams[site.key].add_inputs(x, site.a)
                if base_energy:
                    wx = x.double() @ layer.base.weight.detach().double().t()
                    self.base_energy[site.key] += float(wx.pow(2).sum())

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


@dataclass
class StoredPair:
    """One site after compression: factors at the kept rank, float32 (``bits`` 0) or quantised."""

    modules: tuple[str, ...]
    scale: float
    a: torch.Tensor  # k x in, float32: exactly what the layers compute with (dequantised codes)
    b: torch.Tensor  # out x k
    bits: int = 0  # 0 = float32 factors
    quantized: CompressedPair | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def params(self) -> int:
        return self.rank * (self.a.shape[1] + self.b.shape[0])

    def stored_bytes(self) -> int:
        """Codes + scales (quantised) or the float32 factors."""
        if self.quantized is not None:
            return self.quantized.stored_bytes()
        return (self.a.numel() + self.b.numel()) * 4

    def delta_weight(self) -> torch.Tensor:
        """``scale · B A`` exactly as :class:`LoRALinear` computes it (float32)."""
        return self.scale * (self.b @ self.a)


def pair_bytes(rank: int, in_features: int, out_features: int, bits: int, group_size: int | None = None) -> int:
    """What :meth:`StoredPair.stored_bytes` will be for these shapes, without building the pair."""
    if bits == 0 or rank == 0:
        return 4 * rank * (in_features + out_features)
    total = 0
    for cols in (in_features, out_features):  # A' (k x in) and B'ᵀ (k x out), each scaled per row and group
        codes = rank * cols if bits == 8 else (rank * cols + 1) // 2
        groups = -(-cols // (group_size or max(cols, 1)))
        total += codes + 4 * rank * groups
    return total


def store_pair(modules: Sequence[str], a: torch.Tensor, b: torch.Tensor, scale: float, bits: int,
               group_size: int | None = None) -> StoredPair:
    """Trimmed factors ``A'`` (k x in), ``B'`` (out x k) (any float dtype) at ``bits`` 0 (float32), 8 or 4."""
    if bits == 0 or a.shape[0] == 0:
        return StoredPair(tuple(modules), float(scale), a.detach().float().contiguous(),
                          b.detach().float().contiguous())
    q = compress_factors(a, b, scale, bits, group_size)
    qa, qb = q.factors(torch.float32)
    return StoredPair(tuple(modules), float(scale), qa.contiguous(), qb.contiguous(), bits, q)


@dataclass
class CompressedAdapter:
    """The compressed product: trimmed (and quantised) pairs plus the head, with its settings."""

    pairs: list[StoredPair]
    head: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def stored_params(self) -> int:
        return sum(p.params for p in self.pairs)

    def adapter_bytes(self) -> int:
        return sum(p.stored_bytes() for p in self.pairs)

    def head_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.head.values())

    def stored_bytes(self) -> int:
        """The file's payload: codes + scales (or float factors) + head (metadata excluded)."""
        return self.adapter_bytes() + self.head_bytes()

    def ranks(self) -> dict[str, int]:
        return {m: p.rank for p in self.pairs for m in p.modules}

    def to_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Flat tensors and the safetensors metadata (one key) of the compact file."""
        tensors: dict[str, torch.Tensor] = {}
        layout = []
        for i, pair in enumerate(self.pairs):
            prefix = f"pairs.{i}."
            if pair.quantized is not None:
                tensors.update(pair.quantized.to_tensors(prefix))
            else:
                tensors[f"{prefix}lora_A.weight"] = pair.a.contiguous()
                tensors[f"{prefix}lora_B.weight"] = pair.b.contiguous()
                tensors[f"{prefix}scaling"] = torch.tensor([pair.scale], dtype=torch.float64)
            layout.append({"modules": list(pair.modules), "rank": pair.rank, "bits": pair.bits,
                           "in": int(pair.a.shape[1]), "out": int(pair.b.shape[0])})
        tensors.update({f"head.{k}": v.detach().contiguous() for k, v in sorted(self.head.items())})
        meta = {"version": FORMAT_VERSION, "pairs": layout, "settings": self.settings}
        return tensors, {METADATA_KEY: json.dumps(meta, sort_keys=True)}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> CompressedAdapter:
        if METADATA_KEY not in metadata:
            raise ValueError(f"not a compressed adapter: no {METADATA_KEY!r} metadata")
        meta = json.loads(metadata[METADATA_KEY])
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"compressed adapter format {meta.get('version')!r}, this lora-sieve reads "
                             f"{FORMAT_VERSION}")
        flat = dict(tensors)
        pairs = []
        for i, entry in enumerate(meta["pairs"]):
            prefix = f"pairs.{i}."
            modules = tuple(entry["modules"])
            if entry["bits"]:
                q = CompressedPair.from_tensors(flat, prefix)
                a, b = q.factors(torch.float32)
                pairs.append(StoredPair(modules, q.scaling, a.contiguous(), b.contiguous(), int(entry["bits"]), q))
            else:
                a, b = flat[f"{prefix}lora_A.weight"], flat[f"{prefix}lora_B.weight"]
                scale = float(flat[f"{prefix}scaling"].double().item())
                pairs.append(StoredPair(modules, scale, a.float(), b.float()))
        head = {k[len("head."):]: v for k, v in flat.items() if k.startswith("head.")}
        return cls(pairs=pairs, head=head, settings=meta.get("settings", {}))


def is_compressed(metadata: Mapping[str, str] | None) -> bool:
    return bool(metadata) and METADATA_KEY in (metadata or {})


def inject_compressed(model: nn.Module, adapter: CompressedAdapter, roles: str | Sequence[str] = "all"
                      ) -> dict[str, AdapterLayer]:
    """Plain LoRA layers at the stored ranks on a base ``model`` (one ``LoRAPair`` per stored pair, so
    shared pairs stay shared); modules trimmed to rank 0 keep their frozen linear. Loads the head."""
    by_module: dict[str, tuple[LoRAPair, float]] = {}
    for stored in adapter.pairs:
        if stored.rank == 0:
            continue
        pair = LoRAPair(stored.a.shape[1], stored.b.shape[0], stored.rank)
        with torch.no_grad():
            pair.A.copy_(stored.a)
            pair.B.copy_(stored.b)
        for m in stored.modules:
            by_module[m] = (pair, stored.scale)
    targets = [t for t in find_targets(model, roles) if t.name in by_module]
    missing = sorted(set(by_module) - {t.name for t in targets})
    if missing:
        raise ValueError(f"compressed adapter names modules the model lacks, e.g. {missing[:3]}")
    layers = inject(model, targets, lambda t, lin: LoRALinear(lin, by_module[t.name][0], by_module[t.name][1]))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in adapter.head.items():
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"compressed adapter head tensor {name!r} does not fit the model")
            params[name].copy_(value)
    return layers
