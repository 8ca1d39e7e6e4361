"""The compressed adapter: pair sites (shared pairs once), statistics hooks, the compact file, the search."""

from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load_file, save_file

from lora_ops.adapters.base import adapter_layers
from lora_ops.adapters.lora import LoRALinear, LoRAPair
from lora_ops.compress import decompose_output, decompose_svd
from lora_ops.compress.adapter import (
    CompressedAdapter,
    StatsRecorder,
    inject_compressed,
    pair_bytes,
    pair_sites,
    store_pair,
)
from lora_ops.compress.search import search_bits, search_budget
from lora_ops.targets import find_targets, inject, unload


def _lora_drop_like(model: torch.nn.Module) -> tuple[LoRAPair, list[str]]:
    """Own pairs on q/k, one pair shared by every value module (LoRA-drop's shared group)."""
    torch.manual_seed(1)
    targets = [t for t in find_targets(model, ["q", "v"])]
    v = [t for t in targets if t.role == "v"]
    shared = LoRAPair(v[0].in_features, v[0].out_features, 4)

    def make(t, lin):
        pair = shared if t.role == "v" else LoRAPair(lin.in_features, lin.out_features, 4)
        return LoRALinear(lin, pair, 2.0)

    inject(model, targets, make)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora.B.normal_()  # a trained-looking (non-zero) update
    return shared, [t.name for t in v]


def _forward(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def test_shared_pair_is_one_site_with_summed_gram_and_stays_shared(tiny_bert):
    shared, v_modules = _lora_drop_like(tiny_bert)
    sites = pair_sites(tiny_bert)
    by_key = {s.key: s for s in sites}
    assert len(sites) == 3 + 1  # three own q pairs, one shared v pair
    shared_site = next(s for s in sites if len(s.modules) > 1)
    assert list(shared_site.modules) == sorted(v_modules)

    ids = torch.randint(0, 120, (3, 10))
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0  # padding excluded from the statistics
    rec = StatsRecorder(tiny_bert, sites)
    inputs = {}
    hooks = [adapter_layers(tiny_bert)[m].register_forward_hook(
        lambda mod, i, o, m=m: inputs.__setitem__(m, i[0].detach().clone())) for m in v_modules]
    rec.set_token_mask(mask)
    _forward(tiny_bert, ids, mask)
    rec.remove()
    for h in hooks:
        h.remove()
    keep = mask.reshape(-1).bool()
    a = shared.A.detach().double()
    expected = sum((inputs[m].reshape(-1, a.shape[1])[keep].double() @ a.t()).t()
                   @ (inputs[m].reshape(-1, a.shape[1])[keep].double() @ a.t()) for m in v_modules)
    assert torch.allclose(rec.grams[shared_site.key].gram, expected, rtol=1e-10, atol=1e-10)
    assert rec.grams[shared_site.key].tokens == int(keep.sum()) * len(v_modules)
    assert rec.base_energy[shared_site.key] > 0 and set(by_key) == set(rec.grams)

    # trimmed once: one stored pair for all the sharing modules, and they share it when rebuilt
    dec = decompose_output(shared_site.a, shared_site.b, shared_site.scale, rec.grams[shared_site.key].gram)
    a2, b2 = dec.factors(2, shared_site.scale)
    stored = store_pair(shared_site.modules, a2, b2, shared_site.scale, 8)
    adapter = CompressedAdapter(pairs=[stored])
    tensors, meta = adapter.to_tensors()
    assert sum(k.endswith("lora_A.codes") for k in tensors) == 1
    base = tiny_bert
    unload(base, merge=False)
    layers = inject_compressed(base, CompressedAdapter.from_tensors(tensors, meta))
    assert set(layers) == set(v_modules)
    assert len({id(layer.lora) for layer in layers.values()}) == 1


def test_compact_file_reloads_bit_for_bit(tiny_bert, tmp_path):
    _lora_drop_like(tiny_bert)
    head = {k: p.detach().clone() for k, p in tiny_bert.named_parameters() if k.startswith("classifier.")}
    sites = pair_sites(tiny_bert)
    pairs = []
    for i, s in enumerate(sites):
        dec = decompose_svd(s.a, s.b, s.scale)
        a, b = dec.factors(min(2 + i % 2, dec.max_rank), s.scale)
        pairs.append(store_pair(s.modules, a, b, s.scale, (0, 8, 4, 4)[i], group_size=16 if i == 3 else None))
    adapter = CompressedAdapter(pairs=pairs, head=head, settings={"criterion": "svd"})
    tensors, meta = adapter.to_tensors()
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=meta)
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a.safetensors"), framework="pt") as fh:
        reloaded = CompressedAdapter.from_tensors(load_file(str(tmp_path / "a.safetensors")), fh.metadata())
    for p, q in zip(adapter.pairs, reloaded.pairs, strict=True):
        assert p.modules == q.modules and p.bits == q.bits and p.scale == q.scale
        assert torch.equal(p.a, q.a) and torch.equal(p.b, q.b)
        assert p.stored_bytes() == q.stored_bytes() == pair_bytes(p.rank, p.a.shape[1], p.b.shape[0], p.bits,
                                                                    16 if p.bits == 4 and q.quantized and
                                                                    q.quantized.a.group_size == 16 else None)
    assert reloaded.stored_bytes() == adapter.stored_bytes()

    # the rebuilt models compute the same logits, bit for bit
    ids = torch.randint(0, 120, (2, 9))
    mask = torch.ones_like(ids)
    unload(tiny_bert, merge=False)
    import copy

    other = copy.deepcopy(tiny_bert)
    inject_compressed(tiny_bert, adapter)
    inject_compressed(other, reloaded)
    assert torch.equal(_forward(tiny_bert, ids, mask), _forward(other, ids, mask))


