"""Only the ``[CLS]`` row through the last layer of a BERT-style sequence classifier.

A BERT classifier reads one row of the last layer's output: the pooler takes ``hidden[:, 0]``. In that
layer every other row's query, attention output projection and feed-forward block feed nothing, while
its keys and values are still read by the ``[CLS]`` query. :func:`cls_only_last_layer` runs that layer
as: keys and values from every row, the query and everything after attention from row 0 only. The
logits are the same function of the parameters, so the loss and every gradient are too (to float
rounding: a GEMM over one row may sum in another order than over ``T`` rows); on MiniLM it skips about
14 % of the linear FLOPs of a step (benchmarks/bench_finetune.py measures what it buys).

It applies only where that reading is exact: a model whose base has a pooler over token 0 and BERT's
layer layout (``attention.self.{query,key,value}``, ``attention.output``, ``feed_forward_chunk``), not
a decoder, no cross-attention, no feed-forward chunking. :func:`supports_cls_only` says whether a model
qualifies; the context manager leaves any other model untouched. Adapter layers that replace the
linear modules (LoRA, shared pairs, Bone...) are called as the modules they replace, on fewer rows.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


def _last_layer(model: nn.Module) -> nn.Module | None:
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    encoder = getattr(base, "encoder", None)
    layers = getattr(encoder, "layer", None)
    if base is None or getattr(base, "pooler", None) is None or not isinstance(layers, nn.ModuleList) or not layers:
        return None
    return layers[-1]


def supports_cls_only(model: nn.Module) -> bool:
    """Whether ``model`` is a sequence classifier whose output reads only token 0 of its last layer, in
    BERT's layer layout (the only layout :func:`cls_only_last_layer` knows)."""
    layer = _last_layer(model)
    config = getattr(model, "config", None)
    if layer is None or config is None or not type(model).__name__.endswith("ForSequenceClassification"):
        return False
    attention = getattr(layer, "attention", None)
    self_attention = getattr(attention, "self", None)
    return (all(hasattr(self_attention, n) for n in ("query", "key", "value", "attention_head_size", "scaling"))
            and hasattr(attention, "output") and hasattr(layer, "feed_forward_chunk")
            and not getattr(config, "is_decoder", False) and not getattr(config, "add_cross_attention", False)
            and not getattr(layer, "chunk_size_feed_forward", 0))


def _attention_function(self_attention: nn.Module) -> Any:
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.bert.modeling_bert import eager_attention_forward

    return ALL_ATTENTION_FUNCTIONS.get_interface(self_attention.config._attn_implementation, eager_attention_forward)


def _cls_forward(layer: nn.Module, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 *args: Any, **kwargs: Any) -> torch.Tensor:
    """The layer's output at row 0 only, shape ``(batch, 1, hidden)``."""
    sa = layer.attention.self
    batch, tokens, _ = hidden_states.shape
    cls = hidden_states[:, :1]
    query = sa.query(cls).view(batch, 1, -1, sa.attention_head_size).transpose(1, 2)
    key = sa.key(hidden_states).view(batch, tokens, -1, sa.attention_head_size).transpose(1, 2)
    value = sa.value(hidden_states).view(batch, tokens, -1, sa.attention_head_size).transpose(1, 2)
    if attention_mask is not None and attention_mask.dim() == 4 and attention_mask.shape[-2] > 1:
        attention_mask = attention_mask[..., :1, :]  # a per-query mask: the [CLS] query's row
    context, _ = _attention_function(sa)(sa, query, key, value, attention_mask,
                                         dropout=sa.dropout.p if sa.training else 0.0, scaling=sa.scaling)
    attended = layer.attention.output(context.reshape(batch, 1, -1).contiguous(), cls)
    return layer.feed_forward_chunk(attended)


@contextmanager
def cls_only_last_layer(model: nn.Module, enabled: bool = True) -> Iterator[bool]:
    """Within the block, ``model``'s last layer computes row 0 only (see the module); yields whether it does.
    A model that does not qualify (:func:`supports_cls_only`), or ``enabled=False``, runs unchanged. The
    parameters and their names are untouched: only the layer's ``forward`` is replaced, and restored after."""
    if not enabled or not supports_cls_only(model):
        yield False
        return
    layer = _last_layer(model)
    assert layer is not None
    had_own = "forward" in vars(layer)
    previous = vars(layer).get("forward")
    layer.forward = types.MethodType(_cls_forward, layer)
    try:
        yield True
    finally:
        if had_own:
            layer.forward = previous
        else:
            del layer.forward
