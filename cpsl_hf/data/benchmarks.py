"""Readers for the field's other target benchmarks: ACDC, Dark Zurich, BDD100K and Mapillary Vistas.

Each yields the columns of :func:`cpsl_hf.data.load_cityscapes` (``image``, ``label`` as protocol train ids with
255 = ignore, ``name``) in the 19-class Cityscapes protocol (16 / 13 on request), from the official download's
layout, with the same checks, caching and :class:`~cpsl_hf.data.readers.DataReport` (unknown label values counted
per file). Splits without ground truth (ACDC and Dark Zurich ``test``, Dark Zurich ``train``) are read
*unlabelled*: every label pixel is 255 (a UDA target needs no labels; predictions for the benchmark servers are
written with ``scripts/predict.py --format labelids``).

- **ACDC** (``load_acdc``): ``rgb_anon/{condition}/{split}/{sequence}/*_rgb_anon.png`` with
  ``gt/{condition}/{split}/{sequence}/*_gt_labelIds.png`` (Cityscapes label ids); conditions fog, night, rain,
  snow (all found, or the ones asked); splits train, val (labelled), test (unlabelled). The field reports mIoU on
  the 406 val images of all four conditions (and the test server's); per condition on request.
- **Dark Zurich** (``load_dark_zurich``): ``rgb_anon/{split}/{time}/{sequence}/*_rgb_anon.png`` with
  ``gt/val/night/{sequence}/*_gt_labelIds.png``; train (unlabelled; ``times``: night by default, also day and
  twilight), val (the 50 labelled night images the field reports), test (unlabelled, for the server).
- **BDD100K** semantic segmentation (``load_bdd100k``): ``images/10k/{split}/*.jpg`` with
  ``labels/sem_seg/masks/{split}/*.png`` (the 19 Cityscapes train ids); splits train, val (test unlabelled).
- **Mapillary Vistas** (``load_mapillary``): ``{training,validation,testing}/images/*.jpg`` with
  ``{split}/{version}/labels/*.png`` (or ``{split}/labels/*.png`` of the v1 download) and the download's
  ``config_{version}.json`` (``config.json``), whose label names are mapped onto the 19 Cityscapes classes by
  :func:`mapillary_to_cityscapes` (v1.2's 66 and v2.0's 124 labels). ``split`` accepts train / val / test too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

from . import protocols
from .class_table import ClassTable, protocol_table
from .folder import FolderDecoder, load_pairs
from .readers import BadSample, LayoutError, SamplePair

__all__ = [
    "ACDC_CONDITIONS",
    "BENCHMARK_LAYOUTS",
    "bdd100k_table",
    "load_acdc",
    "load_bdd100k",
    "load_dark_zurich",
    "load_mapillary",
    "mapillary_table",
    "mapillary_to_cityscapes",
]

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
DARK_ZURICH_TIMES = ("day", "twilight", "night")
MAPILLARY_SPLITS = {"train": "training", "val": "validation", "test": "testing"}

BENCHMARK_LAYOUTS = {
    "acdc": "ACDC: DATA_DIR/rgb_anon/{condition}/{split}/{sequence}/*_rgb_anon.png and "
    "DATA_DIR/gt/{condition}/{split}/{sequence}/*_gt_labelIds.png (conditions fog, night, rain, snow)",
    "dark_zurich": "Dark Zurich: DATA_DIR/rgb_anon/{split}/{time}/{sequence}/*_rgb_anon.png and "
    "DATA_DIR/gt/val/night/{sequence}/*_gt_labelIds.png",
    "bdd100k": "BDD100K: DATA_DIR/images/10k/{split}/*.jpg and DATA_DIR/labels/sem_seg/masks/{split}/*.png",
    "mapillary": "Mapillary Vistas: DATA_DIR/{training,validation,testing}/images/*.jpg, "
    "DATA_DIR/{split}/{version}/labels/*.png and DATA_DIR/config_{version}.json",
}


def _layout_error(kind: str, data_dir: Path, problem: str) -> LayoutError:
    return LayoutError(f"--data_dir {data_dir}: {problem}. Expected layout: {BENCHMARK_LAYOUTS[kind]}")


def _check_split(kind: str, split: str, splits: Sequence[str]) -> None:
    if split not in splits:
        raise ValueError(f"{kind}: split={split!r}; expected one of {', '.join(splits)}")


def _pair_suffixed(image_root: Path, label_root: Path | None, image_suffix: str, label_suffix: str):
    """Pairs ``image_root/**/X{image_suffix}`` with ``label_root/<same folders>/X{label_suffix}`` (None: no
    labels), and the labels without an image."""
    images = sorted(path for path in image_root.rglob(f"*{image_suffix}") if path.is_file())
    pairs = []
    for path in images:
        stem = path.name[: -len(image_suffix)]
        relative = path.parent.relative_to(image_root)
        label = None if label_root is None else label_root / relative / f"{stem}{label_suffix}"
        pairs.append(
            SamplePair(stem, str(path), str(label) if label is not None and label.is_file() else None)
        )
    orphans = []
    if label_root is not None and label_root.is_dir():
        stems = {pair.name for pair in pairs}
        orphans = [
            BadSample(path.name[: -len(label_suffix)], str(path), "label without an image")
            for path in sorted(label_root.rglob(f"*{label_suffix}"))
            if path.name[: -len(label_suffix)] not in stems
        ]
    return pairs, orphans


def _load(kind, data_dir, split, pairs, orphans, table, unlabelled, streaming, on_bad_sample, options):
    decoder = FolderDecoder(table, None, "values", unlabelled=unlabelled)
    return load_pairs(kind, data_dir, split, pairs, orphans, decoder, streaming, on_bad_sample, **options)


# ----------------------------------------------------------------------------------------------------------
# ACDC and Dark Zurich: Cityscapes label ids


def load_acdc(
    data_dir,
    split: str = "val",
    conditions: Sequence[str] | None = None,
    num_classes: int = 19,
    streaming: bool = False,
    on_bad_sample: str = "raise",
    **options,
):
    """ACDC ``split`` ("train", "val", "test") of ``conditions`` (None: every condition found) as image / label
    (train ids; all 255 for test) / name. ``options``: ``return_report``, ``cache_dir``, ``progress``."""
    data_dir = Path(data_dir)
    _check_split("acdc", split, ("train", "val", "test"))
    if not (data_dir / "rgb_anon").is_dir():
        raise _layout_error("acdc", data_dir, "missing folder rgb_anon/")
    found = [c for c in ACDC_CONDITIONS if (data_dir / "rgb_anon" / c / split).is_dir()]
    if conditions is None:
        conditions = found
        if not conditions:
            raise _layout_error("acdc", data_dir, f"no rgb_anon/{{condition}}/{split}/ folder")
    unknown = [c for c in conditions if c not in ACDC_CONDITIONS]
    if unknown:
        raise ValueError(
            f"acdc: unknown condition(s) {unknown}; expected some of {', '.join(ACDC_CONDITIONS)}"
        )
    missing = [c for c in conditions if c not in found]
    if missing:
        raise _layout_error(
            "acdc", data_dir, f"missing folder(s) {', '.join(f'rgb_anon/{c}/{split}/' for c in missing)}"
        )
    unlabelled = split == "test"
    pairs, orphans = [], []
    for condition in conditions:
        label_root = None if unlabelled else data_dir / "gt" / condition / split
        if label_root is not None and not label_root.is_dir():
            raise _layout_error("acdc", data_dir, f"missing folder gt/{condition}/{split}/")
        found_pairs, found_orphans = _pair_suffixed(
            data_dir / "rgb_anon" / condition / split, label_root, "_rgb_anon.png", "_gt_labelIds.png"
        )
        pairs += found_pairs
        orphans += found_orphans
    if not pairs:
        raise _layout_error("acdc", data_dir, f"no *_rgb_anon.png images for split {split}")
    name = f"acdc-{'+'.join(conditions)}"
    return _load(
        name,
        data_dir,
        split,
        pairs,
        orphans,
        protocol_table(num_classes),
        unlabelled,
        streaming,
        on_bad_sample,
        options,
    )


def load_dark_zurich(
    data_dir,
    split: str = "val",
    num_classes: int = 19,
    streaming: bool = False,
    on_bad_sample: str = "raise",
    *,
    times: Sequence[str] = ("night",),
    **options,
):
    """Dark Zurich ``split`` ("train": unlabelled, of ``times``; "val": the labelled night images; "test":
    unlabelled night) as image / label / name. ``options``: ``return_report``, ``cache_dir``, ``progress``."""
    data_dir = Path(data_dir)
    _check_split("dark_zurich", split, ("train", "val", "test"))
    unknown = [t for t in times if t not in DARK_ZURICH_TIMES]
    if unknown:
        raise ValueError(
            f"dark_zurich: unknown time(s) {unknown}; expected some of {', '.join(DARK_ZURICH_TIMES)}"
        )
    if split != "train":
        times = ("night",)
    unlabelled = split != "val"
    pairs, orphans = [], []
    for time in times:
        image_root = data_dir / "rgb_anon" / split / time
        if not image_root.is_dir():
            raise _layout_error("dark_zurich", data_dir, f"missing folder rgb_anon/{split}/{time}/")
        label_root = None if unlabelled else data_dir / "gt" / split / time
        if label_root is not None and not label_root.is_dir():
            raise _layout_error("dark_zurich", data_dir, f"missing folder gt/{split}/{time}/")
        found_pairs, found_orphans = _pair_suffixed(
            image_root, label_root, "_rgb_anon.png", "_gt_labelIds.png"
        )
        pairs += found_pairs
        orphans += found_orphans
    if not pairs:
        raise _layout_error("dark_zurich", data_dir, f"no *_rgb_anon.png images for split {split}")
    return _load(
        "dark_zurich",
        data_dir,
        split,
        pairs,
        orphans,
        protocol_table(num_classes),
        unlabelled,
        streaming,
        on_bad_sample,
        options,
    )


# ----------------------------------------------------------------------------------------------------------
# BDD100K: Cityscapes train ids


def _table_by_names(
    num_classes: int, values_by_name: dict[str, Sequence[int]], void: Sequence[int], source: str
):
    names = protocols.class_names(num_classes)
    class_values = [tuple(values_by_name.get(name, ())) for name in names]
    empty = [name for name, values in zip(names, class_values, strict=True) if not values]
    if empty:
        raise ValueError(f"{source}: no label maps to the class(es) {', '.join(empty)}")
    used = {value for values in class_values for value in values}
    dropped = [v for name, vs in values_by_name.items() if name not in names for v in vs]
    return ClassTable(
        names=tuple(names),
        values=tuple(class_values),
        void_values=tuple(sorted((set(void) | set(dropped)) - used)),
        colors=tuple(tuple(int(c) for c in row) for row in protocols.palette(num_classes)),
        label_ids=protocol_table(num_classes).label_ids,
        source=source,
        name=f"{source}-{num_classes}",
    )


def bdd100k_table(num_classes: int = 19) -> ClassTable:
    """BDD100K masks hold the 19 Cityscapes train ids (255 void): the protocol's classes by name."""
    by_name = {name: (train_id,) for train_id, name in enumerate(protocols.CITYSCAPES_CLASSES)}
    return _table_by_names(num_classes, by_name, (255,), "bdd100k")


