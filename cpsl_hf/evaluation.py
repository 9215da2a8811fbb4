"""Streaming mIoU: a confusion matrix accumulated on the device, reduced across processes.

The numbers are those of the Cityscapes benchmark (``cityscapesscripts``' pixel-level evaluation):

- one confusion matrix over the whole split, at label resolution (logits are upsampled bilinearly,
  ``align_corners=False``, to the label size before the argmax); pixels whose label is ``ignore_index``
  are left out;
- ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``, from the summed matrix (not averaged per image);
- a class with ``TP + FP + FN = 0`` (neither in the ground truth nor predicted anywhere in the split)
  has no IoU: it is ``NaN`` and left out of the mean, exactly as the official script (which returns
  ``nan`` and averages over the valid scores) and ``evaluate``'s ``mean_iou`` (``nanmean``) do.
  A class that is predicted but absent from the ground truth has IoU 0 and counts;
- per-class accuracy ``TP_c / (TP_c + FN_c)`` (``NaN`` when the class is absent from the ground truth),
  its mean over the defined classes, and the overall pixel accuracy;
- for the 16-class SYNTHIA protocol, the 13-class mIoU is the mean of the IoUs of the 13 classes of
  :data:`cpsl_hf.data.protocols.THIRTEEN_OF_SIXTEEN`, taken from the same 16-class matrix.

The result dictionary uses the keys of ``evaluate``'s ``mean_iou`` (``mean_iou``, ``mean_accuracy``,
``overall_accuracy``, ``per_category_iou``, ``per_category_accuracy``) plus ``class_names``,
``num_classes``, ``num_images`` and, for 16 classes, ``mean_iou_13``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from cpsl_hf.data import protocols, registry
from cpsl_hf.inference import predict_logits, unwrap_model
from cpsl_hf.selflabel import class_argmax
from cpsl_hf.utils import UsageError, autocast_dtype, format_percent, json_ready
from cpsl_hf.utils import progress as progress_bar

logger = logging.getLogger(__name__)

__all__ = [
    "ConfusionMatrix",
    "confusion_counts",
    "confusion_rates",
    "evaluate_model",
    "evaluate_checkpoint",
    "load_eval_dataset",
    "DATASETS",
    "DEFAULT_SLIDING_WINDOW",
    "format_metrics_table",
    "metrics_to_json",
    "metric_module_path",
    "protocol_description",
]


CHUNK_PIXELS = 1 << 15
"""Pixels per chunk of :meth:`ConfusionMatrix.update` on class ids: each chunk's few operations run on
cache-resident int64 slices, and at 32768 elements they do not exceed ATen's parallel grain, so they run on
the calling thread (no thread-pool wake-up per operation, which on a loaded machine costs more than the work).
Also the sub-band size of the argmax of logits. ``None``: the whole update at once (as on accelerators)."""

UPSAMPLE_CHUNK_PIXELS = 1 << 17
"""Output pixels (``N x rows x W``) per chunk of the bilinear upsampling of logits in :meth:`ConfusionMatrix.update`:
``C x`` that many float32 values (about 10 MB for 19 classes) are live at a time instead of the whole
``N x C x H x W`` upsampled tensor. ``None``: one band."""

_MAX_LABEL_ROWS = 1024  # histogram rows (label values) spanned by clamping; beyond: ignore_index is remapped


class ConfusionMatrix:
    """A ``num_classes x num_classes`` int64 confusion matrix (rows: ground truth, columns: prediction).

    Updates stay on the device and never synchronise with the host. Each update is one histogram (a
    ``scatter_add_`` of ones into a fixed-size buffer, chunk by chunk on CPU) of
    ``row(label) * K + column(prediction)``, where the
    rows are the clamped label values (``0 .. C-1``, ``ignore_index`` and the out-of-range ones) and the
    ``K = C + 2`` columns the predictions ``< 0``, ``0 .. C-1`` and ``>= C``. The matrix, the number of label
    values other than ``0 .. C-1`` and ``ignore_index`` and the number of labelled pixels with a prediction
    outside ``0 .. C-1`` are read off that histogram on the device; :meth:`compute` reports the last two as
    errors. Pixels whose label is ``ignore_index`` count nowhere.

    Args:
        num_classes: ``C``.
        ignore_index: label value left out of the matrix (255, the Cityscapes ``ignore``).
        device: where the matrix lives (default CPU); inputs are moved there.
    """

    def __init__(self, num_classes: int, ignore_index: int = protocols.IGNORE_INDEX, device=None):
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        count = self.num_classes
        # Label rows: the label value clamped to [low, high], minus low. low < 0 and high >= C hold the
        # out-of-range values; when ignore_index is far from 0 .. C-1 it is first mapped to low (its own row).
        low, high = min(0, self.ignore_index) - 1, max(count - 1, self.ignore_index) + 1
        self._remap_ignore = high - low + 1 > _MAX_LABEL_ROWS
        if self._remap_ignore:
            low, high = -2, count
        self._label_low, self._label_high = low, high
        self._ignore_row = (low if self._remap_ignore else self.ignore_index) - low
        self._columns = count + 2
        self._bins = (high - low + 1) * self._columns
        # bin = row(label) * K + column(prediction) = clamped label * K + clamped prediction + offset
        self._offset = 1 - low * self._columns
        # CPU: chunks (cache-resident, on the calling thread); accelerators: one pass per update (no launches)
        self._chunk_pixels = CHUNK_PIXELS if self.device.type == "cpu" else None
        self.reset()

    def reset(self) -> None:
        """Zero the counts (and allow updates again after :meth:`reduce`)."""
        self.matrix = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=self.device)
        # [images, labels outside 0..C-1 and != ignore_index, predictions outside 0..C-1]
        self._counters = torch.zeros(3, dtype=torch.int64, device=self.device)
        self._reduced = False

    @torch.no_grad()
    def update(self, logits_or_preds: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch.

        Args:
            logits_or_preds: float logits ``N x C x h x w`` (any ``h x w``: upsampled bilinearly, in float32,
                ``align_corners=False``, to the label size, then argmax'ed), or integer predicted class
                ids ``N x H x W`` at label size (any integer dtype; uint8 is the cheapest to move).
            labels: integer ``N x H x W`` train ids in ``0 .. C-1``, ``ignore_index`` where unlabelled
                (any integer dtype).
        """
        if self._reduced:
            raise RuntimeError(
                "ConfusionMatrix.update() after reduce(): call reset() to start a new evaluation"
            )
        if labels.dim() != 3 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ValueError(
                f"labels must be an integer tensor N x H x W, got {labels.dtype} {tuple(labels.shape)}"
            )
        labels = labels.to(self.device, non_blocking=True)
        if logits_or_preds.dtype.is_floating_point:
            histogram = self._logits_histogram(logits_or_preds, labels)
        else:
            if tuple(logits_or_preds.shape) != tuple(labels.shape):
                raise ValueError(
                    f"predicted class ids must have the labels' shape {tuple(labels.shape)}, "
                    f"got {tuple(logits_or_preds.shape)} (pass float logits N x C x h x w to have them upsampled)"
                )
            predictions = logits_or_preds.to(self.device, non_blocking=True)
            histogram = self._ids_histogram(predictions.reshape(-1), labels.reshape(-1))
        self._accumulate(histogram, labels.shape[0])

    def _index(self, predictions: torch.Tensor, labels: torch.Tensor, scratch) -> torch.Tensor:
        """Histogram bins of one chunk: integer ``predictions``, ``labels`` of one shape ``S`` -> flat int64
        bins (``prod(S)``), written into the buffers of :func:`_scratch` (at least ``prod(S)`` long)."""
        count = labels.numel()
        low, high = self._label_low, self._label_high
        if self._remap_ignore:  # low is ignore_index's row, low + 1 the negative values'
            rows = _clamped(labels, low + 1, high, scratch[0][:count].view(labels.shape))
            rows.masked_fill_(labels == self.ignore_index, low)
        else:
            rows = _clamped(labels, low, high, scratch[0][:count].view(labels.shape))
        index = _clamped(predictions, -1, self.num_classes, scratch[1][:count].view(labels.shape))
        return index.add_(rows, alpha=self._columns).add_(self._offset).view(-1)

    def _ids_histogram(self, predictions: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Histogram of flat class ids and labels (``P`` pixels), ``CHUNK_PIXELS`` at a time."""
        histogram = torch.zeros(self._bins, dtype=torch.int64, device=self.device)
        scratch = _scratch(max(self._chunk_size(labels.numel()), 1), self.device)
        self._add_ids(histogram, predictions, labels, scratch)
        return histogram

    def _chunk_size(self, pixels: int) -> int:
        return pixels if self._chunk_pixels is None else min(pixels, self._chunk_pixels)

    def _add_ids(
        self, histogram: torch.Tensor, predictions: torch.Tensor, labels: torch.Tensor, scratch
    ) -> None:
        """Add flat class ids and labels (``P`` pixels) to ``histogram``, ``CHUNK_PIXELS`` at a time."""
        pixels = labels.numel()
        step = max(self._chunk_size(pixels), 1)
        for start in range(0, pixels, step):  # chunks of pixels (a fixed count per image size)
            chunk = slice(start, start + step)
            self._add(histogram, self._index(predictions[chunk], labels[chunk], scratch), scratch)

    @staticmethod
    def _add(histogram: torch.Tensor, index: torch.Tensor, scratch) -> None:
        """``histogram[i] += 1`` for each bin ``i`` of the flat int64 ``index``: a ``scatter_add_`` of ones
        (on CPU about twice as fast per chunk as ``bincount``, which also scans for the minimum and maximum;
        on accelerators no host synchronisation, unlike CUDA's ``bincount``)."""
        histogram.scatter_add_(0, index, scratch[2][: index.numel()])

    def _logits_histogram(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Histogram of the argmax of ``logits`` (``N x C x h x w``, upsampled to the labels' ``N x H x W``)."""
        if logits.dim() != 4 or logits.shape[0] != labels.shape[0]:
            raise ValueError(
                f"logits must be N x C x h x w with N={labels.shape[0]} (the labels' batch size), "
                f"got {tuple(logits.shape)}"
            )
        if logits.shape[1] != self.num_classes:
            raise ValueError(
                f"logits have {logits.shape[1]} classes, the confusion matrix {self.num_classes}"
            )
        logits = logits.to(self.device, non_blocking=True)
        size = labels.shape[-2:]
        if logits.shape[-2:] == size:
            bands = _row_bands(labels.shape[0] * size[1], size[0], self._chunk_pixels)
            return self._sum_bands(lambda top, bottom: logits[:, :, top:bottom], labels, bands, factor=1)
        factor = _chunkable_factor(logits, size)
        if factor is None:  # the whole tensor at once, as F.interpolate does it
            upsampled = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
            return self._sum_bands(
                lambda top, bottom: upsampled[:, :, top:bottom],
                labels,
                _row_bands(labels.shape[0] * size[1], size[0], self._chunk_pixels),
                factor=1,
            )
        height = logits.shape[2]
        bands = _row_bands(labels.shape[0] * size[1] * factor, height, UPSAMPLE_CHUNK_PIXELS)
        return self._sum_bands(
            lambda top, bottom: _upsampled_band(logits, top, bottom, factor, size[1]),
            labels,
            bands,
            factor=factor,
        )

    def _sum_bands(self, scores, labels: torch.Tensor, bands, factor: int) -> torch.Tensor:
        """Sum of the histograms of the argmax of ``scores(top, bottom)`` (``N x C x factor*(bottom-top) x W``)
        and the matching label rows, over the row ``bands`` (in units of ``factor`` label rows). The argmax
        runs on sub-bands of about ``CHUNK_PIXELS`` (``max(1)`` is faster on small ones)."""
        histogram = torch.zeros(self._bins, dtype=torch.int64, device=self.device)
        pixels_per_row = labels.shape[0] * labels.shape[2]
        scratch = _scratch(max(self._chunk_size(pixels_per_row * labels.shape[1]), 1), self.device)
        for top, bottom in bands:  # bands of rows: bounded memory, a fixed count per image size
            band = scores(top, bottom)
            band_labels = labels[:, top * factor : bottom * factor]
            for first, last in _row_bands(pixels_per_row, band.shape[2], self._chunk_pixels):
                predictions = class_argmax(band[:, :, first:last]).reshape(-1)
                self._add_ids(histogram, predictions, band_labels[:, first:last].reshape(-1), scratch)
        return histogram

    def _accumulate(self, histogram: torch.Tensor, num_images: int) -> None:
        """Add one update's histogram (``R * K`` int64, rows: label values, columns: predictions) to the matrix
        and the counters, on the device."""
        table = histogram.view(-1, self._columns)
        table[self._ignore_row] = 0  # ignored pixels count nowhere
        first = -self._label_low  # row of label 0
        classes = table[first : first + self.num_classes]
        self.matrix += classes[:, 1 : self.num_classes + 1]
        self._counters[0] += num_images
        self._counters[1] += table[:first].sum() + table[first + self.num_classes :].sum()
        self._counters[2] += classes[:, 0].sum() + classes[:, self.num_classes + 1].sum()

    def reduce(self) -> ConfusionMatrix:
        """Sum the matrices of all processes (``torch.distributed`` all-reduce, any backend) in place.

        A no-op without an initialised process group or when called again. Every process must call it.
        """
        if self._reduced:
            return self
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            packed = torch.cat([self.matrix.flatten(), self._counters])
            if dist.get_backend() == "nccl" and packed.device.type != "cuda":
                packed = packed.cuda()
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            packed = packed.to(self.device)
            count = self.num_classes * self.num_classes
            self.matrix = packed[:count].view(self.num_classes, self.num_classes).clone()
            self._counters = packed[count:].clone()
        self._reduced = True
        return self

    def compute(self, class_names: Sequence[str] | None = None) -> dict:
        """Metrics of the accumulated matrix (call :meth:`reduce` first under data parallelism).

        Args:
            class_names: ``C`` names; default the protocol's Cityscapes names for 19, 16 or 13 classes,
                else ``"0" .. "C-1"``.

        Returns:
            ``mean_iou``, ``mean_accuracy``, ``overall_accuracy`` (floats in [0, 1], ``NaN`` if undefined),
            ``per_category_iou``, ``per_category_accuracy`` (lists of ``C`` floats, ``NaN`` for classes
            without IoU / absent from the ground truth), ``class_names``, ``num_classes``, ``num_images``
            and, when ``C == 16``, ``mean_iou_13``.

        Raises:
            ValueError: some labels were outside ``0 .. C-1`` without being ``ignore_index``, or some
                predicted class ids were outside ``0 .. C-1``.
        """
        num_images, bad_labels, bad_predictions = (int(value) for value in self._counters.cpu())
        if bad_labels:
            raise ValueError(
                f"{bad_labels} label pixels were outside 0..{self.num_classes - 1} and not the ignore index "
                f"{self.ignore_index}: wrong label protocol (num_classes={self.num_classes}) or unconverted label ids?"
            )
        if bad_predictions:
            raise ValueError(f"{bad_predictions} predicted class ids were outside 0..{self.num_classes - 1}")
        names = list(class_names) if class_names is not None else _default_class_names(self.num_classes)
        if len(names) != self.num_classes:
            raise ValueError(f"class_names has {len(names)} entries, expected {self.num_classes}")
        iou, accuracy, overall_accuracy = confusion_rates(self.matrix)
        metrics = {
            "mean_iou": _nanmean(iou),
            "mean_accuracy": _nanmean(accuracy),
            "overall_accuracy": overall_accuracy,
            "per_category_iou": iou.tolist(),
            "per_category_accuracy": accuracy.tolist(),
            "class_names": names,
            "num_classes": self.num_classes,
            "num_images": num_images,
        }
        if self.num_classes == 16 and names == protocols.class_names(
            16
        ):  # the SYNTHIA protocol, not a table's
            metrics["mean_iou_13"] = _nanmean(iou[list(protocols.THIRTEEN_OF_SIXTEEN)])
        return metrics


def confusion_counts(
    labels: torch.Tensor, predictions: torch.Tensor, num_classes: int, counted: torch.Tensor
) -> torch.Tensor:
    """C x C int64 confusion counts (rows: ``labels``, columns: ``predictions``) of the pixels where ``counted``.

    Args:
        labels, predictions: int64 tensors of one shape, values in ``0 .. C-1`` wherever ``counted``.
        num_classes: C.
        counted: bool tensor of that shape.

    One histogram of ``label * C + prediction`` on the device, no host synchronisation (:func:`_histogram`).
    """
    count = num_classes * num_classes
    index = torch.where(counted, labels * num_classes + predictions, count).flatten()
    return _histogram(index, count + 1)[:count].view(num_classes, num_classes)


def confusion_rates(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(iou, accuracy, overall_accuracy)`` of a C x C confusion matrix (rows: ground truth): length-C float64
    per-class IoU and accuracy (NaN where undefined: no union, no ground-truth pixel) and the overall pixel
    accuracy (NaN for an empty matrix)."""
    matrix = matrix.cpu().double()
    true_positives = matrix.diagonal()
    ground_truth = matrix.sum(1)
    union = ground_truth + matrix.sum(0) - true_positives
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    iou = torch.where(union > 0, true_positives / union.clamp_min(1), nan)
    accuracy = torch.where(ground_truth > 0, true_positives / ground_truth.clamp_min(1), nan)
    total = ground_truth.sum()
    overall = float(true_positives.sum() / total) if total > 0 else float("nan")
    return iou, accuracy, overall


def _histogram(index: torch.Tensor, num_bins: int) -> torch.Tensor:
    """Counts of each value of a flat int64 ``index`` in ``0 .. num_bins - 1`` -> int64 ``num_bins``.

    ``torch.bincount`` on CPU (fastest there); elsewhere a ``scatter_add_`` into a fixed-size buffer, since
    CUDA's ``bincount`` reads the maximum value back to the host (a synchronisation per update).
    """
    if index.device.type == "cpu":
        return torch.bincount(index, minlength=num_bins)
    return _scatter_histogram(index, num_bins)


def _scatter_histogram(index: torch.Tensor, num_bins: int) -> torch.Tensor:
    counts = torch.zeros(num_bins, dtype=torch.int64, device=index.device)
    return counts.scatter_add_(0, index, torch.ones_like(index))


def _scratch(count: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat int64 buffers of ``count`` reused across the chunks of an update: label rows and bins for
    :meth:`ConfusionMatrix._index`, and ones for :meth:`ConfusionMatrix._add`."""
    empty = (torch.empty(count, dtype=torch.int64, device=device) for _ in range(2))
    return (*empty, torch.ones(count, dtype=torch.int64, device=device))


def _clamped(values: torch.Tensor, low: int, high: int, out: torch.Tensor) -> torch.Tensor:
    """``values`` (any integer dtype) clamped to ``[low, high]`` into the int64 tensor ``out`` of its shape
    (one pass for int64; a lossless widening copy first for the others)."""
    if values.dtype == torch.int64:
        return torch.clamp(values, low, high, out=out)
    return out.copy_(values).clamp_(low, high)


def _row_bands(pixels_per_row: int, rows: int, chunk_pixels: int | None) -> list[tuple[int, int]]:
    """``(top, bottom)`` bands covering ``rows`` rows of ``pixels_per_row`` pixels, about ``chunk_pixels`` each
    (at least one row; ``None``: one band)."""
    if chunk_pixels is None:
        return [(0, rows)]
    step = max(1, chunk_pixels // max(pixels_per_row, 1))
    return [(top, min(top + step, rows)) for top in range(0, rows, step)]


def _chunkable_factor(logits: torch.Tensor, size: torch.Size) -> int | None:
    """The height factor ``H / h`` when the upsampling can be done in row bands with results bit-identical to
    one ``F.interpolate`` of the whole tensor, else None.

    Bands of input rows ``[top - 1, bottom + 1)`` upsampled by an exact power-of-two factor ``f`` (to
    ``f x`` their rows, the full width) compute every kept output row with the same source index and weight
    as the whole-tensor call: the scale ``h / H = 1 / f`` and the source coordinates ``(i + 0.5) / f - 0.5``
    are exact in float32, and the one-row halo holds both rows each kept output row reads. The same CPU
    kernel must run for the bands and the whole: contiguous (not channels-last) logits and outputs wider than
    ATen's small-output threshold (``H + W > 128``: it picks another kernel at or below). Elsewhere (other
    devices, other factors) the whole tensor is upsampled at once, as before.
    """
    height, width = logits.shape[-2:]
    out_height, out_width = size
    if logits.device.type != "cpu" or not logits.is_contiguous() or height < 2 or out_height % height:
        return None
    factor = out_height // height
    if factor < 1 or factor & (factor - 1) or factor > 1 << 10 or out_height >= 1 << 20 or out_width <= 128:
        return None  # not a power of two, or an output this kernel might special-case
    return factor


def _upsampled_band(logits: torch.Tensor, top: int, bottom: int, factor: int, out_width: int) -> torch.Tensor:
    """Rows ``factor * top .. factor * bottom`` of the bilinear (``align_corners=False``) float32 upsampling of
    ``logits`` ``N x C x h x w`` to ``N x C x factor*h x out_width`` -> float32
    ``N x C x factor*(bottom-top) x out_width``, computed on the band of input rows ``top-1 .. bottom`` only."""
    first, last = max(top - 1, 0), min(bottom + 1, logits.shape[2])
    band = F.interpolate(
        logits[:, :, first:last].float(),
        size=(factor * (last - first), out_width),
        mode="bilinear",
        align_corners=False,
    )
    return band[:, :, factor * (top - first) : factor * (bottom - first)]


def _nanmean(values: torch.Tensor) -> float:
    defined = values[~values.isnan()]
    return float(defined.mean()) if defined.numel() else float("nan")


def _default_class_names(num_classes: int) -> list[str]:
    if num_classes in protocols.SUPPORTED_NUM_CLASSES:
        return protocols.class_names(num_classes)
    return [str(index) for index in range(num_classes)]


def protocol_description(num_classes: int) -> str:
    """Human-readable name of the label protocol of ``num_classes``."""
    return {
        19: "19 classes (GTA5 -> Cityscapes, Cityscapes train ids)",
        16: "16 classes (SYNTHIA -> Cityscapes); mean_iou_13 over the 13-class subset",
        13: "13 classes (SYNTHIA -> Cityscapes subset)",
    }.get(num_classes, f"{num_classes} classes")


def evaluate_model(
    model: torch.nn.Module,
    loader: Iterable[dict],
    num_classes: int,
    device=None,
    flip: bool = False,
    sliding_window: tuple[int, int, int, int] | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
    class_names: Sequence[str] | None = None,
) -> dict:
    """mIoU of ``model`` over ``loader``, reduced across processes.

    Args:
        model: a segmentation model (``DistributedDataParallel``-wrapped is fine: the bare module is run).
            It is put in eval mode for the pass and restored to its previous mode afterwards. Inputs are
            normalised here (:func:`cpsl_hf.inference.predict_logits`).
        loader: batches ``{"pixel_values": uint8 N x 3 x H x W, "labels": int64 N x H x W, ...}``; under
            data parallelism each process's loader must hold its own shard so that every sample is seen
            once (``build_eval_loader(..., process_index, num_processes)``).
        num_classes: ``C`` (19, 16 or 13 for the benchmarks).
        device: where to run; default the model's device (the model is moved if they differ).
        flip, sliding_window, autocast_dtype: see :func:`cpsl_hf.inference.predict_logits`
            (defaults: whole image, no flip, full precision). Without flip and sliding window, and with
            labels of the images' size, the model's own low-resolution logits are passed to
            :meth:`ConfusionMatrix.update`, which upsamples them in row bands fused with the argmax (the
            same bilinear float32 values as upsampling the whole batch first, without materialising
            ``N x C x H x W``).
        progress: show a progress bar (main process only).
        class_names: the ``C`` names of the metrics (a class table's); default the protocol's.

    Returns:
        :meth:`ConfusionMatrix.compute` of the matrix summed over all processes (identical on every process).
    """
    model = unwrap_model(model)
    if device is None:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
    device = torch.device(device)
    model.to(device)
    confusion = ConfusionMatrix(num_classes, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batches = progress_bar(loader, progress and _is_main_process(), "evaluating", unit="batch")
            for batch in batches:
                pixel_values, labels = batch["pixel_values"], batch["labels"]
                # Plain inference at label size: the model's low-resolution logits go to update(), which
                # upsamples them in row bands fused with the argmax, bit-identically to upsampling here.
                direct = not flip and sliding_window is None and pixel_values.shape[-2:] == labels.shape[-2:]
                logits = predict_logits(
                    model,
                    pixel_values,
                    flip=flip,
                    sliding_window=sliding_window,
                    autocast_dtype=autocast_dtype,
                    upsample=not direct,
                )
                confusion.update(logits, labels)
    finally:
        model.train(was_training)
    return confusion.reduce().compute(class_names)


def _is_main_process() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def format_metrics_table(metrics: dict) -> str:
    """A plain-text table: one row per class (IoU, accuracy, in %) and the summary rows."""
    width = max(len("mIoU (13 classes)"), *(len(name) for name in metrics["class_names"]))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'acc':>6}", "-" * (width + 16)]
    for name, iou, accuracy in zip(
        metrics["class_names"], metrics["per_category_iou"], metrics["per_category_accuracy"]
    ):
        lines.append(f"{name:<{width}}  {format_percent(iou):>6}  {format_percent(accuracy):>6}")
    lines.append("-" * (width + 16))
    lines.append(
        f"{'mIoU':<{width}}  {format_percent(metrics['mean_iou']):>6}  {format_percent(metrics['mean_accuracy']):>6}"
    )
    if "mean_iou_13" in metrics:
        lines.append(f"{'mIoU (13 classes)':<{width}}  {format_percent(metrics['mean_iou_13']):>6}")
    lines.append(f"{'overall accuracy':<{width}}  {'':>6}  {format_percent(metrics['overall_accuracy']):>6}")
    return "\n".join(lines)


def metrics_to_json(metrics: dict, path: str | os.PathLike | None = None, **extra) -> str:
    """Serialise metrics (plus ``extra`` fields) as strict JSON: ``NaN`` becomes ``null``.

    Writes ``path`` (creating its folder) when given; returns the JSON text.
    """
    payload = json_ready({**metrics, **extra})
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return text


DATASETS = registry.DATASETS
"""Dataset names accepted by :func:`load_eval_dataset` and ``scripts/evaluate.py --dataset`` (the registry's)."""

DEFAULT_SLIDING_WINDOW = (1024, 1024, 768, 768)
"""Window of ``--sliding_window`` given without a value: SegFormer's Cityscapes setting (crop, stride)."""


def load_eval_dataset(
    dataset: str,
    data_dir: str | os.PathLike | None,
    split: str = "val",
    num_classes: int | None = 19,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    class_table=None,
    class_mapping=None,
    reader_options: dict | None = None,
):
    """The evaluation split of a named dataset, as a ``datasets`` dataset with image / label / name, read by
    :func:`cpsl_hf.data.registry.load_dataset` (``cache_dir``: the download readers' label cache).

    - ``cityscapes``: ``data_dir`` holds ``leftImg8bit/{split}`` and ``gtFine/{split}`` (``split`` "val").
    - ``gta5`` / ``synthia``: the whole folder ``data_dir`` (these datasets have no official split).
    - ``synthetic`` / ``synthetic-hard``: the built-in synthetic *target* domain of the default or the hard
      variant of the shift (``split`` "val"/"validation" or "train"); ``data_dir`` is its cache folder
      (optional).
    - ``prepared``: a dataset written by ``scripts/prepare_dataset.py``; ``data_dir`` is its folder or Hub
      dataset repo id, ``split`` its split name, streamed.
    - ``folder``: your own images and masks (``data_dir``), decoded through ``class_table`` (and into
      ``class_mapping``'s source classes when the dataset has a table of its own).
    """
    if dataset not in DATASETS:
        raise ValueError(f"--dataset {dataset!r}: expected one of {', '.join(DATASETS)}")
    spec = registry.dataset_spec(dataset)
    return registry.load_dataset(
        dataset,
        data_dir,
        split,
        num_classes,
        streaming=spec.loader == "prepared",  # parquet shards (maybe on the Hub) are streamed
        label_cache_dir=cache_dir,
        progress=progress,
        domain="target",  # the synthetic shift's target domain
        reader_options=reader_options,
        **({"class_table": class_table, "class_mapping": class_mapping} if dataset == "folder" else {}),
    )


def evaluate_checkpoint(
    model: str | os.PathLike,
    dataset: str = "cityscapes",
    data_dir: str | os.PathLike | None = None,
    split: str = "val",
    num_classes: int | None = None,
    batch_size: int = 1,
    flip: bool = False,
    sliding_window: tuple[int, int, int, int] | None = None,
    mixed_precision: str = "no",
    image_size: tuple[int, int] | None = None,
    max_samples: int | None = None,
    output: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    progress: bool = True,
    class_table: str | os.PathLike | None = None,
    target_class_table: str | os.PathLike | None = None,
    reader_options: dict | None = None,
) -> dict:
    """Evaluate a checkpoint (folder or Hub id) on a dataset split; the engine of ``scripts/evaluate.py``.

    Runs on every process started by ``accelerate launch`` / ``torchrun`` (``Accelerator(cpu=True)`` when
    there is no GPU, so CPU processes form a gloo group): each process evaluates its shard and the
    confusion matrices are summed, so the numbers equal a one-process run. The main process prints the
    per-class table and writes ``output`` (strict JSON, ``NaN`` as ``null``).

    Args:
        mixed_precision: "no" (default), "fp16" or "bf16": autocast dtype of the forward passes.
        image_size: resize images (bilinear) and labels (nearest) to ``(H, W)``; default: original sizes,
            as the benchmark requires.
        max_samples: evaluate only the first samples of the split (quick checks).
        num_classes: the label protocol, 19, 16 or 13 (default 19); with ``class_table`` the table's (an
            explicit different value is an error).
        class_table: the class table of the model's classes (its names go to the metrics); a ``folder``
            dataset is decoded through it.
        target_class_table: the ``folder`` dataset's own table, when it differs: matched to ``class_table``
            (or the protocol) by name; classes on one side only are reported.
        reader_options: options of a target benchmark's reader (``{"conditions": ["night"]}`` for ACDC).
        Others: see :func:`load_eval_dataset`, :func:`evaluate_model`.

    Returns:
        the metrics of :meth:`ConfusionMatrix.compute` plus ``protocol``, ``model``, ``dataset``, ``split``,
        ``inference`` (flip, sliding_window, mixed_precision, image_size) and ``num_processes``.
    """
    from accelerate import Accelerator

    from cpsl_hf.data.loading import build_eval_loader
    from cpsl_hf.inference import load_model, load_model_config

    dtype = autocast_dtype(mixed_precision)  # checks the value before anything is loaded
    num_classes, class_names, data_table, mapping = resolve_eval_classes(
        dataset, num_classes, class_table, target_class_table
    )
    # the model's classes are checked from its config, before its weights load
    model_classes = getattr(load_model_config(model, trust_remote_code=trust_remote_code), "num_labels", None)
    if model_classes != num_classes:
        raise UsageError(
            f"--num_classes {num_classes} but the model {model} predicts {model_classes} classes; "
            f"pass --num_classes {model_classes} (19: GTA5 protocol, 16: SYNTHIA protocol) or the --class_table "
            "the model was trained with"
        )
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    with accelerator.main_process_first():  # the main process builds the dataset cache, the others read it
        data = load_eval_dataset(  # before the weights load: a wrong --data_dir fails at once
            dataset,
            data_dir,
            split,
            num_classes,
            cache_dir,
            progress=progress and accelerator.is_main_process,
            class_table=data_table,
            class_mapping=mapping,
            reader_options=reader_options,
        )
    segmenter = load_model(model, device=accelerator.device, trust_remote_code=trust_remote_code)
    if max_samples is not None:
        data = data.take(max_samples)
    loader = build_eval_loader(
        data,
        batch_size=batch_size,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        image_size=image_size,
    )
    metrics = evaluate_model(
        segmenter,
        loader,
        num_classes,
        device=accelerator.device,
        flip=flip,
        sliding_window=sliding_window,
        autocast_dtype=dtype,
        progress=progress,
        class_names=class_names,
    )
    metrics.update(
        protocol=protocol_description(num_classes)
        if class_table is None
        else f"{num_classes} classes (class table {class_table})",
        model=str(model),
        dataset=dataset,
        split=split,
        inference={
            "flip": flip,
            "sliding_window": list(sliding_window) if sliding_window else None,
            "mixed_precision": mixed_precision,
            "image_size": list(image_size) if image_size else None,
        },
        num_processes=accelerator.num_processes,
    )
    if accelerator.is_main_process:
        print(f"{dataset} {split}: {metrics['num_images']} images, {metrics['protocol']}")
        print(format_metrics_table(metrics))
        if output is not None:
            metrics_to_json(metrics, output)
            print(f"metrics written to {output}")
    accelerator.wait_for_everyone()
    return metrics


def resolve_eval_classes(dataset: str, num_classes: int | None, class_table, target_class_table):
    """``(num_classes, class_names, table the dataset decodes with, mapping or None)`` of an evaluation.

    Raises:
        UsageError: a bad table (file, key, reason), ``--num_classes`` disagreeing with ``--class_table``, a
            ``folder`` dataset without a table, a target table for another dataset, or no common class.
    """
    from cpsl_hf.data.class_table import ClassTableError, load_class_table, map_class_tables, protocol_table

    try:
        if class_table is not None:
            table = load_class_table(class_table)
            if num_classes is not None and num_classes != table.num_classes:
                raise UsageError(
                    f"--num_classes {num_classes} disagrees with --class_table {class_table}, which has "
                    f"{table.num_classes} classes"
                )
        else:
            num_classes = 19 if num_classes is None else num_classes
            if num_classes not in protocols.SUPPORTED_NUM_CLASSES:
                raise UsageError(
                    f"--num_classes {num_classes}: supported protocols are 19, 16 and 13; for other classes "
                    "pass --class_table FILE"
                )
            table = protocol_table(num_classes)
        if target_class_table is None:
            if dataset == "folder" and class_table is None:
                raise UsageError("--dataset folder needs --class_table FILE (the classes of its masks)")
            return table.num_classes, list(table.names), table, None
        if dataset != "folder":
            raise UsageError(
                f"--target_class_table: only --dataset folder has a table of its own, got {dataset}"
            )
        mapping = map_class_tables(table, load_class_table(target_class_table))
    except ClassTableError as error:
        raise UsageError(str(error)) from None
    if mapping.source_only or mapping.target_only:
        logger.warning("classes of --class_table and --target_class_table: %s", mapping.summary())
    return table.num_classes, list(table.names), mapping.target, None if mapping.is_identity else mapping


def metric_module_path() -> str:
    """Path of the ``evaluate`` metric module on this code: ``evaluate.load(metric_module_path())``."""
    return str(Path(__file__).resolve().parent / "metrics" / "cpsl_mean_iou")
