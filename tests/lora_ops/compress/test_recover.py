"""Recovery (lora_ops/compress/recover.py): trimmed factors and the head re-tuned on training data, shared
pairs kept shared, the result in the canonical form the quantiser expects, deterministic."""

from __future__ import annotations

import copy

import pytest
import torch
from support.adapter_cases import features
from test_adapter import _lora_drop_like

from lora_ops.compress import decompose_svd
from lora_ops.compress.adapter import CompressedAdapter, inject_compressed, pair_sites, store_pair
from lora_ops.compress.recover import recover, steps_config
from lora_ops.data import BatchSource
from lora_ops.targets import unload
from lora_ops.training import TrainConfig

HEAD = ("classifier.weight", "classifier.bias")


def _trimmed(model: torch.nn.Module, keep: int) -> CompressedAdapter:
    """Every pair cut to its ``keep`` leading SVD components (the q pair of layer 0 to rank 0)."""
    pairs = []
    for site in pair_sites(model):
        d = decompose_svd(site.a, site.b, site.scale)
        rank = 0 if site.key.endswith("layer.0.attention.self.query") else min(keep, d.max_rank)
        a, b = d.factors(rank, site.scale)
        pairs.append(store_pair(site.modules, a, b, site.scale, 0))
    params = dict(model.named_parameters())
    return CompressedAdapter(pairs=pairs, head={k: params[k].detach().clone() for k in HEAD}, settings={"x": 1})


def _loss(base: torch.nn.Module, adapter: CompressedAdapter, feats: dict[str, torch.Tensor]) -> float:
    model = copy.deepcopy(base)
    inject_compressed(model, adapter)
    with torch.no_grad():
        return float(model(**feats).loss)


def _setup(tiny_bert):
    _lora_drop_like(tiny_bert)
    adapter = _trimmed(tiny_bert, keep=1)
    base = copy.deepcopy(tiny_bert)
    unload(base, merge=False)  # the frozen base the adapter goes on
    feats = features(n=48, seq=10, seed=2)
    return base, adapter, feats


def _run(base, adapter, feats, steps=12):
    data = BatchSource(feats, 8, seed=3)
    cfg = steps_config(TrainConfig(lr=3e-2, warmup_ratio=0.0, progress=False), steps, len(data))
    torch.manual_seed(0)
    return recover(copy.deepcopy(base), adapter, ["classifier"], data, cfg)


def test_recovery_lowers_the_training_loss_and_keeps_the_layout(tiny_bert):
    base, adapter, feats = _setup(tiny_bert)
    out = _run(base, adapter, feats)
    assert _loss(base, out, feats) < _loss(base, adapter, feats) - 1e-3
    assert [p.modules for p in out.pairs] == [p.modules for p in adapter.pairs]  # a shared pair stays one pair
    assert any(len(p.modules) > 1 for p in out.pairs)
    assert [p.rank for p in out.pairs] == [p.rank for p in adapter.pairs]  # rank 0 stays 0, nothing grows
    assert not torch.equal(out.head["classifier.weight"], adapter.head["classifier.weight"])  # the head trains
    assert out.settings == adapter.settings and all(p.bits == 0 for p in out.pairs)
    for p in out.pairs:
        if p.rank:  # the compress stage's canonical form: orthonormal B' (per-component scales fit it)
            gram = p.b.double().t() @ p.b.double()
            torch.testing.assert_close(gram, torch.eye(p.rank, dtype=torch.float64), atol=1e-5, rtol=0)


def test_recovery_is_deterministic_and_leaves_its_input_alone(tiny_bert):
    base, adapter, feats = _setup(tiny_bert)
    before = [(p.a.clone(), p.b.clone()) for p in adapter.pairs]
    one, two = _run(base, adapter, feats), _run(base, adapter, feats)
    for p, q in zip(one.pairs, two.pairs):
        assert torch.equal(p.a, q.a) and torch.equal(p.b, q.b)
    assert all(torch.equal(p.a, a) and torch.equal(p.b, b) for p, (a, b) in zip(adapter.pairs, before))


def test_recovery_refuses_quantised_factors_and_zero_steps(tiny_bert):
    base, adapter, feats = _setup(tiny_bert)
    quantised = CompressedAdapter(pairs=[store_pair(p.modules, p.a, p.b, p.scale, 8) for p in adapter.pairs],
                                  head=adapter.head)
    data = BatchSource(feats, 8, seed=3)
    cfg = steps_config(TrainConfig(progress=False), 4, len(data))
    with pytest.raises(ValueError, match="quantise after"):
        recover(copy.deepcopy(base), quantised, ["classifier"], data, cfg)
    with pytest.raises(ValueError, match="max_steps"):
        recover(copy.deepcopy(base), adapter, ["classifier"], data, TrainConfig(progress=False))


def test_steps_config_covers_the_steps_with_whole_epochs():
    cfg = steps_config(TrainConfig(lr=1e-3), steps=25, steps_per_epoch=10)
    assert (cfg.epochs, cfg.max_steps, cfg.lr, cfg.checkpoint_every, cfg.progress) == (3, 25, 1e-3, 0, False)
    assert steps_config(TrainConfig(lr=1e-3), 5, 10, lr=4e-4).lr == 4e-4
