"""Predictions people can look at: colour masks, overlays and side-by-side strips in the Cityscapes palette.

Every function takes images and label maps in the forms the package passes around and returns a
``PIL.Image.Image`` (RGB):

- images: ``uint8`` RGB as a ``torch.Tensor`` ``3 x H x W``, a ``numpy.ndarray`` ``H x W x 3`` or a PIL image
  (any mode; converted to RGB);
- label maps: protocol train ids ``0 .. C-1`` as a ``torch.Tensor`` / ``numpy.ndarray`` ``H x W``; ignored
  pixels (255) and any id ``>= C`` are drawn black in masks and left untouched in overlays.

:func:`save_prediction_strips` is what the trainer calls after each evaluation; the strips it writes into a
checkpoint's ``predictions/`` folder are shown by the model card (:mod:`cpsl_hf.hub`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from cpsl_hf.data.protocols import IGNORE_INDEX, colorize

#: Folder (inside a checkpoint) where the trainer saves prediction strips; the model card links them.
PREDICTIONS_DIRNAME = "predictions"

DEFAULT_CAPTIONS = ("image", "ground truth", "prediction")


def _as_rgb_array(image) -> np.ndarray:
    """Any supported image form -> ``H x W x 3`` uint8 RGB array."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image tensor must be 3 x H x W (RGB), got shape {tuple(image.shape)}")
        if image.dtype != torch.uint8:
            raise ValueError(f"image tensor must be uint8 (0..255), got {image.dtype}")
        return image.detach().to("cpu").permute(1, 2, 0).contiguous().numpy()
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image array must be H x W x 3 (RGB), got shape {array.shape}")
    if array.dtype != np.uint8:
        raise ValueError(f"image array must be uint8 (0..255), got {array.dtype}")
    return array


def _as_id_array(train_ids) -> np.ndarray:
    """A train-id map (tensor, array or single-channel PIL image) -> ``H x W`` uint8 array (255 = ignore)."""
    if isinstance(train_ids, Image.Image):
        array = np.asarray(train_ids)
    elif isinstance(train_ids, torch.Tensor):
        array = train_ids.detach().to("cpu").numpy()
    else:
        array = np.asarray(train_ids)
    if array.ndim != 2:
        raise ValueError(f"label map must be H x W, got shape {array.shape}")
    if array.dtype != np.uint8:
        # Anything outside 0..255 (e.g. -1) is "not a class": draw it like the ignore label.
        array = np.where((array >= 0) & (array <= IGNORE_INDEX), array, IGNORE_INDEX).astype(np.uint8)
    return array


def color_mask(train_ids, num_classes: int = 19, palette=None) -> Image.Image:
    """Colour a train-id map ``H x W`` in ``palette`` (``C x 3``, a class table's; default the Cityscapes
    protocol's) -> RGB image ``H x W``; ignore is black."""
    return Image.fromarray(colorize(_as_id_array(train_ids), num_classes, palette), mode="RGB")


def overlay(image, train_ids, num_classes: int = 19, alpha: float = 0.5, palette=None) -> Image.Image:
    """Blend the colour mask of ``train_ids`` (``H x W``) over ``image`` (same ``H x W``).

    ``out = (1 - alpha) * image + alpha * colour`` where the pixel has a class; ignored pixels show the image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb_array(image)
    ids = _as_id_array(train_ids)
    if ids.shape != rgb.shape[:2]:
        raise ValueError(f"label map size {ids.shape} differs from image size {rgb.shape[:2]}")
    colours = colorize(ids, num_classes, palette).astype(np.float32)
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours
    has_class = (ids < num_classes)[..., None]
    out = np.where(has_class, np.rint(blended), rgb).astype(np.uint8)
    return Image.fromarray(out, mode="RGB")


def _resize_ids(ids: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an ``H x W`` id map to ``size_hw`` (no new ids are invented)."""
    if ids.shape == size_hw:
        return ids
    return np.asarray(Image.fromarray(ids, mode="L").resize((size_hw[1], size_hw[0]), Image.NEAREST))


