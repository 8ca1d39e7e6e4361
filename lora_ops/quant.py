"""Bayesian-Bits fake quantisation with hard-concrete gates (used by Bayesian-LoRA, ``blora``).

A tensor is quantised on a coarse 2-bit grid and then refined by residuals on nested finer
grids (2 -> 4 -> 8 -> 16 -> 32 bits). Each refinement is switched by a gate ``z_k``; gates are
nested, so the 8-bit residual only counts when the 4-bit one is on:

    x~ = x_2 + z_4 (e_4 + z_8 (e_8 + z_16 (e_16 + z_32 e_32)))

Step sizes: ``s_2 = range / (2^2 - 1)`` and ``s_{2b} = s_b / (2^b + 1)``, so every coarser grid
point lies on every finer grid and the sum above is an exact point of the finest active grid.

Gates are hard-concrete (Louizos et al., L0) with ``beta = 2/3, gamma = -0.1, zeta = 1.1``:
stochastic samples during training, a deterministic rule at evaluation (on iff
``P(z = 0) < 0.34``). As in the official code, a gate whose ``log_alpha <= -2`` is closed
together with every higher gate, even during training. All formulas follow
``shared/spec/methods.md`` section 4b/4c; nothing here calls ``.cuda()``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from lora_ops import distributed

HC_BETA = 2.0 / 3.0
HC_GAMMA = -0.1
HC_ZETA = 1.1
#: evaluation rule: a gate is on iff its probability of being exactly zero is below this
TEST_OFF_THRESHOLD = 0.34
#: hard rule of the official code: log_alpha at or below this closes the gate and all higher ones
CLOSE_LOG_ALPHA = -2.0
DEFAULT_BITS: tuple[int, ...] = (2, 4, 8, 16, 32)
_EPS = 1e-12


# ------------------------------------------------------------------ hard-concrete gates
def prob_active(log_alpha: torch.Tensor) -> torch.Tensor:
    """``P(z != 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` (differentiable)."""
    return torch.sigmoid(log_alpha - HC_BETA * math.log(-HC_GAMMA / HC_ZETA))


def on_log_alpha_threshold() -> float:
    """The log-alpha above which the deterministic rule switches a gate on (about -0.935)."""
    logit = math.log((1.0 - TEST_OFF_THRESHOLD) / TEST_OFF_THRESHOLD)
    return logit + HC_BETA * math.log(-HC_GAMMA / HC_ZETA)


def hard_concrete_sample(log_alpha: torch.Tensor) -> torch.Tensor:
    """One stretched-and-clamped concrete sample per gate, in [0, 1], differentiable in log_alpha."""
    u = torch.rand_like(log_alpha).clamp(1e-6, 1.0 - 1e-6)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / HC_BETA)
    return (s * (HC_ZETA - HC_GAMMA) + HC_GAMMA).clamp(0.0, 1.0)


def deterministic_gate(log_alpha: torch.Tensor) -> torch.Tensor:
    """Evaluation gates: 1 where ``P(z = 0) < 0.34``, else 0 (no gradient)."""
    return ((1.0 - prob_active(log_alpha.detach())) < TEST_OFF_THRESHOLD).to(log_alpha.dtype)


def closed_by_rule(log_alpha: torch.Tensor) -> torch.Tensor:
    """Boolean mask of gates forced shut: the first gate with ``log_alpha <= -2`` and all after it."""
    hit = (log_alpha.detach() <= CLOSE_LOG_ALPHA).to(torch.int32)
    return torch.cumsum(hit, dim=-1) > 0


def gate_values(log_alpha: torch.Tensor, training: bool) -> torch.Tensor:
    """Per-gate values (before nesting): samples in training, deterministic at evaluation."""
    z = hard_concrete_sample(log_alpha) if training else deterministic_gate(log_alpha)
    return z.masked_fill(closed_by_rule(log_alpha), 0.0)


# --------------------------------------------------------------------- quantisation
def validate_bits(bits: Sequence[int]) -> tuple[int, ...]:
    """A usable bit list starts at 2 and doubles at every level (2, 4, 8, ...), at most 32."""
    bits = tuple(int(b) for b in bits)
    if not bits or bits[0] != 2 or any(b2 != 2 * b1 for b1, b2 in zip(bits, bits[1:])) or bits[-1] > 32:
        raise ValueError(
            f"bits must be nested doublings starting at 2 (e.g. [2, 4, 8, 16, 32] or [2, 4, 8]), got {list(bits)}: "
            "each residual level refines the previous grid, so a level can only double the previous width"
        )
    return bits


def step_sizes(x_max: torch.Tensor, signed: bool, bits: Sequence[int]) -> list[torch.Tensor]:
    """Grid steps ``s_b`` per level: ``s_2 = range / 3``, ``s_2b = s_b / (2^b + 1)``."""
    width = (2.0 * x_max if signed else x_max).clamp_min(_EPS)
    steps = [width / (2 ** bits[0] - 1)]
    for b in bits[:-1]:
        steps.append(steps[-1] / (2**b + 1))
    return steps


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def residual_quantize(
    x: torch.Tensor, x_max: torch.Tensor, signed: bool, gates: torch.Tensor, bits: Sequence[int] = DEFAULT_BITS
) -> torch.Tensor:
    """Bayesian-Bits residual fake quantisation of ``x``.

    ``gates`` holds ``z_4, z_8, ...`` (one per level above 2 bits, values in [0, 1]); they are nested
    here (cumulative product), so a closed 4-bit gate also removes the 8-, 16- and 32-bit residuals.
    No clipping: values outside the range round to larger integers (as in the official code).
    """
    dtype = x.dtype
    xf = x.float()  # 32-bit residuals need float32 even when activations are bf16
    steps = step_sizes(x_max.float(), signed, bits)
    out = steps[0] * round_ste(xf / steps[0])
    residual = xf - out
    nested = torch.cumprod(gates.float(), dim=0)
    for k, s in enumerate(steps[1:]):
        eps_k = s * round_ste(residual / s)
        residual = residual - eps_k
        out = out + nested[k] * eps_k
    return out.to(dtype)


def integer_codes(x_q: torch.Tensor, step: float) -> torch.Tensor:
    """Integers ``n`` with ``x_q = n * step`` in the smallest signed dtype that holds them."""
    n = torch.round(x_q.double() / step)
    top = float(n.abs().max()) if n.numel() else 0.0
    for dt in (torch.int8, torch.int16, torch.int32, torch.int64):
        if top <= torch.iinfo(dt).max:
            return n.to(dt)
    raise OverflowError("quantised values do not fit in int64")


class BayesianBitsQuantizer(nn.Module):
    """Per-tensor Bayesian-Bits quantizer with learned nested bit gates and a learned range.

    The range is ``[-x_max, x_max]`` for signed tensors (``x_min < 0``) and ``[0, x_max]``
    otherwise. It is fixed from the first tensor seen unless :meth:`set_range` gave one
    (calibration); afterwards ``x_max`` is a trainable parameter (straight-through gradient)
    when ``learn_range``. ``observing`` turns the module into a pass-through min/max recorder
    (the calibration pass).
    """

    def __init__(self, bits: Sequence[int] = DEFAULT_BITS, gate_init: float = 2.0, learn_range: bool = True) -> None:
        super().__init__()
        self.bits = validate_bits(bits)
        self.log_alpha = nn.Parameter(torch.full((len(self.bits) - 1,), float(gate_init)))
        x_max = torch.zeros(())
        if learn_range:
            self.x_max = nn.Parameter(x_max)
        else:
            self.register_buffer("x_max", x_max)
        # buffers (checkpointed with the adapter): whether a range is set, and the grid's sign
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.register_buffer("signed", torch.zeros((), dtype=torch.bool))
        self.observing = False
        self.observed: tuple[float, float] | None = None
        # host-side copy of `signed` once a range is set: avoids a device sync per forward on GPU
        self._signed: bool | None = None

    # ------------------------------------------------------------------ range
    @torch.no_grad()
    def set_range(self, x_min: float, x_max: float) -> None:
        """Fix the range from an observed ``[x_min, x_max]`` (zero is always inside)."""
        lo, hi = min(float(x_min), 0.0), max(float(x_max), 0.0)
        signed = lo < 0.0
        # signed grids are symmetric; take the larger side so the grid covers the tensor [D]
        bound = max(-lo, hi) if signed else hi
        self.x_max.fill_(bound)
        self.signed.fill_(signed)
        self.initialized.fill_(True)
        self._signed = signed

    def _grid_signed(self) -> bool | None:
        """Whether the grid is signed, or None while no range is set (read from the buffers once)."""
        if self._signed is None and bool(self.initialized):
            self._signed = bool(self.signed)
        return self._signed

    def _load_from_state_dict(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._signed = None  # buffers may change: re-read them at the next forward
        super()._load_from_state_dict(*args, **kwargs)

    def _observe(self, x: torch.Tensor) -> None:
        lo, hi = float(x.detach().min()), float(x.detach().max())
        self.observed = (lo, hi) if self.observed is None else (min(lo, self.observed[0]), max(hi, self.observed[1]))

    # ------------------------------------------------------------------ gates
    def gates(self, training: bool | None = None) -> torch.Tensor:
        """Gate values ``z_4, z_8, ...`` (not yet nested)."""
        return gate_values(self.log_alpha, self.training if training is None else training)

    def nested_probs(self) -> torch.Tensor:
        """``q_4, q_4 q_8, q_4 q_8 q_16, ...``: probability that each residual level is used."""
        return torch.cumprod(prob_active(self.log_alpha), dim=0)

    def regularizer(self) -> torch.Tensor:
        """Expected number of active levels, ``c_2 + q_4 + q_4 q_8 + ...`` with all costs 1."""
        return 1.0 + self.nested_probs().sum()

    def bit_width(self) -> int:
        """Deterministic read-out: ``bits[number of nested gates on]`` (2 when all are off)."""
        on = torch.cumprod(self.gates(training=False), dim=0)
        return self.bits[int(on.sum().item())]

    def step(self) -> float:
        """Grid step at the deterministic bit width (for integer export)."""
        level = self.bits.index(self.bit_width())
        return float(step_sizes(self.x_max.detach().abs(), bool(self.signed), self.bits)[level])

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        signed = self._grid_signed()
        if signed is None:
            # data-parallel ranks each see part of the batch: agree on the whole batch's range
            lo, hi = distributed.all_reduce_range(x.detach().min(), x.detach().max())
            self.set_range(lo, hi)
            signed = bool(self._signed)
        gates = self.gates(training=self.training and not deterministic)
        return residual_quantize(x, self.x_max.abs(), signed, gates, self.bits)

    def extra_repr(self) -> str:
        return f"bits={list(self.bits)}"


class RankGates(nn.Module):
    """Nested rank gates: mask ``[1, z_1, z_1 z_2, ...]`` over ``rank`` components.

    The first component is always on. The cumulative product is rounded with a straight-through
    estimator, so masked components contribute exactly zero while ``log_alpha`` still gets gradient.
    """

    def __init__(self, rank: int, gate_init: float = 6.0) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.log_alpha = nn.Parameter(torch.full((rank - 1,), float(gate_init)))

    def mask(self, training: bool | None = None) -> torch.Tensor:
        training = self.training if training is None else training
        z = gate_values(self.log_alpha, training)
        soft = torch.cat([torch.ones(1, dtype=z.dtype, device=z.device), torch.cumprod(z, dim=0)])
        return round_ste(soft)

    def probs(self) -> torch.Tensor:
        """Per-gate ``q_k = P(z_k != 0)`` (the regulariser uses these, not the cumulative product)."""
        return prob_active(self.log_alpha)

    def effective_rank(self) -> int:
        """``1 + #{k : prod_{j<=k} z_j = 1}`` under deterministic gates."""
        return int(self.mask(training=False).sum().item())
