"""Causal-LM tasks: instruction data for (recovery) fine-tuning, perplexity corpora for evaluation.

Mirror layout (as in ../shared/data): ``alpaca/alpaca_5000.json``, ``wikitext-2/test.txt``,
``ptb/ptb.test.txt``; without them the same data comes from the Hugging Face hub.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from stages.common.glue import DataUnavailable


@dataclass(frozen=True)
class LMTask:
    name: str
    mirror_file: str
    hub: tuple[str, ...]
    fields: tuple[str, ...] = ("text",)
    num_labels: int = 0
    metrics: tuple[str, ...] = ("wikitext2_ppl", "ptb_ppl")
    main_metric: str = "wikitext2_ppl"
    kind: str = "causal_lm"
    is_regression: bool = False
    lower_is_better: bool = True


LM_TASKS = {"alpaca": LMTask("alpaca", "alpaca/alpaca_5000.json", ("tatsu-lab/alpaca",))}
EVAL_CORPORA = {
    "wikitext2": ("wikitext-2/test.txt", ("wikitext", "wikitext-2-v1", "test")),
    "ptb": ("ptb/ptb.test.txt", ("ptb_text_only", "penn_treebank", "test")),
}


def format_alpaca(instruction: str, inp: str, output: str) -> str:
    """The Alpaca prompt (as LoRAPrune's recovery data uses it)."""
    extra = f"\n\n### Input:\n{inp}" if inp else ""
    return f"### Instruction:\n{instruction}{extra}\n\n### Response:\n{output}"


def load_instructions(task: LMTask, mirror: Path | None) -> pd.DataFrame:
    if mirror is not None and (Path(mirror) / task.mirror_file).is_file():
        rows = json.loads((Path(mirror) / task.mirror_file).read_text())
    else:
        try:
            import datasets

            rows = datasets.load_dataset(*task.hub, split="train").to_list()
        except Exception as exc:
            raise DataUnavailable(f"{task.name} data is not in the mirror ({task.mirror_file}) and the hub is "
                                  f"unreachable ({type(exc).__name__}); set data.mirror or go online") from exc
    texts = [format_alpaca(r["instruction"], r.get("input", ""), r["output"]) for r in rows]
    return pd.DataFrame({"text": texts, "label": 0})


def load_corpus(name: str, mirror: Path | None) -> str:
    rel, hub = EVAL_CORPORA[name]
    if mirror is not None and (Path(mirror) / rel).is_file():
        return (Path(mirror) / rel).read_text(encoding="utf-8")
    try:
        import datasets

        ds = datasets.load_dataset(hub[0], hub[1], split=hub[2])
        column = "text" if "text" in ds.column_names else "sentence"
        return "\n".join(ds[column])
    except Exception as exc:
        raise DataUnavailable(f"{name} test text is not in the mirror ({rel}) and the hub is unreachable "
                              f"({type(exc).__name__})") from exc


def corpus_tokens(text: str, tokenizer, need: int, chunk_chars: int = 50_000) -> torch.Tensor:
    """Token ids of the start of ``text``: only as many characters are tokenised as ``need`` tokens take."""
    ids: list[int] = []
    start = 0
    while len(ids) < need and start < len(text):
        ids += tokenizer(text[start:start + chunk_chars], add_special_tokens=False)["input_ids"]
        start += chunk_chars
    if len(ids) < need:
        raise ValueError(f"the corpus has only {len(ids)} tokens, the evaluation needs {need}")
    return torch.tensor(ids[:need])


def tokenize_lm(texts: list[str], tokenizer, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded causal-LM features; loss on every real token (inputs included), never on padding."""
    eos = tokenizer.eos_token or ""
    enc = tokenizer([t + eos for t in texts], max_length=max_length, truncation=True, padding="max_length",
                    return_tensors="pt", add_special_tokens=False)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels}
