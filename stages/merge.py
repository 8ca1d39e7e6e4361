"""merge: fold the adapters into the base weights (plain HF folder), and save the adapter in its
compact form (safetensors + JSON plan) and in PEFT format."""

from __future__ import annotations

import json

from safetensors.torch import load_file, save_file

from lora_ops.training import load_trainable_state
from stages.common import runtime
from stages.common.io import atomic_path, read_json
from stages.common.params import load_params
from stages.common.pipeline import Paths, build_adapted, model_ref
from stages.common.tracking import StageRun


def main() -> None:
    params = load_params()
    plan = read_json(Paths.plan)
    with StageRun("merge", params.model_dump()) as run:
        adapted = build_adapted(params, plan)
        model, method, ctx = adapted.model, adapted.method, adapted.ctx
        if not Paths.adapter.is_file():
            raise FileNotFoundError(f"{Paths.adapter} is missing: run the finetune stage")
        state = load_file(str(Paths.adapter))
        load_trainable_state(model, state)
        model.eval()
        ref = model_ref(params)
        heads = adapted.loaded.head_modules
        meta = {"method": method.name, "base_model": ref.name, "base_model_path": ref.path,
                "task": params.task.name, "adapter": params.adapter.model_dump(),
                "method_params": params.method_params().model_dump(), "head_modules": heads,
                "parameters": method.parameter_counts(model)}

        # 1. compact form: our own adapter file (shared tensors stored once) + the plan
        with atomic_path(Paths.compact) as tmp:
            tmp.mkdir()
            save_file(state, str(tmp / "adapter.safetensors"), metadata={"method": method.name})
            (tmp / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True))
            (tmp / "lora_sieve.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

        # 2. PEFT format (shared tensors cloned per module; head as modules_to_save)
        head_tensors = {k: v for k, v in state.items() if any(k.startswith(h + ".") for h in heads)}
        export = None if method.no_peft_export_reason else method.export_peft(model, plan, ctx)
        with atomic_path(Paths.peft) as tmp:
            tmp.mkdir()
            if export is None:
                (tmp / "NOT_EXPORTED.txt").write_text(f"{method.name}: {method.no_peft_export_reason}\n")
            else:
                config = {**export.config, "base_model_name_or_path": ref.path,
                          "task_type": "CAUSAL_LM" if adapted.loaded.kind == "causal_lm" else "SEQ_CLS",
                          "modules_to_save": heads or None}
                tensors = {**export.tensors,
                           **{f"base_model.model.{k}": v.clone().contiguous() for k, v in head_tensors.items()}}
                (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
                save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
                (tmp / "lora_sieve.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

        # 3. method-specific deployable forms (e.g. blora's integer factors + scales)
        for name, (tensors, extra_meta) in method.extra_exports(model, plan, ctx).items():
            with atomic_path(Paths.merge / name) as tmp:
                tmp.mkdir()
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter.safetensors"))
                (tmp / "meta.json").write_text(json.dumps(extra_meta, indent=2, sort_keys=True, default=float))
            print(f"merge: {method.name} {name} form -> {Paths.merge / name}")

        # 4. merged plain Hugging Face folder
        merged = method.export_merged(model, plan, ctx).cpu()
        with atomic_path(Paths.merged_model) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            adapted.loaded.tokenizer.save_pretrained(tmp)
            (tmp / "lora_sieve.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        run.log_metrics({f"params.{k}": v for k, v in meta["parameters"].items()})
        run.log_artifact(Paths.compact, "adapter")
        run.log_artifact(Paths.peft, "peft")
        print(f"merge: merged model -> {Paths.merged_model}; adapter -> {Paths.compact}, {Paths.peft}")


if __name__ == "__main__":
    runtime.run_stage(main, "merge")
