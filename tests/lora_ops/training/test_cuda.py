"""CUDA: every adapter kind and every method on a GPU, against the CPU.

Marked ``cuda``: tests/conftest.py skips them, with the reason, where torch sees no GPU. Run them
with ``pytest -m cuda tests/lora_ops/training/test_cuda.py`` (benchmarks/gpu_suite.sh does). They import only
lora_ops, torch, transformers, safetensors and pytest (no stages/, DVC, MLflow or Prefect); lora_ops
itself needs pydantic (method parameter models), which the suite installs from shipped wheels.

Tolerances (relative Frobenius error ``|got - want| / |want|`` over logits, loss and every gradient):

* fp32 on CUDA vs fp32 on CPU: ``FP32_TOL`` = 1e-5 (only the summation order differs; TF32 is off).
  Bayesian-LoRA ``BLORA_FP32_TOL`` = 1e-3: its fake-quantised activations round, and a value that
  lands on a rounding boundary on one device moves by one quantisation step.
* bf16 autocast on CUDA vs fp32 on CPU: ``BF16_TOL`` = 5e-2 (bf16 keeps 8 significant bits; bf16
  autocast on the CPU measured at most 2.2e-2, tests/lora_ops/training/test_precision.py).
* Bayesian-LoRA's quantizer-range gradients are not compared (they jump at rounding boundaries).

The helpers take the device as an argument, so the same code runs on the CPU for a dry run
(``benchmarks/bench_gpu.py --device cpu --dry-run`` calls them).
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, before CUDA starts

import pytest  # noqa: E402
import torch  # noqa: E402
from support.adapter_cases import (  # noqa: E402
    METHODS,
    assert_close_rel,
    build,
    features,
    forward_backward,
    merged,
    rel_err,
    tiny_llama,
)

from lora_ops.data import BatchSource  # noqa: E402
from lora_ops.training import TrainConfig, TrainingInterrupted, train, trainable_state  # noqa: E402

pytestmark = pytest.mark.cuda

FP32_TOL = 1e-5
BLORA_FP32_TOL = 1e-3
BF16_TOL = 5e-2
DEVICE = "cuda"


def _comparable(res: dict[str, torch.Tensor], method: str) -> dict[str, torch.Tensor]:
    if method != "blora":
        return res
    return {k: v for k, v in res.items() if ".quantizers." not in k or "log_alpha" in k}


@pytest.fixture(autouse=True)
def _exact_fp32():
    # fp32 must mean fp32 on the GPU too: TF32 GEMMs keep only 10 mantissa bits
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# ------------------------------------------------------------------- forward, backward and merge
def check_adapter_matches_cpu(method: str, precision: str, device: str) -> dict[str, float]:
    """Forward + backward on ``device`` (under ``precision``) against fp32 on the CPU; merge on both."""
    case = build(method)
    batch = {k: v[:16] for k, v in case.feats.items()}
    want = _comparable(forward_backward(case.model, batch, "cpu"), method)
    moved = copy.deepcopy(case.model).to(device)
    got = _comparable(forward_backward(moved, batch, device, precision), method)
    tol = BF16_TOL if precision != "fp32" else (BLORA_FP32_TOL if method == "blora" else FP32_TOL)
    assert_close_rel(got, want, tol, f"{method} {precision} on {device} vs fp32 on cpu")
    errors = {"forward_backward": max(rel_err(got[k], want[k]) for k in want)}
    if precision == "fp32":
        # the method's own merge (LoRAPrune also slices structure) gives the same weights on both devices
        m_cpu, m_dev = merged(case, "cpu"), merged(case, device)
        w_cpu, w_dev = m_cpu.state_dict(), {k: v.cpu() for k, v in m_dev.state_dict().items()}
        assert_close_rel(w_dev, w_cpu, FP32_TOL, f"{method} merged weights on {device} vs cpu")
        errors["merge"] = max(rel_err(w_dev[k], w_cpu[k]) for k in w_cpu if w_cpu[k].is_floating_point())
        m_dev.eval()
        with torch.no_grad():
            logits = m_dev(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
        # merged = unmerged on the device (Bayesian-LoRA: its float export of fake-quantised factors)
        err = rel_err(logits, got["logits"])
        assert err <= (BLORA_FP32_TOL if method == "blora" else 1e-5), f"{method}: merged vs unmerged {err:.2e}"
        errors["merged_vs_unmerged"] = err
    return errors


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_adapter_on_cuda_matches_cpu(method, precision):
    check_adapter_matches_cpu(method, precision, DEVICE)


# ----------------------------------------------------------------- training, resume and merge
def _roundtrip(state: dict) -> dict:
    """Through the pickle-free checkpoint format (safetensors + JSON), as a fresh process reads it."""
    from safetensors.torch import load_file, save_file

    from lora_ops.training.state import join_state, split_state

    tensors, tree = split_state(state)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, str(Path(tmp) / "t.safetensors"))
        return join_state(load_file(str(Path(tmp) / "t.safetensors")), json.loads(json.dumps(tree)))


def check_training(method: str, precision: str, device: str, causal: bool = False,
                   gradient_checkpointing: bool = False) -> dict[str, float]:
    """A few steps of every hook on ``device``; a run killed mid-way and resumed from its checkpoint
    equals the uninterrupted one; the merged model equals the trained one."""
    case = build(method, model=tiny_llama() if causal else None)
    cfg = TrainConfig(epochs=2, lr=5e-3, warmup_ratio=0.0, checkpoint_every=2, progress=False,
                      precision=precision, gradient_checkpointing=gradient_checkpointing)

    def run(resume=None, on_checkpoint=None):
        torch.manual_seed(7)  # stochastic gates draw the same samples in each run (a resume restores the RNG)
        model = copy.deepcopy(case.model).to(device)
        controller = case.method.controller(model, case.plan, case.ctx)
        data = BatchSource(case.feats, 8, seed=3)
        result = train(model, data, cfg, controller=controller, resume=resume, on_checkpoint=on_checkpoint,
                       device=device)
        return model, result

    full_model, full = run()
    saved = {}

    def kill(state):
        saved["state"] = _roundtrip(state)
        if state["step"] >= 6:  # mid-epoch 2 (5 steps per epoch)
            raise TrainingInterrupted("simulated kill")

    with pytest.raises(TrainingInterrupted):
        run(on_checkpoint=kill)
    assert (saved["state"]["scaler"] is not None) == (precision == "fp16")
    resumed_model, resumed = run(resume=saved["state"])

    losses = [h["loss"] for h in full.history]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    tol = 1e-5 if precision == "fp32" else 1e-3
    assert [h["loss"] for h in resumed.history] == pytest.approx(losses, rel=tol)
    s_full, s_res = trainable_state(full_model), trainable_state(resumed_model)
    assert all(t.device.type == torch.device(device).type for t in s_full.values())
    assert all(t.dtype == torch.float32 for t in s_full.values() if t.is_floating_point())  # never bf16/fp16
    assert_close_rel({k: v.cpu() for k, v in s_res.items()}, {k: v.cpu() for k, v in s_full.items()},
                     tol * 10, f"{method} {precision}: resumed vs uninterrupted")
    start = trainable_state(case.model)
    assert any(not torch.equal(s_full[k].cpu(), start[k]) for k in start), "training changed nothing"

    # merge on the device: the plain model computes what the trained adapters compute (fp32 eval)
    batch = {k: v[:16].to(device) for k, v in features(labels=None if causal else 2, seed=11).items()}
    full_model.eval()
    with torch.no_grad():
        want = full_model(**batch).logits.float()
        plain = case.method.export_merged(full_model, case.plan, case.ctx)
        got = plain(**batch).logits.float()
    err = rel_err(got.cpu(), want.cpu())
    assert err <= (BLORA_FP32_TOL if method == "blora" else 1e-5), f"{method}: merged vs trained {err:.2e}"
    return {"final_loss": losses[-1], "merged_vs_trained": err}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_resumes_and_merges_on_cuda(method, precision):
    check_training(method, precision, DEVICE)


@pytest.mark.parametrize("method", ["lora", "bone"])
def test_fp16_with_grad_scaler_on_cuda(method):
    check_training(method, "fp16", DEVICE)


@pytest.mark.parametrize("method", ["lora", "loraprune"])
def test_causal_lm_with_gradient_checkpointing_on_cuda(method):
    check_training(method, "bf16", DEVICE, causal=True, gradient_checkpointing=True)


def test_bf16_on_cuda_agrees_with_fp32():
    # the same run in bf16 and fp32: close, not equal (autocast really ran)
    a = check_training("lora", "fp32", DEVICE)
    b = check_training("lora", "bf16", DEVICE)
    assert a["final_loss"] != b["final_loss"]
    assert abs(a["final_loss"] - b["final_loss"]) <= BF16_TOL * abs(a["final_loss"])


# --------------------------------------------------------------------------- data-parallel, nccl
def _dp_worker(rank: int, world: int, backend: str, init_file: str, out: str) -> None:
    import torch.distributed as tdist

    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    if backend == "nccl":
        torch.cuda.set_device(rank)
    if world > 1:
        tdist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        case = build("dora_dr")  # gradient all-reduce plus controller statistics reduced over ranks
        model = case.model.to(device)
        controller = case.method.controller(model, case.plan, case.ctx)
        data = BatchSource(case.feats, 8, seed=3, rank=rank, world_size=world)
        cfg = TrainConfig(epochs=2, lr=5e-3, warmup_ratio=0.0, progress=False)
        train(model, data, cfg, controller=controller, device=device)
        torch.save({k: v.cpu() for k, v in trainable_state(model).items()}, f"{out}.rank{rank}")
    finally:
        if world > 1:
            tdist.destroy_process_group()


def check_data_parallel(backend: str, tmp: Path, world: int = 2) -> float:
    """``world`` processes over ``backend`` equal one process: identical on every rank, close to 1."""
    import torch.multiprocessing as mp

    init = str(tmp / "init")
    _dp_worker(0, 1, backend, init + "-single", str(tmp / "one"))
    mp.spawn(_dp_worker, args=(world, backend, init, str(tmp / "many")), nprocs=world, join=True)
    one = torch.load(tmp / "one.rank0")
    ranks = [torch.load(tmp / f"many.rank{r}") for r in range(world)]
    for k in ranks[0]:
        assert all(torch.equal(ranks[0][k], r[k]) for r in ranks[1:]), f"ranks differ in {k}"
    assert_close_rel(ranks[0], one, 1e-4, f"{world} {backend} processes vs 1")
    return max(rel_err(ranks[0][k], one[k]) for k in one)


def test_data_parallel_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"nccl data-parallel needs 2 GPUs; this machine has {torch.cuda.device_count()}")
    check_data_parallel("nccl", tmp_path)
