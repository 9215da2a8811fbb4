"""How good are the pseudo labels? Their confusion against the target's ground truth, as a diagnostic.

When the target training split carries labels (the built-in shift does; Cityscapes' train split ships gtFine),
:class:`PseudoLabelMonitor` compares, on each step's weak view at the resolution of the trained labels
(``--pseudo_label_resolution``: the crop's or the decoder's), three label maps with them:

- ``p_st``: argmax ``P_ST``, the labels self-training would use without self-labeling;
- ``p_sl``: argmax ``P_SL`` (CPSL only), the teacher's nearest prototype ``W'``: what the clustering alone says;
- ``pseudo_labels``: the labels the target loss actually trains on (CPSL: the rectified ``argmax P_SL P_ST``;
  mean teacher: argmax ``P_ST`` above its confidence threshold).

The ground truth enters only here: the trainer takes the target batch's labels out of the batch before any
loss sees it and hands them to :meth:`PseudoLabelMonitor.update` alone, under ``torch.no_grad()``. Counts stay
on the device (one ``bincount`` per map and step, no host sync); they are reduced across processes only when a
logging window or a stage is summarised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cpsl_hf.data.protocols import IGNORE_INDEX
from cpsl_hf.data.transforms import ViewGeometry, warp_to_view
from cpsl_hf.evaluation import confusion_counts, confusion_rates

KINDS = ("p_st", "p_sl", "pseudo_labels")


@dataclass
class PseudoLabelRecord:
    """The pseudo labels of one step, on the target weak view at the trained labels' resolution (h x w: the
    crop's or the decoder's, ``--pseudo_label_resolution``).

    Attributes:
        params: geometry of the weak view (maps the full target image onto the view).
        p_st_labels: N x h x w int64 argmax ``P_ST`` (255 outside ``valid``).
        pseudo_labels: N x h x w int64 labels the target loss trains on (255 where ignored).
        valid: N x h x w bool, pixels of the view that exist in the image (and in the stored ``P_ST``).
        p_sl_labels: N x h x w int64 argmax ``P_SL`` (255 outside ``valid``), or None without self-labeling.
    """

    params: ViewGeometry
    p_st_labels: torch.Tensor
    pseudo_labels: torch.Tensor
    valid: torch.Tensor
    p_sl_labels: torch.Tensor | None = None


def _confusion_counts(truth: torch.Tensor, predictions: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C x C int64 counts (rows truth, columns prediction) over pixels where both are in ``0 .. C-1``."""
    counted = (truth < num_classes) & (predictions < num_classes) & (truth >= 0) & (predictions >= 0)
    return confusion_counts(truth, predictions, num_classes, counted)


def confusion_summary(matrix: torch.Tensor, class_names: list[str] | None = None) -> dict[str, Any]:
    """``mean_iou``, ``pixel_accuracy``, ``per_category_iou`` (NaN -> None) and ``pixels`` of a C x C matrix."""
    iou, _, overall_accuracy = confusion_rates(matrix)
    defined = iou[~iou.isnan()]
    total = int(matrix.sum())
    summary = {
        "mean_iou": float(defined.mean()) if defined.numel() else None,
        "pixel_accuracy": overall_accuracy if total > 0 else None,
        "per_category_iou": [None if value != value else float(value) for value in iou.tolist()],
        "pixels": total,
    }
    if class_names is not None:
        summary["class_names"] = list(class_names)
    return summary


class PseudoLabelMonitor:
    """Confusion matrices of argmax ``P_ST`` and of the trained pseudo labels against the target ground truth.

    Args:
        num_classes: C.
        device: where the counts live (the training device).

    State: ``window`` (3 x C x C, one matrix per kind of :data:`KINDS`, this process's counts since the last :meth:`window_summary`) and ``totals``
    (stage name -> 3 x C x C, this process's counts over the stage; :meth:`state_dict`).
    """

    def __init__(self, num_classes: int, device):
        self.num_classes = int(num_classes)
        self.device = torch.device(device)
        self.window = torch.zeros(len(KINDS), num_classes, num_classes, dtype=torch.int64, device=self.device)
        self.totals: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, stage: str, truth: torch.Tensor, record: PseudoLabelRecord) -> None:
        """Add one step.

        Args:
            stage: the stage the step belongs to (its totals are kept apart).
            truth: N x H x W integer ground truth of the full target images (255 unlabelled).
            record: the step's :class:`PseudoLabelRecord`.
        """
        label_size = tuple(record.pseudo_labels.shape[-2:])
        truth_view, _ = warp_to_view(
            truth.to(self.device).long(), record.params, label_size, mode="nearest", fill=IGNORE_INDEX
        )
        truth_view = torch.where(record.valid, truth_view, torch.full_like(truth_view, IGNORE_INDEX))
        nothing = torch.full_like(truth_view, IGNORE_INDEX)
        maps = (
            record.p_st_labels,
            nothing if record.p_sl_labels is None else record.p_sl_labels,
            record.pseudo_labels,
        )
        counts = torch.stack([_confusion_counts(truth_view, labels, self.num_classes) for labels in maps])
        self.window += counts
        if stage not in self.totals:
            self.totals[stage] = torch.zeros_like(self.window)
        self.totals[stage] += counts

    def _reduced(self, counts: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        counts = counts.clone()
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(counts)
        return counts

    def window_summary(self) -> dict[str, float]:
        """Scalars of the window over all processes (every process must call it), then a fresh window:
        ``pseudo_<kind>_miou`` and ``pseudo_<kind>_accuracy`` for each kind that was recorded, and
        ``pseudo_labels_share`` (pseudo-labelled share of the ground-truth-labelled pixels). Empty when no
        labelled pixel was seen (a target without ground truth)."""
        counts = self._reduced(self.window)
        self.window.zero_()
        logs: dict[str, float] = {}
        if int(counts[0].sum()) == 0:
            return logs
        for kind, matrix in zip(KINDS, counts):
            summary = confusion_summary(matrix)
            if summary["mean_iou"] is not None:
                logs[f"pseudo_{kind}_miou"] = summary["mean_iou"]
                logs[f"pseudo_{kind}_accuracy"] = summary["pixel_accuracy"]
        logs["pseudo_labels_share"] = float(counts[-1].sum()) / float(counts[0].sum())
        return logs

    def stage_summary(self, stage: str, class_names: list[str] | None = None) -> dict[str, Any] | None:
        """Per-class summaries (:func:`confusion_summary`) of each recorded kind over the whole stage and all
        processes (every process must call it); None when the stage saw no labelled pixel."""
        local = self.totals.get(stage, torch.zeros_like(self.window))
        counts = self._reduced(local)
        if int(counts[0].sum()) == 0:
            return None
        return {
            kind: confusion_summary(matrix, class_names)
            for kind, matrix in zip(KINDS, counts)
            if int(matrix.sum()) > 0
        }

    def state_dict(self) -> dict[str, Any]:
        return {"totals": {stage: counts.cpu() for stage, counts in self.totals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals = {stage: counts.to(self.device) for stage, counts in state["totals"].items()}


__all__ = ["KINDS", "PseudoLabelMonitor", "PseudoLabelRecord", "confusion_summary"]
