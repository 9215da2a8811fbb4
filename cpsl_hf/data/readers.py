"""Readers for the official GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes downloads, and for prepared datasets.

Every reader returns a ``datasets.Dataset`` (or, with ``streaming=True``, an ``IterableDataset``) with the
columns ``image`` (RGB, ``datasets.Image()``), ``label`` (single-channel "L" PNG of protocol train ids, 255 =
ignore, ``datasets.Image()``) and ``name`` (str). Images keep their original size; nothing is resized.

How a download is read:

1. *Scan*: the expected folder layout is listed (an empty or wrong folder raises :class:`LayoutError` naming
   the layout that was expected) and images are paired with labels by file name.
2. *Check* every pair: missing label, unreadable or truncated file (PNG chunk CRCs and the ``IEND`` trailer
   are verified), image/label size mismatch (never resized), wrong label format.
3. *Convert* each label once to protocol train ids with the vectorised lookup tables of
   :mod:`cpsl_hf.data.protocols`. Ids outside the dataset's table become 255 and are counted in the
   :class:`DataReport`.

With ``on_bad_sample="raise"`` (default) the reader raises :class:`BadSampleError` listing every bad pair
(file + reason); with ``"skip"`` it drops them and lists them in the report (``return_report=True``).

Map-style datasets keep the images as paths (no copy) and store the converted labels in a cache folder
(``cache_dir``, default ``$HF_DATASETS_CACHE/cpsl_hf``) keyed by the file list, sizes and modification times,
so a second call is instant. Streaming datasets convert labels on the fly and cache nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS
from PIL import Image

from cpsl_hf.utils import MissingPathError, UsageError, atomic_directory
from cpsl_hf.utils import progress as progress_bar

from . import protocols
from .registry import DATASET_SPECS, DOWNLOADS

logger = logging.getLogger(__name__)

DatasetKind = Literal["gta5", "synthia", "cityscapes"]
OnBadSample = Literal["raise", "skip"]

_READER_VERSION = "1"  # bump when the conversion changes, so stale caches are not reused

#: The folder layout each reader expects (quoted in errors), from the dataset registry.
LAYOUTS: dict[str, str] = {name: DATASET_SPECS[name].layout for name in DOWNLOADS}

#: Every id of the Cityscapes label table (GTA5 uses the same ids); other ids are "outside the table".
CITYSCAPES_TABLE_IDS: frozenset[int] = frozenset(label.id for label in _CITYSCAPES_LABELS if label.id >= 0)
#: Every id of the SYNTHIA-RAND-CITYSCAPES table, evaluated or not; other ids are "outside the table".
SYNTHIA_TABLE_IDS: frozenset[int] = frozenset(protocols.SYNTHIA_ID_TO_NAME) | frozenset(
    protocols.SYNTHIA_UNEVALUATED_IDS
)

_SYNTHIA_LABEL_MODES = ("RGB", "RGBA", "I;16", "I;16B", "I;16L", "I", "L", "P")
_PNG_TRAILER = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def dataset_features():
    """The ``datasets.Features`` every reader returns: image, label (train ids), name."""
    import datasets

    return datasets.Features(
        {"image": datasets.Image(), "label": datasets.Image(), "name": datasets.Value("string")}
    )


# ----------------------------------------------------------------------------------------------------------
# Report and errors


@dataclass(frozen=True)
class BadSample:
    """One rejected sample: its name, the offending file and why."""

    name: str
    file: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.reason}"


@dataclass
class DataReport:
    """What a reader or ``prepare_dataset`` found in a download.

    ``out_of_table_pixels`` maps each label id that is not in the dataset's table to the number of pixels that
    carried it (they became 255); ``class_pixels`` is the per-class pixel count of the converted labels
    (length ``num_classes``) and ``ignored_pixels`` the number of 255 pixels. The last three are ``None`` for
    streaming readers, which do not read the labels up front.
    """

    dataset: str
    data_dir: str
    split: str | None
    num_classes: int
    num_found: int = 0
    num_kept: int = 0
    skipped: list[BadSample] = field(default_factory=list)
    out_of_table_pixels: dict[int, int] | None = None
    out_of_table_samples: int | None = None
    class_pixels: list[int] | None = None
    ignored_pixels: int | None = None
    unknown_by_file: dict[str, dict[str, int]] | None = None
    label_format: str | None = None

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def summary(self) -> str:
        """A few human-readable lines."""
        where = f"{self.dataset} ({self.data_dir}" + (f", split {self.split})" if self.split else ")")
        lines = [
            f"{where}: {self.num_found} samples found, {self.num_kept} kept, {self.num_skipped} skipped "
            f"({self.num_classes}-class protocol)"
        ]
        lines += [f"  skipped {bad}" for bad in self.skipped]
        if self.unknown_by_file:  # folder datasets: per file, values or #rrggbb colours
            lines.append(
                f"  label values not in the class table (set to 255) in {len(self.unknown_by_file)} files:"
            )
            shown = sorted(self.unknown_by_file.items())
            for file, unknown in shown[:10]:
                lines.append(f"    {file}: " + ", ".join(f"{value}: {n} px" for value, n in unknown.items()))
            if len(shown) > 10:
                lines.append(f"    ... and {len(shown) - 10} more files (DataReport.unknown_by_file)")
        elif self.out_of_table_pixels:
            ids = ", ".join(f"{i}: {n} px" for i, n in sorted(self.out_of_table_pixels.items()))
            lines.append(
                f"  label ids outside the table (set to 255) in {self.out_of_table_samples} samples: {ids}"
            )
        return "\n".join(lines)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.out_of_table_pixels is not None:
            data["out_of_table_pixels"] = {str(k): v for k, v in self.out_of_table_pixels.items()}
        return data

    @classmethod
    def from_dict(cls, data: dict) -> DataReport:
        data = dict(data)
        data["skipped"] = [BadSample(**bad) for bad in data["skipped"]]
        if data.get("out_of_table_pixels") is not None:
            data["out_of_table_pixels"] = {int(k): v for k, v in data["out_of_table_pixels"].items()}
        return cls(**data)


class BadSampleError(ValueError):
    """Raised when samples fail the checks and ``on_bad_sample="raise"``; ``.bad_samples`` lists them all."""

    def __init__(self, dataset: str, bad_samples: Sequence[BadSample]):
        self.bad_samples = list(bad_samples)
        listing = "\n".join(f"  {bad}" for bad in self.bad_samples)
        super().__init__(
            f"{len(self.bad_samples)} bad sample(s) in the {dataset} data:\n{listing}\n"
            "Fix or remove these files, or pass on_bad_sample='skip' (--on_bad_sample skip) to skip them."
        )


class LayoutError(MissingPathError):
    """The data folder is missing, empty or not in the expected layout (a usage error: ``--data_dir``)."""


# ----------------------------------------------------------------------------------------------------------
# Scanning


@dataclass(frozen=True)
class SamplePair:
    """An image and its label file (``label_path`` is None when the label is missing)."""

    name: str
    image_path: str
    label_path: str | None


def _list_pngs(folder: Path, pattern: str = "*.png") -> list[Path]:
    return sorted(path for path in folder.glob(pattern) if path.is_file())


def _layout_error(kind: str, data_dir: Path, problem: str) -> LayoutError:
    return LayoutError(f"--data_dir {data_dir}: {problem}. Expected layout: {LAYOUTS[kind]}")


def scan(
    kind: DatasetKind, data_dir: str | os.PathLike, split: str = "train"
) -> tuple[list[SamplePair], list]:
    """List the sample pairs of a download in its official layout.

    Returns ``(pairs, orphans)``: every image with its label path (None when missing) and the
    :class:`BadSample` entries for label files without an image. Raises :class:`LayoutError` when the layout
    is not there.
    """
    data_dir = Path(data_dir)
    if kind not in LAYOUTS:
        raise ValueError(f"unknown dataset {kind!r}; expected one of {sorted(LAYOUTS)}")
    if not data_dir.is_dir():
        raise _layout_error(kind, data_dir, "data_dir does not exist or is not a folder")
    if kind in ("gta5", "synthia"):
        image_dir, label_dir = ("images", "labels") if kind == "gta5" else ("RGB", "GT/LABELS")
        for sub in (image_dir, label_dir):
            if not (data_dir / sub).is_dir():
                raise _layout_error(kind, data_dir, f"missing folder {sub}/")
        images = {path.name: path for path in _list_pngs(data_dir / image_dir)}
        labels = {path.name: path for path in _list_pngs(data_dir / label_dir)}
        if not images:
            raise _layout_error(kind, data_dir, f"no .png images in {image_dir}/")
        pairs = [
            SamplePair(Path(file).stem, str(path), str(labels[file]) if file in labels else None)
            for file, path in images.items()
        ]
        orphans = [
            BadSample(Path(file).stem, str(labels[file]), "label without an image")
            for file in sorted(labels.keys() - images.keys())
        ]
        return pairs, orphans

    image_root, label_root = data_dir / "leftImg8bit" / split, data_dir / "gtFine" / split
    if not image_root.is_dir():
        raise _layout_error(kind, data_dir, f"missing folder leftImg8bit/{split}/")
    if not label_root.is_dir():
        raise _layout_error(kind, data_dir, f"missing folder gtFine/{split}/")
    images = _list_pngs(image_root, "*/*_leftImg8bit.png")
    if not images:
        raise _layout_error(kind, data_dir, f"no */*_leftImg8bit.png files in leftImg8bit/{split}/")
    pairs = []
    for path in images:
        stem = path.name[: -len("_leftImg8bit.png")]
        label = label_root / path.parent.name / f"{stem}_gtFine_labelIds.png"
        pairs.append(SamplePair(stem, str(path), str(label) if label.is_file() else None))
    image_stems = {pair.name for pair in pairs}
    orphans = [
        BadSample(path.name[: -len("_gtFine_labelIds.png")], str(path), "label without an image")
        for path in _list_pngs(label_root, "*/*_gtFine_labelIds.png")
        if path.name[: -len("_gtFine_labelIds.png")] not in image_stems
    ]
    return pairs, orphans


# ----------------------------------------------------------------------------------------------------------
# Label decoding


def _expected_label_path(kind: str, pair: SamplePair) -> str:
    image = Path(pair.image_path)
    if kind == "gta5":
        return str(image.parent.parent / "labels" / image.name)
    if kind == "synthia":
        return str(image.parent.parent / "GT" / "LABELS" / image.name)
    split_dir = image.parent.parent.name
    data_dir = image.parent.parent.parent.parent
    return str(data_dir / "gtFine" / split_dir / image.parent.name / f"{pair.name}_gtFine_labelIds.png")


def read_label_ids(kind: DatasetKind, source: str | bytes | io.BytesIO) -> np.ndarray:
    """Decode a label file to its raw dataset ids: ``H x W`` (uint8 for GTA5/Cityscapes, uint16 for SYNTHIA).

    GTA5 palette PNGs are read as their *indices* (never the colours). SYNTHIA 16-bit RGB PNGs are read
    exactly: Pillow only gives the high byte of each 16-bit sample, so the low byte is read by decoding the
    same data with the little-endian unpacker (same C decoder and filters), and the two are combined.
    Raises ``ValueError`` for a label in the wrong format.
    """
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with Image.open(source) as label:
        if kind == "synthia":
            return _read_synthia_ids(label, source)
        if label.mode not in ("P", "L"):
            expected = "a palette (P) PNG" if kind == "gta5" else "an 8-bit (L) label-id PNG"
            raise ValueError(f"label has mode {label.mode}; expected {expected} whose values are label ids")
        label.load()
        return np.asarray(label, dtype=np.uint8)


def _tile_rawmode(tile) -> str | None:
    args = tile[3] if isinstance(tile, tuple) else getattr(tile, "args", None)
    return args[0] if isinstance(args, tuple) else args


def _with_rawmode(tile, rawmode: str):
    if hasattr(tile, "_replace"):  # Pillow >= 11: ImageFile._Tile named tuple
        return tile._replace(args=rawmode)
    return (tile[0], tile[1], tile[2], rawmode)


def _read_synthia_ids(label: Image.Image, source) -> np.ndarray:
    if label.mode in ("I;16", "I;16B", "I;16L", "L", "P"):
        return np.asarray(label).astype(np.uint16)
    if label.mode == "I":
        values = np.asarray(label)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"label values span {values.min()}..{values.max()}; expected 16-bit class ids")
        return values.astype(np.uint16)
    if label.mode not in ("RGB", "RGBA"):
        raise ValueError(f"label has mode {label.mode}; expected a 16-bit PNG with the class id in channel 0")
    rawmodes = {_tile_rawmode(tile) for tile in label.tile}
    if rawmodes <= {"RGB", "RGBA", "RGBX"}:  # an 8-bit RGB(A) label: the first channel is the id
        return np.asarray(label)[..., 0].astype(np.uint16)
    if len(rawmodes) != 1 or not rawmodes <= {"RGB;16B", "RGBA;16B"}:
        raise ValueError(f"unsupported {label.mode} label encoding {sorted(map(str, rawmodes))}")
    (rawmode,) = rawmodes
    high = np.asarray(label)[..., 0]  # Pillow keeps the high byte of each big-endian 16-bit sample
    if isinstance(source, io.BytesIO):
        source.seek(0)
    with Image.open(source) as again:  # same data, little-endian unpacker: yields the low byte instead
        again.tile = [_with_rawmode(tile, rawmode.replace("16B", "16L")) for tile in again.tile]
        low = np.asarray(again)[..., 0]
    return (high.astype(np.uint16) << 8) | low


def _verify_png(path: str) -> None:
    """Raise if the file is not a complete, uncorrupted image (PNG CRCs + IEND trailer, without decoding)."""
    with open(path, "rb") as handle:
        head = handle.read(8)
        if head == b"\x89PNG\r\n\x1a\n":
            handle.seek(-12, os.SEEK_END)
            if handle.read(12) != _PNG_TRAILER:
                raise OSError("truncated PNG (no IEND trailer)")
    with Image.open(path) as image:
        image.verify()


def _label_lut(kind: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(id -> train id lookup table, boolean 'id is in the dataset's table') for ``kind``."""
    if kind == "synthia":
        lut = protocols.synthia_lut(num_classes)
        known = np.zeros(65536, dtype=bool)
        known[list(SYNTHIA_TABLE_IDS)] = True
    else:
        lut = protocols.label_id_lut(num_classes)
        known = np.zeros(256, dtype=bool)
        known[list(CITYSCAPES_TABLE_IDS)] = True
    return lut, known


