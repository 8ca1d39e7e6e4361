"""finetune: train the planned adapters; resumable after a kill from the last checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import subprocess
import sys

import pandas as pd
import torch
from safetensors.torch import save_file

from lora_ops import distributed as dist
from lora_ops.data import BatchSource
from lora_ops.training import train, trainable_state
from stages.common import runtime, shapes
from stages.common.adapted import build_adapted
from stages.common.checkpoint import CheckpointUnreadable, load_checkpoint, remove_checkpoint, save_checkpoint
from stages.common.context import task_of
from stages.common.evaluation import evaluate_features
from stages.common.features import tokenize
from stages.common.io import atomic_path, read_json, read_parquet, write_json
from stages.common.params import load_params
from stages.common.paths import Paths
from stages.common.stop import GracefulStop
from stages.common.tracking import stage_run

AFTER_TRAINING = ("compress", "evaluate", "lm_eval", "registry", "schedule", "tracking")


def fingerprint(params_dump: dict, plan: dict) -> str:
    """Identity of a training run: a checkpoint is only resumed by the run that wrote it."""
    # sections read only after training (compress, evaluate, promotion) or by no stage's numbers (tracking)
    # leave it alone: changing them must not invalidate a checkpoint nor change the adapter file's bytes
    relevant = {k: v for k, v in params_dump.items() if k not in AFTER_TRAINING}
    blob = json.dumps({"params": relevant, "plan": plan}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()


def resume_state(expected: str) -> dict | None:
    """The checkpoint this run may resume from, or None (none, damaged, or another run's)."""
    try:
        state = load_checkpoint(Paths.checkpoint)
    except CheckpointUnreadable as exc:  # truncated or foreign: say so and start over rather than crash
        print(f"finetune: {exc}; starting over", file=sys.stderr)
        return None
    if state is None:
        return None
    if state.get("fingerprint") != expected:
        print("finetune: checkpoint belongs to other params or plan; starting over", file=sys.stderr)
        return None
    return state


def launch_torchrun(processes: int) -> int:
    """Re-run this stage under torchrun with ``processes`` local workers (one node)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           "-m", "stages.finetune"]
    print(f"finetune: data-parallel over {processes} processes: {' '.join(cmd[2:])}")
    return subprocess.call(cmd)


def init_distributed(backend: str) -> None:
    """Join the process group torchrun prepared (env:// rendezvous)."""
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group(dist.default_backend() if backend == "auto" else backend)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        os.environ["LORA_SIEVE_DEVICE"] = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def main() -> None:
    params = load_params()
    shapes.check_model_shapes(params)  # impossible for this model (rank > width...): fail before training
    under_torchrun = "LOCAL_RANK" in os.environ
    if params.distributed.processes > 1 and not under_torchrun:
        code = launch_torchrun(params.distributed.processes)
        if code:
            raise SystemExit(code)
        return
    if under_torchrun:
        init_distributed(params.distributed.backend)
    try:
        _finetune(params)
    finally:
        if under_torchrun:
            import torch.distributed as tdist

            if tdist.is_initialized():
                tdist.destroy_process_group()


def _finetune(params) -> None:
    plan = read_json(Paths.plan)
    task = task_of(params)
    dump = params.model_dump()
    with stage_run("finetune", dump) as run:
        adapted = build_adapted(params, plan)
        model, ctx, device = adapted.model, adapted.ctx, adapted.ctx.device
        tok = adapted.loaded.tokenizer
        train_f = tokenize(read_parquet(Paths.train), task, tok, params.model.max_length)
        # model selection sees only the validation split carved from the training data; dev is reported
        # by evaluate and never read here
        val_f = tokenize(read_parquet(Paths.validation), task, tok, params.model.max_length)
        # every rank takes its slice of the same global batch (params.train.batch_size)
        data = BatchSource(train_f, params.train.batch_size, seed=runtime.derive_seed(params.seed, "data") % 2**31,
                           rank=dist.rank(), world_size=dist.world_size(),
                           group_by_length=params.train.group_by_length,
                           pad_to_multiple_of=params.train.pad_to_multiple_of)
        cfg = ctx.train  # select_metric resolved for the task (context.train_config)
        controller = adapted.method.controller(model, plan, ctx)
        fp = fingerprint(dump, plan)
        resume = resume_state(fp)
        if resume is not None:
            print(f"finetune: resuming from step {resume['step']} ({Paths.checkpoint})")

        def write_checkpoint(state: dict) -> None:
            if not dist.is_main():  # ranks hold identical adapters: one writer
                return
            state["fingerprint"] = fp
            save_checkpoint(Paths.checkpoint, state)

        # dropout masks: one seeded stream per rank (a resumed run restores the stream's state)
        runtime.seed_everything(runtime.derive_seed(params.seed, "dropout", dist.rank()))
        # SIGTERM (a cancelled flow run, a stopped job): checkpoint at the next step boundary, exit 143
        with GracefulStop(cfg) as stop:
            result = train(model, data, cfg, controller=controller,
                           evaluate=lambda m: evaluate_features(m, val_f, task, params.evaluate.batch_size, device),
                           on_checkpoint=stop.wrap(write_checkpoint), resume=resume, device=device)
        if not dist.is_main():
            return
        state = {k: v.contiguous() for k, v in trainable_state(model).items()}
        with atomic_path(Paths.adapter) as tmp:
            # one metadata key: safetensors keeps metadata in a hash map, so several keys are written
            # in a per-process order and the file bytes would differ between identical runs
            save_file(state, str(tmp), metadata={"lora_sieve": json.dumps(
                {"method": adapted.method.name, "fingerprint": fp}, sort_keys=True)})
        peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        summary = {
            "method": adapted.method.name, "steps": result.steps, "seconds": result.seconds,
            "best": {k: v for k, v in result.best.items() if k not in ("trainable", "controller")},
            "evals": result.evals, "controller": controller.summary(),
            "parameters": adapted.method.parameter_counts(model), "peak_rss_mb": peak_rss_mb,
            "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            "resumed_from_step": resume["step"] if resume else None, "processes": dist.world_size(),
        }
        history = pd.DataFrame(result.history)
        with atomic_path(Paths.history) as tmp:
            history.to_csv(tmp, index=False)
        write_json(Paths.finetune_summary, summary)
        remove_checkpoint(Paths.checkpoint)  # finished: the next run starts clean
        run.log_history(result.history)
        for e in result.evals:
            run.log_metrics({f"validation_{k}": v for k, v in e.items() if k not in ("step", "epoch")},
                            step=e["step"])
        run.log_metrics({"train_seconds": result.seconds, "peak_rss_mb": peak_rss_mb,
                         f"best_validation_{cfg.select_metric}": result.best.get("value", float("nan"))},
                        parent=True)
        run.log_artifact(Paths.finetune_summary)
        print(f"finetune: {result.steps} steps in {result.seconds:.0f}s ({result.precision}); best validation "
              f"{cfg.select_metric} {result.best.get('value', float('nan')):.4f} at epoch {result.best.get('epoch')}")
        if os.environ.get("LORA_SIEVE_DEBUG"):
            print(json.dumps(summary["best"]))


if __name__ == "__main__":
    runtime.run_stage(main, "finetune")
