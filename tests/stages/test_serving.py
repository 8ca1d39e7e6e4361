"""The promote stage logs the merged model as an MLflow Model: ``pyfunc`` predictions by
``models:/<name>@champion`` equal the merged model's (classification, regression, causal LM),
and ``mlflow models serve`` answers real REST requests with the same predictions.

Tiny random BERT / Llama models (MiniLM's tokenizer) stand in for the real ones: what is checked
is the chain merged folder -> MLflow Model -> registry alias -> pyfunc / REST, not the weights.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import save_file
from support.helpers import REPO, SHARED_DATA
from support.services import _stop, _wait_healthy, free_port, service_env

from lora_ops.export import serve_safe
from lora_ops.methods import AdapterConfig, MethodContext, get_method
from lora_ops.targets import find_targets, freeze_all_but, unload

pytestmark = pytest.mark.skipif(not (SHARED_DATA / "glue").is_dir(), reason="needs the shared data mirror")

SST2 = ["a gorgeous , witty , seductive movie .", "dull , lifeless and far too long", "it 's fine"]
STSB = [{"text": "A man is playing a guitar.", "text_pair": "A man plays the guitar."},
        {"text": "A cat sleeps.", "text_pair": "Stocks fell sharply on Monday."}]
PROMPTS = ["### Instruction:\nName a colour.\n\n### Response:\n", "The quick brown fox"]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from stages.common.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm").path)


def _tiny(kind: str, tokenizer):
    """A tiny random model with LoRA adapters trained to random values, before merging."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab = len(tokenizer)
    if kind in ("causal_lm", "pruned_lm"):
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=None, tie_word_embeddings=kind == "causal_lm"))
        # no end-of-sequence token: every generation runs its full length, so there is text to compare;
        # untied head for the pruned model: with tied weights the thinned random layers only echo the last token
    else:
        labels = 1 if kind == "regression" else 2
        model = BertForSequenceClassification(BertConfig(
            vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128, num_labels=labels,
            problem_type="regression" if labels == 1 else "single_label_classification"))
    if kind.startswith("pruned"):
        return _pruned(model, tokenizer)
    method = get_method("lora")
    ctx = MethodContext(adapter=AdapterConfig(rank=2, alpha=4), params=method.params_model())
    targets = find_targets(model, "all")
    plan = method.decide([], targets, ctx)
    method.build(model, targets, plan, ctx)
    freeze_all_but(model, [] if kind == "causal_lm" else ["classifier"])
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval(), method, ctx, plan


