"""Class tables: any class set, read from a YAML or JSON file, and the mapping between two of them.

A class table says how the label files of a dataset become *train ids* ``0 .. C-1``: the class names in
train-id order, the label values that map to each class (many-to-one), the values that are void (ignored
without comment), a palette for pictures and, optionally, the official label id of each class for submission
files. Every other value is *unknown*: it becomes :data:`IGNORE_INDEX` and the readers count it per file.

The file form (``palette`` optional, defaulting to :func:`distinct_palette`)::

    void_values: [0]
    classes:
      - {name: flat, values: [10, 11], color: [128, 64, 128]}
      - {name: vehicle, values: [70], label_id: 26}

Top-level keys: ``classes`` (required), ``void_values``, ``palette`` (one ``[R, G, B]`` per class, instead of
per-class ``color``), ``void_colors`` (colours of void pixels in colour-coded labels) and ``name``. Class keys:
``name``, ``values``, ``color``, ``label_id``. Anything else is an error, as are duplicate names, a value listed
twice or mapped to two classes, a void value that is also a class value, and a palette of the wrong length:
:class:`ClassTableError` names the file, the key and the reason.

The three built-in protocols are such tables (:func:`protocol_table`): values are Cityscapes label ids (GTA5's
palette indices are the same ids) or SYNTHIA-RAND-CITYSCAPES class ids; they decode exactly as the lookup
tables of :mod:`cpsl_hf.data.protocols`.
"""

from __future__ import annotations

import colorsys
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from . import protocols
from .protocols import IGNORE_INDEX

__all__ = [
    "ClassMapping",
    "ClassTable",
    "ClassTableError",
    "distinct_palette",
    "load_class_table",
    "map_class_tables",
    "protocol_table",
]

MAX_VALUE = 65535
"""Largest label value a table may name (16-bit label PNGs)."""
MAX_CLASSES = 255
"""Train ids are stored as uint8 with 255 = ignore, so a table has at most 255 classes."""

_TOP_KEYS = ("name", "void_values", "classes", "palette", "void_colors")
_CLASS_KEYS = ("name", "values", "color", "label_id")


class ClassTableError(ValueError):
    """A class table (or a pair of them) that cannot be used; the message names the file, the key and why."""


