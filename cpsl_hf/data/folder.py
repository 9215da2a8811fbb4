"""Your own dataset: a folder of images and masks, decoded through a class table.

:func:`load_folder` reads any folder of image / mask pairs into the columns every reader yields (``image``,
``label`` as protocol train ids with 255 = ignore, ``name``), decoding the masks with a
:class:`~cpsl_hf.data.class_table.ClassTable`. Layouts:

- ``DIR/images/**`` with ``DIR/masks/**`` (the default), or ``DIR/{split}/images`` with ``DIR/{split}/masks``
  when the folder has splits. A folder without splits is read whole, whatever split is asked.
- ``image_pattern`` / ``mask_pattern``: paths relative to ``DIR`` with one ``{name}`` placeholder (and
  optionally ``{split}``), e.g. ``image_pattern="rgb/{name}.jpg", mask_pattern="gt/{name}_label.png"``;
  ``*`` matches within one folder level.
- ``list_file``: a text file of ``IMAGE MASK`` lines (paths relative to ``DIR`` or absolute; ``#`` comments).

In the default and split layouts images and masks pair by their relative path without extension (any image
extension; masks are PNG, TIFF or BMP). Masks may be 8- or 16-bit label PNGs, palette PNGs (their indices are
the values, never the colours) or colour-coded RGB labels decoded through the table's palette
(``label_format="auto"`` reads RGB masks as colours). Values (or colours) the table does not know become 255
and are counted per file in the :class:`~cpsl_hf.data.readers.DataReport`, as the built-in readers count ids
outside their tables. The same bad-pair checks apply: missing mask, unreadable or truncated file, image / mask
size mismatch (never resized), unsupported mask mode.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

from cpsl_hf.utils import atomic_directory
from cpsl_hf.utils import progress as progress_bar

from .class_table import ClassMapping, ClassTable, load_class_table
from .protocols import IGNORE_INDEX
from .readers import (
    BadSample,
    BadSampleError,
    DataReport,
    LayoutError,
    SamplePair,
    _example,
    _verify_png,
    dataset_features,
    encode_label_png,
)

logger = logging.getLogger(__name__)

__all__ = ["FOLDER_LAYOUT", "IMAGE_EXTENSIONS", "MASK_EXTENSIONS", "load_folder", "scan_folder"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")
LabelFormat = Literal["auto", "values", "colors"]
_VALUE_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I", "1")
_COLOR_MODES = ("RGB", "RGBA")
_READER_VERSION = "1"

FOLDER_LAYOUT = (
    "DATA_DIR/images/** with DATA_DIR/masks/** (or DATA_DIR/{split}/images with DATA_DIR/{split}/masks), "
    "paired by relative path without extension; or --image_pattern / --mask_pattern with {name}; or a list "
    "file of 'IMAGE MASK' lines"
)


# ----------------------------------------------------------------------------------------------------------
# Scanning


def _relative_stem(path: Path, root: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _files_under(root: Path, extensions: Sequence[str]) -> list[Path]:
    return sorted(path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in extensions)


def _by_stem(files: list[Path], root: Path, role: str) -> tuple[dict[str, Path], list[BadSample]]:
    by_stem: dict[str, Path] = {}
    clashes = []
    for path in files:
        stem = _relative_stem(path, root)
        if stem in by_stem:
            clashes.append(BadSample(stem, str(path), f"two {role}s named {stem!r} ({by_stem[stem].name})"))
            continue
        by_stem[stem] = path
    return by_stem, clashes


def _pair_by_stem(image_root: Path, mask_root: Path) -> tuple[list[SamplePair], list[BadSample]]:
    images, image_clashes = _by_stem(_files_under(image_root, IMAGE_EXTENSIONS), image_root, "image")
    masks, mask_clashes = _by_stem(_files_under(mask_root, MASK_EXTENSIONS), mask_root, "mask")
    pairs = [
        SamplePair(stem, str(path), str(masks[stem]) if stem in masks else None)
        for stem, path in images.items()
    ]
    orphans = [
        BadSample(stem, str(masks[stem]), "mask without an image")
        for stem in sorted(masks.keys() - images.keys())
    ]
    return pairs, orphans + image_clashes + mask_clashes


def _pattern_regex(pattern: str) -> re.Pattern:
    if pattern.count("{name}") != 1:
        raise ValueError(f"pattern {pattern!r} must contain {{name}} exactly once")
    before, after = pattern.split("{name}")

    def glob_part(text: str) -> str:
        return "".join("[^/]*" if char == "*" else re.escape(char) for char in text)

    return re.compile(f"^{glob_part(before)}(?P<name>.+?){glob_part(after)}$")


def _pair_by_pattern(data_dir: Path, image_pattern: str, mask_pattern: str):
    image_regex, mask_regex = _pattern_regex(image_pattern), _pattern_regex(mask_pattern)
    images: dict[str, str] = {}
    masks: dict[str, str] = {}
    for path in sorted(p for p in data_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(data_dir).as_posix()
        for regex, found in ((image_regex, images), (mask_regex, masks)):
            match = regex.match(relative)
            if match:
                found.setdefault(match["name"], str(path))
    pairs = [SamplePair(name, path, masks.get(name)) for name, path in images.items()]
    orphans = [
        BadSample(name, masks[name], "mask without an image") for name in sorted(masks.keys() - images.keys())
    ]
    return pairs, orphans


def _pair_from_list(data_dir: Path, list_file: Path):
    if not list_file.is_file():
        raise LayoutError(f"--list_file {list_file}: no such file")
    pairs = []
    for number, line in enumerate(list_file.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise LayoutError(f"{list_file}:{number}: expected 'IMAGE MASK', got {line!r}")
        image, mask = (Path(part) if Path(part).is_absolute() else data_dir / part for part in parts)
        name = Path(parts[0]).with_suffix("").as_posix().lstrip("/")
        if not image.is_file():
            raise LayoutError(f"{list_file}:{number}: image {image} does not exist")
        pairs.append(SamplePair(name, str(image), str(mask) if mask.is_file() else None))
    if not pairs:
        raise LayoutError(f"{list_file}: lists no pairs")
    return pairs, []


def _found_splits(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if (p / "images").is_dir() and (p / "masks").is_dir())


def scan_folder(
    data_dir: str | os.PathLike,
    split: str | None = None,
    *,
    image_pattern: str | None = None,
    mask_pattern: str | None = None,
    list_file: str | os.PathLike | None = None,
) -> tuple[list[SamplePair], list[BadSample]]:
    """The image / mask pairs of a folder (layouts: module docstring) -> ``(pairs, bad)``; ``bad`` lists masks
    without an image and name clashes. Raises :class:`LayoutError` when nothing matches the layout."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LayoutError(
            f"--data_dir {data_dir}: does not exist or is not a folder. Expected layout: {FOLDER_LAYOUT}"
        )
    if list_file is not None:
        return _pair_from_list(data_dir, Path(list_file))
    if (image_pattern is None) != (mask_pattern is None):
        raise ValueError("image_pattern and mask_pattern go together: give both or neither")
    if image_pattern is not None:
        fill = {"split": split or ""}
        image_pattern, mask_pattern = (
            p.replace("{split}", fill["split"]) for p in (image_pattern, mask_pattern)
        )
        pairs, bad = _pair_by_pattern(data_dir, image_pattern, mask_pattern)
        if not pairs:
            raise LayoutError(f"--data_dir {data_dir}: no file matches the image pattern {image_pattern!r}")
        return pairs, bad
    if split is not None and (data_dir / split / "images").is_dir():
        root = data_dir / split
    elif (data_dir / "images").is_dir():
        root = data_dir
        if split not in (None, "train"):  # e.g. the target's "val": the same images it adapts on
            logger.warning(
                "%s has no %s/ split folder: split %r reads the whole folder (images/ + masks/)",
                data_dir,
                split,
                split,
            )
    else:
        splits = _found_splits(data_dir)
        wanted = f"{split}/images/ (or images/)" if split is not None else "images/"
        hint = f"; splits found: {', '.join(splits)}" if splits else ""
        raise LayoutError(
            f"--data_dir {data_dir}: no folder {wanted}{hint}. Expected layout: {FOLDER_LAYOUT}"
        )
    if not (root / "masks").is_dir():
        raise LayoutError(f"--data_dir {data_dir}: missing folder {root.relative_to(data_dir) / 'masks'}/")
    pairs, bad = _pair_by_stem(root / "images", root / "masks")
    if not pairs:
        raise LayoutError(
            f"--data_dir {data_dir}: no images ({', '.join(IMAGE_EXTENSIONS)}) under "
            f"{(root / 'images').relative_to(data_dir)}/"
        )
    return pairs, bad


