"""Per-method recipes: parameter groups, their learning rates, and the recipe fixes each paper calls for."""

from __future__ import annotations

import math

import pytest
import torch
from support.method_cases import build_case

from lora_ops.adapters.blora import blora_layers
from lora_ops.data import BatchSource
from lora_ops.methods import get_method
from lora_ops.methods.recipe import Recipe, apply_recipe
from lora_ops.pruning.schedule import PruneSchedule
from lora_ops.training import TrainConfig, TrainingInterrupted, train, trainable_state
from lora_ops.training.loop import _param_groups, parameter_group_names
from stages.common.context import method_context
from stages.common.params import ConfigError, load_params
from stages.resolve import stage_settings

# the default budget of params.yaml: 4,000 training examples, batch 32, 4 epochs
DEFAULT_BUDGET_STEPS = math.ceil(4000 / 32) * 4


def test_groups_and_their_learning_rates():
    model, method, plan, ctx, _ = build_case("blora")
    names = parameter_group_names(model)
    assert set(names.values()) == {"adapter", "gates", "ranges", "head"}  # base_gates only with quantize_base
    assert names["classifier.weight"] == "head"
    assert all(g == "gates" for n, g in names.items() if n.endswith("log_alpha"))
    cfg = apply_recipe(TrainConfig(lr=1e-3), Recipe(lr=2e-3, head_lr=1e-2, group_lr={"gates": 5e-2}))
    lrs = {g["name"]: g["lr"] for g in _param_groups(model, cfg)}
    assert lrs["adapter"] == 2e-3 and lrs["head"] == 1e-2 and lrs["gates.no_decay"] == 5e-2
    assert lrs["ranges.no_decay"] == 2e-3  # a group the recipe does not name trains at the adapter lr
    with pytest.raises(ValueError, match="groups are"):
        _param_groups(model, apply_recipe(TrainConfig(), Recipe(group_lr={"gate": 1.0})))


def test_quantize_base_puts_the_frozen_paths_gates_in_their_own_group():
    model, method, *_ = build_case("blora", settings={"quantize_base": True})
    names = parameter_group_names(model)
    assert set(names.values()) == set(method.parameter_groups)
    gates = {n: g for n, g in names.items() if n.endswith("log_alpha")}
    base = {n for n in gates if n.split(".")[-2] in ("W", "h", "o")}  # ...quantizers.<W|h|o>.log_alpha
    assert base and all(gates[n] == "base_gates" for n in base)
    assert all(g == "gates" for n, g in gates.items() if n not in base)
    cfg = apply_recipe(TrainConfig(lr=1e-3), Recipe(group_lr={"gates": 5e-2, "base_gates": 1e-3}))
    lrs = {g["name"]: g["lr"] for g in _param_groups(model, cfg)}
    assert lrs["gates.no_decay"] == 5e-2 and lrs["base_gates.no_decay"] == 1e-3


def test_base_gates_train_at_the_gates_lr_unless_set_and_only_with_quantize_base():
    p = load_params(overrides={"method.name": "blora", "blora.quantize_base": True})
    group_lr = method_context(p)[1].train.group_lr
    assert group_lr["base_gates"] == group_lr["gates"] == 5e-2  # the recipe before the group was split off
    p = load_params(overrides={"method.name": "blora", "blora.quantize_base": True,
                               "blora.recipe.group_lr": {"gates": 5e-2, "base_gates": 1e-3}})
    assert method_context(p)[1].train.group_lr == {"gates": 5e-2, "base_gates": 1e-3}
    assert "base_gates" not in method_context(load_params(overrides={"method.name": "blora"}))[1].train.group_lr
    with pytest.raises(ConfigError, match="base_gates.*only with blora.quantize_base: true"):
        load_params(overrides={"blora.recipe.group_lr": {"gates": 5e-2, "base_gates": 1e-3}})


def test_gated_methods_name_their_gate_group():
    for name in ("dora_dr", "adalora"):
        model, method, *_ = build_case(name)
        groups = parameter_group_names(model)
        assert {g for n, g in groups.items() if n.endswith(".gate")} == {"gates"}
        assert set(groups.values()) == set(method.parameter_groups)


def test_recipe_null_follows_train_section_and_values_override_it():
    p = load_params(overrides={"method.name": "lora", "train.lr": 3e-4, "train.warmup_ratio": 0.1})
    assert method_context(p)[1].train.lr == 3e-4
    p = load_params(overrides={"method.name": "lora", "train.lr": 3e-4, "lora.recipe.lr": 7e-4,
                               "lora.recipe.warmup_ratio": 0.2})
    cfg = method_context(p)[1].train
    assert (cfg.lr, cfg.warmup_ratio) == (7e-4, 0.2)
    p = load_params(overrides={"method.name": "blora"})
    assert method_context(p)[1].train.group_lr["gates"] == get_method("blora").params_model().recipe.group_lr["gates"]


def test_recipe_in_params_yaml_matches_the_documented_code_defaults():
    p = load_params()
    for name in ("lora", "lora_drop", "blora", "dora_dr", "adalora", "bone", "bat", "loraprune"):
        assert p.method_params(name).recipe == get_method(name).params_model().recipe, name


