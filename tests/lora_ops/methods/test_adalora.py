"""AdaLoRA (spec §6): sensitivity x uncertainty, triplet scores, cubic budget, orthogonality, resume, export."""

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

from lora_ops.adapters.adalora import AdaLoRALinear
from lora_ops.adapters.base import adapter_layers
from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.rank_allocation import adalora_budget
from lora_ops.targets import find_targets
from lora_ops.training import TrainConfig, TrainingInterrupted, train, trainable_state

M = 18  # tiny_bert: 3 layers x 6 linear types


def test_layer_init_and_forward(tiny_bert):
    _, _, plan = adapt(tiny_bert, "adalora", rank=8, alpha=16)
    assert plan["initial_rank"] == 12 and plan["target_budget"] == 8 * M
    layer = next(iter(adapter_layers(tiny_bert).values()))
    assert isinstance(layer, AdaLoRALinear) and layer.rank == 12 and layer.scale == pytest.approx(16 / 12)
    assert torch.count_nonzero(layer.E) == 0
    assert 0.01 < layer.A.std().item() < 0.03 and 0.01 < layer.B.std().item() < 0.03  # N(0, 0.02^2)
    with torch.no_grad():
        layer.E.normal_()
    x = torch.randn(3, layer.in_features)
    expected = layer.base(x) + layer.scale * x @ (layer.B @ torch.diag(layer.E) @ layer.A).T
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_budget_schedule_at_given_steps():
    b0, bt, total, ti, tf = 120, 80, 100, 10, 50  # frozen from T - tf = 50
    assert adalora_budget(0, ti, tf, total, b0, bt) == b0
    assert adalora_budget(ti, ti, tf, total, b0, bt) == b0
    assert adalora_budget(ti + 1, ti, tf, total, b0, bt) < b0  # the first allocation prunes
    # progress 1/2: 80 + 40 (1/2)^3 = 85; AdaLoRA prunes fast first, slow at the end
    assert adalora_budget(30, ti, tf, total, b0, bt) == 85
    assert adalora_budget(50, ti, tf, total, b0, bt) == bt
    assert adalora_budget(99, ti, tf, total, b0, bt) == bt
    values = [adalora_budget(t, ti, tf, total, b0, bt) for t in range(total + 1)]
    assert values == sorted(values, reverse=True)


def test_sensitivity_uncertainty_and_triplet_scores_by_hand(tiny_bert):
    method, ctx, plan = adapt(tiny_bert, "adalora", rank=2, beta1=0.8, beta2=0.7)
    ctrl = method.controller(tiny_bert, plan, ctx)
    ctrl.bind(100)
    layers = list(adapter_layers(tiny_bert).values())
    gen = torch.Generator().manual_seed(0)
    history = []
    for _ in range(3):
        for layer in layers:
            for p in (layer.A, layer.B, layer.E):
                with torch.no_grad():
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)
                p.grad = torch.randn(p.shape, generator=gen)
        history.append({name: (getattr(layers[0], name).detach().clone(), getattr(layers[0], name).grad.clone())
                        for name in ("A", "B", "E")})
        ctrl.update_sensitivity()
    ipt_bar, unc_bar = {}, {}
    for name in ("A", "B", "E"):
        i_bar = u_bar = 0.0
        for step in history:
            w, g = step[name]
            i = (w * g).abs()
            i_bar = 0.8 * i_bar + 0.2 * i
            u_bar = 0.7 * u_bar + 0.3 * (i - i_bar).abs()
        ipt_bar[name], unc_bar[name] = i_bar, u_bar
    for k, name in enumerate(("A", "B", "E")):
        torch.testing.assert_close(ctrl.ipt[k], ipt_bar[name])
        torch.testing.assert_close(ctrl.unc[k], unc_bar[name])
    s = {n: ipt_bar[n] * unc_bar[n] for n in ipt_bar}
    triplet = s["E"] + s["B"].mean(dim=0) + s["A"].mean(dim=1)  # P columns over d_o, Q rows over d_i
    torch.testing.assert_close(ctrl.triplet_scores()[0], triplet)


def test_orthogonality_regulariser_by_hand(tiny_bert):
    method, ctx, plan = adapt(tiny_bert, "adalora", rank=2, orth_reg_weight=0.3)
    ctrl = method.controller(tiny_bert, plan, ctx)
    ctrl.bind(50)
    layers = list(adapter_layers(tiny_bert).values())
    eye = torch.eye(3)
    by_hand = sum(torch.linalg.norm(m.B.T @ m.B - eye).item() + torch.linalg.norm(m.A @ m.A.T - eye).item()
                  for m in layers) / (2 * M)
    assert ctrl.orthogonality().item() == pytest.approx(by_hand, rel=1e-5)
    assert ctrl.regularizer(0).item() == pytest.approx(0.3 * by_hand, rel=1e-5)
    assert ctrl.regularizer(49) is not None  # on for the whole run