# ----------------------------------------------------------------------------------------------------------
# Checking and decoding


@dataclass
class _Decoded:
    name: str
    image_path: str
    label_png: bytes | None = None
    bad: BadSample | None = None
    unknown: dict[int, int] | None = None  # unknown value (or 24-bit colour code) -> pixels
    train_id_counts: np.ndarray | None = None


@dataclass(frozen=True, eq=False)
class FolderDecoder:
    """Checks one pair and decodes its mask through ``table`` (then into ``mapping``'s source classes)."""

    table: ClassTable
    mapping: ClassMapping | None = None
    label_format: LabelFormat = "auto"
    unlabelled: bool = False  # a split without masks (a benchmark's test split): labels are all 255

    def check(self, pair: SamplePair) -> BadSample | None:
        """Cheap checks (no pixel decoding): files present, complete, readable, same size, mask mode usable."""
        if self.unlabelled:
            try:
                _verify_png(pair.image_path)
                with Image.open(pair.image_path):
                    pass
            except Exception as error:
                return BadSample(
                    pair.name, pair.image_path, f"unreadable image ({type(error).__name__}: {error})"
                )
            return None
        if pair.label_path is None:
            return BadSample(pair.name, _expected_mask(pair), "missing mask")
        sizes, modes = {}, {}
        for role, path in (("image", pair.image_path), ("mask", pair.label_path)):
            try:
                _verify_png(path)
                with Image.open(path) as image:
                    sizes[role], modes[role] = image.size, image.mode
            except Exception as error:  # any decoder error means the file is unusable
                return BadSample(pair.name, path, f"unreadable {role} ({type(error).__name__}: {error})")
        accepted = {"auto": _VALUE_MODES + _COLOR_MODES, "values": _VALUE_MODES, "colors": _COLOR_MODES}
        if modes["mask"] not in accepted[self.label_format]:
            expected = {
                "auto": "a label-value (L, P, 16-bit) or colour-coded (RGB) PNG",
                "values": "a label-value PNG (L, P or 16-bit)",
                "colors": "a colour-coded RGB PNG",
            }[self.label_format]
            return BadSample(
                pair.name, pair.label_path, f"mask has mode {modes['mask']}; expected {expected}"
            )
        if sizes["image"] != sizes["mask"]:
            (iw, ih), (mw, mh) = sizes["image"], sizes["mask"]
            return BadSample(
                pair.name,
                pair.label_path,
                f"size mismatch: image {pair.image_path} is {iw}x{ih} but the mask is {mw}x{mh} (never resized)",
            )
        return None

    def decode_mask(self, path: str) -> tuple[np.ndarray, dict[int, int]]:
        """``H x W`` uint8 train ids and the unknown values' (or colour codes') pixel counts of one mask."""
        with Image.open(path) as mask:
            mask.load()
            if mask.mode in _COLOR_MODES:
                train_ids, colours = self.table.decode_colors(np.asarray(mask.convert("RGB")))
                unknown = {(r << 16) | (g << 8) | b: count for (r, g, b), count in colours.items()}
            else:
                values = np.asarray(mask)
                if mask.mode == "1":
                    values = values.astype(np.uint8)
                elif mask.mode == "I":
                    if values.size and (values.min() < 0 or values.max() > 65535):
                        raise ValueError(
                            f"mask values span {values.min()}..{values.max()}; expected 0..65535"
                        )
                    values = values.astype(np.uint16)
                elif values.dtype != np.uint8:
                    values = values.astype(np.uint16)
                train_ids, counts = self.table.decode(values)
                outside = np.flatnonzero(counts * ~self.table.known_values(len(counts)))
                unknown = {int(v): int(counts[v]) for v in outside}
        if self.mapping is not None:
            train_ids = self.mapping.to_source(train_ids)
        return train_ids, unknown

    def convert(self, pair: SamplePair) -> _Decoded:
        bad = self.check(pair)
        if bad is not None:
            return _Decoded(pair.name, pair.image_path, bad=bad)
        if self.unlabelled:
            with Image.open(pair.image_path) as image:
                width, height = image.size
            train_ids = np.full((height, width), IGNORE_INDEX, dtype=np.uint8)
            counts = np.bincount(train_ids.ravel(), minlength=256)
            return _Decoded(pair.name, pair.image_path, encode_label_png(train_ids), None, {}, counts)
        try:
            train_ids, unknown = self.decode_mask(pair.label_path)
        except Exception as error:
            reason = f"unreadable mask ({type(error).__name__}: {error})"
            return _Decoded(pair.name, pair.image_path, bad=BadSample(pair.name, pair.label_path, reason))
        counts = np.bincount(train_ids.ravel(), minlength=256)
        return _Decoded(pair.name, pair.image_path, encode_label_png(train_ids), None, unknown, counts)

    def fingerprint(self) -> str:
        mapping = None if self.mapping is None else self.mapping.target_to_source.tolist()
        description = {
            "table": self.table.to_dict(),
            "mapping": mapping,
            "format": self.label_format,
            "unlabelled": self.unlabelled,
        }
        return json.dumps(description, sort_keys=True)


