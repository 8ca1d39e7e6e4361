"""Bayesian-LoRA (``blora``, arXiv 2406.13046): SVD-form LoRA with learned rank and bit-widths.

Per adapted linear layer (spec section 4b)::

    u = Q_e( Q_a( drop(x) Q_A(A)^T ) * (m * Q_E(E)) )
    y = h + s * Q_ab( u Q_B(B)^T )               with h = W x + b
    (quantize_base: h = Q_h(x Q_W(W)^T + Q_W(b)),  y = Q_o(y))

``A`` (r x in), ``B`` (out x r) ~ N(0, 0.02^2), ``E`` (r) ~ N(0, 1) so the update is non-zero at
step 0, ``m`` the nested rank mask (first component always on). Every ``Q_*`` is a
:class:`~lora_ops.quant.BayesianBitsQuantizer` with its own learned gates. The frozen base
weight is only quantised with ``quantize_base`` (the paper's setting; off by default).

Read-outs use the deterministic gates: per matrix the effective rank and bit-widths, and the
bit operations ``BOPs = MACs x b_w x b_a`` per token against a full-rank LoRA baseline.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lora_ops.adapters.base import AdapterLayer, adapter_layers
from lora_ops.quant import DEFAULT_BITS, BayesianBitsQuantizer, RankGates, integer_codes

#: quantizers of the adapter branch: factors A, E, B and the activations after A, after E, after B
ADAPTER_QUANTIZERS = ("A", "E", "B", "a", "e", "ab")
#: quantizers that touch the frozen path: base weight and bias, base output, final sum
BASE_QUANTIZERS = ("W", "h", "o")


class BLoRALinear(AdapterLayer):
    """Frozen ``nn.Linear`` plus a fake-quantised ``s B diag(m E) A`` branch with learned gates."""

    method = "blora"

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        scale: float,
        dropout: float = 0.0,
        bits: Sequence[int] = DEFAULT_BITS,
        gate_init: float = 2.0,
        rank_gate_init: float = 6.0,
        quantize_base: bool = False,
        learn_ranges: bool = True,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(base)
        if rank < 1:
            raise ValueError(f"blora rank must be >= 1, got {rank}")
        device = base.weight.device
        # a per-module generator makes the initialisation reproducible between calibrate and build,
        # so activation ranges measured in calibration belong to the very factors build creates
        self.A = nn.Parameter((torch.randn(rank, base.in_features, generator=generator) * init_std).to(device))
        self.B = nn.Parameter((torch.randn(base.out_features, rank, generator=generator) * init_std).to(device))
        self.E = nn.Parameter(torch.randn(rank, generator=generator).to(device))
        self.scale = float(scale)
        self.dropout = float(dropout)
        self.quantize_base = bool(quantize_base)
        names = ADAPTER_QUANTIZERS + (BASE_QUANTIZERS if quantize_base else ())
        self.quantizers = nn.ModuleDict(
            {n: BayesianBitsQuantizer(bits, gate_init, learn_ranges) for n in names}
        ).to(device)
        self.rank_gates = RankGates(rank, rank_gate_init).to(device)
        #: when True the layer runs as the float LoRA export (base + s B' A'), for measuring the gap
        self.float_mode = False

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    # ---------------------------------------------------------------- forward
    def _factors(self, deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q = self.quantizers
        a = q["A"](self.A, deterministic)
        b = q["B"](self.B, deterministic)
        mask = self.rank_gates.mask(training=self.training and not deterministic)
        e = q["E"](self.E, deterministic) * mask.to(self.E.dtype)
        return a, b, e

    def _base_out(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize_base:
            return self.base(x)
        q = self.quantizers
        # the official code quantises weight and bias with the same quantizer; its range comes from W
        w = q["W"](self.base.weight)
        b = self.base.bias
        if b is not None and not q["W"].observing:  # calibration records W's range only, as first-tensor mode does
            b = q["W"](b)
        return q["h"](F.linear(x, w, b))

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_mode:
            a, b, s = self.as_lora()
            xd = F.dropout(x, self.dropout, self.training)
            return self.base(x) + s * ((xd @ a.t().to(x.dtype)) @ b.t().to(x.dtype))
        q = self.quantizers
        a, b, e = self._factors(deterministic=False)
        xd = F.dropout(x, self.dropout, self.training)
        u = q["a"](xd @ a.t().to(x.dtype))
        u = q["e"](u * e.to(u.dtype))
        v = q["ab"](u @ b.t().to(u.dtype))
        y = self._base_out(x) + self.scale * v
        return q["o"](y) if self.quantize_base else y

    # ------------------------------------------------------------- read-outs
    def regularizer(self) -> torch.Tensor:
        """``sum_Q R_Q`` of this layer: expected active levels; ``Q_E`` weighted by the rank gates."""
        total = torch.zeros((), device=self.A.device)
        for name, q in self.quantizers.items():
            r = q.regularizer()
            if name == "E" and self.rank > 1:
                # spec 4c: the mean of the per-gate q_k (not the cumulative product) times E's bit cost
                r = self.rank_gates.probs().mean() * r
            total = total + r
        return total

    def effective_rank(self) -> int:
        return self.rank_gates.effective_rank()

    def bit_widths(self) -> dict[str, int]:
        return {name: q.bit_width() for name, q in self.quantizers.items()}

    @torch.no_grad()
    def deterministic_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantised ``A, B`` and masked ``m * Q_E(E)`` under the deterministic gates."""
        return self._factors(deterministic=True)

    @torch.no_grad()
    def collapsed(self) -> bool:
        """True when the quantised update is exactly zero (all of E, A or B rounds to 0)."""
        a, b, e = self.deterministic_factors()
        return bool((e == 0).all() or (a == 0).all() or (b == 0).all())

    def all_gates_closed(self) -> bool:
        """Rank 1 and every adapter-branch quantizer at its lowest width."""
        lowest = self.quantizers["A"].bits[0]
        return self.effective_rank() == 1 and all(self.bit_widths()[n] == lowest for n in ADAPTER_QUANTIZERS)

    def bops(self, activation_bits: int = 16, weight_bits: int = 16, baseline_bits: int = 16) -> dict[str, int]:
        """Bit operations per token (MACs x b_w x b_a) of this layer and of a full-rank LoRA baseline.

        ``activation_bits`` is the width assumed for the unquantised input ``x``; ``weight_bits`` the
        width of the frozen base weight when it is not quantised. The baseline runs base, A and B
        at ``baseline_bits`` for weights and activations, at the full rank.
        """
        d_o, d_i, r = self.out_features, self.in_features, self.effective_rank()
        bw = self.bit_widths()
        b_w = bw["W"] if self.quantize_base else weight_bits
        base = d_o * d_i * b_w * activation_bits
        a_proj = r * d_i * bw["A"] * activation_bits
        e_scale = r * bw["E"] * bw["a"]
        b_proj = d_o * r * bw["B"] * bw["e"]
        adapter = a_proj + e_scale + b_proj
        bb = baseline_bits * baseline_bits
        base_ref = d_o * d_i * bb
        adapter_ref = (self.rank * d_i + d_o * self.rank) * bb
        return {"base": base, "adapter": adapter, "total": base + adapter,
                "baseline_base": base_ref, "baseline_adapter": adapter_ref, "baseline_total": base_ref + adapter_ref}

    def parameter_group(self, name: str) -> str:
        if name.endswith("log_alpha"):
            parts = name.split(".")
            if parts[0] == "quantizers" and parts[1] in BASE_QUANTIZERS:
                # the frozen path's bit gates (quantize_base): the prior charges them what it charges the
                # adapter's, so a recipe may want them slower (blora.recipe.group_lr.base_gates)
                return "base_gates"
            return "gates"  # bit gates and rank gates: log-alpha must travel ~3 to close (recipe gives them a high lr)
        if name.endswith("x_max"):
            return "ranges"
        return "adapter"

    def no_decay_parameter_names(self) -> set[str]:
        # weight decay would pull log-alpha towards 0 (P(on) = 0.83) and shrink ranges: gates and ranges are exempt
        return {n for n, _ in self.adapter_parameters() if n.endswith("log_alpha") or n.endswith("x_max")}

    def num_active(self) -> int:
        return self.effective_rank() * (self.in_features + self.out_features + 1)

    # ---------------------------------------------------------------- float forms
    @torch.no_grad()
    def as_lora(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Plain LoRA of the deterministic quantised factors: masked ranks dropped, ``E`` folded into A.

        Exact for the factors; it drops the activation quantizers (and the base quantizers), so the
        float export only approximates the quantised model (see :func:`float_export_gap`).
        """
        a, b, e = self.deterministic_factors()
        r = self.effective_rank()  # the mask is a prefix: components 0..r-1 are on
        return (e[:r, None] * a[:r]).detach(), b[:, :r].detach(), self.scale

    def delta_weight(self) -> torch.Tensor:
        a, b, s = self.as_lora()
        return s * (b @ a)

    # ------------------------------------------------------------- calibration
    def set_observing(self, flag: bool) -> None:
        """Calibration: every quantizer passes tensors through and records their min/max."""
        for q in self.quantizers.values():
            q.observing = flag
            if flag:
                q.observed = None

    def observed_ranges(self) -> dict[str, list[float]]:
        return {n: [q.observed[0], q.observed[1]] for n, q in self.quantizers.items() if q.observed is not None}

    def set_ranges(self, ranges: dict[str, Sequence[float]]) -> None:
        """Fix quantizer ranges (from calibration rows); quantizers not named keep first-tensor ranges."""
        unknown = set(ranges) - set(self.quantizers)
        if unknown:
            raise ValueError(f"ranges given for unknown quantizers {sorted(unknown)}; this layer has "
                             f"{sorted(self.quantizers)} (was calibration run with another quantize_base?)")
        for n, (lo, hi) in ranges.items():
            self.quantizers[n].set_range(lo, hi)

    # ----------------------------------------------------------------- export
    @torch.no_grad()
    def quantized_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Deployable form: integer codes of A, B, E at rank ``r_eff`` plus steps, bits and activation ranges."""
        a, b, e = self.deterministic_factors()
        r = self.effective_rank()
        bits = self.bit_widths()
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"rank": r, "max_rank": self.rank, "scale": self.scale, "bits": bits,
                                "quantize_base": self.quantize_base, "steps": {}, "activations": {}}
        for name, value in (("A", a[:r]), ("B", b[:, :r]), ("E", e[:r])):
            step = self.quantizers[name].step()
            tensors[name] = integer_codes(value, step).cpu()
            meta["steps"][name] = step
        for name, q in self.quantizers.items():
            if name in ("A", "B", "E"):
                continue
            # activation quantizers stay in the deployed branch; W (base weight) only with quantize_base
            target = meta.setdefault("base_weight", {}) if name == "W" else meta["activations"]
            target[name] = {"bits": bits[name], "x_max": float(q.x_max.detach().abs()),
                            "signed": bool(q.signed), "step": q.step()}
        return tensors, meta

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, r={self.rank}, scale={self.scale:g}, dropout={self.dropout:g}, "
                f"quantize_base={self.quantize_base}")


