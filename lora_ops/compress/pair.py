"""One module's compressed LoRA pair and its flat tensor form (for safetensors).

Both factors are quantised with one scale per *component* (per row of ``A'``, per column of ``B'``),
so ``B'`` is stored transposed (``B'ᵀ``, k x out) and quantised by rows. Why per component: after
trimming, ``A'``'s rows carry the singular values ``S_i`` (from ~S_1 down to ~S_k), so a scale shared
across components would quantise the small trailing ones on the leading one's step; ``B'``'s columns
are orthonormal, and a per-component scale costs ``k`` floats instead of ``out`` (per-output-row
scales would cost as much as int4 codes at small ``k``). Groups of ``group_size`` columns split each
row further (4-bit).

Flat tensor names (``prefix`` is prepended, e.g. a PEFT module path plus "."):

* ``lora_A.codes`` / ``lora_A.scales`` / ``lora_A.meta`` -- ``A'`` (k x in);
* ``lora_B_T.codes`` / ``lora_B_T.scales`` / ``lora_B_T.meta`` -- ``B'ᵀ`` (k x out);
* ``scaling`` -- float64 [1], the LoRA scaling ``s`` (``ΔW ≈ s · B' A'``).

``codes``: int8 ``k x cols`` (8 bit) or flat uint8 with two codes per byte (4 bit); ``scales``: float32
(or float16) ``k x groups``; ``meta``: int64 ``[rows, cols, bits, group_size]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lora_ops.compress.quantize import SUPPORTED_BITS, QuantizedMatrix, dequantize, quantize

_META_FIELDS = 4


def _matrix_tensors(name: str, q: QuantizedMatrix) -> dict[str, torch.Tensor]:
    meta = torch.tensor([q.shape[0], q.shape[1], q.bits, q.group_size], dtype=torch.int64)
    return {f"{name}.codes": q.codes.contiguous(), f"{name}.scales": q.scales.contiguous(), f"{name}.meta": meta}


def _matrix_from_tensors(tensors: dict[str, torch.Tensor], name: str) -> QuantizedMatrix:
    missing = [f"{name}.{part}" for part in ("codes", "scales", "meta") if f"{name}.{part}" not in tensors]
    if missing:
        raise ValueError(f"compressed pair tensors lack {', '.join(missing)}")
    meta = tensors[f"{name}.meta"]
    if meta.dtype != torch.int64 or meta.numel() != _META_FIELDS:
        raise ValueError(f"{name}.meta must hold {_META_FIELDS} int64 values [rows, cols, bits, group_size]")
    rows, cols, bits, group_size = (int(v) for v in meta.tolist())
    codes, scales = tensors[f"{name}.codes"], tensors[f"{name}.scales"]
    if bits not in SUPPORTED_BITS or group_size < 1:
        raise ValueError(f"{name}.meta has bits {bits} / group_size {group_size}; bits must be 4 or 8")
    expected = (torch.uint8, ((rows * cols + 1) // 2,)) if bits == 4 else (torch.int8, (rows, cols))
    if (codes.dtype, tuple(codes.shape)) != expected:
        raise ValueError(f"{name}.codes is {codes.dtype} {tuple(codes.shape)}, expected {expected[0]} {expected[1]}")
    groups = -(-cols // group_size)
    if tuple(scales.shape) != (rows, groups) or scales.dtype not in (torch.float32, torch.float16):
        raise ValueError(f"{name}.scales must be float32/float16 of shape {(rows, groups)}, got "
                         f"{scales.dtype} {tuple(scales.shape)}")
    return QuantizedMatrix(codes=codes, scales=scales, shape=(rows, cols), bits=bits, group_size=group_size)


@dataclass(frozen=True)
class CompressedPair:
    """A trimmed, quantised LoRA pair: ``ΔW ≈ scaling · B' A'`` with ``A'`` (k x in) and ``B'ᵀ`` (k x out)."""

    a: QuantizedMatrix
    b_t: QuantizedMatrix
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b_t.shape[1]

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantised ``(A' (k x in), B' (out x k))``."""
        return dequantize(self.a, dtype), dequantize(self.b_t, dtype).t()

    def delta_weight(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        a, b = self.factors(dtype)
        return self.scaling * (b @ a)

    def stored_bytes(self) -> int:
        """Codes plus scales of both factors (the few metadata bytes excluded)."""
        return self.a.stored_bytes() + self.b_t.stored_bytes()

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Flat ``name -> tensor`` dict (names in the module docstring), loadable by :meth:`from_tensors`."""
        return {**_matrix_tensors(f"{prefix}lora_A", self.a), **_matrix_tensors(f"{prefix}lora_B_T", self.b_t),
                f"{prefix}scaling": torch.tensor([self.scaling], dtype=torch.float64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str = "") -> CompressedPair:
        a = _matrix_from_tensors(tensors, f"{prefix}lora_A")
        b_t = _matrix_from_tensors(tensors, f"{prefix}lora_B_T")
        if a.shape[0] != b_t.shape[0]:
            raise ValueError(f"lora_A has rank {a.shape[0]} but lora_B_T has rank {b_t.shape[0]}")
        scaling = tensors.get(f"{prefix}scaling")
        if scaling is None or scaling.numel() != 1:
            raise ValueError(f"compressed pair tensors lack a one-element {prefix}scaling")
        return cls(a=a, b_t=b_t, scaling=float(scaling.double().item()))


def compress_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float, bits: int,
                     group_size: int | None = None, scale_dtype: torch.dtype = torch.float32) -> CompressedPair:
    """Quantise trimmed factors ``A'`` (k x in) and ``B'`` (out x k), e.g. from ``Decomposition.factors``."""
    if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_a.shape[0] != lora_b.shape[1]:
        raise ValueError(f"LoRA factors must be A (k x in) and B (out x k), got A {tuple(lora_a.shape)} "
                         f"and B {tuple(lora_b.shape)}")
    return CompressedPair(a=quantize(lora_a, bits, group_size, scale_dtype),
                          b_t=quantize(lora_b.t(), bits, group_size, scale_dtype), scaling=float(scaling))