def load_bdd100k(
    data_dir,
    split: str = "val",
    num_classes: int = 19,
    streaming: bool = False,
    on_bad_sample: str = "raise",
    **options,
):
    """BDD100K semantic segmentation ``split`` ("train", "val"; "test" unlabelled) as image / label / name."""
    data_dir = Path(data_dir)
    _check_split("bdd100k", split, ("train", "val", "test"))
    image_root = data_dir / "images" / "10k" / split
    if not image_root.is_dir():
        raise _layout_error("bdd100k", data_dir, f"missing folder images/10k/{split}/")
    unlabelled = split == "test"
    label_root = None if unlabelled else data_dir / "labels" / "sem_seg" / "masks" / split
    if label_root is not None and not label_root.is_dir():
        raise _layout_error("bdd100k", data_dir, f"missing folder labels/sem_seg/masks/{split}/")
    pairs, orphans = _pair_suffixed(image_root, label_root, ".jpg", ".png")
    if not pairs:
        raise _layout_error("bdd100k", data_dir, f"no .jpg images in images/10k/{split}/")
    return _load(
        "bdd100k",
        data_dir,
        split,
        pairs,
        orphans,
        bdd100k_table(num_classes),
        unlabelled,
        streaming,
        on_bad_sample,
        options,
    )


