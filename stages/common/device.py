"""The device a stage runs on (``LORA_SIEVE_DEVICE``, else CUDA when present)."""

from __future__ import annotations

import os

import torch


def device() -> str:
    return os.environ.get("LORA_SIEVE_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