def _pruned(model, tokenizer):
    """LoRAPrune with the default exempt last layer: layers end with different widths, so the
    merged folder needs lora_ops' loader (stock from_pretrained cannot build it). A classifier
    trains on random class labels, a causal LM on its own tokens."""
    from lora_ops.data import BatchSource
    from lora_ops.training.loop import TrainConfig, train

    method = get_method("loraprune")
    ctx = MethodContext(adapter=AdapterConfig(rank=2, alpha=4), params=method.params_model(ratio=0.5, prune_every=2,
                                                                                       min_score_updates=1))
    targets = find_targets(model, "all")
    plan = method.plan_model(model, targets, ctx)
    method.build(model, targets, plan, ctx)
    freeze_all_but(model)
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1000, len(tokenizer), (24, 8), generator=gen)
    causal = type(model).__name__.endswith("ForCausalLM")
    labels = ids.clone() if causal else torch.randint(0, model.config.num_labels, (len(ids),), generator=gen)
    data = BatchSource({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                       batch_size=4, shuffle=False)
    train(model, data, TrainConfig(epochs=1, lr=1e-3, warmup_ratio=0.0, progress=False),
          controller=method.controller(model, plan, ctx))
    return model.eval(), method, ctx, plan


def promoted_repo(root: Path, kind: str, tokenizer) -> Path:
    """A scratch project holding exactly what ``promote`` reads, then ``promote.main()`` run in it."""
    task = {"classification": "sst2", "regression": "stsb", "causal_lm": "alpaca", "pruned_lm": "alpaca",
            "pruned_classifier": "sst2"}[kind]
    repo = root / f"repo-{kind}"
    merged_dir = repo / "data/merge/model"
    model, method, ctx, plan = _tiny(kind, tokenizer)
    counts = method.parameter_counts(model)
    compact = repo / "data/merge/adapter"
    compact.mkdir(parents=True)
    save_file({k: v.detach().clone() for k, v in model.state_dict().items() if "lora" in k},
              str(compact / "adapter.safetensors"))
    if kind.startswith("pruned"):
        assert not method.export_model(model, plan, ctx, merged_dir, tokenizer)["stock_loadable"]
        for sub in ("peft", "peft_serve"):
            (repo / "data/merge" / sub).mkdir(parents=True)
            (repo / "data/merge" / sub / "NOT_EXPORTED.txt").write_text("loraprune: the base is pruned\n")
    else:
        export = method.export_peft(model, plan, ctx)
        for sub, exp in (("peft", export), ("peft_serve", serve_safe(export)[0])):
            (repo / "data/merge" / sub).mkdir(parents=True)
            (repo / "data/merge" / sub / "adapter_config.json").write_text(json.dumps(exp.config))
            save_file(exp.tensors, str(repo / "data/merge" / sub / "adapter_model.safetensors"))
        unload(model, merge=True).save_pretrained(merged_dir)
        tokenizer.save_pretrained(merged_dir)
    meta = {"method": method.name, "base_model": "tiny-random", "base_model_path": str(merged_dir), "task": task,
            "parameters": counts}
    (merged_dir / "lora_sieve.json").write_text(json.dumps(meta))
    (compact / "lora_sieve.json").write_text(json.dumps(meta))
    (repo / "data/decide").mkdir(parents=True)
    (repo / "data/decide/plan.json").write_text(json.dumps(plan))
    main = {"classification": "accuracy", "pruned_classifier": "accuracy", "regression": "pearson"}.get(
        kind, "wikitext2_ppl")
    key = main if main == "wikitext2_ppl" else f"dev_{main}"  # as evaluate names them
    metrics = {key: 30.0 if main == "wikitext2_ppl" else 0.8, "main_metric": main, "score_split": "dev",
               "stored_params": counts["stored"],
               "trainable_params": counts["trainable"], "latency_merged_ms": 1.0, "gain_over_trivial": 0.3,
               "trivial_score": 0.5, "constant_predictions": False}
    metrics["score"] = metrics[key]
    (repo / "data/evaluate").mkdir(parents=True)
    (repo / "data/evaluate/metrics.json").write_text(json.dumps(metrics))
    if kind.endswith("classifier") or kind == "classification":
        (repo / "data/prepare").mkdir(parents=True)
        pd.DataFrame({"sentence": SST2[:2], "label": [1, 0]}).to_parquet(repo / "data/prepare/dev.parquet")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    base = repo / "base"  # what params name as the base model (a local HF folder of its own)
    shutil.copytree(merged_dir, base)
    params["model"]["name"] = str(base)
    params["task"]["name"] = task
    params["data"]["mirror"] = str(SHARED_DATA)
    params["method"]["name"] = method.name
    params["registry"]["name"] = f"{task}-{kind.replace('_', '-')}"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return repo


def _run_promote(repo: Path, monkeypatch) -> dict:
    import mlflow

    from stages import promote

    monkeypatch.chdir(repo)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LORA_SIEVE_PARENT_RUN_ID", raising=False)
    promote.main()
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    return json.loads((repo / "data/promote/decision.json").read_text())


@pytest.fixture(scope="module")
def sst2_repo(tmp_path_factory, tokenizer):
    mp = pytest.MonkeyPatch()
    try:
        repo = promoted_repo(tmp_path_factory.mktemp("serving"), "classification", tokenizer)
        decision = _run_promote(repo, mp)
    finally:
        mp.undo()
    return repo, decision


def _merged_classifier(repo: Path, texts):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = repo / "data/merge/model"
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    if texts and isinstance(texts[0], dict):
        enc = tok([t["text"] for t in texts], [t["text_pair"] for t in texts], padding=True, return_tensors="pt")
    else:
        enc = tok(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits


def test_champion_is_an_mlflow_model_with_card_adapters_and_lineage(sst2_repo):
    import mlflow
    from mlflow.tracking import MlflowClient

    repo, decision = sst2_repo
    assert decision["promoted"] and decision["version"] == "1"
    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    mv = client.get_model_version("sst2-classification", "1")
    assert mv.source == f"models:/{mv.tags['serving.model_id']}"  # the logged MLflow Model, not a raw folder
    assert mv.tags["serving.task"] == "text-classification" and mv.tags["method"] == "lora"
    assert mv.tags["lineage.adapter_sha256"] and mv.tags["lineage.plan_sha256"]  # lineage tags stay
    for words in ("`lora`", "`sst2`", "tiny-random", "| dev_accuracy | 0.8 |", "| score (accuracy, dev) | 0.8 |",
                  "| trivial_score | 0.5 |", "params", "bytes", "mlflow models serve", "negative, positive"):
        assert words in mv.description
    assert "mlflow models serve" not in client.get_registered_model("sst2-classification").description
    # the adapters are artifacts of the same run as the model
    listed = {a.path for a in client.list_artifacts(mv.run_id)}
    assert {"adapter", "peft", "peft_serve"} <= listed
    assert {a.path for a in client.list_artifacts(mv.run_id, "peft_serve")} >= {"peft_serve/adapter_config.json"}
    # the MLflow Model sits in the experiment's artifact location, not in a stray ./mlruns
    assert not (repo / "mlruns").exists() and list((repo / "mlartifacts").rglob("MLmodel"))
    info = mlflow.models.get_model_info("models:/sst2-classification@champion")
    assert "transformers" in info.flavors and info.flavors["transformers"]["task"] == "text-classification"
    assert info.signature.inputs.input_types() and info.signature.outputs.input_names() == ["label", "score"]
    assert info.saved_input_example_info is not None


def test_pyfunc_classification_matches_the_merged_model(sst2_repo):
    import mlflow

    repo, _ = sst2_repo
    out = mlflow.pyfunc.load_model("models:/sst2-classification@champion").predict(SST2)
    probs = _merged_classifier(repo, SST2).softmax(-1)
    assert list(out["label"]) == [["negative", "positive"][i] for i in probs.argmax(-1).tolist()]
    torch.testing.assert_close(torch.tensor(out["score"].to_numpy(), dtype=torch.float32), probs.max(-1).values,
                               rtol=1e-5, atol=1e-6)


def test_mlflow_models_serve_answers_rest_requests(sst2_repo):
    repo, _ = sst2_repo
    port = free_port()
    log = repo / "serve.log"
    env = service_env(MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}")
    cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", "models:/sst2-classification@champion",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=repo, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_healthy(f"http://127.0.0.1:{port}/ping", proc, log, timeout=180)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations",
                                         data=json.dumps({"inputs": SST2}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.status == 200
            predictions = json.loads(resp.read())["predictions"]
    finally:
        _stop(proc)
    assert proc.poll() is not None  # the server is gone
    probs = _merged_classifier(repo, SST2).softmax(-1)
    assert [p["label"] for p in predictions] == [["negative", "positive"][i] for i in probs.argmax(-1).tolist()]
    torch.testing.assert_close(torch.tensor([p["score"] for p in predictions]), probs.max(-1).values,
                               rtol=1e-5, atol=1e-6)


def test_pyfunc_regression_returns_the_merged_score(tmp_path, tokenizer, monkeypatch):
    import mlflow

    repo = promoted_repo(tmp_path, "regression", tokenizer)
    _run_promote(repo, monkeypatch)
    model = mlflow.pyfunc.load_model("models:/stsb-regression@champion")
    assert model.metadata.get_model_info().flavors["transformers"]["task"] == "text-classification"
    out = model.predict(STSB)
    assert set(out["label"]) == {"score"}
    expected = _merged_classifier(repo, STSB).squeeze(-1)  # raw regression output: no sigmoid, no softmax
    torch.testing.assert_close(torch.tensor(out["score"].to_numpy(), dtype=torch.float32), expected,
                               rtol=1e-5, atol=1e-6)


def test_pyfunc_causal_lm_generates_like_the_merged_model(tmp_path, tokenizer, monkeypatch):
    import mlflow
    from transformers import AutoModelForCausalLM

    repo = promoted_repo(tmp_path, "causal_lm", tokenizer)
    _run_promote(repo, monkeypatch)
    model = mlflow.pyfunc.load_model("models:/alpaca-causal-lm@champion")
    assert model.metadata.get_model_info().flavors["transformers"]["task"] == "text-generation"
    merged = AutoModelForCausalLM.from_pretrained(repo / "data/merge/model").eval()

    def greedy(new_tokens: int) -> list[str]:
        texts = []
        for prompt in PROMPTS:
            enc = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
            with torch.no_grad():
                ids = merged.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
            texts.append(" ".join(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
                                  .split()))
        assert all(texts)  # something was generated
        return texts

    # the saved config (greedy, 32 new tokens, no prompt echo), then a request that overrides one param
    assert [" ".join(o.split()) for o in model.predict(PROMPTS)] == greedy(32)
    assert [" ".join(o.split()) for o in model.predict(PROMPTS, params={"max_new_tokens": 8})] == greedy(8)


def test_pyfunc_pruned_lm_with_per_layer_widths_generates_like_the_merged_model(tmp_path, tokenizer, monkeypatch):
    import mlflow

    from lora_ops.pruning import load_pruned_model

    repo = promoted_repo(tmp_path, "pruned_lm", tokenizer)
    _run_promote(repo, monkeypatch)
    model = mlflow.pyfunc.load_model("models:/alpaca-pruned-lm@champion")
    assert "python_function" in model.metadata.flavors and "transformers" not in model.metadata.flavors
    out = model.predict(PROMPTS, params={"max_new_tokens": 6})
    merged = load_pruned_model(repo / "data/merge/model").eval()
    expected = []
    for prompt in PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt", return_token_type_ids=False)
        with torch.no_grad():
            ids = merged.generate(**enc, max_new_tokens=6, do_sample=False)
        expected.append(tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    assert all(e.strip() for e in expected) and list(out) == expected


def test_pyfunc_pruned_classifier_with_per_layer_widths_matches_the_merged_model(tmp_path, tokenizer, monkeypatch):
    """A LoRAPrune classifier champion: no stock config describes its widths, so it is served as a pyfunc
    that loads through lora_ops and answers with the transformers flavour's label/score rows."""
    import mlflow

    from lora_ops.pruning import load_pruned_model

    repo = promoted_repo(tmp_path, "pruned_classifier", tokenizer)
    _run_promote(repo, monkeypatch)
    model = mlflow.pyfunc.load_model("models:/sst2-pruned-classifier@champion")
    assert "python_function" in model.metadata.flavors and "transformers" not in model.metadata.flavors
    assert model.metadata.get_model_info().signature.outputs.input_names() == ["label", "score"]
    out = model.predict(SST2)
    merged = load_pruned_model(repo / "data/merge/model").eval()
    with torch.no_grad():
        probs = merged(**tokenizer(SST2, padding=True, return_tensors="pt")).logits.softmax(-1)
    assert list(out["label"]) == [["negative", "positive"][i] for i in probs.argmax(-1).tolist()]
    torch.testing.assert_close(torch.tensor(out["score"].to_numpy(), dtype=torch.float32), probs.max(-1).values,
                               rtol=1e-5, atol=1e-6)


def test_promote_without_merged_model_fails_in_one_line(tmp_path, tokenizer):
    repo = promoted_repo(tmp_path, "classification", tokenizer)
    shutil.rmtree(repo / "data/merge/model")
    proc = subprocess.run([sys.executable, "-m", "stages.promote"], cwd=repo, capture_output=True, text=True,
                          env=service_env(PYTHONPATH=str(REPO), MLFLOW_TRACKING_URI=f"sqlite:///{repo / 'mlflow.db'}"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error [promote]: data/merge/model is missing")
