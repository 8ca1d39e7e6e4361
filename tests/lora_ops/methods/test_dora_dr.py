"""DoRA-DR (dynamic rank distribution, spec §5): schedule, scores, pruning, DEM, resume, export."""

import copy
import json

import pytest
import torch
from pydantic import ValidationError
from support.tiny_training import (
    InterruptAtStep,
    adapt,
    fresh_copy,
    loss_and_accuracy,
    random_batch,
    reload_with_peft,
    train_batches,
)

from lora_ops.adapters.base import adapter_layers
from lora_ops.adapters.dora_dr import DoRADRLinear
from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.methods.dora_dr import DoRADRController
from lora_ops.rank_allocation import dora_budget, dora_pruned_count, global_prune, resolve_step
from lora_ops.targets import find_targets, unload
from lora_ops.training import TrainConfig, TrainingInterrupted, train, trainable_state

M = 18  # tiny_bert: 3 layers x 6 linear types


def _randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.gate.copy_(torch.rand(layer.rank, generator=gen) + 0.5)
            layer.B.mul_(3.0)


# ------------------------------------------------------------------ adapter
def test_layer_init_forward_and_scale(tiny_bert):
    _, _, plan = adapt(tiny_bert, "dora_dr", rank=8, alpha=16)
    assert plan["initial_rank"] == 12 and plan["target_rank"] == 8 and plan["target_budget"] == 8 * M
    layer = next(iter(adapter_layers(tiny_bert).values()))
    assert isinstance(layer, DoRADRLinear) and layer.method == "dora_dr"
    assert layer.rank == 12 and layer.scale == pytest.approx(16 / 12)
    assert torch.count_nonzero(layer.c) == 0  # c = 0 ...
    assert layer.A.abs().sum() > 0 and layer.B.abs().sum() > 0  # ... both factors random
    assert torch.count_nonzero(layer.delta_weight()) == 0
    _randomize(tiny_bert)
    x = torch.randn(2, 5, layer.in_features)
    expected = layer.base(x) + layer.scale * x @ (layer.B @ torch.diag(layer.c) @ layer.A).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # gradients through the fused call reach A, B and c
    layer(x).pow(2).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (layer.A, layer.B, layer.c))


def test_norm_identity_equals_materialised_components(tiny_bert):
    adapt(tiny_bert, "dora_dr", rank=4)
    _randomize(tiny_bert)
    layer = next(iter(adapter_layers(tiny_bert).values()))
    with torch.no_grad():
        layer.c[1] = 0.0
        comps = [layer.c[i] * torch.outer(layer.B[:, i], layer.A[i]) for i in range(layer.rank)]
        total = torch.linalg.matrix_norm(sum(comps))
        expected = torch.stack([torch.linalg.matrix_norm(ci) for ci in comps]) / (total + 1e-8)
    shares = layer.component_shares()
    torch.testing.assert_close(shares, expected, rtol=1e-5, atol=1e-7)
    assert shares[1] == 0
    # the batched controller path agrees with the single-layer one
    ctrl = get_method("dora_dr").controller(tiny_bert, {}, _ctx(rank=4))
    torch.testing.assert_close(ctrl.shares()[0], shares)


def _ctx(rank=2, **params):
    method = get_method("dora_dr")
    return MethodContext(adapter=AdapterConfig(rank=rank, alpha=8), params=method.params_model(**params))


