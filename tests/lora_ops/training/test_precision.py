"""Mixed precision (bf16 / fp16 autocast, fp16 loss scaling) and gradient checkpointing, on CPU.

The same code paths run on CUDA in tests/lora_ops/training/test_cuda.py; here they run where torch's CPU autocast
supports them (bf16 always, fp16 in recent torch), with the adapters and the optimizer state fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch
from support.adapter_cases import METHODS, assert_close_rel, build, features, forward_backward, tiny_llama
from support.tiny_training import InterruptAtStep

from lora_ops.data import BatchSource
from lora_ops.training import Controller, TrainConfig, TrainingInterrupted, train, trainable_state
from lora_ops.training import precision as amp

CPU_FP16 = amp._autocast_works("cpu", torch.float16)
# relative Frobenius error of bf16 autocast against fp32, for outputs and every gradient (measured on
# this CPU: at most 2.2e-2, DoRA-DR and Bayesian-LoRA; bf16 keeps 8 significant bits). Bayesian-LoRA's quantizer-range gradients
# are left out: they jump when a value crosses a rounding boundary, which any change of precision does
BF16_TOL = 5e-2


def _data(n: int = 40, seed: int = 5, causal: bool = False) -> BatchSource:
    return BatchSource(features(n=n, seed=seed, labels=None if causal else 2), batch_size=8, seed=1)


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 1, "lr": 5e-3, "warmup_ratio": 0.0, "progress": False, **kw})


# ------------------------------------------------------------------------------------ validation
def test_unknown_precision_is_a_one_line_error():
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16, got 'fp8'") as err:
        amp.check_precision("fp8", "cpu")
    assert "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no GPU exists")
def test_reduced_precision_on_a_missing_gpu_is_a_one_line_error():
    amp.check_precision("fp32", "cuda")  # fp32 needs nothing from the device
    with pytest.raises(ValueError, match="not available") as err:
        amp.check_precision("bf16", "cuda")
    assert "\n" not in str(err.value)


def test_bf16_on_a_gpu_without_native_bf16_is_a_one_line_error(monkeypatch):
    # a pre-Ampere GPU, simulated: torch reports CUDA, the device lacks native bf16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(amp, "_cuda_bf16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    with pytest.raises(ValueError) as err:
        amp.check_precision("bf16", "cuda:0")
    assert str(err.value).startswith("precision bf16: Tesla T4 has no native bf16") and "\n" not in str(err.value)


def test_cpu_precisions_follow_what_torch_supports():
    amp.check_precision("bf16", "cpu")
    if CPU_FP16:
        amp.check_precision("fp16", "cpu")
        assert isinstance(amp.grad_scaler("fp16", "cpu"), torch.amp.GradScaler)
    else:
        with pytest.raises(ValueError, match="no fp16 autocast on cpu"):
            amp.check_precision("fp16", "cpu")
    assert amp.grad_scaler("bf16", "cpu") is None and amp.grad_scaler("fp32", "cpu") is None


# ------------------------------------------------------------------------------ adapter kernels
@pytest.mark.parametrize("method", METHODS)
def test_bf16_autocast_matches_fp32_for_every_adapter(method):
    case = build(method)
    batch = {k: v[:16] for k, v in case.feats.items()}
    ref = forward_backward(case.model, batch, "cpu")
    got = forward_backward(case.model, batch, "cpu", "bf16")  # asserts fp32 parameters and gradients
    if method == "blora":
        keep = [k for k in ref if ".quantizers." not in k or "log_alpha" in k]
        ref, got = {k: ref[k] for k in keep}, {k: got[k] for k in keep}
    assert_close_rel(got, ref, BF16_TOL, f"{method} bf16 vs fp32")
    # autocast really ran in bf16: the result is not bit-identical to fp32
    assert not torch.equal(got["logits"], ref["logits"])


# --------------------------------------------------------------------------------- training loop
class _Recorder(Controller):
    """Records which steps saw gradients, and that they were finite and unscaled."""

    def __init__(self, model):
        self.model, self.seen, self.max_grad = model, [], 0.0

    def on_after_backward(self, step: int) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads), f"non-finite gradients reached the controller at {step}"
        self.seen.append(step)
        self.max_grad = max(self.max_grad, max(g.abs().max().item() for g in grads))


def test_bf16_training_keeps_adapters_and_optimizer_state_fp32():
    base = build("lora")
    model32, model16 = copy.deepcopy(base.model), copy.deepcopy(base.model)
    dtypes = []

    def loss_fn(m, batch):
        out = m(**batch)
        dtypes.append(out.logits.dtype)
        return out.loss

    snaps = []
    r32 = train(model32, _data(), _cfg())
    r16 = train(model16, _data(), _cfg(precision="bf16", checkpoint_every=2), loss_fn=loss_fn,
                on_checkpoint=snaps.append)
    assert set(dtypes) == {torch.bfloat16}  # the forward ran under autocast
    state = snaps[-1]
    assert all(t.dtype == torch.float32 for t in state["trainable"].values())
    moments = [t for s in state["optimizer"]["state"].values() for k, t in s.items() if k.startswith("exp_avg")]
    assert moments and all(t.dtype == torch.float32 for t in moments)
    assert all(p.dtype == torch.float32 for p in model16.parameters())
    l32, l16 = [h["loss"] for h in r32.history], [h["loss"] for h in r16.history]
    assert l16 != l32 and max(abs(a - b) / abs(b) for a, b in zip(l16, l32)) < BF16_TOL
    s32, s16 = trainable_state(model32), trainable_state(model16)
    assert_close_rel(s16, s32, BF16_TOL, "bf16-trained adapters vs fp32-trained")
    assert not torch.equal(s16["classifier.weight"], base.model.classifier.weight)


@pytest.mark.skipif(not CPU_FP16, reason="this torch has no fp16 autocast on CPU")
def test_fp16_training_with_scaler_resumes_exactly():
    base = build("dora_dr")
    cfg = _cfg(epochs=2, precision="fp16", checkpoint_every=3)
    full_model = copy.deepcopy(base.model)
    full = train(full_model, _data(), cfg, controller=base.method.controller(full_model, base.plan, base.ctx))
    kill = InterruptAtStep(6)
    killed = copy.deepcopy(base.model)
    with pytest.raises(TrainingInterrupted):
        train(killed, _data(), cfg, controller=base.method.controller(killed, base.plan, base.ctx), on_checkpoint=kill)
    scaler_state = kill.state["scaler"]
    assert scaler_state and scaler_state["scale"] > 1.0
    resumed_model = copy.deepcopy(base.model)
    resumed = train(resumed_model, _data(), cfg, resume=kill.state,
                    controller=base.method.controller(resumed_model, base.plan, base.ctx))
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    sa, sb = trainable_state(full_model), trainable_state(resumed_model)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.skipif(not CPU_FP16, reason="this torch has no fp16 autocast on CPU")
def test_fp16_overflow_steps_are_skipped_and_hidden_from_the_controller(monkeypatch):
    # a loss scale far too large: the first steps overflow in fp16 until the scaler backs off
    monkeypatch.setattr(amp, "grad_scaler", lambda precision, device: torch.amp.GradScaler("cpu", init_scale=2.0**24))
    case = build("lora")
    before = trainable_state(case.model)
    rec = _Recorder(case.model)
    snaps = []
    result = train(case.model, _data(n=160), _cfg(precision="fp16", checkpoint_every=1), controller=rec,
                   on_checkpoint=snaps.append)
    assert 0 < len(rec.seen) < result.steps  # some steps overflowed, later ones did not
    first = rec.seen[0]
    skipped = snaps[first - 2]  # the state after the last overflowing step
    assert all(torch.equal(skipped["trainable"][k], before[k]) for k in before)  # nothing stepped
    assert snaps[-1]["scaler"]["scale"] < 2.0**24
    assert rec.max_grad < 1e3  # the controller saw unscaled gradients, not ~2^20 times too large
    assert all(torch.isfinite(t).all() for t in trainable_state(case.model).values())
    assert any(not torch.equal(trainable_state(case.model)[k], before[k]) for k in before)


# ------------------------------------------------------------------------ gradient checkpointing
def _count_forwards(model) -> list[int]:
    from lora_ops.adapters.base import adapter_layers

    calls = [0]
    for layer in adapter_layers(model).values():
        layer.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    case = build("lora", model=tiny_llama())
    plain, ckpt = case.model, copy.deepcopy(case.model)
    amp.enable_gradient_checkpointing(ckpt)
    batch = {k: v[:8] for k, v in case.feats.items()}
    n_plain, n_ckpt = _count_forwards(plain), _count_forwards(ckpt)
    ref, got = {}, {}
    for model, out in ((plain, ref), (ckpt, got)):
        model.train()  # checkpointing acts in training mode only
        model.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        out["loss"] = loss.detach()
        out.update({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    # adapted layers ran again in backward, so checkpointing is on (non-reentrant checkpoints stop
    # recomputing once every saved tensor is back, so a block's last layer may not rerun)
    assert n_ckpt[0] >= n_plain[0] + len(plain.model.layers) and n_plain[0] == 21
    assert_close_rel(got, ref, 1e-5, "checkpointed vs plain")


def test_gradient_checkpointing_through_the_loop_matches_plain_training():
    case = build("lora", model=tiny_llama())
    plain, ckpt = case.model, copy.deepcopy(case.model)
    r_plain = train(plain, _data(causal=True), _cfg())
    r_ckpt = train(ckpt, _data(causal=True), _cfg(gradient_checkpointing=True))
    assert ckpt.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    assert [h["loss"] for h in r_ckpt.history] == pytest.approx([h["loss"] for h in r_plain.history], rel=1e-5)
    assert_close_rel(trainable_state(ckpt), trainable_state(plain), 1e-4, "checkpointed training")


def test_gradient_checkpointing_on_a_model_without_support_is_a_one_line_error():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="Sequential does not support it") as err:
        amp.enable_gradient_checkpointing(model)
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------------- params.yaml
@pytest.fixture
def repo(tmp_path, monkeypatch):
    from support.helpers import scratch_repo

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv("LORA_SIEVE_DEVICE", raising=False)
    return scratch_repo(tmp_path / "repo", git=False)


@pytest.mark.parametrize("override, message", [
    ({"train.precision": "fp8"}, "train.precision: precision must be one of fp32, bf16, fp16, got 'fp8'"),
    ({"train.gradient_checkpointing": True}, "train.gradient_checkpointing is for causal LMs; task 'sst2'"),
])
def test_params_reject_bad_precision_and_checkpointing(repo, override, message):
    from support.helpers import set_params

    from stages.common.params import ConfigError, load_params

    set_params(repo, override)
    with pytest.raises(ConfigError) as err:
        load_params(repo / "params.yaml")
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no GPU exists")
def test_params_reject_bf16_on_a_device_that_lacks_it(repo, monkeypatch):
    from support.helpers import set_params

    from stages.common.params import ConfigError, load_params

    monkeypatch.setenv("LORA_SIEVE_DEVICE", "cuda")
    set_params(repo, {"train.precision": "bf16"})
    with pytest.raises(ConfigError, match=r"^train\.precision bf16: device cuda is not available") as err:
        load_params(repo / "params.yaml")
    assert "\n" not in str(err.value)


def test_params_reach_the_training_config(repo):
    from support.helpers import set_params

    from stages.common.context import method_context
    from stages.common.params import load_params

    set_params(repo, {"train.precision": "bf16", "task.name": "alpaca", "model.name": "smollm2-135m",
                      "train.gradient_checkpointing": True, "method.name": "lora"})
    _, ctx = method_context(load_params(repo / "params.yaml"))
    assert ctx.train.precision == "bf16" and ctx.train.gradient_checkpointing is True
