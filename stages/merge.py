"""merge: fold the product adapter (data/compress: the compressed one, or the finetuned one as it is)
into the base weights (plain HF folder), and save the adapter in its compact form (safetensors + JSON plan), in PEFT format and, for LoRA-family methods, in a
serve-safe PEFT form (one global rank and scaling, no ``rank_pattern``/``alpha_pattern``) for
serving engines that read only the global ``r`` and ``lora_alpha``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from lora_ops.export import PeftExport, export_lora_family, serve_safe
from lora_ops.targets import unload
from stages.common import runtime
from stages.common.adapted import model_ref
from stages.common.io import atomic_path, read_json
from stages.common.params import load_params
from stages.common.paths import Paths
from stages.common.product import load_product, read_adapter_file
from stages.common.tracking import StageRun

# the serve-safe PEFT adapter (inside data/merge, so it is part of the stage's DVC output)
SERVE_SAFE = Paths.merge / "peft_serve"


def write_peft(dest: Path, export: PeftExport, base: dict[str, Any], heads: dict[str, torch.Tensor],
               meta: dict[str, Any]) -> None:
    """One PEFT folder (written atomically): config, tensors (+ head as ``modules_to_save``), our metadata."""
    config = {**export.config, **base}
    tensors = {**export.tensors, **{f"base_model.model.{k}": v.clone().contiguous() for k, v in heads.items()}}
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "lora_sieve.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def write_not_exported(dest: Path, reason: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.mkdir()
        (tmp / "NOT_EXPORTED.txt").write_text(reason + "\n")


def main() -> None:
    params = load_params()
    plan = read_json(Paths.plan)
    # the product adapter (compressed, or the finetuned bytes): a truncated or foreign file is one line,
    # before anything is written
    state, _ = read_adapter_file(Paths.compressed)
    with StageRun("merge", params.model_dump()) as run:
        product = load_product(params, plan)
        adapted = product.adapted
        model, method, ctx = adapted.model, adapted.method, adapted.ctx
        model.eval()
        ref = model_ref(params)
        heads = adapted.loaded.head_modules
        meta = {"method": method.name, "base_model": ref.name, "base_model_path": ref.path,
                "task": params.task.name, "adapter": params.adapter.model_dump(),
                "method_params": params.method_params().model_dump(), "head_modules": heads,
                "parameters": product.parameter_counts()}
        if product.compressed is not None:
            meta.update(stored_bytes=product.stored_bytes, compressed=product.compressed.settings)

        # 1. compact form: our own adapter file (shared tensors stored once; the compressed product's exact
        # bytes: codes + scales + head + its metadata) + the plan
        with atomic_path(Paths.compact) as tmp:
            tmp.mkdir()
            if product.compressed is None:
                save_file(state, str(tmp / "adapter.safetensors"), metadata={"method": method.name})
            else:
                shutil.copyfile(Paths.compressed, tmp / "adapter.safetensors")
            (tmp / "plan.json").write_text(json.dumps(plan, indent=2, sort_keys=True))
            (tmp / "lora_sieve.json").write_text(json.dumps(meta, indent=2, sort_keys=True))

        # 2. PEFT format (shared tensors cloned per module; head as modules_to_save)
        if product.compressed is None:
            head_tensors = {k: v for k, v in state.items() if any(k.startswith(h + ".") for h in heads)}
            no_export = method.no_peft_export_reason
            export = None if no_export else method.export_peft(model, plan, ctx)
        else:  # plain LoRA at the stored ranks, dequantised factors
            head_tensors = dict(product.compressed.head)
            no_export = ("" if product.compressed.stored_params else
                         "compress trimmed every module to rank 0: the product is the base model and its head")
            export = None if no_export else export_lora_family(model)
        base = {"base_model_name_or_path": ref.path,
                "task_type": "CAUSAL_LM" if adapted.loaded.kind == "causal_lm" else "SEQ_CLS",
                "modules_to_save": heads or None}
        if export is None:
            write_not_exported(Paths.peft, f"{method.name}: {no_export}")
        else:
            write_peft(Paths.peft, export, base, head_tensors, meta)

        # 2b. serve-safe PEFT LoRA: every module at the largest rank (zero-padded), per-module scaling
        # folded into B, so loaders that ignore rank_pattern/alpha_pattern still compute the same model
        if export is None or export.config.get("peft_type") != "LORA":
            why = (no_export if export is None
                   else f"the PEFT export is {export.config.get('peft_type')}, not LoRA: it has no rank/alpha patterns")
            write_not_exported(SERVE_SAFE, f"{method.name}: {why}")
        else:
            safe, report = serve_safe(export)
            write_peft(SERVE_SAFE, safe, base, head_tensors, {**meta, "serve_safe": report})
            print(f"merge: serve-safe adapter -> {SERVE_SAFE} (r={report['r']}, lora_alpha={report['lora_alpha']:g}; "
                  f"zero padding {report['padding_bytes']:,} bytes of {report['lora_bytes']:,})")
            run.log_metrics({"serve_safe.padding_bytes": report["padding_bytes"],
                             "serve_safe.lora_bytes": report["lora_bytes"], "serve_safe.r": report["r"]})

        # 3. method-specific deployable forms (e.g. blora's integer factors + scales)
        extras = method.extra_exports(model, plan, ctx) if product.compressed is None else {}
        for name, (tensors, extra_meta) in extras.items():
            with atomic_path(Paths.merge / name) as tmp:
                tmp.mkdir()
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter.safetensors"))
                (tmp / "meta.json").write_text(json.dumps(extra_meta, indent=2, sort_keys=True, default=float))
            print(f"merge: {method.name} {name} form -> {Paths.merge / name}")

        # 4. merged plain Hugging Face folder
        merged = (method.export_merged(model, plan, ctx) if product.compressed is None
                  else unload(model, merge=True)).cpu()
        with atomic_path(Paths.merged_model) as tmp:
            merged.save_pretrained(tmp, safe_serialization=True)
            adapted.loaded.tokenizer.save_pretrained(tmp)
            (tmp / "lora_sieve.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        run.log_metrics({f"params.{k}": v for k, v in meta["parameters"].items()})
        run.log_artifact(Paths.compact, "adapter")
        run.log_artifact(Paths.peft, "peft")
        run.log_artifact(SERVE_SAFE, "peft_serve")
        print(f"merge: merged model -> {Paths.merged_model}; adapter -> {Paths.compact}, {Paths.peft}, {SERVE_SAFE}")


if __name__ == "__main__":
    runtime.run_stage(main, "merge")