# ---------------------------------------------------------------- schedules
def test_budget_schedule_at_given_steps():
    m, r0, rt, ts, te = 10, 12, 8, 15, 50
    # forced first prune (reference max(k, 1)) vs the option without it
    assert dora_pruned_count(ts, ts, te, m, r0, rt) == 1
    assert dora_pruned_count(ts, ts, te, m, r0, rt, force_first=False) == 0
    assert dora_budget(ts, ts, te, m, r0, rt) == m * r0
    # halfway: N rho = M (r0 - rT) (1/2)^3 = 10 * 4 / 8 = 5; cubic = slow first, fast at the end
    mid = (ts + te) // 2 + 0.5
    assert dora_pruned_count(mid, ts, te, m, r0, rt) == 5
    assert dora_budget(mid, ts, te, m, r0, rt) == pytest.approx(m * r0 - 5)
    assert dora_pruned_count(te, ts, te, m, r0, rt) == m * (r0 - rt)  # final budget = M rT exactly
    assert dora_pruned_count(te + 7, ts, te, m, r0, rt) == m * (r0 - rt)
    counts = [dora_pruned_count(t, ts, te, m, r0, rt) for t in range(ts, te + 1)]
    assert counts == sorted(counts)
    # fractions of the run vs steps
    assert resolve_step(0.15, 100) == 15 and resolve_step(0.29, 100) == 29 and resolve_step(40, 100) == 40


def test_global_threshold_and_ties():
    scores = torch.tensor([[0.5, 0.0, 0.3], [0.0, 0.9, 0.1]])
    assert global_prune(scores, 2).tolist() == [[False, True, False], [True, False, False]]
    # three-way tie at 0.0 with k = 1: reference '<=' prunes both zeros, the option exactly one
    assert int(global_prune(scores, 1, ties=True).sum()) == 2
    assert int(global_prune(scores, 1, ties=False).sum()) == 1
    assert int(global_prune(scores, 0).sum()) == 0


def test_controller_prunes_on_schedule_and_freezes(tiny_bert):
    """Driven step by step with revived gates: active after each prune step is N - k(t)."""
    method, ctx, plan = adapt(tiny_bert, "dora_dr", rank=2, t_start=10, t_end=50, prune_interval=10)
    ctrl = method.controller(tiny_bert, plan, ctx)
    ctrl.bind(100)
    layers = list(adapter_layers(tiny_bert).values())
    n, gen = M * 3, torch.Generator().manual_seed(3)
    prune_steps = []
    for t in range(1, 101):
        with torch.no_grad():  # stand-in for training: every gate moves (revives) between steps
            for layer in layers:
                layer.c.copy_(torch.rand(3, generator=gen) + 0.1)
        ctrl.on_step_end(t)
        active = int((ctrl.gates() != 0).sum())
        if ctrl.is_prune_step(t):
            prune_steps.append(t)
            assert active == n - ctrl.pruned_count(t), t
        elif t < 50:
            assert active == n  # nothing pruned between prune steps
        else:
            assert active == M * 2  # frozen mask re-applied after every step
            assert torch.equal(ctrl.gates() != 0, ctrl.keep)
        assert ctrl.allows_best(t) == (t >= 50)
    assert prune_steps == [10, 20, 30, 40, 50]
    summary = ctrl.summary()
    assert summary["active_components"] == summary["target_budget"] == M * 2
    assert sum(summary["ranks"].values()) == M * 2 and summary["frozen_at_step"] == 50
    assert [e["step"] for e in summary["prune_log"]] == prune_steps
    json.dumps(summary)  # JSON-able for the decision record


