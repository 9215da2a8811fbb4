"""Prepare an official download once: check every pair, convert labels, write parquet shards + a dataset card.

Output folder (also the layout of the Hub dataset repo when pushed)::

    OUTPUT_DIR/
      README.md                                dataset card (YAML configs + protocol, counts, histogram, skips)
      cpsl_prepare.json                        the DataReport of every prepared split, and the shard counts
      data/{split}-00000-of-0000K.parquet      image (original file bytes, embedded), label (train-id PNG), name

The number of shards K is a power of two, so any power-of-two number of processes splits them evenly
(``split_dataset_by_node`` then assigns whole shards). Read it back with
:func:`cpsl_hf.data.load_prepared`, which refuses a split whose shards are not all there.

A split's shards are written under hidden names and renamed into place once all are written, so a stopped
preparation leaves none. :func:`push_prepared` uploads the folder in one commit (all files or none) to a dataset
repo that is private unless asked otherwise (the datasets' licences forbid public redistribution; the card says
so), deleting in the same commit the shards of the pushed splits that the folder no longer holds.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cpsl_hf.utils import MissingPathError, UsageError
from cpsl_hf.utils import progress as progress_bar

from . import protocols
from .readers import (
    PREPARED_INFO_FILE,
    BadSampleError,
    DataReport,
    HubDatasetError,
    _Accumulator,
    _label_lut,
    check_pairs,
    dataset_features,
    http_error_class,
    hub_offline,
    iter_converted,
    scan,
)
from .registry import DOWNLOADS, dataset_spec

TARGET_SHARD_BYTES = 500 * 2**20
MIN_SHARDS = 32  # when there are enough samples: lets up to 32 processes each read whole shards
ROW_GROUP_SIZE = 32  # rows per parquet row group: the unit a streaming reader fetches
INFO_FILE = PREPARED_INFO_FILE


@dataclass
class PrepareResult:
    """What :func:`prepare_dataset` wrote."""

    report: DataReport
    output_dir: Path
    split: str
    shard_files: list[Path]
    url: str | None = None

    def summary(self) -> str:
        lines = [
            self.report.summary(),
            f"wrote {len(self.shard_files)} parquet shard(s) to {self.output_dir}/data/",
        ]
        if self.url:
            lines.append(f"pushed to {self.url}")
        return "\n".join(lines)


def _is_power_of_two(value: int) -> bool:
    return value >= 1 and value & (value - 1) == 0


def _floor_power_of_two(value: int) -> int:
    return 1 << (max(value, 1).bit_length() - 1)


def choose_num_shards(num_samples: int, total_bytes: int) -> int:
    """Power of two: about ``TARGET_SHARD_BYTES`` per shard, at least ``MIN_SHARDS``, never more shards than
    samples."""
    by_size = 1 << max(0, (-(-total_bytes // TARGET_SHARD_BYTES) - 1).bit_length())
    return min(max(by_size, MIN_SHARDS), _floor_power_of_two(num_samples))


def check_hub_access(token: str | None = None) -> str:
    """Fail at once, with a clear message, when the Hub cannot be written to: offline mode, no token, or a token
    the Hub rejects (checked with one ``whoami`` call, before any work). Returns the token."""
    from huggingface_hub import HfApi, get_token

    if hub_offline():
        raise ConnectionError(
            "cannot push to the Hub: HF_HUB_OFFLINE is set (unset it, or drop --push_to_hub)"
        )
    token = token or get_token()
    if not token:
        raise PermissionError(
            "cannot push to the Hub: no token found. Run `hf auth login` or set HF_TOKEN (a write token)."
        )
    try:
        HfApi(token=token).whoami()
    except Exception as error:
        _reraise(_push_error(error), error)
    return token


def _push_error(error: Exception, repo_id: str | None = None) -> Exception:
    """One line for a failed push: a rejected token, a refused repo, an unreachable Hub."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    target = f"the Hub dataset {repo_id!r}" if repo_id else "the Hub"
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status == 401:
        return HubDatasetError(
            f"cannot push to {target}: the Hub at {constants.ENDPOINT} rejected the token (401); set HF_TOKEN to a "
            "write token or run `hf auth login`"
        )
    if isinstance(error, HfHubHTTPError) and status in (403, 404):
        return HubDatasetError(
            f"cannot push to {target}: the Hub refused ({status}: {error.server_message or 'forbidden'}); is the "
            "namespace yours and the token a write token?"
        )
    if isinstance(error, (http_error_class(), ConnectionError)) and not isinstance(error, HfHubHTTPError):
        return ConnectionError(
            f"cannot push to {target}: cannot reach the Hub at {constants.ENDPOINT} ({type(error).__name__}: {error})"
        )
    return error


