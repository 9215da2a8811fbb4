"""What a model card may say about where a run came from, without leaking the author's file system.

- :func:`hub_base_model`: the Hub repo a run's weights descend from (``nvidia/mit-b5``, or the Hub model it
  continued from, followed through local warm-up folders), or ``None``; never a local path.
- :func:`card_dataset_ids` / :func:`dataset_display_name`: the datasets' names for the card's metadata and text
  (Hub ids of pushed prepared datasets; the official dataset a local prepared folder was made from).
- :func:`local_paths` and :func:`redact_local_paths`: every absolute local path a run's records hold, and text
  with each of them replaced by ``<local>/NAME``; what :func:`cpsl_hf.hub.push_checkpoint` applies to every text
  file it uploads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cpsl_hf.data.registry import DATASET_SPECS, dataset_kind, is_hub_repo_id

#: Where the trainer keeps the run's record in a model folder (also read by :mod:`cpsl_hf.hub`).
METRICS_FILENAME = "metrics.json"

#: Text files (by suffix) that :func:`redact_local_paths` is applied to before a push; others are binary.
TEXT_SUFFIXES = (".json", ".md", ".txt", ".yaml", ".yml", ".py", ".csv", ".jinja", ".cfg", ".toml")

REDACTED_PREFIX = "<local>/"


def _card_metadata(folder: Path) -> dict[str, Any]:
    """The YAML metadata of ``folder/README.md`` (a model card), or ``{}``."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    from huggingface_hub import metadata_load

    try:
        return metadata_load(readme) or {}
    except Exception:  # a README without valid metadata says nothing about provenance
        return {}


def _recorded_base_model(folder: Path) -> str | None:
    """The base model a CPSL model folder records: its trainer's ``metrics.json`` (``training.base_model``), else
    its card's ``base_model`` (a folder downloaded from the Hub)."""
    metrics = folder / METRICS_FILENAME
    if metrics.is_file():
        try:
            training = json.loads(metrics.read_text(encoding="utf-8")).get("training") or {}
        except (OSError, json.JSONDecodeError, AttributeError):
            training = {}
        if "base_model" in training:
            recorded = training["base_model"]
            return recorded if isinstance(recorded, str) and is_hub_repo_id(recorded) else None
    recorded = _card_metadata(folder).get("base_model")
    if isinstance(recorded, list):
        recorded = recorded[0] if len(recorded) == 1 else None
    return recorded if isinstance(recorded, str) and is_hub_repo_id(recorded) else None


def hub_base_model(backbone: str, model_name_or_path: str | None, presets: Iterable[str]) -> str | None:
    """The Hub repo id the run's weights descend from, or ``None`` (random init, or an unknown local origin).

    Args:
        backbone: ``--backbone``: a preset name (random weights: ``None``), a Hub id of a pretrained encoder (that
            id) or a local encoder folder (``None``: its origin is unknown).
        model_name_or_path: ``--model_name_or_path``: a Hub id (that id), a local CPSL folder (what it records:
            the base model of the run that wrote it, so a chain warm-up folder -> CPSL keeps ``nvidia/mit-b5``),
            or ``None`` (then ``backbone`` decides).
        presets: the preset names.
    """
    if model_name_or_path is not None:
        if os.path.isdir(model_name_or_path):
            return _recorded_base_model(Path(model_name_or_path))
        return model_name_or_path if is_hub_repo_id(model_name_or_path) else None
    if backbone in set(presets) or os.path.isdir(backbone):
        return None
    return backbone if is_hub_repo_id(backbone) else None


def _prepared_kind(folder: str) -> str | None:
    """The official dataset (``gta5``, ...) a local folder written by ``scripts/prepare_dataset.py`` holds."""
    from cpsl_hf.data.readers import PREPARED_INFO_FILE

    try:
        kind = json.loads((Path(folder) / PREPARED_INFO_FILE).read_text(encoding="utf-8")).get("dataset")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return kind if isinstance(kind, str) and kind in DATASET_SPECS else None