@dataclass
class _Converted:
    name: str
    image_path: str
    label_png: bytes | None = None
    bad: BadSample | None = None
    id_counts: np.ndarray | None = None  # pixel count per raw id (length of the table)
    train_id_counts: np.ndarray | None = None  # pixel count per train id (length 256)


def encode_label_png(train_ids: np.ndarray) -> bytes:
    """Encode an ``H x W`` uint8 train-id map as a single-channel ("L") PNG."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(train_ids, dtype=np.uint8), mode="L").save(
        buffer, format="PNG", compress_level=1
    )
    return buffer.getvalue()


def check_pair(kind: DatasetKind, pair: SamplePair) -> BadSample | None:
    """Cheap checks of one pair (no pixel decoding): files present, complete, readable, same size."""
    if pair.label_path is None:
        return BadSample(pair.name, _expected_label_path(kind, pair), "missing label")
    sizes, modes = {}, {}
    for role, path in (("image", pair.image_path), ("label", pair.label_path)):
        try:
            _verify_png(path)
            with Image.open(path) as image:
                sizes[role], modes[role] = image.size, image.mode
        except Exception as error:  # any decoder error means the file is unusable
            return BadSample(pair.name, path, f"unreadable {role} ({type(error).__name__}: {error})")
    accepted = _SYNTHIA_LABEL_MODES if kind == "synthia" else ("P", "L")
    if modes["label"] not in accepted:
        expected = {
            "gta5": "a palette (P) PNG whose indices are label ids",
            "cityscapes": "an 8-bit (L) PNG of label ids",
            "synthia": "a 16-bit PNG with the class id in channel 0",
        }[kind]
        return BadSample(pair.name, pair.label_path, f"label has mode {modes['label']}; expected {expected}")
    if sizes["image"] != sizes["label"]:
        (iw, ih), (lw, lh) = sizes["image"], sizes["label"]
        return BadSample(
            pair.name,
            pair.label_path,
            f"size mismatch: image {pair.image_path} is {iw}x{ih} but the label is {lw}x{lh} (never resized)",
        )
    return None


def convert_pair(kind: DatasetKind, pair: SamplePair, num_classes: int, lut=None, known=None) -> _Converted:
    """Check a pair and convert its label to protocol train ids (PNG bytes), with id histograms."""
    if lut is None:
        lut, known = _label_lut(kind, num_classes)
    bad = check_pair(kind, pair)
    if bad is not None:
        return _Converted(pair.name, pair.image_path, bad=bad)
    try:
        ids = read_label_ids(kind, pair.label_path)
    except Exception as error:
        reason = f"unreadable label ({type(error).__name__}: {error})"
        return _Converted(pair.name, pair.image_path, bad=BadSample(pair.name, pair.label_path, reason))
    train_ids = lut[ids]
    id_counts = np.bincount(ids.ravel(), minlength=len(lut))
    train_id_counts = np.bincount(train_ids.ravel(), minlength=256)
    return _Converted(
        pair.name, pair.image_path, encode_label_png(train_ids), None, id_counts, train_id_counts
    )


# ----------------------------------------------------------------------------------------------------------
# Building datasets


def _fingerprint(kind: str, num_classes: int, split: str | None, on_bad_sample: str, pairs, orphans) -> str:
    digest = hashlib.sha256(f"{_READER_VERSION}|{kind}|{num_classes}|{split}|{on_bad_sample}".encode())
    for pair in pairs:
        for path in (pair.image_path, pair.label_path):
            if path is None:
                digest.update(b"<missing>")
                continue
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for orphan in orphans:
        digest.update(orphan.file.encode())
    return digest.hexdigest()[:20]


def _default_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "cpsl_hf"


class _Accumulator:
    """Sums id histograms and collects bad samples over converted pairs."""

    def __init__(self, table_size: int, known: np.ndarray):
        self.known = known
        self.id_counts = np.zeros(table_size, dtype=np.int64)
        self.train_id_counts = np.zeros(256, dtype=np.int64)
        self.out_of_table_samples = 0
        self.bad: list[BadSample] = []
        self.kept = 0

    def add(self, converted: _Converted) -> None:
        if converted.bad is not None:
            self.bad.append(converted.bad)
            return
        self.kept += 1
        self.id_counts += converted.id_counts
        self.train_id_counts += converted.train_id_counts
        self.out_of_table_samples += int(converted.id_counts[~self.known].any())

    def fill(self, report: DataReport) -> DataReport:
        outside = np.flatnonzero((~self.known) & (self.id_counts > 0))
        report.out_of_table_pixels = {int(i): int(self.id_counts[i]) for i in outside}
        report.out_of_table_samples = self.out_of_table_samples
        report.class_pixels = [int(n) for n in self.train_id_counts[: report.num_classes]]
        report.ignored_pixels = int(self.train_id_counts[protocols.IGNORE_INDEX])
        return report


def iter_converted(
    kind: DatasetKind, pairs: Sequence[SamplePair], num_classes: int, num_proc: int | None = None
) -> Iterator[_Converted]:
    """Convert pairs in order (with ``num_proc`` worker processes when > 1)."""
    lut, known = _label_lut(kind, num_classes)
    if not num_proc or num_proc <= 1:
        for pair in pairs:
            yield convert_pair(kind, pair, num_classes, lut, known)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        jobs = [(kind, pair, num_classes) for pair in pairs]
        yield from pool.imap(_convert_job, jobs, chunksize=4)


def _convert_job(job) -> _Converted:
    return convert_pair(*job)


def _check_on_bad_sample(on_bad_sample: str) -> None:
    if on_bad_sample not in ("raise", "skip"):
        raise ValueError(f"on_bad_sample={on_bad_sample!r}; expected 'raise' or 'skip'")


def _load(
    kind: DatasetKind,
    data_dir,
    num_classes: int,
    split: str | None,
    streaming: bool,
    on_bad_sample: str,
    return_report: bool,
    cache_dir,
    num_proc: int | None,
    progress: bool,
):
    import datasets

    _check_on_bad_sample(on_bad_sample)
    protocols.class_names(num_classes)  # validates num_classes
    pairs, orphans = scan(kind, data_dir, split or "train")
    report = DataReport(kind, str(data_dir), split, num_classes, num_found=len(pairs))
    features = dataset_features()

    if streaming:
        kept, bad = check_pairs(kind, pairs, orphans, on_bad_sample, num_proc, progress)
        report.skipped, report.num_kept = bad, len(kept)
        _log_report(report)
        dataset = datasets.IterableDataset.from_generator(
            _generate_streaming,
            features=features,
            gen_kwargs={
                "pairs": kept,
                "kind": kind,
                "num_classes": num_classes,
                "on_bad_sample": on_bad_sample,
            },
        )
        return (dataset, report) if return_report else dataset

    cache_root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    fingerprint = _fingerprint(kind, num_classes, split, on_bad_sample, pairs, orphans)
    target = cache_root / f"{kind}-{split or 'all'}-{num_classes}-{fingerprint}"
    if not (target / "report.json").is_file():
        _build_cache(kind, pairs, orphans, num_classes, on_bad_sample, report, target, num_proc, progress)
    report = DataReport.from_dict(json.loads((target / "report.json").read_text()))
    report.data_dir = str(data_dir)
    _log_report(report)
    dataset = datasets.Dataset.from_file(str(target / "data.arrow"))
    return (dataset, report) if return_report else dataset


def _build_cache(kind, pairs, orphans, num_classes, on_bad_sample, report, target, num_proc, progress):
    import pyarrow as pa

    if on_bad_sample == "raise":  # fail fast with the full list from the cheap checks
        check_pairs(kind, pairs, orphans, on_bad_sample, num_proc, progress)
    schema = dataset_features().arrow_schema
    lut, known = _label_lut(kind, num_classes)
    totals = _Accumulator(len(lut), known)
    totals.bad.extend(orphans)
    # Written beside the cache folder and renamed into place: a reader never sees a half-written cache.
    with atomic_directory(target) as staging:
        rows: list[dict] = []
        with pa.OSFile(str(staging / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            converted_stream = iter_converted(kind, pairs, num_classes, num_proc)
            converting = progress_bar(
                converted_stream, progress, f"converting {kind} labels", total=len(pairs), unit="sample"
            )
            for converted in converting:
                totals.add(converted)
                if converted.bad is None:
                    rows.append(_example(converted.name, converted.image_path, converted.label_png))
                if len(rows) == 64:
                    writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=schema))
                    rows = []
            if rows:
                writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=schema))
        if totals.bad and on_bad_sample == "raise":
            raise BadSampleError(kind, totals.bad)
        if totals.kept == 0:
            raise BadSampleError(kind, totals.bad)
        report.skipped, report.num_kept = totals.bad, totals.kept
        totals.fill(report)
        (staging / "report.json").write_text(json.dumps(report.to_dict(), indent=1))


def _example(name: str, image_path: str, label_png: bytes) -> dict:
    """One row: the image by path (no copy), the converted label as PNG bytes."""
    return {
        "image": {"bytes": None, "path": image_path},
        "label": {"bytes": label_png, "path": f"{name}_trainIds.png"},
        "name": name,
    }


def check_pairs(kind, pairs, orphans, on_bad_sample, num_proc, progress) -> tuple[list, list[BadSample]]:
    """Check every pair (cheap checks: files readable, sizes and label modes agree) -> ``(kept, bad)``.

    ``bad`` is ``orphans`` plus every failing pair; with ``on_bad_sample="raise"`` any bad sample raises one
    :class:`BadSampleError` that lists them all.
    """
    checked = progress_bar(
        _iter_checked(kind, pairs, num_proc), progress, f"checking {kind}", total=len(pairs), unit="sample"
    )
    bad = orphans + [result for result in checked if result is not None]
    if bad and on_bad_sample == "raise":
        raise BadSampleError(kind, bad)
    bad_names = {sample.name for sample in bad}
    return [pair for pair in pairs if pair.name not in bad_names], bad


def _iter_checked(kind, pairs, num_proc) -> Iterator[BadSample | None]:
    if not num_proc or num_proc <= 1:
        for pair in pairs:
            yield check_pair(kind, pair)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(num_proc) as pool:
        yield from pool.imap(_check_job, [(kind, pair) for pair in pairs], chunksize=16)


def _check_job(job) -> BadSample | None:
    return check_pair(*job)


def _generate_streaming(pairs, kind, num_classes, on_bad_sample):
    lut, known = _label_lut(kind, num_classes)
    for pair in pairs:
        converted = convert_pair(kind, pair, num_classes, lut, known)
        if converted.bad is not None:
            if on_bad_sample == "raise":
                raise BadSampleError(kind, [converted.bad])
            logger.warning("skipping %s", converted.bad)
            continue
        if converted.id_counts[~known].any():
            outside = np.flatnonzero(converted.id_counts * ~known)
            logger.info("%s: label ids %s are outside the %s table (set to 255)", pair.name, outside, kind)
        yield _example(pair.name, pair.image_path, converted.label_png)


def _log_report(report: DataReport) -> None:
    if report.skipped or report.out_of_table_pixels:
        logger.warning(report.summary())
    else:
        logger.info(report.summary())


_COMMON_DOC = """
    Args:
        data_dir: the download's root folder (layout in :data:`LAYOUTS`).
        num_classes: label protocol (19, 16 or 13).
        streaming: return an ``IterableDataset`` that converts labels on the fly (pairs are still checked
            up front) instead of a cached map-style ``Dataset``.
        on_bad_sample: ``"raise"`` (default): raise :class:`BadSampleError` listing every bad pair;
            ``"skip"``: drop them and list them in the report.
        return_report: also return the :class:`DataReport` (``(dataset, report)``).
        cache_dir: where converted labels are cached (default ``$HF_DATASETS_CACHE/cpsl_hf``).
        num_proc: processes for the one-time label conversion.
        progress: show a tqdm progress bar.