# ------------------------------------------------------------------ model-level helpers
def blora_layers(model: nn.Module) -> dict[str, BLoRALinear]:
    return {n: m for n, m in adapter_layers(model).items() if isinstance(m, BLoRALinear)}


def readout_rows(model: nn.Module, activation_bits: int = 16, weight_bits: int = 16,
                 baseline_bits: int = 16) -> list[dict[str, Any]]:
    """One JSON-able row per adapted matrix: effective rank, bit-widths, BOPs, collapse flags."""
    rows = []
    for name, layer in blora_layers(model).items():
        row: dict[str, Any] = {"module": name, "rank": layer.effective_rank(), "max_rank": layer.rank,
                               "in_features": layer.in_features, "out_features": layer.out_features}
        row.update({f"bits_{q}": b for q, b in layer.bit_widths().items()})
        row.update({f"bops_{k}": v for k, v in layer.bops(activation_bits, weight_bits, baseline_bits).items()})
        row["collapsed"] = layer.collapsed()
        row["all_gates_closed"] = layer.all_gates_closed()
        rows.append(row)
    return rows


def bops_report(model: nn.Module, activation_bits: int = 16, weight_bits: int = 16,
                baseline_bits: int = 16) -> dict[str, Any]:
    """Model BOPs per token (summed over adapted modules) and the ratio to full-rank LoRA at ``baseline_bits``."""
    rows = readout_rows(model, activation_bits, weight_bits, baseline_bits)
    tot = {k: sum(r[f"bops_{k}"] for r in rows) for k in
           ("base", "adapter", "total", "baseline_base", "baseline_adapter", "baseline_total")}
    return {
        **tot,
        "ratio_total": tot["total"] / tot["baseline_total"] if tot["baseline_total"] else None,
        "ratio_adapter": tot["adapter"] / tot["baseline_adapter"] if tot["baseline_adapter"] else None,
        "activation_bits_assumed": activation_bits,
        "weight_bits_assumed": weight_bits,
        "baseline": f"{baseline_bits}-bit weights and activations, full-rank LoRA at the same max rank",
        "unit": "bit operations per token, summed over adapted modules (other layers not counted)",
    }


