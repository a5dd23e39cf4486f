"""Stop requests from the cluster: save within seconds, exit with a code the sbatch wrapper requeues.

SLURM sends SIGUSR1/SIGUSR2 (`--signal=B:USR1@300`) before the wall-time limit
and SIGTERM on pre-emption. The handler sets a flag; the training loop checks
it between steps, so a checkpoint is never written mid-step. Validation and
periodic sampling (minutes on a big model) run inside `interruptible()`: there
a signal raises StopInterrupt at the next Python-level operation, the work is
abandoned (and redone after the resume), and the checkpoint is written at once.
Worst-case latency is thus one training step, one network call of validation
or sampling, or one checkpoint write (README, "Stop signals").
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "saved after a stop signal, run me again with --resume auto"
INTERRUPT_EXIT_CODE = 130  # Ctrl-C: saved, not to be requeued
CATCHABLE = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)


class StopInterrupt(BaseException):
    """A stop signal arrived during interruptible work. A BaseException, so no `except Exception` swallows it."""


class StopRequest:
    """Installs handlers; `requested` names the first signal received (None while running)."""

    def __init__(self) -> None:
        self.requested: str | None = None
        self._previous: dict[int, object] = {}
        self._raise = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            what = (
                "abandoning validation/sampling (redone after resume)" if self._raise else "finishing the current step"
            )
            print(f"\nreceived {name}: {what}, then saving a checkpoint", file=sys.stderr, flush=True)
            self.requested = name
        elif signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user really wants out
        if self._raise:
            self._raise = False  # once: the code that handles it must not be interrupted again
            raise StopInterrupt(name)

    @contextmanager
    def interruptible(self) -> Iterator[None]:
        """Work that a stop signal may abandon (StopInterrupt); entered after a signal, it raises at once."""
        if self.requested is not None:
            raise StopInterrupt(self.requested)
        self._raise = True
        try:
            yield
        finally:
            self._raise = False

    def __enter__(self) -> StopRequest:
        for sig in CATCHABLE:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