def test_search_budget_finds_the_smallest_passing_budget_and_never_tests_beyond_need():
    total = 40

    def size(n: int, bits: int) -> int:
        return n * (4 if bits == 0 else bits // 2) + 7

    def metric(n: int, bits: int) -> float:  # monotone: passes from 13 components (float), 15 (int4)
        return 0.90 if n >= (13 if bits != 4 else 15) else 0.80

    chosen, curve = search_budget(size, metric, total, (4, 8, 0), reference=0.905, tolerance=0.5)
    exact, _ = search_budget(size, metric, total, (4, 8, 0), reference=0.905, tolerance=0.5, resolution=0)
    assert exact is not None and (exact.components, exact.bits) == (15, 4)
    assert chosen is not None and chosen.bits == 4 and 15 <= chosen.components <= 16
    assert all(c.stored_bytes == size(c.components, c.bits) for c in curve)
    assert len(curve) <= 3 * 7  # bisection, not a sweep
    # nothing passes: no candidate
    none, _ = search_budget(size, lambda n, b: 0.0, total, (4,), reference=0.9, tolerance=0.5)
    assert none is None
    # lower-is-better metric (a loss): tolerance is relative, in percent
    cand, _ = search_bits(size, lambda n, b: 1.0 + (0.002 if b == 4 else 0.0), 10, (4, 8, 0), 1.0, 0.5,
                          higher_is_better=False)
    assert cand is not None and cand.bits == 4


def test_a_pair_pruned_to_rank_zero_trims_to_nothing(tiny_bert):
    """A rank allocator (AdaLoRA, DoRA-DR) can mask every component of a module: its site has rank 0,
    its G is 0 x 0 and the output-weighted decomposition keeps nothing, instead of refusing the shapes."""
    _lora_drop_like(tiny_bert)
    sites = pair_sites(tiny_bert)
    pruned = dataclasses.replace(sites[0], a=sites[0].a[:0], b=sites[0].b[:, :0])
    sites = [pruned, *sites[1:]]
    rec = StatsRecorder(tiny_bert, sites)
    _forward(tiny_bert, torch.randint(0, 120, (2, 8)), torch.ones(2, 8, dtype=torch.long))
    rec.remove()
    assert rec.grams[pruned.key].gram.shape == (0, 0)
    dec = decompose_output(pruned.a, pruned.b, pruned.scale, rec.grams[pruned.key].gram)
    assert dec.max_rank == 0 and dec.singular_values.numel() == 0
    assert rec.grams[sites[1].key].gram.shape == (sites[1].rank, sites[1].rank)