def _caption_bar(text: str, width: int, height: int) -> Image.Image:
    bar = Image.new("RGB", (width, height), (255, 255, 255))
    font = ImageFont.load_default(size=max(8, int(height * 0.7)))
    ImageDraw.Draw(bar).text((4, height // 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    return bar


def side_by_side(
    image,
    ground_truth,
    prediction,
    num_classes: int = 19,
    captions: Sequence[str] | None = DEFAULT_CAPTIONS,
    gap: int = 4,
    palette=None,
) -> Image.Image:
    """A horizontal strip: the image, the ground truth in colour (skipped when ``None``), the prediction in colour.

    Args:
        image: RGB image, ``H x W`` (see the module docstring for the accepted forms).
        ground_truth: train-id map or ``None``; resized (nearest) to ``H x W`` if its size differs, as some GTA5
            pairs do.
        prediction: train-id map, resized (nearest) to ``H x W`` if its size differs.
        captions: one caption per panel in the order image, ground truth, prediction (the ground-truth caption
            is dropped with the panel), or ``None`` for no caption bar.
        gap: white pixels between panels.
        palette: ``C x 3`` colours (a class table's); default the Cityscapes protocol's.

    Returns:
        RGB image of width ``panels * W + (panels - 1) * gap`` and height ``H`` (+ the caption bar).
    """
    rgb = _as_rgb_array(image)
    height, width = rgb.shape[:2]
    panels = [Image.fromarray(rgb, mode="RGB")]
    names = list(captions) if captions is not None else None
    if names is not None and len(names) != 3:
        raise ValueError(f"captions must name the 3 panels (image, ground truth, prediction), got {names}")
    if ground_truth is not None:
        panels.append(
            color_mask(_resize_ids(_as_id_array(ground_truth), (height, width)), num_classes, palette)
        )
    elif names is not None:
        names.pop(1)
    panels.append(color_mask(_resize_ids(_as_id_array(prediction), (height, width)), num_classes, palette))

    caption_height = 0 if names is None else max(12, min(32, height // 10))
    strip = Image.new(
        "RGB", (len(panels) * width + (len(panels) - 1) * gap, height + caption_height), "white"
    )
    for index, panel in enumerate(panels):
        left = index * (width + gap)
        if names is not None:
            strip.paste(_caption_bar(names[index], width, caption_height), (left, 0))
        strip.paste(panel, (left, caption_height))
    return strip


def _iter_single_samples(samples: Iterable[Mapping]) -> Iterable[tuple[str | None, torch.Tensor, object]]:
    """Yield ``(name, pixel_values 3 x H x W uint8, labels H x W | None)`` from samples or batches."""
    for sample in samples:
        pixel_values = torch.as_tensor(sample["pixel_values"])
        labels = sample.get("labels")
        names = sample.get("name")
        if pixel_values.dim() == 3:
            yield (names if isinstance(names, str) else None), pixel_values, labels
        elif pixel_values.dim() == 4:  # a loader batch: N x 3 x H x W
            for index in range(pixel_values.shape[0]):
                name = names[index] if isinstance(names, (list, tuple)) else None
                yield name, pixel_values[index], (None if labels is None else labels[index])
        else:
            raise ValueError(
                f"pixel_values must be 3 x H x W or N x 3 x H x W uint8, got shape {tuple(pixel_values.shape)}"
            )


def _file_stem(name: str | None, index: int) -> str:
    if not name:
        return f"{index:02d}"
    safe = "".join(character if character.isalnum() or character in "-_." else "_" for character in name)
    return f"{index:02d}_{Path(safe).stem}"


@torch.no_grad()
def save_prediction_strips(
    model: torch.nn.Module,
    samples: Iterable[Mapping],
    out_dir: str | Path,
    num_classes: int,
    max_images: int = 4,
    flip: bool = False,
    inputs_dir: str | Path | None = None,
    palette=None,
) -> list[Path]:
    """Predict the first ``max_images`` samples and save one :func:`side_by_side` strip PNG per sample.

    Args:
        model: a segmentation model taking ImageNet-normalised ``N x 3 x H x W`` input and returning ``logits``
            ``N x C x h x w`` (``CPSLForSemanticSegmentation``); run through :func:`cpsl_hf.inference.predict_logits`.
            Its train/eval mode is restored afterwards, so the trainer can call this between steps (on the main
            process only; DDP / ``torch.compile`` wrappers are unwrapped).
        samples: dicts with ``pixel_values`` (uint8 ``3 x H x W``, or a loader batch ``N x 3 x H x W``),
            optionally ``labels`` (train ids ``H x W`` / ``N x H x W``) and ``name``.
        out_dir: folder for the strips (created); the trainer uses ``<checkpoint>/predictions``.
        max_images: how many strips to write at most.
        inputs_dir: when given, each input image is also saved there as it was, ``inputs_dir/NN_<name>.png``
            (the trainer's ``<checkpoint>/examples``: images a demo Space offers to try).
        palette: ``C x 3`` colours (a class table's); default the Cityscapes protocol's.

    Returns:
        The written paths, ``out_dir/NN_<name>.png``, in sample order.
    """
    from cpsl_hf.inference import unwrap_model

    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    model = unwrap_model(model)  # DDP / torch.compile wrappers: run the bare module, no collectives
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if inputs_dir is not None:
        inputs_dir = Path(inputs_dir)
        inputs_dir.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    written: list[Path] = []
    try:
        for index, (name, pixel_values, labels) in enumerate(_iter_single_samples(samples)):
            if index >= max_images:
                break
            prediction = predict_train_ids(model, pixel_values, flip=flip)
            strip = side_by_side(pixel_values, labels, prediction, num_classes, palette=palette)
            path = out_dir / f"{_file_stem(name, index)}.png"
            strip.save(path)
            written.append(path)
            if inputs_dir is not None:
                Image.fromarray(pixel_values.permute(1, 2, 0).cpu().numpy()).save(inputs_dir / path.name)
    finally:
        model.train(was_training)
    return written


def predict_train_ids(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    flip: bool = False,
    sliding_window: tuple[int, int, int, int] | None = None,
) -> torch.Tensor:
    """Arg-max train ids of one uint8 RGB image ``3 x H x W`` at its own size -> ``torch.uint8`` ``H x W`` (CPU).

    Runs :func:`cpsl_hf.inference.predict_logits` (logits upsampled to ``H x W`` before the arg-max, exactly as
    the evaluation does).
    """
    from cpsl_hf.inference import predict_logits

    if pixel_values.dtype != torch.uint8 or pixel_values.dim() != 3:
        raise ValueError(
            f"pixel_values must be uint8 3 x H x W, got {pixel_values.dtype} {tuple(pixel_values.shape)}"
        )
    logits = predict_logits(model, pixel_values[None], flip=flip, sliding_window=sliding_window)
    return logits[0].argmax(dim=0).to(device="cpu", dtype=torch.uint8)
