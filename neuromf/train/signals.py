"""Stop requests from the cluster: finish the step, save, exit with a code the sbatch wrapper requeues.

SLURM sends SIGUSR1/SIGUSR2 (`--signal=B:USR1@300`) before the wall-time limit
and SIGTERM on pre-emption. The handler only sets a flag; the training loop
checks it between steps, so a checkpoint is never written mid-step.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType
from typing import Optional

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved after a stop signal, run me again with --resume auto"
INTERRUPT_EXIT_CODE = 130  # Ctrl-C: saved, not to be requeued
CATCHABLE = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class StopRequest:
    """Installs handlers; `requested` names the first signal received (None while running)."""

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            print(f"\nreceived {name}: finishing the current step, then saving a checkpoint", file=sys.stderr, flush=True)
            self.requested = name
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out

    def __enter__(self) -> "StopRequest":
        for sig in CATCHABLE:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]

    @property
    def exit_code(self) -> int:
        return INTERRUPT_EXIT_CODE if self.requested == "SIGINT" else REQUEUE_EXIT_CODE