def test_controller_allocates_on_schedule_and_freezes(tiny_bert):
    method, ctx, plan = adapt(tiny_bert, "adalora", rank=2, tinit=10, tfinal=40, delta_t=5)
    ctrl = method.controller(tiny_bert, plan, ctx)
    ctrl.bind(100)
    layers = list(adapter_layers(tiny_bert).values())
    gen = torch.Generator().manual_seed(1)
    steps = []
    for t in range(1, 101):
        for layer in layers:  # stand-in for training: gates revive, fresh gradients
            with torch.no_grad():
                layer.E.copy_(torch.rand(3, generator=gen) + 0.1)
            for p in (layer.A, layer.B, layer.E):
                p.grad = torch.randn(p.shape, generator=gen)
        ctrl.on_step_end(t)
        active = int((ctrl.gates() != 0).sum())
        if ctrl.prune_log and ctrl.prune_log[-1]["step"] == t:
            steps.append(t)
            assert active == ctrl.budget(t), t
        elif t < 60:
            assert active == M * 3
        else:
            assert active == M * 2 and torch.equal(ctrl.gates() != 0, ctrl.keep)
        assert ctrl.allows_best(t) == (t >= 60)
    assert steps == [15, 20, 25, 30, 35, 40, 45, 50, 55, 60]  # t_i < t < T - tf every 5, then T - tf
    assert ctrl.ipt is None  # EMAs dropped once the pattern is fixed
    summary = ctrl.summary()
    assert summary["active_components"] == M * 2 and summary["t_fix"] == 60
    json.dumps(summary)


def test_training_end_to_end_final_budget_and_resume(tiny_bert):
    cfg = TrainConfig(epochs=4, lr=1e-2, checkpoint_every=3, progress=False, select_metric="accuracy")
    params = {"rank": 2, "tinit": 0.1, "tfinal": 0.4, "delta_t": 2}

    def run(model, **kw):
        method, ctx, plan = adapt(model, "adalora", **params)
        ctrl = method.controller(model, plan, ctx)
        return method, ctrl, train(model, train_batches(), cfg, controller=ctrl, evaluate=loss_and_accuracy, **kw)

    torch.manual_seed(3)
    model_a = copy.deepcopy(tiny_bert)
    method, ctrl_a, full = run(model_a)
    assert (ctrl_a.t_init, ctrl_a.t_fix) == (2, 12)
    assert ctrl_a.prune_log[-1]["step"] == 12
    assert all("regularizer" in h for h in full.history)
    summary = ctrl_a.summary()
    assert summary["active_components"] == M * 2
    layers = adapter_layers(model_a)
    assert {n: m.active_rank() for n, m in layers.items()} == summary["ranks"]
    counts = method.parameter_counts(model_a)
    assert counts["active"] == sum(summary["ranks"][n] * (m.in_features + m.out_features)
                                   for n, m in layers.items())
    assert full.best["step"] >= 12

    kill = InterruptAtStep(7)
    torch.manual_seed(3)
    with pytest.raises(TrainingInterrupted):
        run(copy.deepcopy(tiny_bert), on_checkpoint=kill)
    assert kill.state["controller"]["ipt"] is not None  # mid-allocation: EMAs travel with the checkpoint
    model_c = copy.deepcopy(tiny_bert)
    _, ctrl_c, resumed = run(model_c, resume=kill.state)
    for k, v in trainable_state(model_a).items():
        torch.testing.assert_close(trainable_state(model_c)[k], v, rtol=0, atol=0)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert ctrl_c.summary() == summary


def test_peft_export_reloads_identically(tiny_bert, tmp_path):
    pytest.importorskip("peft")

    base_state = {k: v.clone() for k, v in tiny_bert.state_dict().items()}
    method, ctx, plan = adapt(tiny_bert, "adalora", rank=2)
    layers = adapter_layers(tiny_bert)
    names = list(layers)
    with torch.no_grad():
        for layer in layers.values():
            layer.E.uniform_(0.5, 2.0)
            layer.B.mul_(20)
        layers[names[3]].E[0] = 0.0
        layers[names[4]].E.zero_()
    batch = random_batch()
    with torch.no_grad():
        ours = tiny_bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    export = method.export_peft(tiny_bert, plan, ctx)
    assert names[4] not in export.config["target_modules"]
    assert {k.replace("\\", ""): v for k, v in export.config["rank_pattern"].items()} == {names[3]: 2}
    loaded = reload_with_peft(export, fresh_copy(tiny_bert, base_state), tmp_path)
    with torch.no_grad():
        theirs = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_bad_inputs_fail_before_training(tiny_bert):
    method = get_method("adalora")
    targets = find_targets(tiny_bert, "all")

    def ctx(rank=2, **p):
        return MethodContext(adapter=AdapterConfig(rank=rank), params=method.params_model(**p))

    with pytest.raises(ValueError, match="above the initial rank"):
        method.decide([], targets, ctx(rank=8, initial_rank=6))
    with pytest.raises(ValueError, match="leaves no adapter"):
        method.decide([], targets, ctx(rank=0))
    with pytest.raises(ValidationError, match="phases overlap"):
        method.params_model(tinit=0.6, tfinal=0.5)
    m, c, plan = adapt(tiny_bert, "adalora", rank=2, tinit=20, tfinal=15)
    with pytest.raises(ValueError, match="phases overlap"):
        train(tiny_bert, train_batches(), TrainConfig(epochs=6, lr=5e-4, progress=False), controller=m.controller(tiny_bert, plan, c))