def test_training_revival_before_te_not_after_and_final_budget(tiny_bert):
    method, ctx, plan = adapt(tiny_bert, "dora_dr", rank=2, t_start=0.2, t_end=0.6, prune_interval=3, dem_weight=0.5)
    zeros: dict[int, torch.Tensor] = {}

    class Recording(DoRADRController):
        def on_step_end(self, step):
            super().on_step_end(step)
            zeros[step] = self.gates() == 0

    layers = {n: m for n, m in adapter_layers(tiny_bert).items()}
    ctrl = Recording(layers, 2, ctx.params)
    result = train(tiny_bert, train_batches(), TrainConfig(epochs=6, lr=2e-2, progress=False), controller=ctrl)
    total = 30
    ts, te = 6, 18
    assert (ctrl.t_start, ctrl.t_end) == (ts, te)
    assert [e["step"] for e in ctrl.prune_log] == [6, 9, 12, 15, 18]
    for entry in ctrl.prune_log:
        assert entry["active"] == M * 3 - ctrl.pruned_count(entry["step"])
        assert int((~zeros[entry["step"]]).sum()) == entry["active"]
    assert not zeros[ts - 1].any()  # nothing pruned before t_s
    # revival: components zeroed at a prune step before t_e have non-zero c one step later
    for t in (6, 9, 12, 15):
        revived = zeros[t] & ~zeros[t + 1]
        assert revived.sum() >= 0.5 * zeros[t].sum(), t
    # after t_e: the frozen mask holds at every step, no revival
    for t in range(te, total + 1):
        assert torch.equal(zeros[t], ~ctrl.keep), t
    assert int((~ctrl.keep).sum()) == M
    # DEM is part of the loss until t_e only
    assert all(("regularizer" in h) == (h["step"] <= te) for h in result.history)
    summary = ctrl.summary()
    assert summary["active_components"] == M * 2
    ranks = summary["ranks"]
    assert set(ranks) == set(layers) and all(0 <= r <= 3 for r in ranks.values())
    counts = method.parameter_counts(tiny_bert)
    sizes = {n: m.in_features + m.out_features for n, m in layers.items()}
    assert counts["active"] == counts["stored"] == sum(ranks[n] * sizes[n] for n in layers)
    assert counts["trainable"] == sum(3 * (sizes[n] + 1) for n in layers)


def test_dem_value_by_hand(tiny_bert):
    method, ctx, plan = adapt(tiny_bert, "dora_dr", rank=2, t_start=2, t_end=10, dem_weight=0.25)
    ctrl = method.controller(tiny_bert, plan, ctx)
    ctrl.bind(20)
    layers = list(adapter_layers(tiny_bert).values())
    by_hand = 0.0
    for layer in layers:
        for i in range(3):
            by_hand += torch.var(layer.A[i]).item() + torch.var(layer.B[:, i]).item()
    by_hand /= 2 * 3 * M
    assert ctrl.dem().item() == pytest.approx(by_hand, rel=1e-5)
    assert ctrl.regularizer(0).item() == pytest.approx(0.25 * by_hand, rel=1e-5)
    assert ctrl.regularizer(9) is not None  # the loss of step 10 = t_e still carries DEM
    assert ctrl.regularizer(10) is None
    reg = ctrl.regularizer(3)
    reg.backward()
    assert layers[0].A.grad is not None and layers[0].c.grad is None


def test_resume_after_kill_restores_controller_state(tiny_bert):
    cfg = TrainConfig(epochs=4, lr=1e-2, checkpoint_every=3, progress=False, select_metric="accuracy")
    params = {"rank": 2, "t_start": 0.2, "t_end": 0.6, "prune_interval": 2}

    def run(model, **kw):
        method, ctx, plan = adapt(model, "dora_dr", **params)
        ctrl = method.controller(model, plan, ctx)
        return ctrl, train(model, train_batches(), cfg, controller=ctrl, evaluate=loss_and_accuracy, **kw)

    torch.manual_seed(7)
    model_a = copy.deepcopy(tiny_bert)
    ctrl_a, full = run(model_a)
    kill = InterruptAtStep(7)
    torch.manual_seed(7)
    with pytest.raises(TrainingInterrupted):
        run(copy.deepcopy(tiny_bert), on_checkpoint=kill)
    assert kill.state["step"] == 9 and kill.state["controller"]["keep"] is None  # mid-pruning
    torch.manual_seed(999)
    model_c = copy.deepcopy(tiny_bert)
    ctrl_c, resumed = run(model_c, resume=kill.state)
    for k, v in trainable_state(model_a).items():
        torch.testing.assert_close(trainable_state(model_c)[k], v, rtol=0, atol=0)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert ctrl_c.summary() == ctrl_a.summary()
    torch.testing.assert_close(ctrl_c.ema, ctrl_a.ema, rtol=0, atol=0)
    assert full.best["step"] >= ctrl_a.t_end  # "best" only from final-structure states
    # a state dict is a snapshot (not a view) and refuses another plan's modules
    state = ctrl_a.state_dict()
    ctrl_a.ema.add_(1.0)
    assert not torch.equal(state["ema"], ctrl_a.ema)
    state["modules"] = state["modules"][::-1]
    with pytest.raises(ValueError, match="different modules"):
        ctrl_c.load_state_dict(state)