# ----------------------------------------------------------------------------------------------------------
# Mapillary Vistas: its own label set, mapped onto the Cityscapes classes by name

#: Mapillary label names (or name prefixes ending in ``--``) -> Cityscapes class. Every other label is void.
#: Lane and crosswalk markings lie on the road; sign backs, sign frames aside, are void.
_MAPILLARY_RULES: tuple[tuple[str, str], ...] = (
    ("construction--flat--road", "road"),
    ("construction--flat--bike-lane", "road"),
    ("construction--flat--crosswalk-plain", "road"),
    ("construction--flat--service-lane", "road"),
    ("marking--", "road"),
    ("marking-only--", "road"),
    ("construction--flat--sidewalk", "sidewalk"),
    ("construction--flat--curb-cut", "sidewalk"),
    ("construction--flat--pedestrian-area", "sidewalk"),
    ("construction--barrier--curb", "sidewalk"),
    ("construction--structure--building", "building"),
    ("construction--barrier--wall", "wall"),
    ("construction--barrier--fence", "fence"),
    ("object--support--pole", "pole"),
    ("object--support--utility-pole", "pole"),
    ("object--support--traffic-sign-frame", "pole"),
    ("object--street-light", "pole"),
    ("object--traffic-light", "traffic light"),
    ("object--traffic-light--", "traffic light"),
    ("object--traffic-sign--front", "traffic sign"),
    ("nature--vegetation", "vegetation"),
    ("nature--terrain", "terrain"),
    ("nature--sky", "sky"),
    ("human--person", "person"),
    ("human--person--", "person"),
    ("human--rider--", "rider"),
    ("object--vehicle--car", "car"),
    ("object--vehicle--truck", "truck"),
    ("object--vehicle--bus", "bus"),
    ("object--vehicle--on-rails", "train"),
    ("object--vehicle--motorcycle", "motorcycle"),
    ("object--vehicle--bicycle", "bicycle"),
)


