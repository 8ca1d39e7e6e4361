"""Process set-up shared by every stage: quiet offline-friendly environment, seeds, threads,
device, and the error boundary that turns known failures into one actionable line."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

for _k, _v in {
    "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}.items():
    os.environ.setdefault(_k, _v)

import torch  # noqa: E402

from stages.common.device import device  # noqa: E402,F401  (runtime.device(): what the stages call)

EXIT_BAD_INPUT = 2


def derive_seed(seed: int, *stream: str | int) -> int:
    """A seed for one named random stream of a run (``derive_seed(42, "head")``, ``(42, "dropout", rank)``).

    Streams are independent of each other and of the order in which stages or ranks draw, so
    adding a draw in one place never shifts another; the same run seed always gives the same value.
    """
    key = ":".join([str(seed), *map(str, stream)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed every global generator a stage may touch (Python, torch CPU and CUDA)."""
    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device


EXIT_TRANSIENT = 1  # the environment failed (disk full, tracking server away): a retry may succeed
# errnos of an environment that cannot take the write: one line, not a traceback
_ENV_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def error_exit(exc: BaseException, name: str) -> int | None:
    """The exit code and one-line report for a known failure of stage ``name``; None: not a known one
    (the caller re-raises it, with its traceback: that is a bug to fix, not an input to correct)."""
    from safetensors import SafetensorError

    from stages.common.glue import DataUnavailable
    from stages.common.models import ModelUnavailable
    from stages.common.params import ConfigError
    from stages.common.stop import StopRequested

    if isinstance(exc, StopRequested):
        print(f"{name}: {exc}", file=sys.stderr)
        return exc.exit_code
    from lora_ops.methods.base import MissingDependency

    if isinstance(exc, (ConfigError, DataUnavailable, ModelUnavailable, FileNotFoundError, KeyError, ValueError,
                        MissingDependency)):
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        code = EXIT_BAD_INPUT
    elif isinstance(exc, SafetensorError):  # a raw safetensors read outside stages.common.io's readers
        message, code = f"a safetensors file is truncated or foreign ({exc}); rerun the stage that wrote it", \
            EXIT_BAD_INPUT
    elif isinstance(exc, OSError) and exc.errno in _ENV_ERRNOS:
        where = f" writing {exc.filename}" if exc.filename else ""
        message = (f"{os.strerror(exc.errno)}{where}; nothing half-written was kept (outputs are atomic): "
                   "free the space / fix permissions and rerun")
        code = EXIT_TRANSIENT
    elif type(exc).__name__ == "MlflowException" or type(exc).__module__.startswith("mlflow"):
        from stages.common.tracking import tracking_uri

        uri = tracking_uri(Path("."))
        text = getattr(exc, "message", None) or str(exc)
        # a stage that already said where and what (promote) keeps its own words
        message = text[:600] if uri in text else f"MLflow tracking at {uri} failed: {text[:300]}"
        code = EXIT_TRANSIENT
    else:
        return None
    print(f"error [{name}]: {_one_line(message)}", file=sys.stderr)
    return code


def run_stage(main: Callable[[], None], name: str) -> None:
    """Run a stage's ``main``; bad input exits 2 and a failing environment 1, each with one line that
    says what to do; a signal-stopped finetune exits 128 + signal; anything else is a bug and keeps
    its traceback."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        main()
    except Exception as exc:
        code = error_exit(exc, name)
        if code is None:
            raise
        if os.environ.get("LORA_SIEVE_DEBUG"):
            traceback.print_exc()
        sys.exit(code)
