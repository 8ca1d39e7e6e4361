"""The bodies of tests/lora_ops/training/test_cuda.py on the CPU: what ``gpu_suite.sh --dry-run`` checks without a GPU.

The cuda tests are skipped where no GPU exists; their helpers take the device as an argument, so
every path (adapter kernels fp32 / bf16 against the CPU, training with checkpoint, resume and merge,
fp16 with the loss scaler, a gradient-checkpointed causal LM, data-parallel) runs here on ``cpu``
(gloo standing in for nccl). A file, not stdin: the data-parallel check spawns processes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "lora_ops" / "training")]

import test_cuda as tc  # noqa: E402


def main() -> None:
    start = time.perf_counter()
    for m in tc.METHODS:
        for p in ("fp32", "bf16"):
            errors = {**tc.check_adapter_matches_cpu(m, p, "cpu"), **tc.check_training(m, p, "cpu")}
            print(f"{m:10s} {p}: " + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()), flush=True)
    tc.check_training("lora", "fp16", "cpu")
    tc.check_training("loraprune", "bf16", "cpu", causal=True, gradient_checkpointing=True)
    err = tc.check_data_parallel("gloo", Path(tempfile.mkdtemp(prefix="gpu-dry-")))
    print(f"dry run: the cuda test bodies passed on the CPU in {time.perf_counter() - start:.0f} s "
          f"({len(tc.METHODS)} methods x fp32/bf16, fp16 scaler, checkpointed causal LM, "
          f"2-process gloo: {err:.1e} from 1 process)")


if __name__ == "__main__":
    main()
