"""The bodies of the ``cuda`` tests, run on the CPU so CI checks them where no GPU exists.

``tests/lora_ops/training/test_cuda.py`` is skipped without a GPU; its helpers take the device as an argument, so
the same checks (adapter kernels under fp32/bf16 against the reference, training with checkpoint,
resume and merge, fp16 with the loss scaler, a gradient-checkpointed causal LM) run here on ``cpu``.
"""

from __future__ import annotations

import pytest
import test_cuda as tc


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("method", tc.METHODS)
def test_cuda_test_bodies_pass_on_cpu(method, precision):
    tc.check_adapter_matches_cpu(method, precision, "cpu")
    tc.check_training(method, precision, "cpu")


def test_fp16_scaler_and_checkpointed_causal_lm_on_cpu():
    tc.check_training("lora", "fp16", "cpu")
    tc.check_training("loraprune", "bf16", "cpu", causal=True, gradient_checkpointing=True)
