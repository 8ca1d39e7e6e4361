"""Same params -> the same bytes: in-process for every method, and through the real pipeline.

(a) every method trained twice in one process from the same seeds gives identical tensors
    (dropout on, so the dropout RNG stream is covered too);
(b) two ``dvc repro -f`` runs of a small real MiniLM pipeline give byte-identical
    ``adapter.safetensors``, ``plan.json`` and ``metrics.json``;
(c) a ``dvc repro`` whose finetune process is SIGKILLed after its second checkpoint resumes,
    on the next ``dvc repro``, to the same adapter bytes as an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from support.helpers import env, run, scratch_repo
from support.method_cases import build_case

from lora_ops import available_methods
from lora_ops.data import BatchSource
from lora_ops.methods.recipe import apply_recipe
from lora_ops.training import TrainConfig, train, trainable_state


def _train_once(method_name: str) -> tuple[dict[str, torch.Tensor], dict]:
    dropout = 0.0 if method_name in ("bat", "loraprune", "blora") else 0.1  # Bat has no dropout
    model, method, plan, ctx, feats = build_case(method_name, dropout=dropout)
    data = BatchSource(feats, 8, seed=3, group_by_length=True)
    controller = method.controller(model, plan, ctx)
    torch.manual_seed(11)  # the dropout stream
    cfg = apply_recipe(TrainConfig(epochs=2, lr=5e-3, warmup_ratio=0.0, progress=False), ctx.params.recipe)
    train(model, data, cfg, controller=controller)
    return trainable_state(model), controller.summary()


@pytest.mark.parametrize("method", available_methods())
def test_two_in_process_runs_give_identical_tensors(method):
    state_a, summary_a = _train_once(method)
    state_b, summary_b = _train_once(method)
    assert state_a.keys() == state_b.keys()
    for name in state_a:
        assert torch.equal(state_a[name], state_b[name]), f"{method}: {name} differs between identical runs"
    assert summary_a == summary_b


def test_head_initialisation_comes_from_the_run_seed(tmp_path, monkeypatch):
    """Two loads of the base model for the same seed give the same new head; another seed another."""
    from stages.common.adapted import load_base
    from stages.common.params import load_params

    repo = scratch_repo(tmp_path / "r", git=False)
    monkeypatch.chdir(repo)
    run(["python", "-m", "stages.prepare"], repo)
    params = load_params()
    torch.manual_seed(123)  # whatever the global RNG held before must not matter
    a = load_base(params).model.classifier.weight.detach().clone()
    torch.manual_seed(456)
    b = load_base(params).model.classifier.weight.detach().clone()
    assert torch.equal(a, b)
    other = load_base(params.model_copy(update={"seed": params.seed + 1})).model.classifier.weight
    assert not torch.equal(a, other)


OUTPUTS = ("data/finetune/adapter.safetensors", "data/decide/plan.json", "data/evaluate/metrics.json",
           "data/prepare/train.parquet", "data/prepare/validation.parquet", "data/calibrate/measurements.parquet")


@pytest.mark.slow
def test_two_dvc_repro_runs_give_identical_bytes(tmp_path):
    # lora_drop exercises every seeded stream: calibration sample, probe, head, adapters, data order
    repo = scratch_repo(tmp_path / "repo", {"registry.enabled": False, "adapter.dropout": 0.1})
    run(["dvc", "repro"], repo)
    first = {p: (repo / p).read_bytes() for p in OUTPUTS}
    run(["dvc", "repro", "-f"], repo)
    for p in OUTPUTS:
        assert (repo / p).read_bytes() == first[p], f"{p} differs between two runs of the same params"


def _finetune_pid(repo: Path) -> int | None:
    """The python process running the finetune stage in `repo` (not the shell dvc may wrap it in:
    killing only the shell leaves python running as an orphan that finishes and writes the adapter)."""
    out = subprocess.run(["pgrep", "-f", "stages.finetune"], capture_output=True, text=True).stdout.split()
    for pid in out:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if not Path(argv[0].decode()).name.startswith("python") or b"stages.finetune" not in argv:
                continue
            if Path(f"/proc/{pid}/cwd").resolve() == repo.resolve():
                return int(pid)
        except (OSError, IndexError):
            continue
    return None


@pytest.mark.slow
def test_sigkilled_finetune_resumes_to_the_same_bytes(tmp_path):
    overrides = {"method.name": "lora", "registry.enabled": False, "adapter.dropout": 0.1,
                 "data.train_size": 320, "train.epochs": 2, "train.checkpoint_every": 4}  # 20 steps, 4 ckpts
    ref = scratch_repo(tmp_path / "ref", overrides)
    run(["dvc", "repro", "finetune"], ref)
    killed = scratch_repo(tmp_path / "killed", overrides)
    proc = subprocess.Popen(["dvc", "repro", "finetune"], cwd=killed, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ckpt = killed / ".lora_sieve/checkpoints/finetune.json"
    deadline = time.time() + 600
    step = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if ckpt.is_file():
                import json

                try:
                    step = json.loads(ckpt.read_text())["state"]["step"]
                except (ValueError, KeyError, OSError):
                    step = 0
                if step >= 8:  # past the first checkpoint (step 4)
                    pid = _finetune_pid(killed)
                    if pid is not None:
                        os.kill(pid, signal.SIGKILL)
                        break
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert step >= 8, f"no checkpoint past the first appeared (last step {step}):\n{out[-3000:]}"
    assert proc.returncode != 0 and not (killed / "data/finetune/adapter.safetensors").exists()
    resumed = run(["dvc", "repro", "finetune"], killed)
    assert "resuming from step" in resumed.stdout + resumed.stderr
    assert (killed / "data/finetune/adapter.safetensors").read_bytes() == \
        (ref / "data/finetune/adapter.safetensors").read_bytes()
    assert not ckpt.exists() and not list(ckpt.parent.glob("finetune.*.safetensors"))
