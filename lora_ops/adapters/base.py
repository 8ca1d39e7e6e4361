"""The adapter interface every method implements.

An adapter layer wraps one frozen ``nn.Linear`` (kept as ``self.base``) and adds a
trainable update. Generic code (training, merge, export, parameter accounting)
talks to adapters only through this interface, so a new method is a new subclass
plus a registered :class:`lora_ops.methods.base.Method`, never an edit of a
central if-chain.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lora_ops.adapters.amp import kernel_dtype


class AdapterLayer(nn.Module):
    """Base class: a frozen linear layer plus a trainable update ``delta_weight()``.

    Subclasses implement :meth:`adapted_forward` (unmerged path) and
    :meth:`delta_weight`. Layers whose merged weight is not ``W + delta`` (Bat)
    override :meth:`merged_weight` and :meth:`unmerged_weight`.
    """

    #: method id this layer belongs to (e.g. ``"lora"``); used in exports and reports
    method: str = "base"

    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"adapters wrap nn.Linear modules, got {type(base).__name__}")
        self.base = base
        self.base.weight.requires_grad_(False)
        if self.base.bias is not None:
            self.base.bias.requires_grad_(False)
        self.merged = False
        #: the frozen weight and bias cast to a kernel's compute dtype (bf16/fp16 under autocast), built
        #: once and reused by every call: a plain attribute, not a buffer, so it is never saved or exported
        self._lowp: tuple[tuple, torch.Tensor, torch.Tensor | None] | None = None

    # ----------------------------------------------------------------- shapes
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # lets HF code that peeks at `.weight` keep working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return self.adapted_forward(x)

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # ------------------------------------------------------ low-precision copy
    def frozen_lowp(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The frozen ``(weight, bias)`` in the dtype a fused kernel computes in for input ``x``, or
        ``None`` when that is the weight's own dtype (fp32 training pays nothing).

        Under bf16/fp16 autocast the copy is made once and then reused: autocast itself caches casts
        only of weights that require a gradient, and the base is frozen, so without this every call
        would cast ``W`` again. The cache is keyed on dtype, device, storage and version counter, so an
        in-place change (``load_state_dict``, ``copy_``), a move or a new tensor rebuilds it; merge and
        unmerge drop it explicitly. It is not a buffer: ``state_dict`` and exports never see it."""
        dt = kernel_dtype(x)
        w, b = self.base.weight, self.base.bias
        if dt == w.dtype or not dt.is_floating_point:
            return None
        key = (dt, w.device, w.data_ptr(), w._version,
               None if b is None else (b.data_ptr(), b._version))
        cached = self._lowp
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, w.detach().to(dt), None if b is None else b.detach().to(dt))
            self._lowp = cached
        return cached[1], cached[2]

    def drop_lowp(self) -> None:
        """Free the low-precision copy of the frozen weight (rebuilt on the next reduced-precision call)."""
        self._lowp = None

    def delta_weight(self) -> torch.Tensor:
        """The dense update in the base weight's (out, in) layout."""
        raise NotImplementedError

    # ------------------------------------------------------------------ merge
    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.delta_weight().to(weight.dtype)

    def unmerged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return weight - self.delta_weight().to(weight.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self.base.weight.data = self.merged_weight(self.base.weight.data)
        self.merged = True
        self.drop_lowp()

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.data = self.unmerged_weight(self.base.weight.data)
        self.merged = False
        self.drop_lowp()

    # ------------------------------------------------------------- accounting
    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Trainable parameters of this adapter (shared ones included), base excluded."""
        for name, p in self.named_parameters():
            if not name.startswith("base."):
                yield name, p

    def parameter_group(self, name: str) -> str:
        """Optimiser group of the adapter parameter ``name``: ``adapter`` for the factors; layers with
        gates or quantiser ranges name those groups, so a recipe can give them their own learning rate."""
        return "adapter"

    def no_decay_parameter_names(self) -> set[str]:
        """Names (as in :meth:`adapter_parameters`) that must not get weight decay (gates, ranges)."""
        return set()

    def num_active(self) -> int:
        """Parameters that carry information after training (e.g. unpruned components)."""
        return sum(p.numel() for _, p in self.adapter_parameters())

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, merged={self.merged}"


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """All adapter layers of ``model`` by qualified module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def drop_lowp_copies(model: nn.Module) -> None:
    """Free every adapter layer's low-precision copy of its frozen weight (e.g. after training)."""
    for layer in adapter_layers(model).values():
        layer.drop_lowp()


def unique_adapter_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Adapter parameters with shared tensors listed once, under their first name."""
    seen: set[int] = set()
    out: dict[str, nn.Parameter] = {}
    for lname, layer in adapter_layers(model).items():
        for pname, p in layer.adapter_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            out[f"{lname}.{pname}"] = p
    return out