def _expected_mask(pair: SamplePair) -> str:
    image = Path(pair.image_path)
    parts = list(image.parts)
    if "images" in parts:
        index = len(parts) - 1 - parts[::-1].index("images")
        parts[index] = "masks"
        return str(Path(*parts).with_suffix(".png"))
    return f"a mask for {image}"


def format_unknown(key: int, colors: bool) -> str:
    """An unknown value (``"7"``) or colour code (``"#0a141e"``) as the report shows it."""
    return f"#{key:06x}" if colors else str(key)


# ----------------------------------------------------------------------------------------------------------
# Loading


def _as_table(class_table: ClassTable | str | os.PathLike) -> ClassTable:
    return class_table if isinstance(class_table, ClassTable) else load_class_table(class_table)


def load_folder(
    data_dir: str | os.PathLike,
    class_table: ClassTable | str | os.PathLike,
    split: str | None = None,
    streaming: bool = False,
    on_bad_sample: Literal["raise", "skip"] = "raise",
    *,
    mapping: ClassMapping | None = None,
    label_format: LabelFormat = "auto",
    image_pattern: str | None = None,
    mask_pattern: str | None = None,
    list_file: str | os.PathLike | None = None,
    return_report: bool = False,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
):
    """A folder of images and masks as image / label (train ids, 255 ignored) / name.

    Args:
        data_dir: the folder (layouts: module docstring).
        class_table: a :class:`ClassTable` or the path of its YAML / JSON file; masks are decoded through it.
        split: the split folder read (``DIR/{split}/images``); a folder without splits is read whole.
        streaming: an ``IterableDataset`` that decodes masks on the fly (pairs are still checked up front)
            instead of a cached map-style ``Dataset``.
        on_bad_sample: ``"raise"``: raise :class:`BadSampleError` listing every bad pair; ``"skip"``: drop
            them and list them in the report.
        mapping: express the labels in ``mapping.source``'s classes (``mapping.target`` must be
            ``class_table``): how a target with a table of its own is read for a model of the source's classes.
        label_format: ``"auto"`` (RGB masks are colour-coded, the others hold values), ``"values"`` or
            ``"colors"``.
        image_pattern / mask_pattern / list_file: other layouts (module docstring).
        return_report: also return the :class:`DataReport` (``(dataset, report)``); its
            ``unknown_by_file`` lists, per mask, the values (or ``#rrggbb`` colours) the table does not know.
        cache_dir: where decoded masks are cached (default ``$HF_DATASETS_CACHE/cpsl_hf``).
        progress: show a progress bar.
    """

    if on_bad_sample not in ("raise", "skip"):
        raise ValueError(f"on_bad_sample={on_bad_sample!r}; expected 'raise' or 'skip'")
    if label_format not in ("auto", "values", "colors"):
        raise ValueError(f"label_format={label_format!r}; expected 'auto', 'values' or 'colors'")
    table = _as_table(class_table)
    if mapping is not None and (mapping.target.names, mapping.target.values) != (table.names, table.values):
        raise ValueError("load_folder: mapping.target must be the class_table the folder is decoded with")
    decoder = FolderDecoder(table, mapping, label_format)
    pairs, orphans = scan_folder(
        data_dir, split, image_pattern=image_pattern, mask_pattern=mask_pattern, list_file=list_file
    )
    return load_pairs(
        "folder",
        data_dir,
        split,
        pairs,
        orphans,
        decoder,
        streaming,
        on_bad_sample,
        return_report,
        cache_dir,
        progress,
    )


