"""What a step may do to the weights: a non-finite loss or grad norm never reaches them, and loss spikes
are noticed. Pure Python over the floats the trainer already has (the step's reduced loss and grad
norm), so the policy is tested without a model, and all ranks, seeing the same reduced numbers, take
the same decision."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Literal

Verdict = Literal["step", "skip", "halt"]


@dataclass
class StepGuard:
    on_nonfinite: Literal["halt", "skip"] = "halt"
    max_skipped_steps: int = 8
    spike_factor: float | None = 2.0
    spike_window: int = 64
    check_grad_norm: bool = True  # off under fp16, where an inf grad norm is the loss scaler's business
    skipped: int = 0  # non-finite steps skipped over the run
    in_a_row: int = 0
    recent: list[float] = field(default_factory=list)  # the last spike_window finite losses

    def check(self, loss: float, grad_norm: float | None) -> Verdict:
        """``step`` (apply the update), ``skip`` (drop it) or ``halt`` (stop the run, save nothing)."""
        finite = math.isfinite(loss) and (
            grad_norm is None or not self.check_grad_norm or math.isfinite(grad_norm))
        if finite:
            self.in_a_row = 0
            return "step"
        if self.on_nonfinite == "halt":
            return "halt"
        self.skipped += 1
        self.in_a_row += 1
        return "halt" if self.in_a_row >= self.max_skipped_steps else "skip"

    def spike(self, loss: float) -> float | None:
        """The running median when ``loss`` is a spike (above spike_factor x the median of the recent
        losses, once 8 are known), else None. Finite losses join the window either way."""
        if not math.isfinite(loss):
            return None
        median = statistics.median(self.recent) if len(self.recent) >= 8 else None
        self.recent = [*self.recent, loss][-self.spike_window:]
        if self.spike_factor is not None and median is not None and loss > self.spike_factor * median:
            return median
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row, "recent": list(self.recent)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if state:  # checkpoints from before the guard carry none: counts start at zero
            self.skipped, self.in_a_row = int(state["skipped"]), int(state["in_a_row"])
            self.recent = [float(x) for x in state["recent"]]
