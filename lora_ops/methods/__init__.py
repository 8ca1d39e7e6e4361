"""Methods register themselves on import; importing this package makes all of them available."""

from lora_ops.methods import lora, lora_drop, loraprune  # noqa: F401  (registration side effects)
from lora_ops.methods.base import (
    AdapterConfig,
    Method,
    MethodContext,
    PeftExport,
    available_methods,
    get_method,
    register,
)

__all__ = ["AdapterConfig", "Method", "MethodContext", "PeftExport", "available_methods", "get_method", "register"]