def _reraise(converted: Exception, error: Exception):
    """Raise ``converted`` (the one-line form of ``error``), or ``error`` itself when it has none."""
    if converted is error:
        raise error
    raise converted from error


def _write_shard(path: Path, rows_iter, schema) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    written, rows = 0, []
    with pq.ParquetWriter(str(path), schema) as writer:
        for row in rows_iter:
            rows.append(row)
            if len(rows) == ROW_GROUP_SIZE:
                writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=ROW_GROUP_SIZE)
                written, rows = written + len(rows), []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=schema), row_group_size=ROW_GROUP_SIZE)
            written += len(rows)
    return written


def prepare_dataset(
    kind: str,
    data_dir,
    output_dir,
    num_classes: int | None = None,
    num_shards: int | None = None,
    split: str | None = None,
    on_bad_sample: str = "raise",
    push_to_hub: str | None = None,
    private: bool = True,
    token: str | None = None,
    num_proc: int | None = None,
    progress: bool = True,
    class_table=None,
) -> PrepareResult:
    """Check, convert and write one split of a download as parquet shards (see the module docstring).

    Args:
        kind: "gta5", "synthia" or "cityscapes" (:data:`cpsl_hf.data.registry.DOWNLOADS`).
        data_dir: the download's root folder (layouts in :data:`cpsl_hf.data.registry.DATASET_SPECS`).
        output_dir: where README.md, cpsl_prepare.json and data/ are written (other splits are kept).
        num_classes: label protocol; default the dataset's (19 for GTA5 and Cityscapes, 16 for SYNTHIA).
        num_shards: a power of two; default from the data size (:func:`choose_num_shards`).
        split: output split name; for Cityscapes also the folder read (default "train"; "val", "test").
        on_bad_sample: "raise" (default) or "skip" (bad pairs are listed in the card).
        push_to_hub: a dataset repo id to upload the folder to (checked before any work).
        private: create the Hub repo private (default: the datasets' licences forbid public redistribution).
        class_table: for ``kind="folder"`` (your own images and masks): the class table (a path or a
            :class:`~cpsl_hf.data.class_table.ClassTable`); see :func:`cpsl_hf.data.folder.prepare_folder`.
    """
    if kind == "folder":
        from .folder import prepare_folder

        if class_table is None:
            raise UsageError("prepare_dataset folder needs --class_table FILE (the classes of its masks)")
        if num_classes is not None:
            raise UsageError(
                "prepare_dataset folder: the classes come from --class_table; drop --num_classes"
            )
        return prepare_folder(
            data_dir,
            output_dir,
            class_table,
            num_shards,
            split,
            on_bad_sample,
            push_to_hub,
            private,
            token,
            progress,
        )
    if kind not in DOWNLOADS:
        raise ValueError(f"unknown dataset {kind!r}; expected one of {sorted(DOWNLOADS)}")
    if on_bad_sample not in ("raise", "skip"):
        raise ValueError(f"on_bad_sample={on_bad_sample!r}; expected 'raise' or 'skip'")
    num_classes = num_classes or dataset_spec(kind).default_num_classes
    protocols.class_names(num_classes)  # validates
    if num_shards is not None and not _is_power_of_two(num_shards):
        raise UsageError(f"--num_shards {num_shards}: must be a power of two (1, 2, 4, ...)")
    if push_to_hub:
        token = check_hub_access(token)
    split = split or "train"
    pairs, orphans = scan(kind, data_dir, split)

    kept, bad = check_pairs(kind, pairs, orphans, on_bad_sample, num_proc, progress)
    if not kept:
        raise BadSampleError(kind, bad)
    total_bytes = sum(os.path.getsize(pair.image_path) for pair in kept)
    if num_shards is None:
        num_shards = choose_num_shards(len(kept), total_bytes)
    elif num_shards > len(kept):
        raise UsageError(f"--num_shards {num_shards}: more than the {len(kept)} samples to write")

    output_dir = Path(output_dir)
    lut, known = _label_lut(kind, num_classes)
    totals = _Accumulator(len(lut), known)
    totals.bad.extend(bad)
    converted_stream = iter(
        progress_bar(
            iter_converted(kind, kept, num_classes, num_proc),
            progress,
            f"writing {kind}",
            total=len(kept),
            unit="sample",
        )
    )

    def rows(count: int):
        for converted in itertools.islice(converted_stream, count):
            totals.add(converted)
            if converted.bad is not None:
                if on_bad_sample == "raise":
                    raise BadSampleError(kind, [converted.bad])
                continue
            yield {
                "image": {
                    "bytes": Path(converted.image_path).read_bytes(),
                    "path": Path(converted.image_path).name,
                },
                "label": {"bytes": converted.label_png, "path": f"{converted.name}_trainIds.png"},
                "name": converted.name,
            }

    shard_files = write_split_shards(
        output_dir, split, len(kept), num_shards, lambda start, stop: rows(stop - start)
    )

    report = DataReport(kind, str(data_dir), split, num_classes, num_found=len(pairs))
    report.skipped, report.num_kept = totals.bad, totals.kept
    totals.fill(report)
    info = _update_info(output_dir, split, report, num_shards, kind)
    (output_dir / "README.md").write_text(render_card(info))
    result = PrepareResult(report, output_dir, split, shard_files)
    if push_to_hub:
        result.url = push_prepared(output_dir, push_to_hub, private=private, token=token)
    return result