def distinct_palette(num_classes: int) -> np.ndarray:
    """``num_classes x 3`` uint8 RGB colours, pairwise distinct, none black (black marks ignored pixels).

    Hues step by the golden ratio (neighbouring train ids get far-apart hues); saturation and value cycle
    through three levels so that more than a dozen classes stay distinguishable.
    """
    hues = (np.arange(num_classes) * 0.618033988749895) % 1.0
    levels = ((0.85, 0.95), (0.55, 0.75), (0.95, 0.55))
    colours = [
        colorsys.hsv_to_rgb(hue, *levels[(index // 7) % len(levels)]) for index, hue in enumerate(hues)
    ]
    palette = np.rint(np.array(colours, dtype=np.float64).reshape(num_classes, 3) * 255).astype(np.uint8)
    # Rounding can in principle make two colours equal for very many classes: nudge duplicates apart.
    seen: set[tuple[int, ...]] = {(0, 0, 0)}
    for index in range(num_classes):
        colour = tuple(int(c) for c in palette[index])
        while colour in seen:
            colour = (colour[0], colour[1], (colour[2] + 1) % 256)
        seen.add(colour)
        palette[index] = colour
    return palette


@dataclass(frozen=True, eq=False)
class ClassTable:
    """A class set and how label values decode to it.

    Attributes:
        names: ``C`` class names in train-id order.
        values: for each class, the label values that map to it (many-to-one).
        void_values: label values that are ignored (255) without being reported as unknown.
        colors: ``C`` RGB colours (the palette of pictures and of colour-coded labels); None: a
            :func:`distinct_palette`.
        label_ids: the official label id of each class (for submission files), or None.
        void_colors: colours of void pixels in colour-coded labels (ignored without being reported).
        source: where the table came from (the file path, or a description), quoted in errors.
        name: a short name of the class set (e.g. "cityscapes-19").
    """

    names: tuple[str, ...]
    values: tuple[tuple[int, ...], ...]
    void_values: tuple[int, ...] = ()
    colors: tuple[tuple[int, int, int], ...] | None = None
    label_ids: tuple[int, ...] | None = None
    void_colors: tuple[tuple[int, int, int], ...] = ()
    source: str = "<class table>"
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "values", tuple(tuple(int(v) for v in vs) for vs in self.values))
        object.__setattr__(self, "void_values", tuple(int(v) for v in self.void_values))
        object.__setattr__(self, "void_colors", tuple(tuple(int(c) for c in col) for col in self.void_colors))
        if self.colors is None:
            colors = tuple(tuple(int(c) for c in row) for row in distinct_palette(len(self.names)))
        else:
            colors = tuple(tuple(int(c) for c in row) for row in self.colors)
        object.__setattr__(self, "colors", colors)
        if self.label_ids is not None:
            object.__setattr__(self, "label_ids", tuple(int(i) for i in self.label_ids))
        _check_table(self)

    # -- what the table says ------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.names)

    @property
    def palette(self) -> np.ndarray:
        """``C x 3`` uint8 RGB."""
        return np.array(self.colors, dtype=np.uint8).reshape(self.num_classes, 3)

    @property
    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.names))

    @cached_property
    def value_to_train_id(self) -> dict[int, int]:
        """Every class value -> its train id."""
        return {value: train_id for train_id, values in enumerate(self.values) for value in values}

    @property
    def max_value(self) -> int:
        return max([*self.value_to_train_id, *self.void_values])

    def lookup_table(self, size: int | None = None) -> np.ndarray:
        """uint8 array of ``size`` entries (default 256, or 65536 when a value exceeds 255): label value ->
        train id, every value that is not a class value -> :data:`IGNORE_INDEX`. ``lut[labels]`` decodes an
        ``H x W`` uint8 / uint16 label map at once."""
        size = self._default_size() if size is None else int(size)
        return self._tables(size)[0].copy()

    def known_values(self, size: int | None = None) -> np.ndarray:
        """Boolean array of ``size`` entries: the value is a class value or a void value (not unknown)."""
        size = self._default_size() if size is None else int(size)
        return self._tables(size)[1].copy()

    def decode(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Decode an ``H x W`` uint8 / uint16 label-value map.

        Returns ``(train_ids, value_counts)``: ``H x W`` uint8 train ids (unknown and void values -> 255) and the
        pixel count of every value (length 256 for uint8 input, 65536 for uint16), from which the unknown
        values are read with :meth:`known_values`.
        """
        labels = np.asarray(labels)
        if labels.dtype == np.uint8:
            size = 256
        elif labels.dtype == np.uint16:
            size = 65536
        else:
            raise TypeError(f"label values must be uint8 or uint16, got {labels.dtype}")
        lut, _ = self._tables(size)
        return lut[labels], np.bincount(labels.ravel(), minlength=size)

    def decode_colors(self, rgb: np.ndarray) -> tuple[np.ndarray, dict[tuple[int, int, int], int]]:
        """Decode an ``H x W x 3`` uint8 colour-coded label through the palette.

        Returns ``(train_ids, unknown_colors)``: ``H x W`` uint8 train ids (void and unknown colours -> 255) and
        the pixel count of every colour that is neither a class colour nor in ``void_colors``.
        """
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
            raise ValueError(f"colour-coded labels must be H x W x 3 uint8, got {rgb.shape} {rgb.dtype}")
        codes = _color_codes(rgb)
        palette_codes = _color_codes(self.palette)
        if len(np.unique(palette_codes)) != self.num_classes:
            raise ClassTableError(
                f"{self.source}: palette: colour-coded labels need one distinct colour per class, but two "
                "classes share a colour"
            )
        order = np.argsort(palette_codes)
        sorted_codes = palette_codes[order]
        position = np.clip(np.searchsorted(sorted_codes, codes), 0, self.num_classes - 1)
        matched = sorted_codes[position] == codes
        train_ids = np.where(matched, order[position], IGNORE_INDEX).astype(np.uint8)
        unknown = ~matched
        if self.void_colors:
            unknown &= ~np.isin(codes, _color_codes(np.array(self.void_colors, dtype=np.uint8)))
        colours, counts = np.unique(codes[unknown], return_counts=True)
        unknown_colors = {
            (int(code >> 16), int((code >> 8) & 255), int(code & 255)): int(count)
            for code, count in zip(colours, counts, strict=True)
        }
        return train_ids, unknown_colors

    def train_id_to_label_id(self) -> np.ndarray:
        """uint8 array of 256: train id -> official label id (for submission files); 255 and unused -> 0.

        Raises :class:`ClassTableError` when the table has no ``label_id``s."""
        if self.label_ids is None:
            raise ClassTableError(
                f"{self.source}: classes[].label_id: the table gives no official label ids for submission files"
            )
        lut = np.zeros(256, dtype=np.uint8)
        lut[: self.num_classes] = self.label_ids
        return lut

    def to_dict(self) -> dict[str, Any]:
        """The file form (every class with its colour; ``label_id`` when known)."""
        classes = []
        for index, name in enumerate(self.names):
            entry: dict[str, Any] = {"name": name, "values": list(self.values[index])}
            entry["color"] = list(self.colors[index])
            if self.label_ids is not None:
                entry["label_id"] = self.label_ids[index]
            classes.append(entry)
        data: dict[str, Any] = {}
        if self.name is not None:
            data["name"] = self.name
        data["void_values"] = list(self.void_values)
        if self.void_colors:
            data["void_colors"] = [list(color) for color in self.void_colors]
        data["classes"] = classes
        return data

    def save(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as YAML (``.yaml`` / ``.yml``) or JSON (any other suffix)."""
        path = Path(path)
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    # -- internals ----------------------------------------------------------------------------------------

    def _default_size(self) -> int:
        return 256 if self.max_value < 256 else 65536

    @cached_property
    def _tables_cache(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {}

    def _tables(self, size: int) -> tuple[np.ndarray, np.ndarray]:
        if size not in self._tables_cache:
            lut = np.full(size, IGNORE_INDEX, dtype=np.uint8)
            known = np.zeros(size, dtype=bool)
            for train_id, values in enumerate(self.values):
                inside = [v for v in values if v < size]
                lut[inside] = train_id
                known[inside] = True
            known[[v for v in self.void_values if v < size]] = True
            lut.flags.writeable = known.flags.writeable = False
            self._tables_cache[size] = (lut, known)
        return self._tables_cache[size]


def _color_codes(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


# ----------------------------------------------------------------------------------------------------------
# Checks


def _fail(table_source: str, key: str, reason: str) -> ClassTableError:
    return ClassTableError(f"{table_source}: {key}: {reason}")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_color(source: str, key: str, color: Any) -> None:
    if (
        not isinstance(color, (list, tuple))
        or len(color) != 3
        or not all(_is_int(c) and 0 <= c <= 255 for c in color)
    ):
        raise _fail(source, key, f"expected [R, G, B] with each in 0..255, got {color!r}")


def _check_table(table: ClassTable) -> None:
    """Every rule of the module docstring; keys are named as in the file (``classes[2].values``)."""
    source = table.source
    if not table.names:
        raise _fail(source, "classes", "the table has no classes")
    if len(table.names) > MAX_CLASSES:
        raise _fail(source, "classes", f"{len(table.names)} classes; at most {MAX_CLASSES} (255 is ignore)")
    if len(table.values) != len(table.names):
        raise _fail(source, "classes", f"{len(table.names)} names but {len(table.values)} value lists")
    first_index: dict[str, int] = {}
    for index, name in enumerate(table.names):
        if not isinstance(name, str) or not name.strip():
            raise _fail(source, f"classes[{index}].name", f"expected a non-empty string, got {name!r}")
        if name in first_index:
            raise _fail(
                source,
                f"classes[{index}].name",
                f"duplicate class name {name!r} (also classes[{first_index[name]}])",
            )
        first_index[name] = index
    owner: dict[int, int] = {}
    for index, values in enumerate(table.values):
        key = f"classes[{index}].values"
        if not values:
            raise _fail(source, key, f"class {table.names[index]!r} has no label values")
        for value in values:
            if not 0 <= value <= MAX_VALUE:
                raise _fail(source, key, f"value {value} is outside 0..{MAX_VALUE}")
            if value in owner:
                other = owner[value]
                reason = (
                    f"value {value} is listed twice"
                    if other == index
                    else f"value {value} is mapped to two classes: {table.names[other]!r} (classes[{other}]) "
                    f"and {table.names[index]!r}"
                )
                raise _fail(source, key, reason)
            owner[value] = index
    seen_void: set[int] = set()
    for value in table.void_values:
        if not 0 <= value <= MAX_VALUE:
            raise _fail(source, "void_values", f"value {value} is outside 0..{MAX_VALUE}")
        if value in seen_void:
            raise _fail(source, "void_values", f"value {value} is listed twice")
        if value in owner:
            raise _fail(
                source,
                "void_values",
                f"value {value} is also mapped to class {table.names[owner[value]]!r} (classes[{owner[value]}])",
            )
        seen_void.add(value)
    if len(table.colors) != len(table.names):
        raise _fail(source, "palette", f"{len(table.colors)} colours for {len(table.names)} classes")
    for index, color in enumerate(table.colors):
        _check_color(source, f"palette[{index}]", color)
    for index, color in enumerate(table.void_colors):
        _check_color(source, f"void_colors[{index}]", color)
    if table.label_ids is not None:
        if len(table.label_ids) != len(table.names):
            raise _fail(source, "classes[].label_id", "give a label_id for every class or for none")
        for index, label_id in enumerate(table.label_ids):
            if not 0 <= label_id <= 255:
                raise _fail(source, f"classes[{index}].label_id", f"{label_id} is outside 0..255")


# ----------------------------------------------------------------------------------------------------------
# Loading


def load_class_table(path: str | os.PathLike) -> ClassTable:
    """Read a class table from a YAML (``.yaml`` / ``.yml``) or JSON file (form: module docstring).

    Raises:
        ClassTableError: missing or unparsable file, unknown keys, or a table that breaks a rule; the message
            names the file, the key and the reason.
    """
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ClassTableError(f"{source}: no such class table file")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            content = json.loads(text)
        else:
            import yaml

            content = yaml.safe_load(text)
    except Exception as error:  # any parser error: the file is not a table
        reason = " ".join(str(error).split())
        raise ClassTableError(f"{source}: cannot parse the file ({type(error).__name__}: {reason})") from None
    return class_table_from_dict(content, source=source)


def class_table_from_dict(content: Any, source: str = "<class table>") -> ClassTable:
    """A :class:`ClassTable` from the file form, already parsed (``source`` is quoted in errors)."""
    if not isinstance(content, Mapping):
        raise ClassTableError(
            f"{source}: expected a mapping with a 'classes' list, got {type(content).__name__}"
        )
    unknown = [str(key) for key in content if key not in _TOP_KEYS]
    if unknown:
        raise _fail(source, unknown[0], f"unknown key; the keys are {', '.join(_TOP_KEYS)}")
    classes = content.get("classes")
    if not isinstance(classes, list) or not classes:
        raise _fail(source, "classes", "expected a non-empty list of {name, values} entries")
    names, values, colors, label_ids = [], [], [], []
    for index, entry in enumerate(classes):
        key = f"classes[{index}]"
        if not isinstance(entry, Mapping):
            raise _fail(source, key, f"expected a mapping {{name, values}}, got {entry!r}")
        unknown = [str(k) for k in entry if k not in _CLASS_KEYS]
        if unknown:
            raise _fail(source, f"{key}.{unknown[0]}", f"unknown key; a class has {', '.join(_CLASS_KEYS)}")
        for required in ("name", "values"):
            if required not in entry:
                raise _fail(source, f"{key}.{required}", "missing")
        names.append(entry["name"])
        entry_values = entry["values"]
        if _is_int(entry_values):
            entry_values = [entry_values]
        if not isinstance(entry_values, list) or not all(_is_int(v) for v in entry_values):
            raise _fail(source, f"{key}.values", f"expected a list of integers, got {entry['values']!r}")
        values.append(entry_values)
        if "color" in entry:
            _check_color(source, f"{key}.color", entry["color"])
        colors.append(entry.get("color"))
        label_ids.append(entry.get("label_id"))
        if "label_id" in entry and not _is_int(entry["label_id"]):
            raise _fail(source, f"{key}.label_id", f"expected an integer, got {entry['label_id']!r}")
    palette = content.get("palette")
    given_colors = [color is not None for color in colors]
    if palette is not None:
        if any(given_colors):
            raise _fail(
                source, "palette", "give the colours either as palette or as classes[].color, not both"
            )
        if not isinstance(palette, list):
            raise _fail(source, "palette", f"expected a list of [R, G, B], got {palette!r}")
        if len(palette) != len(names):
            raise _fail(source, "palette", f"{len(palette)} colours for {len(names)} classes")
        for index, color in enumerate(palette):
            _check_color(source, f"palette[{index}]", color)
        colors = palette
    elif any(given_colors):
        if not all(given_colors):
            missing = given_colors.index(False)
            raise _fail(source, f"classes[{missing}].color", "give a colour for every class or for none")
    else:
        colors = None
    given_ids = [label_id is not None for label_id in label_ids]
    if any(given_ids) and not all(given_ids):
        raise _fail(
            source,
            f"classes[{given_ids.index(False)}].label_id",
            "give a label_id for every class or for none",
        )
    void_values = content.get("void_values", []) or []
    if _is_int(void_values):
        void_values = [void_values]
    if not isinstance(void_values, list) or not all(_is_int(v) for v in void_values):
        raise _fail(source, "void_values", f"expected a list of integers, got {content.get('void_values')!r}")
    void_colors = content.get("void_colors", []) or []
    if not isinstance(void_colors, list):
        raise _fail(source, "void_colors", f"expected a list of [R, G, B], got {void_colors!r}")
    for index, color in enumerate(void_colors):
        _check_color(source, f"void_colors[{index}]", color)
    name = content.get("name")
    if name is not None and not isinstance(name, str):
        raise _fail(source, "name", f"expected a string, got {name!r}")
    return ClassTable(
        names=tuple(names),
        values=tuple(tuple(v) for v in values),
        void_values=tuple(void_values),
        colors=None if colors is None else tuple(tuple(c) for c in colors),
        label_ids=tuple(label_ids) if all(given_ids) else None,
        void_colors=tuple(tuple(c) for c in void_colors),
        source=source,
        name=name,
    )


# ----------------------------------------------------------------------------------------------------------
# The built-in protocols as tables


def protocol_table(num_classes: int, dataset: str = "cityscapes") -> ClassTable:
    """The 19-, 16- or 13-class protocol as a :class:`ClassTable`.

    ``dataset``: ``"cityscapes"`` (values are Cityscapes label ids, also GTA5's palette indices; void values
    are the other ids of the Cityscapes label table) or ``"synthia"`` (SYNTHIA-RAND-CITYSCAPES class ids; void
    values are its other ids). Names, palette and official label ids are the Cityscapes ones.
    """
    from cityscapesscripts.helpers.labels import labels as cityscapes_labels

    names = protocols.class_names(num_classes)
    label_id_of = {label.name: label.id for label in cityscapes_labels if not label.ignoreInEval}
    if dataset == "cityscapes":
        table_ids = sorted({label.id for label in cityscapes_labels if label.id >= 0})
        values = [(label_id_of[name],) for name in names]
    elif dataset == "synthia":
        table_ids = sorted(set(protocols.SYNTHIA_ID_TO_NAME) | set(protocols.SYNTHIA_UNEVALUATED_IDS))
        by_name: dict[str, list[int]] = {}
        for synthia_id, class_name in protocols.SYNTHIA_ID_TO_NAME.items():
            by_name.setdefault(class_name, []).append(synthia_id)
        values = [tuple(by_name[name]) for name in names]
    else:
        raise ValueError(f"protocol_table: dataset={dataset!r}; expected 'cityscapes' or 'synthia'")
    class_values = {value for vs in values for value in vs}
    return ClassTable(
        names=tuple(names),
        values=tuple(values),
        void_values=tuple(value for value in table_ids if value not in class_values),
        colors=tuple(tuple(int(c) for c in row) for row in protocols.palette(num_classes)),
        label_ids=tuple(label_id_of[name] for name in names),
        source=f"<built-in {dataset} {num_classes}-class protocol>",
        name=f"{dataset}-{num_classes}",
    )


# ----------------------------------------------------------------------------------------------------------
# Mapping between two tables


@dataclass(frozen=True, eq=False)
class ClassMapping:
    """How the classes of ``target`` correspond, by name, to those of ``source`` (the classes a model predicts).

    Attributes:
        common: names on both sides, in source train-id order.
        source_only: source names the target lacks (never scored on the target).
        target_only: target names the source lacks (their pixels are ignored on the target).
        target_to_source: uint8 array of 256: target train id -> source train id (255 for target-only
            classes and for 255).
    """

    source: ClassTable
    target: ClassTable
    common: tuple[str, ...]
    source_only: tuple[str, ...]
    target_only: tuple[str, ...]
    target_to_source: np.ndarray

    @property
    def is_identity(self) -> bool:
        """Both tables have the same classes in the same order."""
        return self.source.names == self.target.names

    def to_source(self, target_train_ids: np.ndarray) -> np.ndarray:
        """Target train ids (uint8, any shape) -> source train ids; target-only classes and 255 -> 255."""
        return self.target_to_source[np.asarray(target_train_ids, dtype=np.uint8)]

    def summary(self) -> str:
        """One line per side: the classes found on that side only (or that every class is shared)."""
        lines = [f"{len(self.common)} classes shared by {self.source.source} and {self.target.source}"]
        if self.source_only:
            lines.append(
                f"  source only (never seen in the target's labels, not scored there): {', '.join(self.source_only)}"
            )
        if self.target_only:
            lines.append(
                f"  target only (the model cannot predict them; their pixels are ignored): {', '.join(self.target_only)}"
            )
        return "\n".join(lines)


def map_class_tables(source: ClassTable, target: ClassTable) -> ClassMapping:
    """Match ``target``'s classes to ``source``'s by name.

    Raises:
        ClassTableError: the two tables share no class name (naming both files).
    """
    source_index = {name: index for index, name in enumerate(source.names)}
    target_names = set(target.names)
    common = tuple(name for name in source.names if name in target_names)
    if not common:
        raise ClassTableError(
            f"{source.source} and {target.source}: classes: the source and target tables share no class name "
            f"(source: {', '.join(source.names)}; target: {', '.join(target.names)})"
        )
    target_to_source = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for target_id, name in enumerate(target.names):
        if name in source_index:
            target_to_source[target_id] = source_index[name]
    return ClassMapping(
        source=source,
        target=target,
        common=common,
        source_only=tuple(name for name in source.names if name not in target_names),
        target_only=tuple(name for name in target.names if name not in source_index),
        target_to_source=target_to_source,
    )
