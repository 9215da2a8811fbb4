"""Atomic, verified, pickle-free training checkpoints.

A checkpoint is a folder ``output_dir/checkpoints/checkpoint-<step>`` holding

- what ``accelerator.save_state`` writes: student weights (safetensors), optimizers, LR schedulers, gradient scaler
  (all plain tensors and numbers; accelerate loads them with ``weights_only=True``);
- ``trainer_state.pt`` (main process): every stage's state (EMA teacher, self-labeling core, frozen models,
  offline pseudo-labels), step, stage, the evaluations so far and the arguments;
- ``process_state_<rank>.pt`` (every process): its data-loader positions, augmentation generator and
  pseudo-label monitor;
- ``rng_state_<rank>.pt`` (every process): the Python, NumPy, torch CPU and CUDA random states and
  accelerate's step counter, as tensors and numbers. Accelerate's own ``random_states_<rank>.pkl`` is removed:
  it holds NumPy objects that plain ``torch.load(weights_only=True)`` refuses, and ``accelerate`` offers no
  switch to leave it out (its ``load_state`` then logs "Could not load random states" and this module restores
  them instead). Random states of other accelerators (XPU, MLU, HPU, XLA, ...) are not saved;
- ``COMPLETE``: written last, a JSON manifest of every other file with its size and SHA-256.

Nothing in a checkpoint needs pickle: every ``.pt`` / ``.bin`` file loads with ``torch.load(...,
weights_only=True)`` (and is loaded that way), the weights with safetensors, so a downloaded checkpoint folder
cannot run code when it is resumed. What accelerate (1.15) itself loads: its ``load`` uses ``weights_only=True``
(passed explicitly here) and, while it loads, allow-lists a few NumPy reconstructors (``ndarray``, ``dtype``,
``codecs.encode``) for its RNG file, which is no longer there; it unpickles freely only objects registered with
``register_for_checkpointing`` and the sampler of loaders it prepared, and this package uses neither.

Everything is first written to ``.checkpoint-<step>.tmp`` and renamed (``os.replace``, atomic on POSIX) only
after every process finished writing and the manifest exists, so a save killed half-way leaves no folder that
``--resume_from_checkpoint latest`` would pick; a save that fails (disk full, permissions) raises
:class:`CheckpointSaveError` naming the previous checkpoint, which is untouched (old checkpoints are pruned
only after the new one is complete).

A checkpoint is *valid* when its manifest exists and every listed file exists with the listed size and
checksum (:func:`verify_checkpoint`). SHA-256 was measured at 1.1 GB/s on this project's 2-core CPU (SHA-NI;
blake2b 0.5 GB/s, md5 0.6 GB/s), under a second per GB, small next to writing the file, so no weaker checksum
is used. ``latest`` / ``auto`` take the newest valid checkpoint and skip damaged ones with a warning. A
checkpoint written before the manifest existed (``COMPLETE`` without a file list) cannot be verified and is
treated as invalid (skipped with a warning by ``latest`` / ``auto``, refused when named); its RNG states also
live only in accelerate's pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
MANIFEST_FORMAT = 1
CHECKSUM = "sha256"
_ACCELERATE_RNG_FILE = "random_states_{rank}.pkl"


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written; the previous checkpoints are untouched."""


def checkpoints_root(output_dir: str | os.PathLike) -> Path:
    """``output_dir/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def process_state_name(rank: int) -> str:
    return f"process_state_{rank}.pt"


def rng_state_name(rank: int) -> str:
    return f"rng_state_{rank}.pt"


def is_complete(path: str | os.PathLike) -> bool:
    """True for a folder named ``checkpoint-<step>`` that holds the completion marker (not verified)."""
    path = Path(path)
    return (
        path.is_dir()
        and CHECKPOINT_PATTERN.match(path.name) is not None
        and (path / COMPLETE_MARKER).is_file()
    )


def _step_of(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.name).group(1))


def _candidates(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-<step>`` folder under ``output_dir/checkpoints``, oldest first (complete or not)."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=_step_of)


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints (marker present, not verified) under ``output_dir/checkpoints``, oldest first."""
    return [p for p in _candidates(output_dir) if is_complete(p)]


