"""Predict folders of images: colour masks, overlays, official label-id PNGs, train-id PNGs and strips.

:func:`predict` is what ``scripts/predict.py`` runs. Every output is written at the input's own size, whatever
the input's size and mode (grayscale, RGBA, palette and 16-bit images are converted to RGB first). Outputs go to
``output_dir/<format>/<relative path>.png`` for each requested format:

- ``color``: the prediction in the Cityscapes palette (RGB);
- ``overlay``: that colour mask blended over the image (RGB);
- ``labelids``: Cityscapes *label ids* (8-bit grayscale), the format of the official benchmark submission;
- ``trainids``: protocol train ids ``0 .. C-1`` (8-bit grayscale).

With ground-truth labels, a side-by-side strip (image, ground truth, prediction) is also written to
``output_dir/strips/``. Files that cannot be read are reported (name and reason) after all other images have
been processed; they never stop the run.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cpsl_hf.data.protocols import SUPPORTED_NUM_CLASSES, label_id_lut, train_id_to_label_id
from cpsl_hf.utils import MissingPathError, UsageError
from cpsl_hf.utils import progress as progress_bar
from cpsl_hf.visualization import color_mask, overlay, predict_train_ids, side_by_side

FORMATS = ("color", "overlay", "labelids", "trainids")
LABEL_FORMATS = ("labelids", "trainids")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif")
STRIPS_DIRNAME = "strips"

# File-name endings that pair a Cityscapes image with its ground truth (``X_leftImg8bit.png`` <->
# ``X_gtFine_labelIds.png``); stripped from stems before matching images to labels.
_PAIRING_SUFFIXES = (
    "_leftImg8bit",
    "_gtFine_labelIds",
    "_gtFine_labelTrainIds",
    "_labelIds",
    "_labelTrainIds",
)


@dataclass
class PredictionReport:
    """What :func:`predict` did: files written, inputs that failed (path, reason), images without a label."""

    written: list[Path] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)
    unlabeled: list[Path] = field(default_factory=list)
    num_images: int = 0
    num_predicted: int = 0

    @property
    def ok(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        lines = [
            f"predicted {self.num_predicted} of {self.num_images} images, wrote {len(self.written)} files"
        ]
        if self.unlabeled:
            lines.append(f"{len(self.unlabeled)} images had no matching label (no strip written)")
        if self.failures:
            lines.append(f"{len(self.failures)} files could not be processed:")
            lines += [f"  {path}: {reason}" for path, reason in self.failures]
        return "\n".join(lines)

    def error_lines(self) -> list[str]:
        """One ``error: PATH: reason`` line per file that failed (what ``scripts/predict.py`` prints to stderr)."""
        lines = []
        for path, reason in self.failures:
            argument = "--labels" if str(reason).startswith("cannot read label") else "--images"
            lines.append(f"error: {argument} {path}: {' '.join(str(reason).split())}")
        return lines


def _pairing_key(path: Path) -> str:
    stem = path.stem
    for suffix in _PAIRING_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[tuple[Path, Path]]:
    """Expand files and folders (searched recursively for image extensions) into ``(path, output_relpath)``.

    ``output_relpath`` is the path relative to the folder it was found in (just the file name for a file
    argument) with a ``.png`` suffix. Raises ``FileNotFoundError`` for an argument that does not exist and
    ``ValueError`` when two inputs would write the same output file, or when nothing was found.
    """
    found: list[tuple[Path, Path]] = []
    for argument in inputs:
        root = Path(argument)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            found += [(path, path.relative_to(root).with_suffix(".png")) for path in files]
        elif root.exists():
            found.append((root, Path(root.name).with_suffix(".png")))
        else:
            raise MissingPathError(f"--images {argument!s}: does not exist")
    outputs: dict[Path, Path] = {}
    for path, relpath in found:
        if relpath in outputs and outputs[relpath] != path:
            raise UsageError(
                f"--images: {outputs[relpath]} and {path} would both be written as {relpath}; "
                "pass their common parent folder instead"
            )
        outputs[relpath] = path
    if not found:
        raise UsageError(
            f"--images: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in {list(map(str, inputs))}"
        )
    return found


def collect_labels(inputs: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Map the pairing key of every label file (``X`` for ``X_gtFine_labelIds.png`` or ``X.png``) to its path."""
    labels: dict[str, Path] = {}
    for argument in inputs:
        root = Path(argument)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif root.exists():
            files = [root]
        else:
            raise MissingPathError(f"--labels {argument!s}: does not exist")
        for path in files:
            key = _pairing_key(path)
            if key in labels and labels[key] != path:
                raise UsageError(f"--labels: {labels[key]} and {path} both match images named {key!r}")
            labels[key] = path
    return labels


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """Read any image file as RGB -> uint8 ``3 x H x W`` at its stored size.

    Grayscale, palette, RGBA (alpha dropped) and CMYK images are converted by PIL; 16-bit grayscale is scaled
    to 8 bits. Raises ``OSError`` naming the file when it cannot be decoded.
    """
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode.startswith("I;16"):
                rgb = np.repeat(
                    (np.asarray(image, dtype=np.uint32) // 257).astype(np.uint8)[..., None], 3, axis=2
                )
            else:
                rgb = np.array(image.convert("RGB"))  # a writable copy
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise OSError(f"{path}: cannot read image ({type(error).__name__}: {error})") from error
    return torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)


