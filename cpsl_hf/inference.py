"""Inference shared by evaluation and prediction: load a checkpoint, turn uint8 images into logits.

:func:`predict_logits` is the one place where images become class scores. It normalises the images
itself (ImageNet statistics, as the saved image processor), runs the model on the whole image or on
overlapping windows, optionally averages with the horizontally flipped image, and returns logits at the
input size. Evaluation, the prediction script and pseudo-label generation all call it, so their numbers
agree by construction.

Any ``transformers`` semantic-segmentation model whose output has ``logits`` (``N x C x h x w`` at any
decode resolution) works: CPSL checkpoints and plain SegFormer ones alike.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from cpsl_hf.data.transforms import normalize, to_float
from cpsl_hf.utils import MissingPathError, UsageError

__all__ = ["load_model", "predict_logits", "parse_sliding_window", "unwrap_model"]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``torch.compile`` wrapper (else ``model`` itself).

    Evaluation runs the bare module: a DDP forward may start collectives (buffer broadcasts), which hang
    when processes hold different numbers of evaluation batches.
    """
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def load_model_config(
    model_name_or_path: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    argument: str = "--model",
):
    """The ``config.json`` of a checkpoint folder or Hub repository (cheap: no weights), e.g. to check its number
    of classes before loading it.

    Raises:
        MissingPathError: ``model_name_or_path`` is a path (absolute, or starting with ``.``) that does not exist.
        UsageError: it is a file, or a local folder that holds no model configuration.
        OSError: a Hub repository that cannot be read (the message names it and says why).
        Every message starts with ``argument`` (the script's flag) and the name.
    """
    from transformers import AutoConfig

    import cpsl_hf  # noqa: F401  (registers CPSLConfig / CPSLForSemanticSegmentation with the Auto classes)

    name = os.fspath(model_name_or_path)
    if not os.path.exists(name) and (os.path.isabs(name) or name.startswith(".")):
        raise MissingPathError(f"{argument} {name}: no such folder")
    if os.path.isfile(name):
        raise UsageError(
            f"{argument} {name}: a file, not a checkpoint folder (save_pretrained writes a folder)"
        )
    with _load_errors(name, argument):
        return AutoConfig.from_pretrained(
            name, revision=revision, token=token, trust_remote_code=trust_remote_code
        )


@contextlib.contextmanager
def _load_errors(name: str, argument: str):
    """Turn ``from_pretrained``'s errors into one-line messages that start with ``argument`` and ``name``."""
    try:
        yield
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())
        if os.path.isdir(name):
            raise UsageError(f"{argument} {name}: not a model folder ({reason})") from error
        from cpsl_hf.data.readers import hub_offline

        offline = " HF_HUB_OFFLINE=1 is set, so the Hub is not contacted." if hub_offline() else ""
        raise OSError(
            f"{argument} {name}: cannot load model as a Hub repository id (no such local folder): "
            f"{reason}.{offline}"
        ) from error


def load_model(
    model_name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    trust_remote_code: bool = False,
    argument: str = "--model",
) -> torch.nn.Module:
    """Load a semantic-segmentation checkpoint from a local folder or a Hub repository id, in eval mode.

    Importing :mod:`cpsl_hf` registers the CPSL classes with the ``Auto`` factories, so CPSL checkpoints
    load without remote code; other ``AutoModelForSemanticSegmentation`` checkpoints (SegFormer, ...) load
    too. ``trust_remote_code=True`` is only needed for foreign architectures.

    Raises:
        The errors of :func:`load_model_config` (a missing path, a folder that is not a model, an unreadable
        Hub repository), each naming ``argument`` and the checkpoint.
    """
    from transformers import AutoModelForSemanticSegmentation

    config = load_model_config(model_name_or_path, revision, token, trust_remote_code, argument)
    name = os.fspath(model_name_or_path)
    with _load_errors(name, argument):
        model = AutoModelForSemanticSegmentation.from_pretrained(
            name, config=config, revision=revision, token=token, trust_remote_code=trust_remote_code
        )
    if device is not None:
        model = model.to(device)
    return model.eval()


