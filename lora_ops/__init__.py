"""lora_ops: the pure-torch library behind lora-sieve (adapters, injection, importance,
schedules, training loop, merge and export). No file or tracking I/O lives here."""

from lora_ops.adapters.base import AdapterLayer, adapter_layers, unique_adapter_parameters
from lora_ops.adapters.lora import LoRALinear, LoRAPair, lora_linear
from lora_ops.methods import AdapterConfig, Method, MethodContext, available_methods, get_method
from lora_ops.targets import Target, find_targets, inject, unload

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "AdapterLayer", "LoRALinear", "LoRAPair", "Method", "MethodContext", "Target",
    "adapter_layers", "available_methods", "find_targets", "get_method", "inject", "lora_linear",
    "unique_adapter_parameters", "unload",
]
