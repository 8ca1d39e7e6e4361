"""Method-specific behaviour inside the training loop.

The loop owns *when* hooks run; a controller owns *what* happens (EMAs, masks,
budgets, regularisers). The loop calls every hook, so a user can never forget an
allocation step (a frequent PEFT AdaLoRA mistake). Controllers are checkpointed
with the adapter, so resume restores scores, masks and budgets.
"""

from __future__ import annotations

from typing import Any

import torch


class Controller:
    """No-op controller: plain fine-tuning. Subclass and override what you need."""

    def bind(self, total_steps: int) -> None:
        """Called once before training with the number of optimizer steps."""
        self.total_steps = total_steps

    def regularizer(self, step: int) -> torch.Tensor | None:
        """Extra loss term for this step (DEM, orthogonality, bit/rank prior)."""
        return None

    def on_after_backward(self, step: int) -> None:
        """Gradients are complete (and unscaled), the optimizer has not stepped: gradient-based scores."""

    def on_step_end(self, step: int) -> None:
        """After ``optimizer.step()``: weight-based scores, masks, budgets. ``step`` counts from 1."""

    def allows_best(self, step: int) -> bool:
        """Whether a state at ``step`` may be kept as "best" (False while the structure still changes)."""
        return True

    def on_train_end(self) -> None:
        """Freeze final structure (masks, ranks)."""

    def summary(self) -> dict[str, Any]:
        """JSON-able facts for the decision record (final ranks, sparsity, ...)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} has no state but a checkpoint carried {sorted(state)}")
