"""Methods register themselves on import; importing this package makes all of them available."""

from lora_ops.methods import (  # noqa: F401  (registration side effects)
    adalora,
    blora,
    bone,
    dora_dr,
    eva,
    lora,
    lora_drop,
    loraprune,
    svd_trim,
)
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