def test_unknown_recipe_group_is_a_one_line_config_error():
    with pytest.raises(ConfigError, match=r"blora\.recipe\.group_lr sets \['gate'\].*adapter, base_gates, gates, head, ranges"):
        load_params(overrides={"blora.recipe.group_lr": {"gate": 0.1}})
    with pytest.raises(ConfigError, match="lora.recipe.lr"):
        load_params(overrides={"lora.recipe.lr": -1})


def test_recipe_reaches_finetune_but_not_the_plan():
    p = load_params(overrides={"method.name": "dora_dr"})
    settings = stage_settings(p)
    assert "recipe" in settings["finetune"]["settings"] and "recipe" not in settings["decide"]["settings"]
    p = load_params(overrides={"method.name": "lora_drop"})
    settings = stage_settings(p)  # the probe trains with the recipe's lr, the plan reads the threshold only
    assert "recipe" in settings["calibrate"]["settings"] and settings["decide"]["settings"] == {"threshold": 0.9}


def _prior_only(model, batch):
    """Zero task loss: only the gate prior moves the gates (what every unimportant gate sees)."""
    return model(**batch).logits.sum() * 0.0


def _closed_gates(model) -> int:
    closed = 0
    for layer in blora_layers(model).values():
        closed += layer.rank - layer.effective_rank()
        for q in layer.quantizers.values():
            closed += len(q.bits) - 1 - q.bits.index(q.bit_width())
    return closed


@pytest.mark.filterwarnings("ignore:blora:RuntimeWarning")  # the prior alone closes gates: that is the point
@pytest.mark.parametrize("use_recipe", [True, False])
def test_blora_gates_can_close_within_the_default_budget_only_with_its_recipe(use_recipe):
    model, method, plan, ctx, feats = build_case("blora")
    recipe = ctx.params.recipe if use_recipe else Recipe()
    data = BatchSource({k: v[:8] for k, v in feats.items()}, 8, shuffle=False)  # one step per epoch
    cfg = apply_recipe(TrainConfig(epochs=DEFAULT_BUDGET_STEPS, lr=1e-3, warmup_ratio=0.06, progress=False), recipe)
    controller = method.controller(model, plan, ctx)
    train(model, data, cfg, controller=controller, loss_fn=_prior_only)
    closed = _closed_gates(model)
    if use_recipe:
        assert closed > 0, "no gate closed in the default budget with blora's recipe"
    else:  # one lr for everything: log-alpha moves ~lr per step, 2.0 -> -2.0 is out of reach
        assert closed == 0


def test_parameter_groups_resume_exactly():
    def run(kill_after=None, resume=None):
        model, method, plan, ctx, feats = build_case("blora")
        cfg = apply_recipe(TrainConfig(epochs=2, lr=5e-3, warmup_ratio=0.2, checkpoint_every=2, progress=False),
                           ctx.params.recipe)
        saved = {}

        def checkpoint(state):
            saved["state"] = state
            if kill_after is not None and state["step"] >= kill_after:
                raise TrainingInterrupted

        try:
            train(model, BatchSource(feats, 8, seed=3), cfg, controller=method.controller(model, plan, ctx),
                  on_checkpoint=checkpoint, resume=resume)
        except TrainingInterrupted:
            return saved["state"]
        return trainable_state(model)

    full = run()
    state = run(kill_after=4)
    assert [g["name"] for g in state["optimizer"]["param_groups"]][:2] == ["adapter", "gates.no_decay"]
    resumed = run(resume=state)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k


def test_loraprune_never_masks_before_min_score_updates():
    model, method, plan, ctx, feats = build_case("loraprune")
    ctx.params = ctx.params.model_copy(update={"min_score_updates": 6, "warmup": 0.1, "prune_every": 1})
    controller = method.controller(model, plan, ctx)
    first_mask = {}

    class Watch:
        def __getattr__(self, name):
            return getattr(controller, name)

        def on_step_end(self, step):
            controller.on_step_end(step)
            if not first_mask and any(bool((m == 0).any()) for m in controller.masks.values()):
                first_mask.update(step=step, updates=controller.score_updates)

    data = BatchSource(feats, 8, seed=0)  # 5 steps per epoch, 20 in all: warm-up 0.1 alone would be 2 steps
    train(model, data, TrainConfig(epochs=4, lr=1e-3, progress=False), controller=Watch())
    assert first_mask["updates"] >= 6 and first_mask["step"] >= 7, first_mask
    assert controller.sparsity()["heads"] > 0  # and it still reaches its target


def test_loraprune_warmup_in_steps_and_schedule_without_room():
    assert PruneSchedule(total=100, warmup=20).t_init == 20
    assert PruneSchedule(total=16, warmup=0.1, min_warmup_steps=10).t_init == 10
    with pytest.raises(ValueError, match="no room"):
        PruneSchedule(total=12, warmup=0.1, cooldown=0.2, min_warmup_steps=10)
    with pytest.raises(ConfigError, match="whole number of steps"):
        load_params(overrides={"loraprune.warmup": 2.5})
