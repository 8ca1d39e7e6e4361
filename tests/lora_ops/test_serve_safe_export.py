"""Serve-safe PEFT export: one global rank and scaling, exact under a loader that reads only
``r``, ``lora_alpha`` and ``target_modules`` (what vLLM-style engines do), and under PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.tiny_training import random_batch

from lora_ops.adapters.base import adapter_layers
from lora_ops.export import PREFIX, PeftExport, export_lora_family, serve_safe
from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.targets import find_targets, freeze_all_but, unload


def _save(export: PeftExport, folder: Path, head: dict[str, torch.Tensor]) -> Path:
    """As the merge stage writes it: the classification head rides along as ``modules_to_save``."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {**export.config, "task_type": "SEQ_CLS", "modules_to_save": ["classifier"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {**export.tensors, **{f"{PREFIX}{k}": v.clone() for k, v in head.items()}}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return folder


def global_only_load(base: torch.nn.Module, folder: Path) -> torch.nn.Module:
    """A serving engine's reading of a PEFT folder: only ``r``, ``lora_alpha`` and
    ``target_modules``; one scaling for every module and rank-``r`` slots (shapes must fit).
    The head (``modules_to_save``) is copied as it is."""
    cfg = json.loads((folder / "adapter_config.json").read_text())
    r, scaling = cfg["r"], cfg["lora_alpha"] / cfg["r"]
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    modules = dict(base.named_modules())
    with torch.no_grad():
        for key, value in tensors.items():
            if ".lora_" not in key:
                base.get_parameter(key.removeprefix(PREFIX)).copy_(value)
        for name in cfg["target_modules"]:
            a, b = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
            if a.shape[0] != r or b.shape[1] != r:
                raise ValueError(f"{name}: rank {a.shape[0]} does not fit the engine's rank-{r} slot")
            modules[name].weight += scaling * (b @ a)
    return base


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _dora_dr(model):
    """A DoRA-DR adapter after allocation: ranks 0..3 differ per module, and two modules carry
    their own scaling (what a plan with per-module alphas exports) so the fold into B is exercised."""
    method = get_method("dora_dr")
    ctx = MethodContext(adapter=AdapterConfig(rank=2, alpha=8.0), params=method.params_model())
    targets = find_targets(model, "all")
    plan = method.decide([], targets, ctx)
    method.build(model, targets, plan, ctx)
    gen = torch.Generator().manual_seed(0)
    layers = list(adapter_layers(model).values())
    with torch.no_grad():
        for i, layer in enumerate(layers):
            layer.gate.copy_(torch.rand(layer.rank, generator=gen) + 0.5)
            layer.B.mul_(3.0)
            layer.c[: i % (layer.rank + 1)] = 0.0  # ranks r0, r0-1, ..., 0 across modules
    layers[2].scale *= 2.5
    layers[4].scale *= 0.3
    return method, ctx, plan


def _lora_drop(model):
    method = get_method("lora_drop")
    ctx = MethodContext(adapter=AdapterConfig(rank=4, alpha=8), params=method.params_model(threshold=0.5))
    targets = find_targets(model, "all")
    rows = [{"module": t.name, "group": t.group, "role": t.role, "layer": t.layer, "energy": 1.0 + t.layer,
             "tokens": 1} for t in targets]
    plan = method.decide(method.score(rows, targets, ctx), targets, ctx)
    method.build(model, targets, plan, ctx)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora.B.copy_(torch.randn(layer.lora.B.shape, generator=gen) * 0.1)
    assert any(m["mode"] == "shared" for m in plan["modules"].values())
    return method, ctx, plan