def load_pairs(
    dataset_name: str,
    data_dir,
    split: str | None,
    pairs: Sequence[SamplePair],
    orphans: Sequence[BadSample],
    decoder: FolderDecoder,
    streaming: bool = False,
    on_bad_sample: str = "raise",
    return_report: bool = False,
    cache_dir=None,
    progress: bool = True,
):
    """Check, decode (through ``decoder``) and cache scanned pairs: the engine of :func:`load_folder` and of the
    benchmark readers (:mod:`cpsl_hf.data.benchmarks`). Returns the dataset (and the report)."""
    import datasets

    if on_bad_sample not in ("raise", "skip"):
        raise ValueError(f"on_bad_sample={on_bad_sample!r}; expected 'raise' or 'skip'")
    table, mapping = decoder.table, decoder.mapping
    out_classes = mapping.source.num_classes if mapping is not None else table.num_classes
    report = DataReport(dataset_name, str(data_dir), split, out_classes, num_found=len(pairs))
    report.label_format = decoder.label_format
    orphans = list(orphans)

    if streaming:
        bad = orphans + [result for result in map(decoder.check, pairs) if result is not None]
        if bad and on_bad_sample == "raise":
            raise BadSampleError(dataset_name, bad)
        bad_names = {sample.name for sample in bad}
        kept = [pair for pair in pairs if pair.name not in bad_names]
        report.skipped, report.num_kept = bad, len(kept)
        _log(report)
        dataset = datasets.IterableDataset.from_generator(
            _generate_streaming,
            features=dataset_features(),
            gen_kwargs={
                "pairs": kept,
                "decoder": decoder,
                "on_bad_sample": on_bad_sample,
                "dataset_name": dataset_name,
            },
        )
        return (dataset, report) if return_report else dataset

    cache_root = Path(cache_dir) if cache_dir is not None else _default_cache_dir()
    key = _fingerprint(decoder, split, on_bad_sample, pairs, orphans)
    target = cache_root / f"{dataset_name}-{split or 'all'}-{out_classes}-{key}"
    if not (target / "report.json").is_file():
        _build_cache(decoder, pairs, orphans, on_bad_sample, report, target, progress, dataset_name)
    report = DataReport.from_dict(json.loads((target / "report.json").read_text()))
    report.data_dir = str(data_dir)
    _log(report)
    dataset = datasets.Dataset.from_file(str(target / "data.arrow"))
    return (dataset, report) if return_report else dataset