def write_split_shards(
    output_dir: Path,
    split: str,
    num_samples: int,
    num_shards: int,
    rows: Callable[[int, int], Iterable[dict]],
) -> list[Path]:
    """Write ``split`` as ``num_shards`` parquet shards ``output_dir/data/{split}-XXXXX-of-YYYYY.parquet`` of
    consecutive, near-equal sample ranges; ``rows(start, stop)`` yields the rows of samples ``start .. stop - 1``
    (in order). Earlier shards of the split are removed first. The shards are written under hidden names and
    renamed once all are written, so an interrupted preparation leaves no shard of the split, never a subset that
    would read as a smaller dataset (``load_prepared`` checks too). Returns the shard paths."""
    data_out = Path(output_dir) / "data"
    data_out.mkdir(parents=True, exist_ok=True)
    for stale in [*data_out.glob(f"{split}-*.parquet"), *data_out.glob(f".{split}-*.parquet.partial")]:
        stale.unlink()
    schema = dataset_features().arrow_schema
    shard_files = []
    bounds = np.linspace(0, num_samples, num_shards + 1).round().astype(int)
    for shard in range(num_shards):
        path = data_out / f"{split}-{shard:05d}-of-{num_shards:05d}.parquet"
        _write_shard(_partial(path), rows(int(bounds[shard]), int(bounds[shard + 1])), schema)
        shard_files.append(path)
    for path in shard_files:
        os.replace(_partial(path), path)
    return shard_files


def _partial(path: Path) -> Path:
    """Where a shard is written before it is renamed into place (hidden: never uploaded, never globbed)."""
    return path.with_name(f".{path.name}.partial")


def _update_info(output_dir: Path, split: str, report: DataReport, num_shards: int, kind: str) -> dict:
    path = output_dir / INFO_FILE
    info = json.loads(path.read_text()) if path.is_file() else {"splits": {}}
    if info.get("dataset") not in (None, kind) or info.get("num_classes") not in (None, report.num_classes):
        raise ValueError(
            f"{output_dir} already holds a {info.get('dataset')} dataset with {info.get('num_classes')} classes; "
            f"use another output_dir for {kind} with {report.num_classes} classes"
        )
    info["dataset"], info["num_classes"] = kind, report.num_classes
    info["splits"][split] = {"num_shards": num_shards, "report": report.to_dict()}
    path.write_text(json.dumps(info, indent=1))
    return info