@pytest.mark.parametrize("build", [_dora_dr, _lora_drop], ids=["dora_dr", "lora_drop"])
def test_serve_safe_reloads_identically_ignoring_patterns(build, tiny_bert, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import BertForSequenceClassification

    base_state = {k: v.clone() for k, v in tiny_bert.state_dict().items()}

    def fresh():
        model = BertForSequenceClassification(tiny_bert.config)
        model.load_state_dict(base_state)
        return model.eval()

    method, ctx, plan = build(tiny_bert)
    freeze_all_but(tiny_bert, ["classifier"])
    with torch.no_grad():  # a trained head: the loaders must take it from the adapter folder
        tiny_bert.classifier.weight.add_(torch.randn(tiny_bert.classifier.weight.shape,
                                                     generator=torch.Generator().manual_seed(7)))
    head = {k: v.detach().clone() for k, v in tiny_bert.classifier.state_dict(prefix="classifier.").items()}
    tiny_bert.eval()
    batch = random_batch()
    ours = _logits(tiny_bert, batch)
    export = method.export_peft(tiny_bert, plan, ctx)
    safe, report = serve_safe(export)
    merged = _logits(unload(tiny_bert, merge=True), batch)
    torch.testing.assert_close(merged, ours, rtol=1e-5, atol=1e-5)

    cfg = safe.config
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {} and not cfg["use_rslora"]
    assert cfg["target_modules"] == export.config["target_modules"]  # rank-0 modules stay out
    for name in cfg["target_modules"]:
        assert safe.tensors[f"{PREFIX}{name}.lora_A.weight"].shape[0] == cfg["r"]
        assert safe.tensors[f"{PREFIX}{name}.lora_B.weight"].shape[1] == cfg["r"]
    plain_dir, safe_dir = _save(export, tmp_path / "peft", head), _save(safe, tmp_path / "serve", head)
    # a global-only loader gets the serve-safe adapter right ...
    torch.testing.assert_close(_logits(global_only_load(fresh(), safe_dir), batch), merged, rtol=1e-5, atol=1e-5)
    # ... and so does PEFT itself
    loaded = peft.PeftModel.from_pretrained(fresh(), str(safe_dir)).eval()
    torch.testing.assert_close(_logits(loaded, batch), merged, rtol=1e-5, atol=1e-5)

    if build is _dora_dr:
        # the ordinary export needs its patterns: a global-only loader cannot serve it
        assert export.config["rank_pattern"] and export.config["alpha_pattern"]
        with pytest.raises(ValueError, match="does not fit"):
            global_only_load(fresh(), plain_dir)
        assert report["modules_rescaled"] == 2 and report["padding_bytes"] > 0
    else:
        # homogeneous rank and scaling: nothing to pad or fold, the factors are the very same bits
        assert report["padding_bytes"] == 0 and report["modules_rescaled"] == 0
        for key, value in export.tensors.items():
            assert torch.equal(safe.tensors[key], value)
        torch.testing.assert_close(_logits(global_only_load(fresh(), plain_dir), batch), merged,
                                   rtol=1e-5, atol=1e-5)


def test_padding_and_folding_arithmetic():
    """Per-module delta s_i B_i A_i is preserved; the report's byte count is the zero padding."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"m.q": (2, 8, 6), "m.k": (4, 8, 6), "m.up": (1, 8, 12)}  # rank, in, out
    tensors = {}
    for name, (r, i, o) in shapes.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = torch.randn(r, i, generator=gen)
        tensors[f"{PREFIX}{name}.lora_B.weight"] = torch.randn(o, r, generator=gen)
    tensors[f"{PREFIX}classifier.weight"] = torch.randn(2, 8, generator=gen)
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4.0, "target_modules": sorted(shapes),
              "rank_pattern": {r"m\.k": 4, "up": 1}, "alpha_pattern": {r"m\.k": 2.0, "up": 3.0},
              "use_rslora": False}
    scalings = {"m.q": 2.0, "m.k": 0.5, "m.up": 3.0}
    safe, report = serve_safe(PeftExport(config, tensors))
    s = safe.config["lora_alpha"] / safe.config["r"]
    assert safe.config["r"] == 4
    for name in shapes:
        a, b = tensors[f"{PREFIX}{name}.lora_A.weight"], tensors[f"{PREFIX}{name}.lora_B.weight"]
        a2, b2 = safe.tensors[f"{PREFIX}{name}.lora_A.weight"], safe.tensors[f"{PREFIX}{name}.lora_B.weight"]
        torch.testing.assert_close(s * (b2 @ a2), scalings[name] * (b @ a), rtol=1e-6, atol=1e-6)
        assert torch.count_nonzero(a2[a.shape[0]:]) == 0 and torch.count_nonzero(b2[:, a.shape[0]:]) == 0
    assert torch.equal(safe.tensors[f"{PREFIX}classifier.weight"], tensors[f"{PREFIX}classifier.weight"])
    expected_pad = sum((4 - r) * (i + o) for r, i, o in shapes.values())
    assert report["padded_params"] == expected_pad and report["padding_bytes"] == 4 * expected_pad
    assert report["lora_bytes"] == 4 * sum(4 * (i + o) for _, i, o in shapes.values())


def test_serve_safe_rejects_what_it_cannot_make_safe(tiny_bert):
    with pytest.raises(ValueError, match="needs a LoRA adapter"):
        serve_safe(PeftExport({"peft_type": "MISS", "r": 4}, {}))
    a = torch.zeros(3, 8)
    bad = PeftExport({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["m"]},
                     {f"{PREFIX}m.lora_A.weight": a, f"{PREFIX}m.lora_B.weight": torch.zeros(8, 3)})
    with pytest.raises(ValueError, match="config says rank 2"):
        serve_safe(bad)
    with pytest.raises(ValueError, match="rank 0"):
        export_lora_family(tiny_bert)  # no adapters at all
