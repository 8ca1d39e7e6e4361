"""Graceful stop on SIGTERM: the training loop writes a checkpoint at the next step boundary and
the stage exits non-zero (128 + signal), so a cancelled flow run or a killed job loses at most one
step and the next run resumes.

The loop (lora_ops.training.train) checkpoints when ``step % cfg.checkpoint_every == 0`` and reads
that field at every step, so the handler sets it to 1: the very next step boundary (or epoch end)
hands a complete state to ``on_checkpoint``, which saves it and then raises :class:`StopRequested`.
No change to the loop is needed, and the checkpoint records the configured interval, not 1, so
the resume check (same training config) still holds.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

from lora_ops.training import TrainingInterrupted


class StopRequested(TrainingInterrupted):
    """Training stopped on a signal after writing a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """Context manager: while active, SIGTERM asks ``cfg`` (a TrainConfig) to checkpoint and stop."""

    def __init__(self, cfg: Any, signals: tuple[int, ...] = (signal.SIGTERM,)) -> None:
        self.cfg = cfg
        self.signals = signals
        self.every = cfg.checkpoint_every
        self.requested: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested is None:
            self.requested = signum
            self.cfg.checkpoint_every = 1  # checkpoint at the next step boundary (see module doc)

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():  # signals can only be set there
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        self.cfg.checkpoint_every = self.every

    def wrap(self, save: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], None]:
        """``save`` as an ``on_checkpoint`` callback that stops training once a signal arrived."""

        def on_checkpoint(state: dict[str, Any]) -> None:
            if self.requested is not None and isinstance(state.get("config"), dict):
                state["config"]["checkpoint_every"] = self.every  # what the run was configured with
            save(state)
            if self.requested is not None:
                name = signal.Signals(self.requested).name
                raise StopRequested(f"stopped by {name} at step {state.get('step')}; checkpoint written, "
                                    "run the stage again to resume", self.requested)

        return on_checkpoint