def render_card(info: dict) -> str:
    """The dataset card (README.md) for the splits recorded in ``info`` (the content of cpsl_prepare.json)."""
    kind, num_classes = info["dataset"], info["num_classes"]
    names = info.get("class_names") or protocols.class_names(num_classes)  # a folder's: its class table's
    source = dataset_spec(kind).long_name
    if kind == "folder":
        origin = "Converted from your own folder of images and masks, through its class table,"
        licence = (
            "The images' own license applies: keep this repository private unless it allows publication."
        )
    else:
        origin = f"Converted from the official {source} download"
        licence = (
            f"The {source} license applies: do not make this repository public unless that license allows it."
        )
    yaml_splits = "\n".join(
        f"  - split: {split}\n    path: data/{split}-*.parquet" for split in sorted(info["splits"])
    )
    lines = [
        "---",
        "license: other",
        "task_categories:\n- image-segmentation",
        f"tags:\n- semantic-segmentation\n- domain-adaptation\n- cpsl\n- {kind}",
        f"configs:\n- config_name: default\n  data_files:\n{yaml_splits}",
        "---",
        "",
        f"# {source}, prepared for cpsl-hf ({num_classes}-class protocol)",
        "",
        f"{origin} by `scripts/prepare_dataset.py` of cpsl-hf. The images are the original files, byte for byte; "
        f"the labels are single-channel PNGs of train ids (0..{num_classes - 1}, 255 = ignore). {licence}",
        "",
        "```python",
        "from cpsl_hf.data import load_prepared",
        f'dataset = load_prepared("REPO_ID_OR_FOLDER", split="{sorted(info["splits"])[0]}")  # streaming',
        "```",
        "",
        "## Label protocol",
        "",
        "| train id | class |",
        "| --- | --- |",
        *[f"| {train_id} | {name} |" for train_id, name in enumerate(names)],
        "| 255 | ignored (every other id) |",
        "",
    ]
    for split, entry in sorted(info["splits"].items()):
        report = DataReport.from_dict(entry["report"])
        lines += [
            f"## Split `{split}`",
            "",
            f"- samples found: {report.num_found}; written: {report.num_kept}; skipped: {report.num_skipped}",
            f"- parquet shards: {entry['num_shards']}",
        ]
        if report.out_of_table_pixels:
            ids = ", ".join(f"{i} ({n} px)" for i, n in sorted(report.out_of_table_pixels.items()))
            lines.append(
                f"- label ids outside the {source} table, set to 255, in {report.out_of_table_samples} "
                f"samples: {ids}"
            )
        else:
            lines.append(f"- label ids outside the {source} table: none")
        total = sum(report.class_pixels) + report.ignored_pixels
        lines += ["", "| class | pixels | share |", "| --- | ---: | ---: |"]
        lines += [
            f"| {name} | {pixels} | {pixels / max(total, 1):.2%} |"
            for name, pixels in zip(names, report.class_pixels)
        ]
        lines += [
            f"| ignored (255) | {report.ignored_pixels} | {report.ignored_pixels / max(total, 1):.2%} |",
            "",
        ]
        if report.skipped:
            lines += ["Skipped samples:", "", "| sample | file | reason |", "| --- | --- | --- |"]
            lines += [f"| {bad.name} | `{bad.file}` | {bad.reason} |" for bad in report.skipped]
            lines.append("")
    return "\n".join(lines)


def push_prepared(output_dir, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Create (if needed) the Hub dataset repo and upload the prepared folder in one commit. Returns the repo URL.

    The repo is private unless ``private=False``: the datasets' licences forbid public redistribution (the card
    says so). The commit replaces the shards of the folder's splits: a shard of such a split that the folder does
    not hold (the split prepared again with another shard count) is deleted in the same commit, so a split never
    reads two preparations at once; other splits already in the repo are left alone. One commit is atomic: an
    interrupted push leaves the repo as it was.
    """
    from huggingface_hub import HfApi

    info_path = Path(output_dir) / INFO_FILE
    if not info_path.is_file():
        raise MissingPathError(
            f"{output_dir}: no {INFO_FILE}; not a folder written by scripts/prepare_dataset.py"
        )
    splits = sorted(json.loads(info_path.read_text())["splits"])
    token = check_hub_access(token)
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(output_dir),
            repo_id=repo_id,
            repo_type="dataset",
            commit_message="Add dataset prepared by cpsl-hf scripts/prepare_dataset.py",
            allow_patterns=["README.md", INFO_FILE, "data/*.parquet"],
            delete_patterns=[f"data/{split}-*.parquet" for split in splits],
        )
    except Exception as error:
        _reraise(_push_error(error, repo_id), error)
    return str(url)
