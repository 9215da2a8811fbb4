"""Write downloads in the official GTA5 / SYNTHIA / Cityscapes layouts from arrays (for tests and benchmarks).

The real datasets cannot be redistributed, so tests and ``bench/bench_data.py`` generate folders with the
exact file layout and label encodings of the originals:

- GTA5: ``images/NAME.png`` (RGB) + ``labels/NAME.png``, a palette PNG whose *indices* are label ids (its
  palette is deliberately not the Cityscapes colours, so reading colours instead of indices fails).
- SYNTHIA-RAND-CITYSCAPES: ``RGB/NAME.png`` + ``GT/LABELS/NAME.png``, a 16-bit 3-channel PNG with the class id
  in channel 0 and an instance id in channel 1 (written by :func:`write_png16`, any PNG row filter).
- Cityscapes: ``leftImg8bit/{split}/{city}/{city}_000000_NNNNNN_leftImg8bit.png`` +
  ``gtFine/{split}/{city}/..._gtFine_labelIds.png`` (8-bit label ids).
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from . import protocols


def _paeth_predictor(left: np.ndarray, up: np.ndarray, up_left: np.ndarray) -> np.ndarray:
    estimate = left + up - up_left
    distance_left, distance_up, distance_up_left = (
        np.abs(estimate - left),
        np.abs(estimate - up),
        np.abs(estimate - up_left),
    )
    return np.where(
        (distance_left <= distance_up) & (distance_left <= distance_up_left),
        left,
        np.where(distance_up <= distance_up_left, up, up_left),
    )


def write_png16(path, array: np.ndarray, row_filter: int = 4) -> None:
    """Write an ``H x W x C`` (C in 1, 3, 4) uint16 array as a 16-bit PNG with the given row filter (0..4).

    Pillow cannot write 16-bit colour PNGs; this small encoder can, with any of the five PNG filters
    (libpng-written files such as SYNTHIA's mix them; Paeth is the hardest to decode).
    """
    height, width, channels = array.shape
    raw = np.ascontiguousarray(array.astype(">u2")).view(np.uint8).reshape(height, width * channels * 2)
    raw = raw.astype(np.int32)
    bytes_per_pixel = channels * 2
    left = np.zeros_like(raw)
    left[:, bytes_per_pixel:] = raw[:, :-bytes_per_pixel]
    up = np.zeros_like(raw)
    up[1:] = raw[:-1]
    up_left = np.zeros_like(raw)
    up_left[1:, bytes_per_pixel:] = raw[:-1, :-bytes_per_pixel]
    prediction = {
        0: np.zeros_like(raw),
        1: left,
        2: up,
        3: (left + up) // 2,
        4: _paeth_predictor(left, up, up_left),
    }[row_filter]
    filtered = ((raw - prediction) % 256).astype(np.uint8)
    scanlines = np.concatenate([np.full((height, 1), row_filter, dtype=np.uint8), filtered], axis=1)
    color_type = {1: 0, 3: 2, 4: 6}[channels]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    Path(path).write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(scanlines.tobytes()))
        + chunk(b"IEND", b"")
    )


def write_gta5_label(path, label_ids: np.ndarray) -> None:
    """Write GTA5-style labels: a palette PNG whose indices are ``label_ids`` (H x W uint8)."""
    label = Image.fromarray(np.asarray(label_ids, dtype=np.uint8), mode="P")
    # a scrambled palette: colours are NOT the ids, so a reader that converts to RGB gets garbage
    colours = (np.arange(256 * 3, dtype=np.int64) * 37 % 256).astype(np.uint8)
    label.putpalette(colours.tobytes())
    label.save(path)


def random_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A random RGB ``H x W x 3`` uint8 image (smooth enough to compress like a photo would not matter)."""
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def write_gta5(
    root, label_maps: dict[str, np.ndarray], image_sizes: dict[str, tuple[int, int]] | None = None, seed=0
):
    """Write a GTA5 folder: one ``images/NAME.png`` + ``labels/NAME.png`` per entry of ``label_maps``.

    ``image_sizes`` (name -> (H, W)) overrides an image's size (to create size mismatches).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    for name, label_ids in label_maps.items():
        height, width = (image_sizes or {}).get(name, label_ids.shape)
        Image.fromarray(random_image(height, width, rng)).save(root / "images" / f"{name}.png")
        write_gta5_label(root / "labels" / f"{name}.png", label_ids)
    return root


def write_synthia(root, label_maps: dict[str, np.ndarray], seed=0, row_filters=(0, 1, 2, 3, 4)):
    """Write a SYNTHIA-RAND-CITYSCAPES folder; label ``k`` uses PNG filter ``row_filters[k % len]``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    (root / "RGB").mkdir(parents=True, exist_ok=True)
    (root / "GT" / "LABELS").mkdir(parents=True, exist_ok=True)
    for index, (name, class_ids) in enumerate(label_maps.items()):
        height, width = class_ids.shape
        Image.fromarray(random_image(height, width, rng)).save(root / "RGB" / f"{name}.png")
        label = np.zeros((height, width, 3), dtype=np.uint16)
        label[..., 0] = class_ids
        label[..., 1] = rng.integers(0, 65536, size=(height, width), dtype=np.uint16)  # instance ids
        write_png16(root / "GT" / "LABELS" / f"{name}.png", label, row_filters[index % len(row_filters)])
    return root


def cityscapes_stem(city: str, index: int) -> str:
    return f"{city}_000000_{index:06d}"


def write_cityscapes(root, label_maps: dict[str, np.ndarray], split="train", seed=0):
    """Write Cityscapes files; keys of ``label_maps`` are ``city_000000_NNNNNN`` stems."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for stem, label_ids in label_maps.items():
        city = stem.split("_")[0]
        image_dir = root / "leftImg8bit" / split / city
        label_dir = root / "gtFine" / split / city
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        height, width = label_ids.shape
        Image.fromarray(random_image(height, width, rng)).save(image_dir / f"{stem}_leftImg8bit.png")
        Image.fromarray(np.asarray(label_ids, dtype=np.uint8), mode="L").save(
            label_dir / f"{stem}_gtFine_labelIds.png"
        )
    return root


def random_label_ids(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Random raw ids of the dataset's table (every class, and unevaluated ids such as 0)."""
    if kind == "synthia":
        ids = np.array(
            sorted(protocols.SYNTHIA_ID_TO_NAME) + sorted(protocols.SYNTHIA_UNEVALUATED_IDS), dtype=np.uint16
        )
    else:
        ids = np.arange(0, 34, dtype=np.uint8)
    return rng.choice(ids, size=(height, width))