def read_label(
    path: str | os.PathLike, num_classes: int, label_format: str = "labelids", class_table=None
) -> np.ndarray:
    """Read a single-channel label PNG -> protocol train ids ``H x W`` uint8 (255 = ignore).

    ``label_format="labelids"``: pixel values are Cityscapes label ids (``*_gtFine_labelIds.png``; GTA5's
    palette indices are label ids too), mapped with :func:`cpsl_hf.data.protocols.label_id_lut`.
    ``"trainids"``: pixel values already are protocol train ids.
    With ``class_table`` (a :class:`~cpsl_hf.data.class_table.ClassTable`) and ``"labelids"``: the mask is
    decoded through the table, as the ``folder`` dataset decodes it (8/16-bit values, palette indices, or
    colour-coded RGB through its palette).
    """
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    if class_table is not None and label_format == "labelids":
        from cpsl_hf.data.class_table import ClassTableError
        from cpsl_hf.data.folder import FolderDecoder

        try:
            return FolderDecoder(class_table).decode_mask(str(path))[0]
        except (OSError, ValueError, ClassTableError) as error:
            raise OSError(f"{path}: cannot read label ({type(error).__name__}: {error})") from error
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in ("L", "P"):
                raise ValueError(
                    f"expected a single-channel 8-bit label PNG (mode L or P), got mode {image.mode}"
                )
            ids = np.asarray(image)  # for mode P: the palette indices, never the colours
    except (OSError, ValueError) as error:
        raise OSError(f"{path}: cannot read label ({type(error).__name__}: {error})") from error
    if label_format == "labelids":
        return label_id_lut(num_classes)[ids]
    return ids


