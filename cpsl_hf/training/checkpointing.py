"""Atomic, resumable training checkpoints.

A checkpoint is a folder ``output_dir/checkpoints/checkpoint-<step>`` holding

- what ``accelerator.save_state`` writes: student weights, optimizer, LR scheduler, the RNG states of every
  process (``random_states_<rank>.pkl``), gradient scaler;
- ``trainer_state.pt`` (main process): the EMA teacher, the self-labeling core (memory bank, class prior),
  step, stage, the evaluations so far;
- ``process_state_<rank>.pt`` (every process): its data-loader positions and augmentation generator;
- ``COMPLETE``: written last.

Everything is first written to ``.checkpoint-<step>.tmp`` and renamed (``os.replace``, atomic on POSIX)
only after every process finished writing and the marker exists, so a save killed half-way leaves no
folder that :func:`find_latest_checkpoint` or ``--resume_from_checkpoint latest`` would pick.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    """``output_dir/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def is_complete(path: str | os.PathLike) -> bool:
    """True for a folder named ``checkpoint-<step>`` that holds the completion marker."""
    path = Path(path)
    return (
        path.is_dir()
        and CHECKPOINT_PATTERN.match(path.name) is not None
        and (path / COMPLETE_MARKER).is_file()
    )


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``output_dir/checkpoints``, oldest (lowest step) first."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if is_complete(p)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``--resume_from_checkpoint`` -> a complete checkpoint folder (or None when not resuming).

    ``latest`` picks the newest complete checkpoint of ``output_dir`` (None when there is none yet, so the same
    command starts fresh the first time and resumes afterwards). An explicit folder must be complete.
    """
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        return find_latest_checkpoint(output_dir)
    path = Path(resume_from_checkpoint)
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {str(path)!r}: not a complete checkpoint (no {COMPLETE_MARKER} marker; "
            "the save that wrote it did not finish)"
        )
    return path


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    trainer_state: dict[str, Any],
    process_state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically; every process must call it.

    Args:
        accelerator: the run's ``Accelerator`` (its ``save_state`` stores model, optimizer, scheduler, RNG).
        output_dir: the run's output folder (checkpoints go to ``output_dir/checkpoints``).
        step: global step (number of optimisation steps done).
        trainer_state: written once by the main process (teacher, SL core, step, stage, ...).
        process_state: written by every process (its loader positions, generators).
        total_limit: keep only the newest K complete checkpoints.

    Returns:
        The final checkpoint folder.
    """
    root = checkpoints_root(output_dir)
    final = root / f"checkpoint-{step}"
    temporary = root / f".checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir()
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(temporary))
        torch.save(process_state, temporary / f"process_state_{accelerator.process_index}.pt")
        if accelerator.is_main_process:
            torch.save(trainer_state, temporary / TRAINER_STATE)
    finally:
        # All processes reach the barrier even if one failed, so none waits for ever on the others.
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        expected = [temporary / f"process_state_{rank}.pt" for rank in range(accelerator.num_processes)]
        missing = [p.name for p in expected + [temporary / TRAINER_STATE] if not p.is_file()]
        if missing:
            raise RuntimeError(f"checkpoint {temporary}: files missing after the save: {missing}")
        (temporary / COMPLETE_MARKER).write_text(f"step {step}\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore what ``accelerator.save_state`` wrote and return ``(trainer_state, process_state)``.

    ``process_state`` is this process's own file; a checkpoint written by a different number of processes is
    refused (loader shards and RNG streams would not line up).
    """
    path = Path(path)
    own = path / f"process_state_{accelerator.process_index}.pt"
    written_by = len(list(path.glob("process_state_*.pt")))
    if written_by != accelerator.num_processes:
        raise ValueError(
            f"--resume_from_checkpoint {str(path)!r}: written by {written_by} process(es), "
            f"this run has {accelerator.num_processes}"
        )
    accelerator.load_state(str(path))
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    process_state = torch.load(own, map_location="cpu", weights_only=False)
    return trainer_state, process_state