def _named_by(name: str, directory: str | None) -> str:
    """What the dataset argument pair designates: a ``prepared`` dataset given with ``--source_dir`` is its folder or
    Hub id."""
    return directory if name == "prepared" and directory else name


def dataset_display_name(name: str, directory: str | None = None) -> str:
    """How the card's text names a dataset: GTA5, SYNTHIA, Cityscapes, ``synthetic``; your own folder (``folder``
    with ``directory``) as ``NAME (folder)``; a Hub id as it is; a local prepared folder as the official dataset it
    was made from (else its folder name), never its path."""
    if name == "folder" and directory:
        return f"{Path(directory).name} (folder)"
    name = _named_by(name, directory)
    kind = dataset_kind(name)
    if kind in DATASET_SPECS:
        return DATASET_SPECS[kind].display_name
    if kind == "prepared_dir":
        prepared = _prepared_kind(name)
        return DATASET_SPECS[prepared].display_name if prepared else Path(name).name
    return name


#: Dataset names that are no dataset on the Hub: the built-in shift, your own folder, a bare "prepared".
_NOT_ON_THE_HUB = ("synthetic", "folder", "prepared", "unknown")


def card_dataset_ids(datasets: Iterable[str | tuple[str, str | None]]) -> list[str]:
    """The card metadata's ``datasets``: the official datasets by name (``gta5``, ``cityscapes``), a pushed
    prepared dataset by its Hub id, a local prepared folder by the official dataset it holds; the built-in
    synthetic shift, your own folders and folders of unknown origin are left out (they are no dataset on the Hub).
    Each entry is a name or a ``(name, data_dir)`` pair (``--source`` with ``--source_dir``)."""
    ids: list[str] = []
    for entry in datasets:
        name, directory = (entry, None) if isinstance(entry, str) else entry
        name = _named_by(name, directory)
        kind = dataset_kind(name)
        if kind in _NOT_ON_THE_HUB:
            continue
        found = kind if kind in DATASET_SPECS else (name if kind == "hub" else _prepared_kind(name))
        if found and found not in ids:
            ids.append(found)
    return ids


def _collect_strings(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _collect_strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _collect_strings(item)


def local_paths(records: Any, folder: str | os.PathLike | None = None) -> list[str]:
    """Absolute local paths to hide: every string in ``records`` (e.g. a run's arguments) that is an absolute path
    or names an existing file or folder (then also its absolute, resolved form), ``folder`` itself, the working
    directory and the home directory; longest first, so that :func:`redact_local_paths` replaces a path before
    any folder above it."""
    found: set[str] = set()

    def add(path: str) -> None:
        for form in (os.path.abspath(path), os.path.realpath(path)):
            if form not in ("/", ""):
                found.add(form)

    for text in _collect_strings(records):
        if os.path.isabs(text) or ((os.sep in text or "." in text) and os.path.exists(text)):
            add(text)
    if folder is not None:
        add(os.fspath(folder))
    add(os.getcwd())
    add(os.path.expanduser("~"))
    return sorted(found, key=len, reverse=True)


def redact_local_paths(text: str, paths: Iterable[str]) -> str:
    """``text`` with each of ``paths`` (and anything below it) replaced by ``<local>/NAME``, NAME the path's last
    part: ``/home/me/runs/warm_s0/x.json`` with ``/home/me/runs/warm_s0`` listed becomes ``<local>/warm_s0/x.json``.
    ``paths`` must be longest first (:func:`local_paths`)."""
    for path in paths:
        if path in text:
            text = text.replace(path, REDACTED_PREFIX + (Path(path).name or "root"))
    return text


def leaked_paths(text: str, paths: Iterable[str]) -> list[str]:
    """Which of ``paths`` occur in ``text`` (after redaction, none should)."""
    return [path for path in paths if path in text]


__all__ = [
    "TEXT_SUFFIXES",
    "card_dataset_ids",
    "dataset_display_name",
    "hub_base_model",
    "leaked_paths",
    "local_paths",
    "redact_local_paths",
]