def _save(image: Image.Image, path: Path, written: list[Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    written.append(path)


@torch.no_grad()
def predict(
    model: torch.nn.Module | str | os.PathLike,
    images: Sequence[str | os.PathLike],
    output_dir: str | os.PathLike,
    formats: Sequence[str] = ("color",),
    labels: Sequence[str | os.PathLike] | None = None,
    label_format: str = "labelids",
    num_classes: int | None = None,
    flip: bool = False,
    sliding_window: tuple[int, int, int, int] | None = None,
    alpha: float = 0.5,
    device: str | torch.device | None = None,
    progress: bool = True,
    class_table: str | os.PathLike | None = None,
) -> PredictionReport:
    """Predict every image in ``images`` (files and/or folders) and write ``formats`` under ``output_dir``.

    Args:
        model: a loaded segmentation model or a checkpoint folder / Hub repo id (loaded with
            :func:`cpsl_hf.inference.load_model`).
        formats: any of :data:`FORMATS`; each goes to ``output_dir/<format>/``.
        labels: optional label files/folders; an image ``X_leftImg8bit.png`` (or ``X.*``) pairs with the label
            ``X_gtFine_labelIds.png`` (or ``X.png``). Paired images also get ``output_dir/strips/<name>.png``.
        label_format: ``labelids`` (Cityscapes label ids, the default) or ``trainids``.
        num_classes: label protocol (19, 16 or 13); defaults to the model's ``config.num_labels`` and must match it.
        flip, sliding_window: passed to :func:`cpsl_hf.inference.predict_logits`.
        alpha: opacity of the colour mask in ``overlay``.
        device: where to run the model (default: CUDA when available, else CPU).
        class_table: the class table the model was trained with (YAML / JSON): its palette colours the
            predictions, its ``label_id``s are written by ``labelids``, and ``labels`` are decoded through it.
            Needed for a model of classes other than the 19 / 16 / 13 Cityscapes protocols.

    Returns:
        A :class:`PredictionReport`; unreadable images and labels are listed in ``failures``, not raised.
    """
    from cpsl_hf.inference import load_model, load_model_config

    unknown = [name for name in formats if name not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"label_format must be one of {LABEL_FORMATS}, got {label_format!r}")
    inputs = collect_images(images)
    label_paths = collect_labels(labels) if labels else {}

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(model, torch.nn.Module):
        config = model.config
    else:  # the number of classes is checked from the config, before the weights load
        config = load_model_config(model)
    model_classes = config.num_labels
    table = None
    if class_table is not None:
        from cpsl_hf.data.class_table import ClassTableError, load_class_table

        try:
            table = load_class_table(class_table)
        except ClassTableError as error:
            raise UsageError(f"--class_table {error}") from None
        if num_classes is not None and num_classes != table.num_classes:
            raise UsageError(
                f"--num_classes {num_classes} disagrees with --class_table {class_table}, which has "
                f"{table.num_classes} classes"
            )
        num_classes = table.num_classes
        if "labelids" in formats and table.label_ids is None:
            raise UsageError(
                f"--format labelids: --class_table {class_table} gives no classes[].label_id to write; "
                "use --format trainids"
            )
    if num_classes is None:
        num_classes = model_classes
    if num_classes != model_classes:
        raise UsageError(
            f"--num_classes {num_classes} does not match the model's {model_classes} output classes"
            if table is None
            else f"--class_table {class_table} has {num_classes} classes but the model predicts {model_classes}"
        )
    if table is None and num_classes not in SUPPORTED_NUM_CLASSES:
        raise UsageError(
            f"--model: the model predicts {num_classes} classes; colours and label ids exist only for the "
            f"{SUPPORTED_NUM_CLASSES}-class Cityscapes protocols: pass the model's --class_table"
        )
    if not isinstance(model, torch.nn.Module):
        model = load_model(model, device=device)
    else:
        model = model.to(device).eval()
    to_label_ids = train_id_to_label_id(num_classes) if table is None else None
    if table is not None and table.label_ids is not None:
        to_label_ids = table.train_id_to_label_id()
    palette = None if table is None else table.palette

    output_dir = Path(output_dir)
    report = PredictionReport(num_images=len(inputs))
    for path, relpath in progress_bar(inputs, progress, "predict", unit="image"):
        try:
            pixel_values = read_image(path)
        except OSError as error:
            report.failures.append((path, str(error).removeprefix(f"{path}: ")))
            continue
        train_ids = predict_train_ids(model, pixel_values, flip=flip, sliding_window=sliding_window).numpy()
        report.num_predicted += 1
        if "color" in formats:
            _save(color_mask(train_ids, num_classes, palette), output_dir / "color" / relpath, report.written)
        if "overlay" in formats:
            blended = overlay(pixel_values, train_ids, num_classes, alpha=alpha, palette=palette)
            _save(blended, output_dir / "overlay" / relpath, report.written)
        if "labelids" in formats:
            _save(
                Image.fromarray(to_label_ids[train_ids], mode="L"),
                output_dir / "labelids" / relpath,
                report.written,
            )
        if "trainids" in formats:
            _save(Image.fromarray(train_ids, mode="L"), output_dir / "trainids" / relpath, report.written)
        if label_paths:
            label_path = label_paths.get(_pairing_key(path))
            if label_path is None:
                report.unlabeled.append(path)
                continue
            try:
                ground_truth = read_label(label_path, num_classes, label_format, table)
            except OSError as error:
                report.failures.append((label_path, str(error).removeprefix(f"{label_path}: ")))
                continue
            strip = side_by_side(pixel_values, ground_truth, train_ids, num_classes, palette=palette)
            _save(strip, output_dir / STRIPS_DIRNAME / relpath, report.written)
    return report