def parse_sliding_window(text: str | Sequence[int] | None) -> tuple[int, int, int, int] | None:
    """``"CROP_H,CROP_W[,STRIDE_H,STRIDE_W]"`` (or a sequence of 2 or 4 ints) -> ``(crop_h, crop_w, stride_h, stride_w)``.

    With two numbers the stride is half the crop. ``None`` or ``""`` -> ``None`` (whole-image inference).
    """
    if text is None or text == "":
        return None
    if isinstance(text, str):
        try:
            values = [int(part) for part in text.replace("x", ",").split(",")]
        except ValueError as error:
            raise ValueError(
                f"sliding window {text!r}: expected 'CROP_H,CROP_W' or 'CROP_H,CROP_W,STRIDE_H,STRIDE_W' (integers)"
            ) from error
    else:
        values = [int(value) for value in text]
    if len(values) == 2:
        values += [max(values[0] // 2, 1), max(values[1] // 2, 1)]
    if len(values) != 4:
        raise ValueError(f"sliding window {text!r}: expected 2 or 4 integers, got {len(values)}")
    crop_h, crop_w, stride_h, stride_w = values
    if min(values) <= 0:
        raise ValueError(f"sliding window {text!r}: crop and stride must be positive")
    if stride_h > crop_h or stride_w > crop_w:
        raise ValueError(
            f"sliding window {text!r}: a stride larger than the crop would leave pixels without a prediction"
        )
    return crop_h, crop_w, stride_h, stride_w


@torch.no_grad()
def predict_logits(
    model: torch.nn.Module,
    pixel_values: torch.Tensor,
    flip: bool = False,
    sliding_window: tuple[int, int, int, int] | None = None,
    autocast_dtype: torch.dtype | None = None,
    upsample: bool = True,
) -> torch.Tensor:
    """Class scores for a batch of uint8 images, at the images' own size.

    Args:
        model: a semantic-segmentation model whose output has ``logits`` (``N x C x h x w``, any ``h x w``).
            It is used as it is (call ``model.eval()`` first; :func:`load_model` does).
        pixel_values: uint8 ``N x 3 x H x W`` RGB images, on any device (moved to the model's device).
        flip: also run the horizontally flipped images and average the two softmax probabilities.
        sliding_window: ``None`` for one forward pass on the whole image, or ``(crop_h, crop_w, stride_h,
            stride_w)`` for overlapping windows whose logits (each upsampled to its window) are averaged
            where they overlap. Images smaller than the crop are run whole.
        autocast_dtype: run the model under ``torch.autocast`` with this dtype (``torch.float16`` or
            ``torch.bfloat16``); ``None`` runs in the model's own precision. Returned logits are float32.
        upsample: False (only without ``flip`` and ``sliding_window``) returns the model's logits at its own
            output size ``h x w`` (float32, not upsampled), for a consumer that upsamples them itself with the
            same bilinear, ``align_corners=False`` float32 interpolation (``ConfusionMatrix.update`` does, in
            row bands, bit-identically); logits already at the image size are returned as ``upsample=True``
            returns them.

    Returns:
        float32 ``N x C x H x W`` on the model's device. Without ``flip``: the model's logits, bilinearly
        upsampled (``align_corners=False``). With ``flip``: the log of the averaged probabilities, so that
        ``softmax`` of the result is the flip-averaged probability and ``argmax`` the averaged prediction.
    """
    if not upsample and (flip or sliding_window is not None):
        raise ValueError("predict_logits(upsample=False) takes neither flip nor sliding_window")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dtype != torch.uint8:
        raise TypeError(
            f"pixel_values must be a uint8 tensor N x 3 x H x W, got "
            f"{type(pixel_values).__name__} {getattr(pixel_values, 'dtype', '')}"
        )
    if pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
        raise ValueError(f"pixel_values must have shape N x 3 x H x W, got {tuple(pixel_values.shape)}")
    if sliding_window is not None:
        sliding_window = parse_sliding_window(sliding_window)
    device = _model_device(model)
    images = normalize(to_float(pixel_values.to(device, non_blocking=True)))
    if not upsample:
        logits = _model_logits(model, images, autocast_dtype)
        if logits.shape[-2:] != images.shape[-2:]:
            return logits.float()
        return _upsampled(logits, images.shape[-2:])
    logits = _segment(model, images, sliding_window, autocast_dtype)
    if not flip:
        return logits
    flipped_logits = _segment(model, images.flip(-1), sliding_window, autocast_dtype).flip(-1)
    return torch.logaddexp(logits.log_softmax(1), flipped_logits.log_softmax(1)) - math.log(2.0)


def _model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _model_logits(
    model: torch.nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """Model logits for normalised float images ``N x 3 x H x W`` -> ``N x C x h x w`` at the model's output
    size, in its output dtype."""
    with _autocast(images.device, autocast_dtype):
        outputs = model(pixel_values=images)
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def _upsampled(logits: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """``N x C x h x w`` -> float32 ``N x C x H x W``: bilinear, ``align_corners=False``, in float32."""
    return F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)


def _forward(
    model: torch.nn.Module, images: torch.Tensor, autocast_dtype: torch.dtype | None
) -> torch.Tensor:
    """Model logits for normalised float images ``N x 3 x H x W`` -> float32 ``N x C x H x W`` (upsampled)."""
    return _upsampled(_model_logits(model, images, autocast_dtype), images.shape[-2:])


def _window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Top (or left) offsets of the windows covering ``size`` pixels; the last window ends at the border."""
    if size <= crop:
        return [0]
    count = math.ceil((size - crop) / stride) + 1
    return [min(index * stride, size - crop) for index in range(count)]


def _segment(
    model: torch.nn.Module,
    images: torch.Tensor,
    sliding_window: tuple[int, int, int, int] | None,
    autocast_dtype: torch.dtype | None,
) -> torch.Tensor:
    """Whole-image or sliding-window logits: normalised ``N x 3 x H x W`` -> float32 ``N x C x H x W``."""
    if sliding_window is None:
        return _forward(model, images, autocast_dtype)
    crop_h, crop_w, stride_h, stride_w = sliding_window
    height, width = images.shape[-2:]
    logits_sum = None
    window_count = images.new_zeros(1, 1, height, width)
    for top in _window_starts(height, crop_h, stride_h):
        for left in _window_starts(width, crop_w, stride_w):
            window = (slice(None), slice(None), slice(top, top + crop_h), slice(left, left + crop_w))
            window_logits = _forward(model, images[window], autocast_dtype)
            if logits_sum is None:
                logits_sum = window_logits.new_zeros(images.shape[0], window_logits.shape[1], height, width)
            logits_sum[window] += window_logits
            window_count[window] += 1
    return logits_sum / window_count