"""


def load_gta5(
    data_dir,
    num_classes: int = 19,
    streaming: bool = False,
    on_bad_sample: OnBadSample = "raise",
    *,
    return_report: bool = False,
    cache_dir=None,
    num_proc: int | None = None,
    progress: bool = True,
):
    """GTA5 (``images/*.png`` + palette ``labels/*.png``) as image / label (train ids) / name."""
    return _load(
        "gta5",
        data_dir,
        num_classes,
        None,
        streaming,
        on_bad_sample,
        return_report,
        cache_dir,
        num_proc,
        progress,
    )


def load_synthia(
    data_dir,
    num_classes: int = 16,
    streaming: bool = False,
    on_bad_sample: OnBadSample = "raise",
    *,
    return_report: bool = False,
    cache_dir=None,
    num_proc: int | None = None,
    progress: bool = True,
):
    """SYNTHIA-RAND-CITYSCAPES (``RGB/*.png`` + 16-bit ``GT/LABELS/*.png``) as image / label / name."""
    return _load(
        "synthia",
        data_dir,
        num_classes,
        None,
        streaming,
        on_bad_sample,
        return_report,
        cache_dir,
        num_proc,
        progress,
    )


def load_cityscapes(
    data_dir,
    split: str = "train",
    num_classes: int = 19,
    streaming: bool = False,
    on_bad_sample: OnBadSample = "raise",
    *,
    return_report: bool = False,
    cache_dir=None,
    num_proc: int | None = None,
    progress: bool = True,
):
    """Cityscapes ``leftImg8bit/{split}`` + ``gtFine/{split}/*_labelIds.png`` as image / label / name.

    ``split``: "train", "val" or "test" (the folder name under ``leftImg8bit/``).
    """
    return _load(
        "cityscapes",
        data_dir,
        num_classes,
        split,
        streaming,
        on_bad_sample,
        return_report,
        cache_dir,
        num_proc,
        progress,
    )


for _reader in (load_gta5, load_synthia, load_cityscapes):
    _reader.__doc__ += _COMMON_DOC


# ----------------------------------------------------------------------------------------------------------
# Prepared (parquet) datasets


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE is set (read now, not only when huggingface_hub was imported)."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    )


SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.parquet$")
"""``{split}-{index:05d}-of-{count:05d}.parquet``: how ``scripts/prepare_dataset.py`` names a split's shards."""

PREPARED_INFO_FILE = "cpsl_prepare.json"
"""What ``prepare_dataset`` records beside the shards: dataset, protocol, and per split its shard count."""


class HubDatasetError(UsageError):
    """A Hub dataset repo that cannot be read: missing, private without a token that can read it, or a token the
    Hub rejects. A usage error: the repo id or the token is wrong, and the message says which."""


@dataclass(frozen=True)
class PreparedShards:
    """Where a prepared split's shards are: ``data_files`` (local paths, or ``hf://`` URLs pinned to the commit
    read), the dataset's ``cpsl_prepare.json`` (``info``, None when absent) and ``where`` (for messages)."""

    data_files: list[str]
    info: dict | None
    where: str
    revision: str | None = None


def check_shards(file_names, split: str, where: str, info: dict | None = None) -> list[str]:
    """The shard file names of ``split`` among ``file_names`` (names under ``data/``), sorted, after checking
    that the split is there and complete.

    Complete means: every shard ``{split}-NNNNN-of-K`` for NNNNN in 0..K-1 is present, with one K, and K equals
    the shard count ``cpsl_prepare.json`` recorded for the split (when ``info`` is given). An upload or a copy that
    stopped midway leaves a split that fails this check instead of one that silently reads fewer samples.

    Raises:
        LayoutError: no shard of ``split`` (naming the splits found), or an incomplete / mixed shard set.
    """
    parsed = [(name, SHARD_NAME.match(name)) for name in file_names]
    shards = sorted(name for name, match in parsed if match and match["split"] == split)
    if not shards:
        available = sorted({match["split"] for _, match in parsed if match})
        raise LayoutError(
            f"{where}: no parquet shards for split {split!r} (splits found: {', '.join(available) or 'none'}); "
            "expected data/{split}-XXXXX-of-YYYYY.parquet as written by scripts/prepare_dataset.py"
        )
    counts = sorted({int(SHARD_NAME.match(name)["count"]) for name in shards})
    recorded = ((info or {}).get("splits", {}).get(split) or {}).get("num_shards")
    expected = recorded if recorded is not None else counts[-1]
    present = {
        int(SHARD_NAME.match(name)["index"])
        for name in shards
        if int(SHARD_NAME.match(name)["count"]) == expected
    }
    missing = [
        f"{split}-{index:05d}-of-{expected:05d}.parquet" for index in range(expected) if index not in present
    ]
    stray = [name for name in shards if int(SHARD_NAME.match(name)["count"]) != expected]
    if missing or stray:
        problems = []
        if missing:
            listing = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            problems.append(f"{len(missing)} of its {expected} shards are missing ({listing})")
        if stray:
            problems.append(f"shards of another preparation are mixed in ({', '.join(stray[:3])})")
        raise LayoutError(
            f"{where}: split {split!r} is incomplete: {'; '.join(problems)}. An upload or copy was interrupted, "
            "or two preparations were mixed: prepare the split again (scripts/prepare_dataset.py) and push it again"
        )
    return shards


def _prepared_local(folder: Path, split: str) -> PreparedShards:
    info_path = folder / PREPARED_INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else None
    names = [path.name for path in (folder / "data").glob("*.parquet")] if (folder / "data").is_dir() else []
    shards = check_shards(names, split, str(folder / "data"), info)
    return PreparedShards([str(folder / "data" / name) for name in shards], info, str(folder))


def http_error_class() -> type[Exception]:
    """The HTTP library's base error (``httpx.HTTPError``, or ``httpx2``'s in newer ``huggingface_hub``): the
    base of the client's ``HfHubHTTPError`` and of its transport errors (refused connection, timeout)."""
    from huggingface_hub.errors import HfHubHTTPError

    return next(base for base in HfHubHTTPError.__mro__[1:] if base.__name__ == "HTTPError")


def _hub_error(repo_id: str, error: Exception) -> Exception:
    """The one-line error for a failed read of the Hub dataset ``repo_id`` (the client's own, when not known)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(error, RepositoryNotFoundError):
        return HubDatasetError(
            f"Hub dataset {repo_id!r} not found at {constants.ENDPOINT}, or it is private and the token cannot read "
            "it: check the repo id, and log in (`hf auth login` or HF_TOKEN) with a token of its owner"
        )
    if isinstance(error, RevisionNotFoundError):
        return HubDatasetError(
            f"Hub dataset {repo_id!r}: revision not found ({error.server_message or error})"
        )
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, HfHubHTTPError) and status in (401, 403):
        return HubDatasetError(
            f"Hub dataset {repo_id!r}: the Hub rejected the token ({status}); set HF_TOKEN to a valid token or run "
            "`hf auth login`"
        )
    if isinstance(error, HfHubHTTPError) or not isinstance(error, (http_error_class(), ConnectionError)):
        return error
    return ConnectionError(
        f"cannot reach the Hugging Face Hub at {constants.ENDPOINT} to read {repo_id!r} "
        f"({type(error).__name__}: {error})"
    )


def _prepared_hub(repo_id: str, split: str, token: str | None) -> PreparedShards:
    """List the repo at its current commit (one call), check the split, read cpsl_prepare.json, and return
    ``hf://`` URLs pinned to that commit: every process of a run, and every epoch, reads the same files even if
    the repo is pushed to meanwhile."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        repo = api.dataset_info(repo_id)
        names = [sibling.rfilename for sibling in repo.siblings or ()]
        info = None
        if PREPARED_INFO_FILE in names:
            path = api.hf_hub_download(repo_id, PREPARED_INFO_FILE, repo_type="dataset", revision=repo.sha)
            info = json.loads(Path(path).read_text())
    except (http_error_class(), OSError) as error:
        converted = _hub_error(repo_id, error)
        if converted is error:
            raise
        raise converted from error
    where = f"Hub dataset {repo_id} (commit {repo.sha[:8]})"
    shards = check_shards(
        [name[len("data/") :] for name in names if name.startswith("data/")], split, where, info
    )
    files = [f"hf://datasets/{repo_id}@{repo.sha}/data/{name}" for name in shards]
    return PreparedShards(files, info, where, revision=repo.sha)


def locate_prepared(repo_id_or_dir, split: str = "train", token: str | None = None) -> PreparedShards:
    """Find and check the shards of ``split`` in a prepared folder or Hub dataset repo (see
    :func:`load_prepared`); nothing is read but the file listing and ``cpsl_prepare.json``."""
    local = Path(repo_id_or_dir)
    if local.is_dir():
        return _prepared_local(local, split)
    repo_id = str(repo_id_or_dir)
    if repo_id.count("/") != 1 or repo_id.startswith((".", "/")):
        raise MissingPathError(
            f"{repo_id!r} is neither an existing folder nor a Hub dataset repo id of the form 'owner/name'"
        )
    if hub_offline():
        raise ConnectionError(
            f"cannot read the Hub dataset {repo_id!r}: HF_HUB_OFFLINE is set. Pass a local folder written by "
            "scripts/prepare_dataset.py instead, or unset HF_HUB_OFFLINE."
        )
    return _prepared_hub(repo_id, split, token)


def load_prepared(
    repo_id_or_dir,
    split: str = "train",
    streaming: bool = True,
    token: str | None = None,
    num_classes: int | None = None,
):
    """Load a dataset written by ``scripts/prepare_dataset.py`` from a local folder or a Hub dataset repo.

    The folder (or repo) holds ``data/{split}-XXXXX-of-YYYYY.parquet`` shards with the image bytes embedded, and
    ``cpsl_prepare.json``. A local folder is read directly; anything else is treated as a Hub dataset repo id and
    read through ``hf://datasets/{repo_id}@{commit}/data/...``, pinned to the repo's commit at the time of the
    call (needs network access and, for a private repo, a token). The split must be complete (every shard
    ``0..K-1`` of one preparation, :func:`check_shards`), else :class:`LayoutError` says what is missing.

    Returns an ``IterableDataset`` (``streaming=True``, the default: shards are read with HTTP range requests as
    the stream goes) or a ``Dataset`` with columns image, label and name. ``streaming=False`` downloads the
    shards into the ``datasets`` cache (Arrow) first.

    Args:
        token: a Hub token for a private repo (default: the logged-in one, or ``HF_TOKEN``).
        num_classes: the label protocol the caller expects; a dataset prepared with another one raises
            :class:`~cpsl_hf.utils.UsageError` (None: read whatever protocol it has).

    Raises:
        LayoutError: no shards of ``split`` (the message lists the splits found), or an incomplete split.
        HubDatasetError: a missing repo, a private repo the token cannot read, a rejected token.
        ConnectionError: HF_HUB_OFFLINE is set, or the Hub cannot be reached.
    """
    import datasets

    located = locate_prepared(repo_id_or_dir, split, token)
    prepared_classes = (located.info or {}).get("num_classes")
    if num_classes is not None and prepared_classes is not None and prepared_classes != num_classes:
        raise UsageError(
            f"--num_classes {num_classes} disagrees with {located.where}: it was prepared with the "
            f"{prepared_classes}-class protocol (prepare it again with --num_classes {num_classes}, or train with "
            f"--num_classes {prepared_classes})"
        )
    loaded = datasets.load_dataset(
        "parquet",
        data_files={split: located.data_files},
        split=split,
        streaming=streaming,
        features=dataset_features(),
        token=token,
    )
    return loaded