# ------------------------------------------------------------------- export
def test_peft_export_with_rank_pattern_reloads_identically(tiny_bert, tmp_path):
    pytest.importorskip("peft")

    base_state = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    method, ctx, plan = adapt(tiny_bert, "dora_dr", rank=2)
    _randomize(tiny_bert)
    layers = adapter_layers(tiny_bert)
    names = list(layers)
    with torch.no_grad():
        layers[names[0]].c[1] = 0.0  # rank 2
        layers[names[1]].c.zero_()  # rank 0: must be left out
        layers[names[2]].c[:2] = 0.0  # rank 1
    batch = random_batch()
    with torch.no_grad():
        ours = tiny_bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    export = method.export_peft(tiny_bert, plan, ctx)
    cfg = export.config
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3
    assert names[1] not in cfg["target_modules"] and len(cfg["target_modules"]) == M - 1
    ranks = {k.replace("\\", ""): v for k, v in cfg["rank_pattern"].items()}
    assert ranks == {names[0]: 2, names[2]: 1}
    alphas = {k.replace("\\", ""): v for k, v in cfg["alpha_pattern"].items()}
    assert alphas[names[2]] / 1 == pytest.approx(cfg["lora_alpha"] / cfg["r"])  # same scale alpha/r0
    assert export.tensors[f"base_model.model.{names[2]}.lora_A.weight"].shape == (1, 32)
    loaded = reload_with_peft(export, fresh_copy(tiny_bert, base_state), tmp_path)
    with torch.no_grad():
        theirs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # the merged HF model gives the same outputs too
    unload(tiny_bert, merge=True)
    with torch.no_grad():
        merged = tiny_bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(merged, ours, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- bad input
def test_bad_inputs_fail_before_training(tiny_bert):
    method = get_method("dora_dr")
    targets = find_targets(tiny_bert, "all")

    def ctx(rank=2, **p):
        return MethodContext(adapter=AdapterConfig(rank=rank), params=method.params_model(**p))

    with pytest.raises(ValueError, match="above the initial rank"):
        method.decide([], targets, ctx(rank=8, initial_rank=4))
    with pytest.raises(ValueError, match="above the initial rank"):
        method.build(tiny_bert, targets, {"modules": {}}, ctx(rank=8, initial_rank_factor=0.5))
    with pytest.raises(ValueError, match="leaves no adapter"):
        method.decide([], targets, ctx(rank=0))
    with pytest.raises(ValueError, match="nothing to allocate"):
        method.decide([], targets, ctx(rank=4, initial_rank_factor=1.0))
    with pytest.raises(ValidationError, match="phases overlap"):
        method.params_model(t_start=0.5, t_end=0.3)
    with pytest.raises(ValidationError, match="fraction"):
        method.params_model(t_end=1.5)
    # steps vs fractions only meet at bind(), which train() calls before the first step
    m, c, plan = adapt(tiny_bert, "dora_dr", rank=2, t_start=25, t_end=0.5)
    ctrl = m.controller(tiny_bert, plan, c)
    before = {k: v.clone() for k, v in trainable_state(tiny_bert).items()}
    with pytest.raises(ValueError, match="phases overlap"):
        train(tiny_bert, train_batches(), TrainConfig(epochs=6, lr=5e-4, progress=False), controller=ctrl)
    for k, v in trainable_state(tiny_bert).items():
        assert torch.equal(v, before[k])
