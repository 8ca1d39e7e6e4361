"""Low-bit LoRA factors: symmetric round-to-nearest int8 / int4 with absmax scales per row (or per group).

Why this scheme (``shared/spec/compress.md`` §4): round-to-nearest with absmax scales is the standard
baseline (LLM.int8 vector-wise scales; 64-128 column groups for 4 bit as in GPTQ/AWQ), needs no
calibration, and bounds every element's error by half its scale. Symmetric (no zero point) because
trimmed factors are centred: rows of ``A'`` and columns of ``B'`` are singular vectors, not
activations with an offset. Codes are ``q = round(x / scale)`` with ``scale = absmax / 127`` (int8) or
``absmax / 7`` (int4; the code -8 is unused so the grid is symmetric); int4 codes are stored two per
byte (offset by 8, first code in the low nibble), flattened row-major.

Scales are computed, rounded to their storage dtype, and only then used to compute the codes, so the
stored scale is the one that produced the codes and the ``scale/2`` bound holds for the stored data.
Default scale dtype float32: exact, and it covers any absmax (float16 overflows above 65504·127 and
loses relative precision below ~6e-5·127, which a row carrying a small singular value can reach).
The cost is bytes: per row of ``n`` columns a scale is 4 bytes against ``n`` (int8) or ``n/2`` (int4)
code bytes, e.g. 6 % overhead at int4 with 128-column groups; float16 halves that and may be chosen
(``scale_dtype=torch.float16``), with a ValueError where a scale does not fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SUPPORTED_BITS: tuple[int, ...] = (4, 8)
SCALE_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16)


def max_code(bits: int) -> int:
    """Largest code magnitude of the symmetric grid: 127 (int8) or 7 (int4)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits!r}")
    return 2 ** (bits - 1) - 1


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [-8, 7] (any shape) to uint8, two per byte, flattened row-major; odd counts pad a zero nibble."""
    flat = codes.reshape(-1).to(torch.int16)
    if flat.numel() and (int(flat.min()) < -8 or int(flat.max()) > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    nibbles = (flat + 8).to(torch.uint8)
    if nibbles.numel() % 2:
        nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])  # pad with the nibble of code 0
    pairs = nibbles.reshape(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: the first ``count`` codes as a flat int8 tensor."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed int4 codes must be a flat uint8 tensor")
    if packed.numel() != (count + 1) // 2:
        raise ValueError(f"{packed.numel()} bytes cannot hold exactly {count} int4 codes")
    nibbles = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)[:count]
    return nibbles.to(torch.int8) - 8


@dataclass(frozen=True)
class QuantizedMatrix:
    """A ``rows x cols`` matrix as codes and one scale per row and group of ``group_size`` columns.

    ``codes``: int8 ``rows x cols`` (8 bit) or flat uint8 of ``ceil(rows·cols/2)`` bytes (4 bit);
    ``scales``: ``rows x ceil(cols/group_size)``; the last group of a row may be shorter."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    bits: int
    group_size: int

    @property
    def num_groups(self) -> int:
        return math.ceil(self.shape[1] / self.group_size)

    def stored_bytes(self) -> int:
        """Bytes on disk: codes plus scales."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def int_codes(self) -> torch.Tensor:
        """Codes as an int8 ``rows x cols`` tensor (unpacked for 4 bit)."""
        if self.bits == 4:
            return unpack_int4(self.codes, self.shape[0] * self.shape[1]).reshape(self.shape)
        return self.codes


def _column_scales(scales: torch.Tensor, group_size: int, cols: int) -> torch.Tensor:
    """Per-group scales expanded to one per element column (``rows x cols``)."""
    return scales.repeat_interleave(group_size, dim=1)[:, :cols]


def quantize(matrix: torch.Tensor, bits: int, group_size: int | None = None,
             scale_dtype: torch.dtype = torch.float32) -> QuantizedMatrix:
    """Symmetric round-to-nearest with absmax scales per row (``group_size=None``) or per ``group_size`` columns."""
    q_max = max_code(bits)
    if matrix.dim() != 2:
        raise ValueError(f"quantize expects a matrix, got shape {tuple(matrix.shape)}")
    if scale_dtype not in SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be torch.float32 or torch.float16, got {scale_dtype}")
    rows, cols = matrix.shape
    if group_size is None:
        group_size = max(cols, 1)
    elif isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer or None, got {group_size!r}")
    x = matrix.detach().double()
    if not torch.isfinite(x).all():
        raise ValueError("cannot quantize non-finite values")
    groups = math.ceil(cols / group_size)
    padded = torch.nn.functional.pad(x.abs(), (0, groups * group_size - cols))
    absmax = padded.reshape(rows, groups, group_size).amax(dim=2) if groups else x.new_zeros(rows, 0)
    scales = (absmax / q_max).to(scale_dtype)
    if not torch.isfinite(scales).all() or bool(((scales == 0) & (absmax > 0)).any()):
        raise ValueError(f"a scale does not fit in {scale_dtype}; use torch.float32 scales")
    per_column = _column_scales(scales.double(), group_size, cols)
    safe = torch.where(per_column > 0, per_column, torch.ones_like(per_column))
    # rounding the scale may put the absmax element a hair past q_max: clamp (error stays ≤ scale/2)
    codes = torch.round(x / safe).clamp_(-q_max, q_max).to(torch.int8)
    stored = pack_int4(codes) if bits == 4 else codes
    return QuantizedMatrix(codes=stored, scales=scales, shape=(rows, cols), bits=bits, group_size=group_size)


def dequantize(quantized: QuantizedMatrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``codes · scale`` as a ``rows x cols`` tensor of ``dtype`` (float64 gives the exact grid point)."""
    per_column = _column_scales(quantized.scales.to(dtype), quantized.group_size, quantized.shape[1])
    return quantized.int_codes().to(dtype) * per_column
