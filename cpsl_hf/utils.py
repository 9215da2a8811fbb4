"""Small helpers every layer shares: JSON-ready values, percentages, the autocast dtype, progress bars and
folders written atomically.

Only the standard library is imported here (``torch`` and ``tqdm`` inside the functions that need them), so
any module of the package, down to ``cpsl_hf.data``, can use it.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "AUTOCAST_DTYPES",
    "MissingPathError",
    "UsageError",
    "atomic_directory",
    "autocast_dtype",
    "format_percent",
    "json_ready",
    "progress",
]


class UsageError(ValueError):
    """A bad argument value, found before any work starts: a path that is not what it must be, a model that
    does not fit the data, an empty input. The message starts with the argument (``--model PATH: ...``);
    the scripts exit with status 2 on it, as ``argparse`` does for its own usage errors (:mod:`cpsl_hf.cli`)."""


class MissingPathError(UsageError, FileNotFoundError):
    """A path argument that does not exist (a :class:`UsageError` that is also a ``FileNotFoundError``)."""


def json_ready(value: Any) -> Any:
    """``value`` as plain JSON data: NaN floats become ``None``; tensors and numpy arrays or scalars become
    (nested) lists or numbers, converted the same way; tuples become lists. Dicts keep their keys.

    ``json.dumps(json_ready(metrics), allow_nan=False)`` then writes strict JSON (``null`` for an undefined IoU).
    """
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if hasattr(value, "tolist"):  # torch.Tensor, numpy arrays and scalars
        return json_ready(value.tolist())
    return value


def format_percent(value: Any, digits: int = 2) -> str:
    """A fraction as a percentage with ``digits`` decimals (``0.4567`` -> ``"45.67"``); ``"n/a"`` for ``None``
    or NaN (a class with no IoU). Accepts Python, numpy and 0-dim torch numbers."""
    if value is None:
        return "n/a"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    return f"{100 * value:.{digits}f}"


AUTOCAST_DTYPES: tuple[str, ...] = ("no", "fp16", "bf16")
"""The ``--mixed_precision`` values :func:`autocast_dtype` understands."""


def autocast_dtype(mixed_precision: str):
    """``--mixed_precision`` -> the ``torch.autocast`` dtype: ``"no"`` -> ``None``, ``"fp16"`` ->
    ``torch.float16``, ``"bf16"`` -> ``torch.bfloat16``. Raises ``ValueError`` naming the choices otherwise."""
    import torch

    dtypes = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}
    if mixed_precision not in dtypes:
        raise ValueError(
            f"--mixed_precision {mixed_precision!r}: expected one of {', '.join(AUTOCAST_DTYPES)}"
        )
    return dtypes[mixed_precision]


def progress(
    iterable: Iterable | None,
    enabled: bool,
    description: str,
    total: int | None = None,
    unit: str = "it",
    leave: bool = True,
    initial: int = 0,
):
    """A ``tqdm`` progress bar over ``iterable`` when ``enabled``, else ``iterable`` itself (``tqdm`` is not
    even imported).

    Args:
        iterable: what to iterate; ``None`` for a bar advanced by hand with ``.update()`` (then ``None`` is
            returned when disabled).
        enabled: show the bar (callers pass ``False`` on every process but the main one). The Hugging Face
            stack's ``HF_HUB_DISABLE_PROGRESS_BARS=1`` hides it too.
        description: the bar's label.
        total: number of items (default: ``len(iterable)`` when it has one, else unknown).
        unit: what one item is ("sample", "batch", ...).
        leave: keep the finished bar on screen.
        initial: items already done (a resumed run).
    """
    if not enabled or os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    ):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(
        iterable,
        total=total,
        desc=description,
        unit=unit,
        leave=leave,
        initial=initial,
        dynamic_ncols=True,
    )


@contextmanager
def atomic_directory(
    final_path: str | os.PathLike, keep_existing: Callable[[Path], bool] | None = None
) -> Iterator[Path]:
    """Write a folder that readers only ever see complete.

    Yields a new temporary folder beside ``final_path`` (``.NAME-XXXXXXXX`` in the same parent, so the rename
    stays on one file system). When the body completes the temporary folder is renamed to ``final_path``
    (``os.replace``, atomic on POSIX); when the body raises, or the rename fails, it is removed and the
    exception propagates, leaving ``final_path`` as it was.

    Args:
        final_path: the folder to create; its parent is created if needed.
        keep_existing: what to do when ``final_path`` already exists at the rename. ``None`` (default):
            replace it. A predicate: keep the existing folder, and discard the new one, when
            ``keep_existing(final_path)`` is true (a cache keyed by its content, which a concurrent writer
            finished first); otherwise the rename's ``OSError`` propagates.

    Example::

        with atomic_directory(cache / key) as scratch:
            dataset.save_to_disk(str(scratch))
    """
    final = Path(final_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        yield temporary
        if keep_existing is None and final.exists():
            shutil.rmtree(final)
        try:
            os.replace(temporary, final)
        except OSError:
            if keep_existing is None or not (final.is_dir() and keep_existing(final)):
                raise
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