def file_checksum(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 8 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(8 << 20):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike, step: int, num_processes: int) -> dict[str, Any]:
    """Write ``COMPLETE``: every file under ``folder`` (relative POSIX path) with its size and checksum."""
    folder = Path(folder)
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE_MARKER):
        files[path.relative_to(folder).as_posix()] = {
            "size": path.stat().st_size,
            CHECKSUM: file_checksum(path),
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "step": step,
        "num_processes": num_processes,
        "checksum": CHECKSUM,
        "files": files,
    }
    (folder / COMPLETE_MARKER).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's manifest; ``ValueError`` saying why when there is none or it is not one."""
    marker = Path(path) / COMPLETE_MARKER
    if not marker.is_file():
        raise ValueError(f"no {COMPLETE_MARKER} marker (the save that wrote it did not finish)")
    try:
        manifest = json.loads(marker.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ValueError(
            f"its {COMPLETE_MARKER} marker lists no files: written by a cpsl-hf version before checkpoints "
            "recorded their files and checksums, so it cannot be verified (resume it with that version)"
        )
    return manifest


def checkpoint_problems(path: str | os.PathLike, checksums: bool = True) -> list[str]:
    """What is wrong with the checkpoint folder ``path`` (empty when valid): the manifest, then for every listed
    file whether it is missing, has another size or (when ``checksums``) another checksum."""
    path = Path(path)
    if not path.is_dir():
        return [f"{path} is not a folder"]
    try:
        manifest = read_manifest(path)
    except ValueError as error:
        return [str(error)]
    problems = []
    for name, expected in manifest["files"].items():
        file = path / name
        if not file.is_file():
            problems.append(f"{name}: missing")
            continue
        size = file.stat().st_size
        if size != expected["size"]:
            problems.append(
                f"{name}: expected {expected['size']} bytes, found {size} (truncated or overwritten)"
            )
        elif checksums and file_checksum(file) != expected[CHECKSUM]:
            problems.append(f"{name}: {CHECKSUM} checksum mismatch (expected {expected[CHECKSUM]})")
    return problems


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise ``ValueError`` naming every problem of the checkpoint ``path`` (see :func:`checkpoint_problems`)."""
    problems = checkpoint_problems(path)
    if problems:
        raise ValueError(f"checkpoint {str(path)!r} is damaged or incomplete: " + "; ".join(problems))


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The valid checkpoint with the highest step, or None; newer damaged ones are skipped with a warning that
    names the checkpoint and what is wrong."""
    for path in reversed(_candidates(output_dir)):
        problems = checkpoint_problems(path)
        if not problems:
            return path
        logger.warning("skipping checkpoint %s: %s", path, "; ".join(problems))
    return None


def resolve_checkpoint(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """``--resume_from_checkpoint`` -> a valid checkpoint folder (or None when not resuming).

    ``latest`` and ``auto`` (the same; ``auto`` says what a requeued job script wants) pick the newest valid
    checkpoint of ``output_dir``, skipping damaged ones with a warning, and return None (start fresh, logged)
    when ``output_dir`` has no checkpoint yet, so the same command starts the first time and resumes afterwards.
    When it has checkpoints but none is valid, that is an error: starting fresh would silently discard the run.
    An explicit folder must be valid; the error says which file is wrong and how.

    Under data parallelism the main process verifies (reading every file once) and tells the others.
    """
    if resume_from_checkpoint is None:
        return None
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        world = torch.distributed.get_world_size()
        if world > 1:
            answer = [None]
            if torch.distributed.get_rank() == 0:
                try:
                    found = _resolve(resume_from_checkpoint, output_dir)
                    answer = [("ok", None if found is None else str(found))]
                except ValueError as error:
                    answer = [("error", str(error))]
            torch.distributed.broadcast_object_list(answer, src=0)
            kind, value = answer[0]
            if kind == "error":
                raise ValueError(value)
            return None if value is None else Path(value)
    return _resolve(resume_from_checkpoint, output_dir)


def _resolve(resume_from_checkpoint: str, output_dir: str | os.PathLike) -> Path | None:
    option = f"--resume_from_checkpoint {resume_from_checkpoint}"
    if resume_from_checkpoint in ("latest", "auto"):
        found = find_latest_checkpoint(output_dir)
        if found is not None:
            logger.info("%s: resuming from %s", option, found)
            return found
        existing = _candidates(output_dir)
        if existing:
            raise ValueError(
                f"{option}: none of the checkpoints in {checkpoints_root(output_dir)} is valid "
                f"({', '.join(p.name for p in existing)}; the warnings above say why); refusing to start fresh "
                "over them: remove them or name a checkpoint"
            )
        logger.info("%s: no checkpoint in %s yet, starting fresh", option, checkpoints_root(output_dir))
        return None
    path = Path(resume_from_checkpoint)
    problems = checkpoint_problems(path)
    if problems:
        raise ValueError(f"{option}: not a valid checkpoint: " + "; ".join(problems))
    return path


# ------------------------------------------------------------------ random states, without pickle
def rng_state(accelerator) -> dict[str, Any]:
    """This process's random states and accelerate's step counter as tensors and plain numbers."""
    version, internal, gauss_next = random.getstate()
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state(legacy=True)  # noqa: NPY002 (the global one)
    state = {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss_next,
        },
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "accelerator_step": int(accelerator.step),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(accelerator, state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    python = state["python"]
    random.setstate((python["version"], tuple(python["internal"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(  # noqa: NPY002
        (numpy["kind"], keys, numpy["position"], numpy["has_gauss"], numpy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    accelerator.step = state["accelerator_step"]


# ------------------------------------------------------------------ save and load
def _all_succeeded(accelerator, ok: bool) -> bool:
    """Whether every process succeeded (every process must call it)."""
    if accelerator.num_processes == 1:
        return ok
    flags = accelerator.reduce(torch.tensor([int(ok)], device=accelerator.device), reduction="sum")
    return int(flags.item()) == accelerator.num_processes


def _previous_note(output_dir) -> str:
    previous = list_checkpoints(output_dir)
    if not previous:
        return "there is no previous checkpoint"
    return f"the previous checkpoint {previous[-1]} is intact and --resume_from_checkpoint latest resumes from it"


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    step: int,
    trainer_state: dict[str, Any],
    process_state: dict[str, Any],
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically with its manifest; every process must call it.

    Args:
        accelerator: the run's ``Accelerator`` (its ``save_state`` stores model, optimizers, schedulers, scaler).
        output_dir: the run's output folder (checkpoints go to ``output_dir/checkpoints``).
        step: global step (number of optimisation steps done).
        trainer_state: written once by the main process (stages' states, step, history, ...): tensors and plain
            Python values only, so that it loads with ``weights_only=True``.
        process_state: written by every process (its loader positions, generators), same rule.
        total_limit: keep only the newest K complete checkpoints (pruned once the new one is complete).

    Returns:
        The final checkpoint folder.

    Raises:
        CheckpointSaveError: on every process when writing failed on any (disk full, permissions, ...); the
            partial folder is removed and the message names the previous checkpoint, which is untouched.
    """
    root = checkpoints_root(output_dir)
    final = root / f"checkpoint-{step}"
    temporary = root / f".checkpoint-{step}.tmp"
    rank = accelerator.process_index
    error: BaseException | None = None
    if accelerator.is_main_process:
        try:
            root.mkdir(parents=True, exist_ok=True)
            if temporary.exists():
                shutil.rmtree(temporary)
            temporary.mkdir()
        except OSError as caught:
            error = caught
    accelerator.wait_for_everyone()
    try:
        if _all_succeeded(accelerator, error is None):
            try:
                rng = rng_state(accelerator)  # before save_state, as accelerate takes its own
                accelerator.save_state(str(temporary))
                # accelerate's pickled RNG file: replaced by the tensor-only rng_state_<rank>.pt
                (temporary / _ACCELERATE_RNG_FILE.format(rank=rank)).unlink(missing_ok=True)
                torch.save(rng, temporary / rng_state_name(rank))
                torch.save(process_state, temporary / process_state_name(rank))
                if accelerator.is_main_process:
                    torch.save(trainer_state, temporary / TRAINER_STATE)
            except Exception as caught:  # noqa: BLE001 (reported below, on every process)
                error = caught
    finally:
        # All processes reach the barrier even if one failed (or is being killed), so none waits for ever.
        accelerator.wait_for_everyone()
    if _all_succeeded(accelerator, error is None) and accelerator.is_main_process:
        try:
            _finish(accelerator, temporary, final, step)
        except Exception as caught:  # noqa: BLE001
            error = caught
    if not _all_succeeded(accelerator, error is None):
        if accelerator.is_main_process:
            shutil.rmtree(temporary, ignore_errors=True)  # may be what fills the disk
        accelerator.wait_for_everyone()
        cause = f"{type(error).__name__}: {error}" if error is not None else "it failed on another process"
        raise CheckpointSaveError(
            f"saving checkpoint-{step} to {root} failed ({cause}); {_previous_note(output_dir)}"
        ) from error
    if accelerator.is_main_process and total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _finish(accelerator, temporary: Path, final: Path, step: int) -> None:
    """Main process, after every process wrote its files: check them, write the manifest, rename."""
    expected = [TRAINER_STATE] + [
        name(rank)
        for rank in range(accelerator.num_processes)
        for name in (process_state_name, rng_state_name)
    ]
    missing = [name for name in expected if not (temporary / name).is_file()]
    if missing:
        raise RuntimeError(f"files missing after the save: {missing}")
    write_manifest(temporary, step, accelerator.num_processes)
    if not final.exists():
        os.replace(temporary, final)
        return
    # A checkpoint of the same step exists (a rerun): keep it until the new one is in place.
    aside = final.with_name(f".{final.name}.old")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(final, aside)
    try:
        os.replace(temporary, final)
    except OSError:
        os.replace(aside, final)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def load_checkpoint(accelerator, path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore what ``accelerator.save_state`` wrote and this process's random states; return
    ``(trainer_state, process_state)``.

    ``path`` is checked against its manifest by size (:func:`resolve_checkpoint` also verified the checksums);
    every file loads without pickle (``weights_only=True``, safetensors). ``process_state`` is this process's own
    file; a checkpoint written by a different number of processes is refused (loader shards and RNG streams
    would not line up).
    """
    path = Path(path)
    problems = checkpoint_problems(path, checksums=False)
    if problems:
        raise ValueError(
            f"--resume_from_checkpoint {str(path)!r}: not a valid checkpoint: " + "; ".join(problems)
        )
    written_by = read_manifest(path)["num_processes"]
    if written_by != accelerator.num_processes:
        raise ValueError(
            f"--resume_from_checkpoint {str(path)!r}: written by {written_by} process(es), "
            f"this run has {accelerator.num_processes}"
        )
    rank = accelerator.process_index
    accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    set_rng_state(accelerator, torch.load(path / rng_state_name(rank), map_location="cpu", weights_only=True))
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=True)
    process_state = torch.load(path / process_state_name(rank), map_location="cpu", weights_only=True)
    return trainer_state, process_state


__all__ = [
    "CheckpointSaveError",
    "checkpoint_problems",
    "find_latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
]
