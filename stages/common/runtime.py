"""Process set-up shared by every stage: quiet offline-friendly environment, seeds, threads,
device, and the error boundary that turns known failures into one actionable line."""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

for _k, _v in {
    "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

EXIT_BAD_INPUT = 2


def device() -> str:
    return os.environ.get("LORA_SIEVE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    torch.manual_seed(seed)


def run_stage(main: Callable[[], None], name: str) -> None:
    """Run a stage's ``main``; known bad input exits 2 with one line, anything else with a traceback."""
    from transformers.utils import logging as hf_logging

    from stages.common.glue import DataUnavailable
    from stages.common.models import ModelUnavailable
    from stages.common.params import ConfigError

    hf_logging.set_verbosity_error()
    try:
        main()
    except (ConfigError, DataUnavailable, ModelUnavailable, FileNotFoundError, KeyError, ValueError) as exc:
        if os.environ.get("LORA_SIEVE_DEBUG"):
            traceback.print_exc()
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error [{name}]: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