def export_quantized(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The deployable form of every blora module: (integer tensors, JSON-able metadata).

    Tensors are named ``<module>.A`` (r_eff x in), ``<module>.B`` (out x r_eff), ``<module>.E``
    (r_eff), stored as the smallest signed integer type that holds the codes; real value =
    code x ``meta["modules"][module]["steps"][factor]``. Activation quantizers are kept as
    (bits, range, step) so a runtime can reproduce the quantised branch.
    """
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"format": "blora-int/1", "modules": {}}
    for name, layer in blora_layers(model).items():
        t, m = layer.quantized_state()
        tensors.update({f"{name}.{k}": v for k, v in t.items()})
        meta["modules"][name] = m
    if not meta["modules"]:
        raise ValueError("the model has no blora layers to export")
    return tensors, meta


def dequantize_export(tensors: dict[str, torch.Tensor], meta: dict[str, Any]
                      ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Real-valued ``(A, B, E)`` per module back from :func:`export_quantized` (for checks and runtimes)."""
    out = {}
    for name, m in meta["modules"].items():
        out[name] = tuple(tensors[f"{name}.{f}"].double() * m["steps"][f] for f in ("A", "B", "E"))
    return out  # type: ignore[return-value]


@contextlib.contextmanager
def float_lora_mode(model: nn.Module) -> Iterator[None]:
    """Run every blora layer as its float LoRA export (unquantised base + ``s B' A'``)."""
    layers = list(blora_layers(model).values())
    for layer in layers:
        layer.float_mode = True
    try:
        yield
    finally:
        for layer in layers:
            layer.float_mode = False


@torch.no_grad()
def float_export_gap(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]],
                     device: torch.device | str | None = None) -> dict[str, float]:
    """Output difference between the quantised model and its float LoRA export, on ``batches``.

    Both run in eval mode (deterministic gates). Returns the max and mean absolute difference of the
    model outputs (logits) and the relative difference ``||y_float - y_q|| / ||y_q||``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    max_abs, abs_sum, count, diff_sq, ref_sq = 0.0, 0.0, 0, 0.0, 0.0
    try:
        for batch in batches:
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            yq = model(**inputs).logits.float()
            with float_lora_mode(model):
                yf = model(**inputs).logits.float()
            d = yf - yq
            max_abs = max(max_abs, float(d.abs().max()))
            abs_sum += float(d.abs().sum())
            count += d.numel()
            diff_sq += float(d.pow(2).sum())
            ref_sq += float(yq.pow(2).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("float_export_gap got no batches")
    return {"max_abs_diff": max_abs, "mean_abs_diff": abs_sum / count,
            "rel_diff": (diff_sq ** 0.5) / max(ref_sq ** 0.5, 1e-30), "values": count}
