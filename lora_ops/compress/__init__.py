"""Library core of the ``compress`` stage: rank trimming, rank budgets and low-bit LoRA factors.

See ``shared/spec/compress.md``. Pure torch, float64 for the linear algebra.
"""

from lora_ops.compress.budget import (
    NORMALISATIONS,
    component_scores,
    ranks_at_global_budget,
    ranks_at_global_threshold,
    ranks_at_module_energy,
)
from lora_ops.compress.pair import CompressedPair, compress_factors
from lora_ops.compress.quantize import (
    SCALE_DTYPES,
    SUPPORTED_BITS,
    QuantizedMatrix,
    dequantize,
    max_code,
    pack_int4,
    quantize,
    unpack_int4,
)
from lora_ops.compress.trim import (
    CRITERIA,
    DEFAULT_RIDGE,
    Decomposition,
    GramAccumulator,
    decompose,
    decompose_output,
    decompose_svd,
)

__all__ = [
    "CRITERIA", "DEFAULT_RIDGE", "NORMALISATIONS", "SCALE_DTYPES", "SUPPORTED_BITS",
    "CompressedPair", "Decomposition", "GramAccumulator", "QuantizedMatrix",
    "component_scores", "compress_factors", "decompose", "decompose_output", "decompose_svd",
    "dequantize", "max_code", "pack_int4", "quantize", "ranks_at_global_budget",
    "ranks_at_global_threshold", "ranks_at_module_energy", "unpack_int4",
]