def mapillary_to_cityscapes(name: str) -> str | None:
    """The Cityscapes class of a Mapillary label name (v1.2 or v2.0), or None (void)."""
    for pattern, cityscapes in _MAPILLARY_RULES:
        if name == pattern or (pattern.endswith("--") and name.startswith(pattern)):
            return cityscapes
    return None


def _mapillary_config(data_dir: Path, version: str) -> Path:
    candidates = [data_dir / f"config_{version}.json"] + (
        [data_dir / "config.json"] if version == "v1.2" else []
    )
    for candidate in candidates:  # config.json: the v1 download's (v1.2 labels)
        if candidate.is_file():
            return candidate
    raise _layout_error("mapillary", data_dir, f"missing config_{version}.json (the download's label list)")


def mapillary_table(config_path: str | os.PathLike, num_classes: int = 19) -> ClassTable:
    """The class table of a Mapillary download: label index (the mask value) -> Cityscapes class, from the
    download's ``config_*.json`` (``{"labels": [{"name": ...}, ...]}`` in index order)."""
    config_path = Path(config_path)
    try:
        labels = json.loads(config_path.read_text())["labels"]
        names = [str(label["name"]) for label in labels]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise LayoutError(
            f"{config_path}: not a Mapillary config ({type(error).__name__}: {error})"
        ) from None
    by_name: dict[str, list[int]] = {}
    void = []
    for index, label_name in enumerate(names):
        cityscapes = mapillary_to_cityscapes(label_name)
        (by_name.setdefault(cityscapes, []) if cityscapes else void).append(index)
    return _table_by_names(num_classes, by_name, void, f"mapillary ({config_path.name})")


def load_mapillary(
    data_dir,
    split: str = "validation",
    version: str = "v1.2",
    num_classes: int = 19,
    streaming: bool = False,
    on_bad_sample: str = "raise",
    **options,
):
    """Mapillary Vistas ``split`` ("training", "validation"; "testing" unlabelled; or train / val / test) with
    the ``version`` label set ("v1.2" or "v2.0") mapped onto the Cityscapes classes, as image / label / name."""
    data_dir = Path(data_dir)
    split = MAPILLARY_SPLITS.get(split, split)
    _check_split("mapillary", split, tuple(MAPILLARY_SPLITS.values()))
    if version not in ("v1.2", "v2.0"):
        raise ValueError(f"mapillary: version={version!r}; expected 'v1.2' or 'v2.0'")
    image_root = data_dir / split / "images"
    if not image_root.is_dir():
        raise _layout_error("mapillary", data_dir, f"missing folder {split}/images/")
    unlabelled = split == "testing"
    label_root = None
    if not unlabelled:
        label_root = next(
            (
                root
                for root in (data_dir / split / version / "labels", data_dir / split / "labels")
                if root.is_dir()
            ),
            None,
        )
        if label_root is None:
            raise _layout_error("mapillary", data_dir, f"missing folder {split}/{version}/labels/")
    table = mapillary_table(_mapillary_config(data_dir, version), num_classes)
    pairs, orphans = _pair_suffixed(image_root, label_root, ".jpg", ".png")
    if not pairs:
        raise _layout_error("mapillary", data_dir, f"no .jpg images in {split}/images/")
    return _load(
        "mapillary", data_dir, split, pairs, orphans, table, unlabelled, streaming, on_bad_sample, options
    )
