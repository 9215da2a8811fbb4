"""One run per output folder: a new run never writes over a finished or running one by accident, and two runs
never write one folder at once.

- A new run (no ``--resume_from_checkpoint``) into a folder that already holds a run (an exported model,
  ``metrics.json`` or checkpoints) is refused unless ``--overwrite_output_dir`` (transformers' convention), which
  removes the previous run's checkpoints first so that a later ``latest`` / ``auto`` cannot resume from them.
- While a run trains, its main process holds an exclusive ``flock`` on ``<output_dir>/.cpsl-run.lock``, a file
  naming the host and process. A second run into the folder (new or resuming) is refused with that name. The
  operating system drops the lock when the process dies (even on ``kill -9``), so a stale lock file never blocks
  a requeued job. (``flock`` is advisory and local to the file system's host: on network file systems without
  lock support two machines could still both proceed; the host in the file then says who was first.)
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path

from .arguments import ConfigurationError

logger = logging.getLogger(__name__)

LOCK_FILE = ".cpsl-run.lock"
RUN_MARKERS = ("metrics.json", "model.safetensors", "checkpoints")
"""What a folder holding a run contains (any of them): the export, the metrics, checkpoints."""


class OutputFolderError(ConfigurationError):
    """The output folder cannot take this run; the message names ``--output_dir``, says why and what to pass
    instead (a configuration error: the scripts report it in one line)."""


def existing_run(output_dir: Path) -> list[str]:
    """The names of :data:`RUN_MARKERS` present in ``output_dir`` (an empty ``checkpoints/`` does not count)."""
    found = []
    for name in RUN_MARKERS:
        path = output_dir / name
        if path.is_dir() and any(path.iterdir()) or path.is_file():
            found.append(name)
    return found


def check_new_run(output_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Refuse a fresh run into a folder that holds one, unless ``overwrite`` (then remove its checkpoints)."""
    found = existing_run(output_dir)
    if not found or resuming:
        return
    if not overwrite:
        raise OutputFolderError(
            f"--output_dir {output_dir}: holds a run already ({', '.join(found)}); pass "
            "--resume_from_checkpoint auto to continue it, --overwrite_output_dir to start again in it, or "
            "another --output_dir"
        )
    checkpoints = output_dir / "checkpoints"
    if checkpoints.is_dir():
        shutil.rmtree(checkpoints)
        logger.warning("--overwrite_output_dir: removed the previous run's checkpoints in %s", checkpoints)


class RunFolderLock:
    """An exclusive lock on ``output_dir`` for the lifetime of a run (main process only).

    Args:
        output_dir: the run's output folder (created if missing).
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._handle = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputFolderError` naming the host and process that hold it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise OutputFolderError(
                    f"--output_dir {self.path.parent}: another run is writing to it ({holder}); wait for it to "
                    "end or choose another --output_dir"
                ) from None
            if self.path.exists() and os.fstat(handle.fileno()).st_ino == os.stat(self.path).st_ino:
                break
            handle.close()  # the holder removed the file between our open and our lock: take the new one
        handle.seek(0)
        handle.truncate()
        handle.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        """Drop the lock and remove the file (a no-op when not held)."""
        if self._handle is None:
            return
        self.path.unlink(missing_ok=True)
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        self._handle.close()
        self._handle = None
