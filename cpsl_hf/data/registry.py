"""The datasets the package reads by name, in one table, and the one function that loads any of them.

Every caller that turns a dataset name into a ``datasets`` dataset (the trainer's ``--source`` / ``--target``,
``scripts/evaluate.py --dataset``) goes through :func:`load_dataset`, and every list of names, class counts,
display names or folder layouts (the trainer's arguments, the readers' errors, the prepared dataset card) is
read from :data:`DATASET_SPECS`:

- ``synthetic``: the built-in synthetic shift, generated on first use; 19 classes; splits train and
  validation ("val" too); ``data_dir``, optional, is the folder its generated splits are kept in.
- ``synthetic-hard``: the same shift, its ``hard`` variant.
- ``gta5``: the GTA5 download (``data_dir``); 19, 16 or 13 classes; no official split: the whole folder.
- ``synthia``: the SYNTHIA-RAND-CITYSCAPES download; 16 or 13 classes; no official split: the whole folder.
- ``cityscapes``: the Cityscapes download; 19, 16 or 13 classes; splits train, val, test.
- ``acdc``, ``dark_zurich``, ``bdd100k``, ``mapillary``: the target benchmarks' downloads
  (:mod:`cpsl_hf.data.benchmarks`); 19, 16 or 13 classes; their official splits (test splits, and Dark
  Zurich's train, have no ground truth: labels all 255).
- ``folder``: your own folder of images and masks (``data_dir``), decoded through a class table
  (``class_table``, required; :mod:`cpsl_hf.data.class_table`); the classes are the table's; splits are the
  folder's ``{split}/`` subfolders, a folder without them is read whole.
- ``prepared``: parquet shards written by ``scripts/prepare_dataset.py``, ``data_dir`` their folder or Hub
  dataset repo id; the protocol and splits they were written with.

A prepared dataset can also be named by its folder or Hub dataset repo id directly (``--source
/data/gta5-parquet``, ``--source user/gta5-cpsl``): :func:`dataset_kind` tells the forms apart.

Only the standard library is imported here; readers (and ``datasets``) are imported when a dataset is loaded.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Literal

__all__ = [
    "DATASETS",
    "DATASET_SPECS",
    "DOWNLOADS",
    "SYNTHETIC_OPTIONS",
    "TRAINING_DATASETS",
    "DatasetSpec",
    "dataset_kind",
    "dataset_spec",
    "is_hub_repo_id",
    "load_dataset",
]

HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
"""``owner/name``: what a Hub dataset (or model) repo id looks like."""

SYNTHETIC_OPTIONS = ("domain", "num_images", "image_size", "seed", "cache_dir", "variant")
"""Keyword options of :func:`load_dataset` for the synthetic shift (those of
:func:`cpsl_hf.data.synthetic.load_synthetic` but ``split``); other datasets ignore them."""


@dataclass(frozen=True)
class DatasetSpec:
    """How one named dataset is read.

    Attributes:
        name: the name callers use (``--source``, ``--target``, ``--dataset``).
        display_name: short human name (model cards, tables): "GTA5", "SYNTHIA", "Cityscapes", ...
        long_name: the dataset's full official name (dataset cards): "SYNTHIA-RAND-CITYSCAPES", ...
        loader: how it is read: ``"synthetic"`` (generated), ``"download"`` (an official download's folder,
            labels converted once and cached) or ``"prepared"`` (parquet shards, local or on the Hub).
        reader: the function of :mod:`cpsl_hf.data` that reads it, as ``"module.function"``
            (:meth:`reader_function` imports it).
        splits: the split names the dataset has; empty for a download without an official split (the whole
            folder is read, whatever split is asked) and for a prepared dataset (it has the splits it was
            written with; any name is passed on).
        official_split: False when the download has no official train / val split (GTA5, SYNTHIA).
        num_classes: the label protocols it provides (empty for ``folder``: its class table's).
        default_num_classes: the protocol read when none is asked (None: the prepared dataset's own).
        needs_data_dir: the name alone does not say where the data is: ``data_dir`` is required (the
            download's folder; for ``prepared``, the folder or Hub repo id).
        layout: what ``data_dir`` must hold, quoted in error messages.
        variant: for the synthetic shift, the variant this name fixes (None: the caller's ``variant``).
        training_name: the trainer's ``--source`` / ``--target`` accept this name (``synthetic-hard`` is
            evaluation's name for ``--synthetic_variant hard``; a prepared dataset is given to the trainer by
            its folder or repo id).
    """

    name: str
    display_name: str
    long_name: str
    loader: Literal["synthetic", "download", "benchmark", "folder", "prepared"]
    reader: str
    splits: tuple[str, ...]
    official_split: bool
    num_classes: tuple[int, ...]
    default_num_classes: int | None
    needs_data_dir: bool
    layout: str
    variant: str | None = None
    training_name: bool = True

    def reader_function(self) -> Callable:
        """The reader (``load_synthetic``, ``load_gta5``, ...), imported now."""
        import importlib

        module, function = self.reader.rsplit(".", 1)
        return getattr(importlib.import_module(f"cpsl_hf.data.{module}"), function)


_SYNTHETIC_LAYOUT = (
    "the built-in synthetic shift is generated on first use (no download); DATA_DIR, if given, is the folder "
    "its generated splits are kept in (default $CPSL_HF_CACHE/synthetic or ~/.cache/cpsl_hf/synthetic)"
)

_SPECS = (
    DatasetSpec(
        name="synthetic",
        display_name="synthetic",
        long_name="the built-in synthetic street-scene shift",
        loader="synthetic",
        reader="synthetic.load_synthetic",
        splits=("train", "validation"),
        official_split=True,
        num_classes=(19,),
        default_num_classes=19,
        needs_data_dir=False,
        layout=_SYNTHETIC_LAYOUT,
    ),
    DatasetSpec(
        name="synthetic-hard",
        display_name="synthetic (hard)",
        long_name="the built-in synthetic street-scene shift, hard variant",
        loader="synthetic",
        reader="synthetic.load_synthetic",
        splits=("train", "validation"),
        official_split=True,
        num_classes=(19,),
        default_num_classes=19,
        needs_data_dir=False,
        layout=_SYNTHETIC_LAYOUT,
        variant="hard",
        training_name=False,
    ),
    DatasetSpec(
        name="gta5",
        display_name="GTA5",
        long_name="GTA5",
        loader="download",
        reader="readers.load_gta5",
        splits=(),
        official_split=False,
        num_classes=(19, 16, 13),
        default_num_classes=19,
        needs_data_dir=True,
        layout=(
            "GTA5: DATA_DIR/images/*.png and DATA_DIR/labels/*.png with the same file names "
            "(labels are palette PNGs whose indices are Cityscapes label ids)"
        ),
    ),
    DatasetSpec(
        name="synthia",
        display_name="SYNTHIA",
        long_name="SYNTHIA-RAND-CITYSCAPES",
        loader="download",
        reader="readers.load_synthia",
        splits=(),
        official_split=False,
        num_classes=(16, 13),
        default_num_classes=16,
        needs_data_dir=True,
        layout=(
            "SYNTHIA-RAND-CITYSCAPES: DATA_DIR/RGB/*.png and DATA_DIR/GT/LABELS/*.png with the same file names "
            "(labels are 16-bit PNGs with the class id in the first channel)"
        ),
    ),
    DatasetSpec(
        name="cityscapes",
        display_name="Cityscapes",
        long_name="Cityscapes",
        loader="download",
        reader="readers.load_cityscapes",
        splits=("train", "val", "test"),
        official_split=True,
        num_classes=(19, 16, 13),
        default_num_classes=19,
        needs_data_dir=True,
        layout=(
            "Cityscapes: DATA_DIR/leftImg8bit/{split}/{city}/*_leftImg8bit.png and "
            "DATA_DIR/gtFine/{split}/{city}/*_gtFine_labelIds.png"
        ),
    ),
    DatasetSpec(
        name="acdc",
        display_name="ACDC",
        long_name="ACDC (Adverse Conditions Dataset with Correspondences)",
        loader="benchmark",
        reader="benchmarks.load_acdc",
        splits=("train", "val", "test"),
        official_split=True,
        num_classes=(19, 16, 13),
        default_num_classes=19,
        needs_data_dir=True,
        layout=(
            "ACDC: DATA_DIR/rgb_anon/{condition}/{split}/{sequence}/*_rgb_anon.png and "
            "DATA_DIR/gt/{condition}/{split}/{sequence}/*_gt_labelIds.png (conditions fog, night, rain, snow)"
        ),
    ),
    DatasetSpec(
        name="dark_zurich",
        display_name="Dark Zurich",
        long_name="Dark Zurich",
        loader="benchmark",
        reader="benchmarks.load_dark_zurich",
        splits=("train", "val", "test"),
        official_split=True,
        num_classes=(19, 16, 13),
        default_num_classes=19,
        needs_data_dir=True,
        layout=(
            "Dark Zurich: DATA_DIR/rgb_anon/{split}/{time}/{sequence}/*_rgb_anon.png and "
            "DATA_DIR/gt/val/night/{sequence}/*_gt_labelIds.png"
        ),
    ),
    DatasetSpec(
        name="bdd100k",
        display_name="BDD100K",
        long_name="BDD100K semantic segmentation",
        loader="benchmark",
        reader="benchmarks.load_bdd100k",
        splits=("train", "val", "test"),
        official_split=True,
        num_classes=(19, 16, 13),
        default_num_classes=19,
        needs_data_dir=True,
        layout="BDD100K: DATA_DIR/images/10k/{split}/*.jpg and DATA_DIR/labels/sem_seg/masks/{split}/*.png",
    ),
    DatasetSpec(
        name="mapillary",
        display_name="Mapillary Vistas",
        long_name="Mapillary Vistas (v1.2 labels mapped to the Cityscapes classes)",
        loader="benchmark",
        reader="benchmarks.load_mapillary",
        splits=("training", "validation", "testing", "train", "val", "test"),
        official_split=True,
        num_classes=(19, 16, 13),
        default_num_classes=19,
        needs_data_dir=True,
        layout=(
            "Mapillary Vistas: DATA_DIR/{training,validation,testing}/images/*.jpg, "
            "DATA_DIR/{split}/v1.2/labels/*.png and DATA_DIR/config_v1.2.json"
        ),
    ),
    DatasetSpec(
        name="folder",
        display_name="folder",
        long_name="a folder of images and masks with a class table",
        loader="folder",
        reader="folder.load_folder",
        splits=(),
        official_split=True,
        num_classes=(),
        default_num_classes=None,
        needs_data_dir=True,
        layout=(
            "DATA_DIR/images/** with DATA_DIR/masks/** (or DATA_DIR/{split}/images with DATA_DIR/{split}/masks), "
            "paired by relative path without extension, and a class table (--class_table FILE)"
        ),
    ),
    DatasetSpec(
        name="prepared",
        display_name="prepared",
        long_name="a dataset prepared by scripts/prepare_dataset.py",
        loader="prepared",
        reader="readers.load_prepared",
        splits=(),
        official_split=True,
        num_classes=(19, 16, 13),
        default_num_classes=None,
        needs_data_dir=True,
        layout=(
            "a folder written by scripts/prepare_dataset.py (DATA_DIR/data/{split}-XXXXX-of-YYYYY.parquet) "
            "or a Hub dataset repo id owner/name holding the same files"
        ),
        training_name=False,
    ),
)

DATASET_SPECS: MappingProxyType[str, DatasetSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})
"""Every named dataset, by name."""

DATASETS: tuple[str, ...] = tuple(DATASET_SPECS)
"""Every dataset name :func:`load_dataset` accepts (besides a prepared folder or Hub repo id)."""

TRAINING_DATASETS: tuple[str, ...] = tuple(spec.name for spec in _SPECS if spec.training_name)
"""The names the trainer's ``--source`` / ``--target`` accept (besides a prepared folder or Hub repo id)."""

DOWNLOADS: tuple[str, ...] = tuple(spec.name for spec in _SPECS if spec.loader == "download")
"""The official downloads (read from their folder; what ``scripts/prepare_dataset.py`` converts)."""


def is_hub_repo_id(text: str) -> bool:
    """True when ``text`` has the form of a Hub repo id, ``owner/name``."""
    return HUB_REPO_ID.match(str(text)) is not None


def dataset_kind(name: str, known: Collection[str] = DATASETS) -> str:
    """What ``name`` designates: the name itself when it is in ``known`` (default: every registered name),
    ``"prepared_dir"`` for an existing local folder, ``"hub"`` for an ``owner/name`` repo id, else
    ``"unknown"``. A known name wins over a folder of the same name."""
    if name in known:
        return name
    if os.path.isdir(name):
        return "prepared_dir"
    if is_hub_repo_id(name):
        return "hub"
    return "unknown"


def _unknown_dataset(name: str) -> ValueError:
    return ValueError(
        f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}, a folder written by "
        "scripts/prepare_dataset.py, or a Hub dataset repo id (owner/name)"
    )


def dataset_spec(name: str) -> DatasetSpec:
    """The :class:`DatasetSpec` of ``name``: a registered name, or a prepared folder / Hub dataset repo id
    (the ``prepared`` spec, with ``needs_data_dir=False``: the name says where the data is).

    Raises:
        ValueError: for any other name, listing the accepted names.
    """
    name = os.fspath(name) if isinstance(name, os.PathLike) else name
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a string, got {type(name).__name__}")
    kind = dataset_kind(name)
    if kind in DATASET_SPECS:
        return DATASET_SPECS[kind]
    if kind in ("prepared_dir", "hub"):
        return replace(DATASET_SPECS["prepared"], needs_data_dir=False)
    raise _unknown_dataset(name)


def load_dataset(
    name: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    split: str = "train",
    num_classes: int | None = None,
    streaming: bool = False,
    *,
    label_cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    class_table=None,
    class_mapping=None,
    reader_options: dict | None = None,
    **synthetic_options,
):
    """Load a dataset by name: a ``datasets.Dataset`` (or ``IterableDataset``) with columns ``image`` (RGB),
    ``label`` (protocol train ids, 255 ignored) and ``name``.

    Args:
        name: a name of :data:`DATASETS`, or a prepared folder / Hub dataset repo id.
        data_dir: where the data is: the download's folder (gta5, synthia, cityscapes; required), the folder
            or Hub repo id of ``prepared`` (required), the folder the synthetic splits are kept in (optional, the
            same as the ``cache_dir`` option). Not used when ``name`` is itself a folder or repo id.
        split: the split read. Cityscapes: the folder under ``leftImg8bit/`` ("train", "val", "test"); GTA5
            and SYNTHIA have no official split and read the whole folder whatever ``split`` is; synthetic:
            "train" or "validation" ("val" is accepted for it); prepared: the split name it was written with.
        num_classes: label protocol; default the dataset's :attr:`DatasetSpec.default_num_classes`. Must be
            one the dataset provides (:attr:`DatasetSpec.num_classes`). A prepared dataset holds the protocol
            it was written with: given, ``num_classes`` must be that one (else a ``UsageError``).
        streaming: an ``IterableDataset`` (downloads convert labels on the fly; prepared shards are streamed)
            instead of a map-style ``Dataset``. The synthetic shift is always map-style.
        label_cache_dir: where the download readers cache converted labels (default
            ``$HF_DATASETS_CACHE/cpsl_hf``); other datasets ignore it.
        progress: the download readers' progress bars.
        class_table: for ``folder`` (required): a :class:`~cpsl_hf.data.class_table.ClassTable` or the path
            of its file; ``num_classes``, when given, must equal its number of classes. Other datasets: their
            protocol's names must equal the table's (they are read as their protocol).
        reader_options: for the target benchmarks, keyword options of their reader (``conditions`` of ACDC,
            ``times`` of Dark Zurich, ``version`` of Mapillary); other datasets ignore them.
        class_mapping: for ``folder``: a :class:`~cpsl_hf.data.class_table.ClassMapping` whose ``target`` is
            ``class_table``; the labels are expressed in its source's classes.
        **synthetic_options: options of the synthetic shift (:data:`SYNTHETIC_OPTIONS`: ``domain`` "source"
            or "target", ``num_images``, ``image_size``, ``seed``, ``cache_dir``, ``variant``), as
            :func:`cpsl_hf.data.synthetic.load_synthetic` takes them; other datasets ignore them, so one call
            serves every name. ``synthetic-hard`` fixes ``variant="hard"``.

    Raises:
        ValueError: unknown name, a protocol the dataset does not provide, a missing ``data_dir``, conflicting
            synthetic options.
        TypeError: an option that is not one of :data:`SYNTHETIC_OPTIONS`.
        cpsl_hf.data.readers.LayoutError: ``data_dir`` missing or not in the expected layout.
    """
    unknown_options = sorted(set(synthetic_options) - set(SYNTHETIC_OPTIONS))
    if unknown_options:
        raise TypeError(
            f"load_dataset: unexpected option(s) {', '.join(unknown_options)}; the synthetic options are "
            f"{', '.join(SYNTHETIC_OPTIONS)}"
        )
    spec = dataset_spec(name)
    name = os.fspath(name)
    if spec.loader == "folder":
        return _load_folder(
            spec,
            data_dir,
            split,
            num_classes,
            streaming,
            class_table,
            class_mapping,
            label_cache_dir,
            progress,
        )
    if class_table is not None:
        _check_protocol_names(spec, num_classes, class_table)
    if num_classes is None:
        num_classes = spec.default_num_classes
    elif spec.loader != "prepared" and num_classes not in spec.num_classes:
        provided = " or ".join(str(n) for n in spec.num_classes)
        raise ValueError(f"{spec.name} provides {provided} classes, got num_classes={num_classes}")
    if spec.loader == "synthetic":
        return _load_synthetic(spec, data_dir, split, synthetic_options)
    if spec.loader == "prepared":
        location = data_dir if name == spec.name else name
        if location is None:
            raise ValueError(f"dataset {name!r} needs data_dir: {spec.layout}")
        return spec.reader_function()(location, split=split, streaming=streaming, num_classes=num_classes)
    if data_dir is None:
        raise ValueError(
            f"dataset {name!r} needs data_dir, the folder of the download. Expected layout: {spec.layout}"
        )
    options = {
        "num_classes": num_classes,
        "streaming": streaming,
        "cache_dir": label_cache_dir,
        "progress": progress,
    }
    if spec.official_split:
        options["split"] = split
    if spec.loader == "benchmark" and reader_options:
        options.update(reader_options)
    return spec.reader_function()(data_dir, **options)


def _load_folder(spec, data_dir, split, num_classes, streaming, class_table, mapping, cache_dir, progress):
    from .class_table import load_class_table

    if data_dir is None:
        raise ValueError(f"dataset 'folder' needs data_dir. Expected layout: {spec.layout}")
    if class_table is None:
        raise ValueError("dataset 'folder' needs a class table (class_table=FILE, --class_table FILE)")
    if isinstance(class_table, (str, os.PathLike)):
        class_table = load_class_table(class_table)
    out_classes = mapping.source.num_classes if mapping is not None else class_table.num_classes
    if num_classes is not None and num_classes != out_classes:
        raise ValueError(
            f"num_classes={num_classes} disagrees with the class table {class_table.source}, which has "
            f"{out_classes} classes"
        )
    return spec.reader_function()(
        data_dir,
        class_table,
        split,
        streaming=streaming,
        mapping=mapping,
        cache_dir=cache_dir,
        progress=progress,
    )


def _check_protocol_names(spec: DatasetSpec, num_classes: int | None, class_table) -> None:
    """A built-in dataset is read as its protocol: a class table given with it must name the same classes."""
    from . import protocols
    from .class_table import load_class_table

    if isinstance(class_table, (str, os.PathLike)):
        class_table = load_class_table(class_table)
    count = num_classes if num_classes is not None else class_table.num_classes
    if count not in protocols.SUPPORTED_NUM_CLASSES or list(class_table.names) != protocols.class_names(
        count
    ):
        raise ValueError(
            f"{spec.name} is read as a built-in protocol (19, 16 or 13 Cityscapes classes); the class table "
            f"{class_table.source} has other classes ({', '.join(class_table.names)}): use dataset 'folder' "
            "for a dataset of your own classes"
        )


def _load_synthetic(spec: DatasetSpec, data_dir, split: str, options: dict):
    options = dict(options)
    cache_dir = options.get("cache_dir")
    if data_dir is not None:
        if cache_dir is not None and Path(cache_dir) != Path(data_dir):
            raise ValueError(
                f"{spec.name}: data_dir={str(data_dir)!r} and cache_dir={str(cache_dir)!r} name two folders for "
                "the generated splits; pass one"
            )
        options["cache_dir"] = data_dir
    if spec.variant is not None:
        if options.get("variant", spec.variant) != spec.variant:
            raise ValueError(
                f"{spec.name} is the {spec.variant!r} variant of the synthetic shift, got variant="
                f"{options['variant']!r}; use 'synthetic' for the others"
            )
        options["variant"] = spec.variant
    return spec.reader_function()(split="validation" if split == "val" else split, **options)
