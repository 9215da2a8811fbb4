"""How a run ends when something outside the plan happens: preemption (a signal, or ``--max_train_time``) and
non-finite training steps.

- ``SIGTERM``, ``SIGINT`` and ``SIGUSR1`` (what SLURM sends before a time limit) only raise a flag; the loop reads
  it every ``--logging_steps`` (combined across processes in the window's single reduction), so every process
  stops after the same step, saves a checkpoint and exits with :data:`EXIT_PREEMPTED`. A second signal exits at
  once (:data:`EXIT_PREEMPTED` too): a save it interrupts stays a ``.checkpoint-<step>.tmp`` folder, which is
  never ``latest``.
- A step whose loss or gradients are not finite changes nothing (see :class:`cpsl_hf.training.loop.Trainer`);
  after ``--max_nonfinite_steps`` consecutive ones the run exits with :data:`EXIT_NONFINITE`, without saving.

Both exits are :class:`SystemExit` subclasses: ``python scripts/train.py`` ends with the status, and code that
runs a training in-process can catch them.
"""

from __future__ import annotations

import os
import signal
import threading

EXIT_PREEMPTED = 75
"""Exit status of a run that stopped early and saved a checkpoint: continue it with
``--resume_from_checkpoint auto`` (75 is ``EX_TEMPFAIL``: try again later)."""

EXIT_NONFINITE = 70
"""Exit status of a run stopped by ``--max_nonfinite_steps`` consecutive non-finite steps (``EX_SOFTWARE``)."""

STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name)
)


class Preempted(SystemExit):
    """The run saved a checkpoint and stopped early (a signal or ``--max_train_time``)."""

    def __init__(self, message: str):
        super().__init__(EXIT_PREEMPTED)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NonFiniteTraining(SystemExit):
    """The run stopped after too many consecutive non-finite steps; the last good checkpoint is ``latest``."""

    def __init__(self, message: str):
        super().__init__(EXIT_NONFINITE)
        self.message = message

    def __str__(self) -> str:
        return self.message


class NonFiniteModelError(RuntimeError):
    """Raised instead of exporting (or pushing) a network with NaN or Inf weights."""


class StopRequest:
    """Signal handlers that record a stop request; use as a context manager around the training.

    Inside the block the first of :data:`STOP_SIGNALS` sets :attr:`signal_number` (the loop polls it); a second
    one ends the process at once with :data:`EXIT_PREEMPTED`. The previous handlers come back on exit. Outside
    the main thread (where Python cannot install handlers) it does nothing.
    """

    def __init__(self):
        self.signal_number: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_number is not None:
            os.write(
                2, f"\nsignal {signum} again: exiting now (the last complete checkpoint stays)\n".encode()
            )
            os._exit(EXIT_PREEMPTED)
        self.signal_number = signum
        os.write(
            2,
            f"\nsignal {signum}: finishing the step, saving a checkpoint, then exiting (again: now)\n".encode(),
        )

    def __enter__(self) -> StopRequest:
        self.signal_number = None  # a new training starts without the last one's request
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


__all__ = [
    "EXIT_NONFINITE",
    "EXIT_PREEMPTED",
    "NonFiniteModelError",
    "NonFiniteTraining",
    "Preempted",
    "STOP_SIGNALS",
    "StopRequest",
]
