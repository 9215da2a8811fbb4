"""How many CPU threads a training process uses (``--cpu_threads auto|N``).

``accelerate launch`` without an accelerate config on a machine without a GPU resolves ``--num_processes`` to 0,
so its own CPU-thread heuristic never runs, and it exports ``OMP_NUM_THREADS=1`` to the training process: the
README's main command would train on one core. ``torchrun`` does the same whenever it starts more than one
process. Neither value was chosen by the user, so ``auto`` overrides it:

- ``N``: ``torch.set_num_threads(N)``, whatever the environment says.
- ``auto`` (the default): a value the user chose is respected: ``OMP_NUM_THREADS`` in the environment the
  launcher was started from (read from ``/proc/<launcher pid>/environ``), a launcher's value other than its
  fallback ``1`` (``accelerate launch --num_cpu_threads_per_process N``, or accelerate's own heuristic), or,
  without a launcher, ``OMP_NUM_THREADS`` in the process's environment. Otherwise the process uses the
  physical cores it may run on divided by the processes of this node (``LOCAL_WORLD_SIZE``), at least 1.
  (A launcher's ``--num_cpu_threads_per_process 1`` looks like its fallback: ask for one thread with
  ``--cpu_threads 1``.)

On a GPU the threads only feed data and launch kernels; the setting is left alone there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LAUNCHER_MARKERS = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID")
"""Variables ``accelerate launch`` (every launcher of it) and ``torchrun`` export to the processes they start."""

LAUNCHER_FALLBACK = "1"
"""What both launchers export as ``OMP_NUM_THREADS`` when nobody chose a value."""


@dataclass(frozen=True)
class ThreadChoice:
    """The resolved thread count and why (one line for the log)."""

    threads: int | None  # None: leave torch's setting as it is
    reason: str


def parse_cpu_threads(value: str) -> str | int:
    """``"auto"`` or a positive int; anything else raises ``ValueError`` naming the argument."""
    if value == "auto":
        return value
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1 or str(threads) != str(value).strip():
        raise ValueError(f"--cpu_threads must be 'auto' or a positive integer, got {value!r}")
    return threads


def physical_cores() -> int:
    """Physical cores this process may run on: psutil's physical count, capped by the CPU affinity mask (a
    container or ``taskset`` may allow fewer)."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        allowed = physical
    return max(1, min(physical, allowed))


def launcher_environment(environ=None, parent_pid: int | None = None) -> dict[str, str] | None:
    """The environment the launcher (the parent process) was started with, when this process was started by
    ``accelerate launch`` or ``torchrun``; None without a launcher or when it cannot be read."""
    environ = os.environ if environ is None else environ
    if not any(marker in environ for marker in LAUNCHER_MARKERS):
        return None
    path = Path(f"/proc/{os.getppid() if parent_pid is None else parent_pid}/environ")
    try:
        raw = path.read_bytes()
    except OSError:
        return None
    pairs = (entry.split("=", 1) for entry in raw.decode(errors="replace").split("\0") if "=" in entry)
    return dict(pairs)


def choose_cpu_threads(
    setting: str | int,
    environ=None,
    launcher_env: dict[str, str] | None = None,
    launched: bool | None = None,
    cores: int | None = None,
) -> ThreadChoice:
    """Resolve ``--cpu_threads`` (see the module docstring) without changing anything.

    Args:
        setting: ``"auto"`` or a positive thread count.
        environ: this process's environment (default ``os.environ``).
        launcher_env: the launcher's own environment (default :func:`launcher_environment`; one that cannot be
            read counts as one without ``OMP_NUM_THREADS``).
        launched: whether a launcher started this process (default: its variables are present).
        cores: physical cores available (default :func:`physical_cores`).
    """
    environ = os.environ if environ is None else environ
    if setting != "auto":
        return ThreadChoice(int(setting), f"--cpu_threads {setting}")
    if launched is None:
        launched = any(marker in environ for marker in LAUNCHER_MARKERS)
    own_value = environ.get("OMP_NUM_THREADS")
    if launched:
        if launcher_env is None:
            launcher_env = launcher_environment(environ) or {}
        if "OMP_NUM_THREADS" in launcher_env:
            return ThreadChoice(None, f"OMP_NUM_THREADS={launcher_env['OMP_NUM_THREADS']} set by the user")
        if own_value is not None and own_value != LAUNCHER_FALLBACK:
            return ThreadChoice(None, f"OMP_NUM_THREADS={own_value} chosen through the launcher")
    elif own_value is not None:
        return ThreadChoice(None, f"OMP_NUM_THREADS={own_value} set by the user")
    local_processes = max(1, int(environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    cores = physical_cores() if cores is None else cores
    threads = max(1, cores // local_processes)
    return ThreadChoice(threads, f"auto: {cores} physical cores / {local_processes} local processes")


def configure_cpu_threads(setting: str | int, on_cpu: bool) -> tuple[int, str | None]:
    """Apply ``--cpu_threads`` to this process when it trains on the CPU. Returns torch's thread count and why
    (None on a GPU), for the caller to log once the run's inputs are checked (a bad input stays one line)."""
    import torch

    if not on_cpu:
        return torch.get_num_threads(), None
    choice = choose_cpu_threads(setting)
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)  # for processes this one starts
    return torch.get_num_threads(), choice.reason
