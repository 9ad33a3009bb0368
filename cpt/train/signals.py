"""Stopping a run cleanly: a stop signal to any one process is a decision of the whole run.

SIGTERM (a scheduler's kill, `kill`), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's pre-emption warning,
``--signal=USR1@120``) set a flag; after every step the processes agree on it (:meth:`StopFlag.agree`: an
all-reduce of one integer, the largest signal number any process got), so every rank checkpoints at the
same step and exits 128 + that signal, whichever rank the signal reached. A stop signal that comes again
later than REPEAT_S seconds after the first (Ctrl-C pressed again) stops the process at once
(KeyboardInterrupt); its peers then see it lost. Within REPEAT_S it is the same stop: a scheduler that
signals every process of a job step, and the launcher that forwards the signal again, deliver it twice.

A worker whose launcher dies (its node's ``accelerate launch``/torchrun killed, even with SIGKILL) gets
SIGTERM from the kernel (:func:`die_with_parent`), so a killed launcher never leaves a worker training on.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# Signals within this many seconds of the first are the same stop: SLURM signals every process of a job step
# and the launcher forwards the signal again, so a worker gets it twice within milliseconds.
REPEAT_S = 2.0


class StopFlag:
    """The stop signals ask for a clean stop at the end of the current step (checkpoint, then exit)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.signum: int | None = None
        self._first = 0.0  # when the first stop signal came (on self.clock)
        self._old: dict[int, Any] = {}
        for s in STOP_SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. called from a notebook worker)
                pass

    def _handle(self, signum, frame) -> None:
        now = self.clock()
        if self.signum is not None and now - self._first > REPEAT_S:  # a second stop, asked again: stop now
            raise KeyboardInterrupt
        if self.signum is None:
            self.signum, self._first = signum, now

    def agree(self, accelerator) -> int | None:
        """The signal the run stops for: this process's, or any other's (a collective: every process calls
        it after every step). One process alone: its own flag, no communication."""
        if accelerator.num_processes > 1:
            import torch.distributed as dist

            flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=accelerator.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item():
                self.signum = int(flag.item())
        return self.signum

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def die_with_parent() -> None:
    """Under a launcher (torchrun, `accelerate launch`): ask the kernel for SIGTERM when the launcher dies.
    torchrun starts its workers in sessions of their own, so killing the launcher's process group misses
    them; with this they stop like any signalled run (a checkpoint where the peers can still agree on it).
    Linux only; elsewhere nothing."""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    parent = os.getppid()
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        return
    # The launcher died between the two calls: the kernel will not send it any more. (Not "the parent is
    # pid 1": in a container the launcher itself is pid 1.)
    if os.getppid() != parent:
        os.kill(os.getpid(), signal.SIGTERM)
