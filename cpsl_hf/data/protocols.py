"""Label protocols: the 19-, 16- and 13-class Cityscapes benchmarks and the id tables of each dataset.

The Cityscapes label table comes from the field's own package (``cityscapesscripts``); only the
SYNTHIA-RAND-CITYSCAPES table is ours. Every table maps to *protocol train ids*: ``0 .. C-1`` in the order of
:func:`class_names`, with every other id mapped to :data:`IGNORE_INDEX`.

- 19 classes (GTA5 -> Cityscapes): the Cityscapes train ids.
- 16 classes (SYNTHIA -> Cityscapes): the 19 without terrain, truck and train.
- 13 classes: the 16 without wall, fence and pole; reported beside the 16-class mIoU
  (:data:`THIRTEEN_OF_SIXTEEN` selects them from a 16-class result).
"""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CITYSCAPES_LABELS

IGNORE_INDEX = 255
SUPPORTED_NUM_CLASSES = (19, 16, 13)

# The 19 evaluated Cityscapes classes in train-id order, straight from cityscapesscripts.
_EVALUATED = sorted(
    (label for label in _CITYSCAPES_LABELS if 0 <= label.trainId < IGNORE_INDEX and not label.ignoreInEval),
    key=lambda label: label.trainId,
)
CITYSCAPES_CLASSES: tuple[str, ...] = tuple(label.name for label in _EVALUATED)
CITYSCAPES_PALETTE: np.ndarray = np.array([label.color for label in _EVALUATED], dtype=np.uint8)  # 19 x 3

_DROPPED_FOR_16 = ("terrain", "truck", "train")
_DROPPED_FOR_13 = _DROPPED_FOR_16 + ("wall", "fence", "pole")

# SYNTHIA-RAND-CITYSCAPES class ids (first channel of the 16-bit GT/LABELS PNGs) -> Cityscapes class name.
SYNTHIA_ID_TO_NAME: dict[int, str] = {
    1: "sky",
    2: "building",
    3: "road",
    4: "sidewalk",
    5: "fence",
    6: "vegetation",
    7: "pole",
    8: "car",
    9: "traffic sign",
    10: "person",
    11: "bicycle",
    12: "motorcycle",
    15: "traffic light",
    16: "terrain",
    17: "rider",
    18: "truck",
    19: "bus",
    20: "train",
    21: "wall",
}
#: SYNTHIA-RAND-CITYSCAPES ids that exist but no protocol evaluates (their pixels become 255).
SYNTHIA_UNEVALUATED_IDS: dict[int, str] = {0: "void", 13: "parking-slot", 14: "road-work", 22: "lanemarking"}


def _check_num_classes(num_classes: int) -> None:
    if num_classes not in SUPPORTED_NUM_CLASSES:
        raise ValueError(
            f"num_classes={num_classes} is not a supported label protocol; expected one of "
            f"{SUPPORTED_NUM_CLASSES} (19: GTA5->Cityscapes, 16/13: SYNTHIA->Cityscapes)"
        )


def protocol_train_ids(num_classes: int) -> list[int]:
    """The 19-class Cityscapes train ids kept by the protocol, in protocol order (length ``num_classes``)."""
    _check_num_classes(num_classes)
    dropped = {19: (), 16: _DROPPED_FOR_16, 13: _DROPPED_FOR_13}[num_classes]
    return [train_id for train_id, name in enumerate(CITYSCAPES_CLASSES) if name not in dropped]


def class_names(num_classes: int) -> list[str]:
    """Class names of the protocol in train-id order."""
    return [CITYSCAPES_CLASSES[train_id] for train_id in protocol_train_ids(num_classes)]


def palette(num_classes: int) -> np.ndarray:
    """Cityscapes colours of the protocol's classes: ``num_classes x 3`` uint8 RGB."""
    return CITYSCAPES_PALETTE[protocol_train_ids(num_classes)]


def _name_to_protocol_id(num_classes: int) -> dict[str, int]:
    return {name: index for index, name in enumerate(class_names(num_classes))}


def label_id_lut(num_classes: int = 19) -> np.ndarray:
    """Lookup table Cityscapes label id (also GTA5's palette index) -> protocol train id.

    Returns a uint8 array of length 256; ids outside the protocol map to :data:`IGNORE_INDEX`.
    """
    to_protocol = _name_to_protocol_id(num_classes)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in _CITYSCAPES_LABELS:
        if 0 <= label.id < 256 and label.name in to_protocol and not label.ignoreInEval:
            lut[label.id] = to_protocol[label.name]
    return lut


def synthia_lut(num_classes: int = 16) -> np.ndarray:
    """Lookup table SYNTHIA-RAND-CITYSCAPES class id -> protocol train id (uint8 array of length 65536)."""
    to_protocol = _name_to_protocol_id(num_classes)
    lut = np.full(65536, IGNORE_INDEX, dtype=np.uint8)
    for synthia_id, name in SYNTHIA_ID_TO_NAME.items():
        if name in to_protocol:
            lut[synthia_id] = to_protocol[name]
    return lut


def train_id_to_label_id(num_classes: int = 19) -> np.ndarray:
    """Lookup table protocol train id -> Cityscapes label id, for official benchmark PNGs.

    Returns a uint8 array of length 256; :data:`IGNORE_INDEX` and unused ids map to label id 0 ("unlabeled").
    """
    name_to_label_id = {label.name: label.id for label in _EVALUATED}
    lut = np.zeros(256, dtype=np.uint8)
    for index, name in enumerate(class_names(num_classes)):
        lut[index] = name_to_label_id[name]
    return lut


#: Indices, within the 16-class protocol, of the 13 classes of the 13-class mIoU.
THIRTEEN_OF_SIXTEEN: tuple[int, ...] = tuple(
    index for index, name in enumerate(class_names(16)) if name not in _DROPPED_FOR_13
)


def colorize(train_ids: np.ndarray, num_classes: int = 19, colors: np.ndarray | None = None) -> np.ndarray:
    """Colour a train-id map ``H x W`` -> ``H x W x 3`` uint8, in ``colors`` (``num_classes x 3``, a class
    table's palette) or by default the protocol's Cityscapes palette.

    Ignored pixels (and any id outside ``0 .. num_classes - 1``) are black.
    """
    table = np.zeros((256, 3), dtype=np.uint8)
    if colors is None:
        table[:num_classes] = palette(num_classes)
    else:
        colors = np.asarray(colors, dtype=np.uint8)
        if colors.shape != (num_classes, 3):
            raise ValueError(f"colors has shape {colors.shape}, expected ({num_classes}, 3)")
        table[:num_classes] = colors
    return table[np.asarray(train_ids, dtype=np.uint8)]