def _default_cache_dir() -> Path:
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "cpsl_hf"


def _fingerprint(decoder: FolderDecoder, split, on_bad_sample, pairs, orphans) -> str:
    digest = hashlib.sha256(f"{_READER_VERSION}|{split}|{on_bad_sample}|{decoder.fingerprint()}".encode())
    for pair in pairs:
        for path in (pair.image_path, pair.label_path):
            if path is None:
                digest.update(b"<missing>")
                continue
            stat = os.stat(path)
            digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    for orphan in orphans:
        digest.update(f"{orphan.file}|{orphan.reason}".encode())
    return digest.hexdigest()[:20]


def _build_cache(
    decoder: FolderDecoder, pairs, orphans, on_bad_sample, report, target, progress, dataset_name="folder"
) -> None:
    import pyarrow as pa

    if on_bad_sample == "raise":  # fail fast with the full list from the cheap checks
        bad = orphans + [result for result in map(decoder.check, pairs) if result is not None]
        if bad:
            raise BadSampleError(dataset_name, bad)
    schema = dataset_features().arrow_schema
    colors = decoder.label_format == "colors" or None
    bad: list[BadSample] = list(orphans)
    unknown_total: dict[int, int] = {}
    unknown_by_file: dict[str, dict[str, int]] = {}
    train_id_counts = np.zeros(256, dtype=np.int64)
    kept = 0
    with atomic_directory(target) as staging:
        rows: list[dict] = []
        with pa.OSFile(str(staging / "data.arrow"), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            decoded_stream = progress_bar(
                map(decoder.convert, pairs), progress, "decoding masks", total=len(pairs), unit="sample"
            )
            for decoded, pair in zip(decoded_stream, pairs, strict=True):
                if decoded.bad is not None:
                    bad.append(decoded.bad)
                    continue
                kept += 1
                train_id_counts += decoded.train_id_counts
                if decoded.unknown:
                    is_color = _is_color_mask(pair.label_path) if colors is None else True
                    unknown_by_file[pair.label_path] = {
                        format_unknown(k, is_color): v for k, v in sorted(decoded.unknown.items())
                    }
                    for value, count in decoded.unknown.items():
                        unknown_total[value] = unknown_total.get(value, 0) + count
                rows.append(_example(decoded.name.replace("/", "__"), decoded.image_path, decoded.label_png))
                if len(rows) == 64:
                    writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=schema))
                    rows = []
            if rows:
                writer.write_batch(pa.RecordBatch.from_pylist(rows, schema=schema))
        if (bad and on_bad_sample == "raise") or kept == 0:
            raise BadSampleError(dataset_name, bad)
        report.skipped, report.num_kept = bad, kept
        report.out_of_table_pixels = unknown_total
        report.out_of_table_samples = len(unknown_by_file)
        report.unknown_by_file = unknown_by_file
        report.class_pixels = [int(n) for n in train_id_counts[: report.num_classes]]
        report.ignored_pixels = int(train_id_counts[IGNORE_INDEX])
        (staging / "report.json").write_text(json.dumps(report.to_dict(), indent=1))


