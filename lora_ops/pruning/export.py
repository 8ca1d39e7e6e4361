"""Physical pruning, export as a plain HF folder, and the loader for per-layer widths.

Export contract
---------------
* ``prune_model`` slices the pruned rows (q/k/v, gate/up; BERT query/key/value, intermediate)
  and columns (o, down) out of the base weights *and* the LoRA factors, then (by default) merges
  LoRA, leaving plain ``nn.Linear`` modules. The masked model and the pruned model compute the
  same function (masks zero exactly what is sliced).
* ``save_pruned`` writes ``save_pretrained`` output plus a ``lora_sieve_pruning`` entry in
  ``config.json`` (per-layer widths). When every layer has the same widths and the config can
  express them (Llama family: ``num_attention_heads``, ``num_key_value_heads`` with an explicit
  ``head_dim``, ``intermediate_size``; BERT: ``intermediate_size`` only, because BERT derives
  its head size from ``hidden_size / num_attention_heads``), the config is rewritten and stock
  ``AutoModel*.from_pretrained`` loads the folder with no lora-sieve code.
* Otherwise (exempt layers keep full width, or BERT heads were pruned) the config keeps the
  dense widths, stock ``from_pretrained`` refuses the folder with a shape-mismatch error, and
  :func:`load_pruned_model` loads it: it builds the stock class, narrows each layer to its
  recorded widths and loads the weights strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from lora_ops.adapters.base import AdapterLayer, adapter_layers
from lora_ops.adapters.lora import LoRALinear, LoRAPair
from lora_ops.targets import find_targets, unload

CONFIG_KEY = "lora_sieve_pruning"


def _parent_attr(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return model.get_submodule(parent), attr


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = linear.weight.detach()
    b = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        w = w.index_select(0, rows)
        b = b.index_select(0, rows) if b is not None else None
    if cols is not None:
        w = w.index_select(1, cols)
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    new.weight.requires_grad_(False)
    if new.bias is not None:
        new.bias.requires_grad_(False)
    return new


def _slice_module(model: nn.Module, name: str, rows: torch.Tensor | None, cols: torch.Tensor | None) -> None:
    parent, attr = _parent_attr(model, name)
    module = getattr(parent, attr)
    if isinstance(module, AdapterLayer):
        if module.merged:
            module.unmerge()
        if not isinstance(module, LoRALinear):
            raise TypeError(f"cannot slice a {type(module).__name__} at {name}")
        base = _slice_linear(module.base, rows, cols)
        a = module.lora.A.detach()
        b = module.lora.B.detach()
        pair = LoRAPair(base.in_features, base.out_features, module.lora.rank).to(a.device)
        with torch.no_grad():
            pair.A.copy_(a.index_select(1, cols) if cols is not None else a)
            pair.B.copy_(b.index_select(0, rows) if rows is not None else b)
        new: nn.Module = LoRALinear(base, pair, module.scale, module.dropout)  # masks are gone: plain LoRA
    else:
        new = _slice_linear(module, rows, cols)
    setattr(parent, attr, new)


def layer_widths(plan: dict[str, Any]) -> dict[str, dict[str, int]]:
    """Per-layer ``q_heads``, ``kv_heads``, ``head_dim``, ``intermediate`` after pruning."""
    out: dict[str, dict[str, int]] = {}
    for idx, e in plan["layers"].items():
        heads = e.get("heads")
        mlp = e.get("mlp")
        out[idx] = {
            "q_heads": len(heads["kept_q_heads"]) if heads else e["n_heads"],
            "kv_heads": len(heads["kept_kv_heads"]) if heads else e["n_kv_heads"],
            "head_dim": e["head_dim"],
            "intermediate": mlp["kept"] if mlp else e["intermediate"],
        }
    return out


def _set_attention_widths(model: nn.Module, q_name: str, family: str, q_heads: int, kv_heads: int,
                          head_dim: int) -> None:
    """Update the bookkeeping attributes of the attention module that owns ``q_name``."""
    attn = model.get_submodule(q_name.rpartition(".")[0])
    if family == "bert":
        attn.num_attention_heads = q_heads
        attn.all_head_size = q_heads * head_dim
    else:
        attn.num_key_value_groups = q_heads // kv_heads


@torch.no_grad()
def prune_model(model: nn.Module, plan: dict[str, Any], merge: bool = True) -> nn.Module:
    """Slice pruned heads/channels out of ``model`` in place; ``merge`` folds LoRA into the weights.

    With ``merge=False`` the LoRA factors are sliced too and stay as plain :class:`LoRALinear`
    layers, so the adapter can be exported against the pruned base (shapes re-keyed).
    """
    family = plan["family"]
    for e in plan["layers"].values():
        mods = e["modules"]
        hd = e["head_dim"]
        heads = e.get("heads")
        if heads and heads["pruned_q_heads"]:
            dev = model.get_submodule(mods["q"]).weight.device
            q_rows = torch.tensor([h * hd + i for h in heads["kept_q_heads"] for i in range(hd)], device=dev)
            _slice_module(model, mods["q"], q_rows, None)
            _slice_module(model, mods["o"], None, q_rows)
            if len(heads["kept_kv_heads"]) < e["n_kv_heads"]:
                kv_rows = torch.tensor([h * hd + i for h in heads["kept_kv_heads"] for i in range(hd)], device=dev)
                _slice_module(model, mods["k"], kv_rows, None)
                _slice_module(model, mods["v"], kv_rows, None)
            _set_attention_widths(model, mods["q"], family, len(heads["kept_q_heads"]),
                                  len(heads["kept_kv_heads"]), hd)
        mlp = e.get("mlp")
        if mlp and mlp["pruned_channels"]:
            dev = model.get_submodule(mods["up"]).weight.device
            gone = set(mlp["pruned_channels"])
            keep = torch.tensor([c for c in range(e["intermediate"]) if c not in gone], device=dev)
            for role in ("gate", "up"):
                if role in mods:
                    _slice_module(model, mods[role], keep, None)
            _slice_module(model, mods["down"], None, keep)
    # exempt layers may still carry masked LoRA layers with all-ones masks: make them plain
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear) and type(module) is not LoRALinear:
            _slice_module(model, name, None, None)
    if merge:
        unload(model, merge=True)
    _record(model, plan)
    return model


def _record(model: nn.Module, plan: dict[str, Any]) -> None:
    """Write the widths into the config: stock fields when uniform and expressible, else our key."""
    cfg = model.config
    widths = layer_widths(plan)
    distinct = {tuple(sorted(w.items())) for w in widths.values()}
    family = plan["family"]
    dense = next(iter(plan["layers"].values()))
    heads_changed = any(w["q_heads"] != dense["n_heads"] for w in widths.values())
    stock = len(distinct) == 1 and not (family == "bert" and heads_changed)
    if stock:
        w = next(iter(widths.values()))
        cfg.intermediate_size = w["intermediate"]
        if family != "bert":
            cfg.head_dim = w["head_dim"]  # explicit: HF would otherwise derive it from hidden_size / heads
            cfg.num_attention_heads = w["q_heads"]
            cfg.num_key_value_heads = w["kv_heads"]
    setattr(cfg, CONFIG_KEY, {"stock_loadable": stock, "layers": widths, "gqa_mode": plan.get("gqa_mode"),
                              "criterion": plan.get("criterion")})


def save_pruned(model: nn.Module, out_dir: str | Path, tokenizer: Any = None) -> dict[str, Any]:
    """``save_pretrained`` of a pruned, merged model; returns the recorded pruning info."""
    if adapter_layers(model):
        raise ValueError("merge the adapters first (prune_model(..., merge=True)) before saving a plain HF folder")
    info = getattr(model.config, CONFIG_KEY, None)
    if info is None:
        raise ValueError("model was not pruned with lora_ops.pruning.prune_model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return info


def load_pruned_model(path: str | Path, dtype: torch.dtype | None = None, device: str = "cpu") -> nn.Module:
    """Load a folder written by :func:`save_pruned`, whether or not its widths are uniform.

    Uniform, expressible widths: plain ``from_pretrained`` of the stock class. Otherwise: the
    stock class is built from the (dense) config, each layer is narrowed to its recorded widths
    and the weights are loaded strictly, so a mismatch fails loudly.
    """
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    cfg = AutoConfig.from_pretrained(path)
    info = getattr(cfg, CONFIG_KEY, None)
    cls = getattr(transformers, cfg.architectures[0])
    if info is None or info.get("stock_loadable"):
        kwargs = {"dtype": dtype} if dtype is not None else {}
        return cls.from_pretrained(path, **kwargs).to(device).eval()
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = cls(cfg)
    _narrow(model, info["layers"])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])  # list (v4) or dict (v5): keys either way
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise ValueError(f"pruned checkpoint does not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    return model.to(device).eval()


def _narrow(model: nn.Module, widths: dict[str, dict[str, int]]) -> None:
    """Replace each layer's linear modules by empty ones of the recorded widths."""
    by_layer: dict[int, dict[str, str]] = {}
    for t in find_targets(model, "all"):
        by_layer.setdefault(t.layer, {})[t.role] = t.name
    family = "bert" if getattr(model.config, "model_type", "") in ("bert", "roberta", "xlm-roberta", "electra") \
        else "llama"
    for idx, w in widths.items():
        mods = by_layer[int(idx)]
        hd = w["head_dim"]
        q_out, kv_out, inter = w["q_heads"] * hd, w["kv_heads"] * hd, w["intermediate"]
        shapes = {"q": (q_out, None), "k": (kv_out, None), "v": (kv_out, None), "o": (None, q_out),
                  "gate": (inter, None), "up": (inter, None), "down": (None, inter)}
        for role, name in mods.items():
            parent, attr = _parent_attr(model, name)
            old: nn.Linear = getattr(parent, attr)
            out_f, in_f = shapes[role]
            out_f = out_f or old.out_features
            in_f = in_f or old.in_features
            if (out_f, in_f) != (old.out_features, old.in_features):
                setattr(parent, attr, nn.Linear(in_f, out_f, bias=old.bias is not None, dtype=old.weight.dtype))
        _set_attention_widths(model, mods["q"], family, w["q_heads"], w["kv_heads"], hd)