def _is_color_mask(path: str) -> bool:
    with Image.open(path) as mask:
        return mask.mode in _COLOR_MODES


def _generate_streaming(
    pairs, decoder: FolderDecoder, on_bad_sample, dataset_name="folder"
) -> Iterator[dict]:
    for pair in pairs:
        decoded = decoder.convert(pair)
        if decoded.bad is not None:
            if on_bad_sample == "raise":
                raise BadSampleError(dataset_name, [decoded.bad])
            logger.warning("skipping %s", decoded.bad)
            continue
        if decoded.unknown:
            logger.info(
                "%s: values %s are not in the class table (set to 255)", pair.label_path, decoded.unknown
            )
        yield _example(decoded.name.replace("/", "__"), decoded.image_path, decoded.label_png)


def _log(report: DataReport) -> None:
    if report.skipped or report.out_of_table_pixels:
        logger.warning(report.summary())
    else:
        logger.info(report.summary())


# ----------------------------------------------------------------------------------------------------------
# Preparing a folder as parquet shards (scripts/prepare_dataset.py folder)


def prepare_folder(
    data_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    class_table: ClassTable | str | os.PathLike,
    num_shards: int | None = None,
    split: str | None = None,
    on_bad_sample: Literal["raise", "skip"] = "raise",
    push_to_hub: str | None = None,
    private: bool = True,
    token: str | None = None,
    progress: bool = True,
):
    """:func:`cpsl_hf.data.prepare.prepare_dataset` for your own folder: decode one split through the class
    table (:func:`load_folder`) and write it as parquet shards (original image bytes, train-id PNG labels) with
    a dataset card whose class list is the table's. ``split``: the folder's split read and the output split's
    name (default "train"). Returns a :class:`~cpsl_hf.data.prepare.PrepareResult`."""
    from cpsl_hf.utils import UsageError

    from . import prepare

    if num_shards is not None and not prepare._is_power_of_two(num_shards):
        raise UsageError(f"--num_shards {num_shards}: must be a power of two (1, 2, 4, ...)")
    if push_to_hub:
        token = prepare.check_hub_access(token)
    table = _as_table(class_table)
    split = split or "train"
    dataset, report = load_folder(
        data_dir, table, split, on_bad_sample=on_bad_sample, return_report=True, progress=progress
    )
    import datasets

    raw = dataset.cast_column("label", datasets.Image(decode=False)).cast_column(
        "image", datasets.Image(decode=False)
    )
    image_paths = raw["image"]
    total_bytes = sum(os.path.getsize(image["path"]) for image in image_paths)
    if num_shards is None:
        num_shards = prepare.choose_num_shards(len(raw), total_bytes)
    elif num_shards > len(raw):
        raise UsageError(f"--num_shards {num_shards}: more than the {len(raw)} samples to write")
    output_dir = Path(output_dir)

    def rows(start: int, stop: int):
        for row in raw.select(range(start, stop)):
            yield {
                "image": {
                    "bytes": Path(row["image"]["path"]).read_bytes(),
                    "path": Path(row["image"]["path"]).name,
                },
                "label": row["label"],
                "name": row["name"],
            }

    shard_files = prepare.write_split_shards(output_dir, split, len(raw), num_shards, rows)
    report.split = split
    info = prepare._update_info(output_dir, split, report, num_shards, "folder")
    if info.get("class_names") not in (None, list(table.names)):
        raise ValueError(
            f"{output_dir} already holds a folder dataset with the classes {info['class_names']}; use another "
            f"output_dir for the classes of {table.source}"
        )
    info["class_names"] = list(table.names)
    (output_dir / prepare.INFO_FILE).write_text(json.dumps(info, indent=1))
    (output_dir / "README.md").write_text(prepare.render_card(info))
    result = prepare.PrepareResult(report, output_dir, split, shard_files)
    if push_to_hub:
        result.url = prepare.push_prepared(output_dir, push_to_hub, private=private, token=token)
    return result
