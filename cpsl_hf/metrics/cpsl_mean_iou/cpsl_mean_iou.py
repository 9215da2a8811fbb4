"""``evaluate`` metric module for semantic segmentation mIoU, computed by ``cpsl_hf.evaluation``.

Load it from its folder (no network needed)::

    import evaluate
    from cpsl_hf.evaluation import metric_module_path

    metric = evaluate.load(metric_module_path())  # or evaluate.load("path/to/cpsl_mean_iou")
    results = metric.compute(predictions=pred_maps, references=label_maps, num_labels=19, ignore_index=255)

It takes the arguments of ``evaluate``'s Hub metric ``mean_iou`` and returns its keys (``mean_iou``,
``mean_accuracy``, ``overall_accuracy``, ``per_category_iou``, ``per_category_accuracy``) plus
``class_names``, ``num_classes``, ``num_images`` and, for 16 classes, ``mean_iou_13``. The numbers come from
``cpsl_hf.evaluation.ConfusionMatrix``: the same code as the package's evaluation, which agrees with the
official Cityscapes evaluator.
"""

import datasets
import evaluate
import numpy as np
import torch

from cpsl_hf.evaluation import ConfusionMatrix

_DESCRIPTION = """\
Mean intersection-over-union of semantic segmentation maps, from one confusion matrix over all images:
IoU_c = TP_c / (TP_c + FP_c + FN_c). Classes with TP + FP + FN = 0 over all images are NaN and left out of
the mean (as the official Cityscapes evaluator and `mean_iou` do). Pixels labelled `ignore_index` are skipped.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of 2-D integer arrays `H x W`): predicted class ids.
    references (`list` of 2-D integer arrays `H x W`, same sizes): ground-truth class ids.
    num_labels (`int`): number of classes C.
    ignore_index (`int`, default 255): label value that is not evaluated.
    nan_to_num (`float`, optional): replace NaN results (undefined classes) with this value.
    label_map (`dict[int, int]`, optional): old id -> new id, applied to the references first.
    reduce_labels (`bool`, default False): references 0 -> ignore, every other id minus 1 (ADE20k style).
    class_names (`list[str]`, optional): C names (default: the Cityscapes protocol names for 19/16/13).
Returns:
    `mean_iou`, `mean_accuracy`, `overall_accuracy` (float), `per_category_iou`, `per_category_accuracy`
    (`np.ndarray` of C floats), `class_names`, `num_classes`, `num_images`, and `mean_iou_13` for C = 16.
Examples:
    >>> metric = evaluate.load("path/to/cpsl_mean_iou")
    >>> metric.compute(predictions=[np.array([[0, 1]])], references=[np.array([[0, 0]])], num_labels=2)["mean_iou"]
    0.25
"""

_CITATION = """\
@inproceedings{li2022class,
  title={Class-Balanced Pixel-Level Self-Labeling for Domain Adaptive Semantic Segmentation},
  author={Li, Ruihuang and Li, Shuai and He, Chenhang and Zhang, Yabin and Jia, Xu and Zhang, Lei},
  booktitle={CVPR},
  year={2022}
}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CpslMeanIou(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                    "references": datasets.Sequence(datasets.Sequence(datasets.Value("uint16"))),
                }
            ),
            reference_urls=["https://github.com/mcordts/cityscapesScripts"],
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int = 255,
        nan_to_num=None,
        label_map=None,
        reduce_labels: bool = False,
        class_names=None,
    ):
        confusion = ConfusionMatrix(num_labels, ignore_index=ignore_index)
        lookup = _reference_lookup(label_map, reduce_labels, ignore_index)
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            prediction = np.asarray(prediction, dtype=np.int64)
            reference = np.asarray(reference, dtype=np.int64)
            if prediction.shape != reference.shape or prediction.ndim != 2:
                raise ValueError(
                    f"cpsl_mean_iou: prediction {index} has shape {prediction.shape}, its reference "
                    f"{reference.shape}; both must be the same H x W"
                )
            if lookup is not None:
                reference = lookup[reference]
            confusion.update(torch.from_numpy(prediction)[None], torch.from_numpy(reference)[None])
        metrics = confusion.compute(class_names=class_names)
        for key in ("per_category_iou", "per_category_accuracy"):
            metrics[key] = np.array(metrics[key], dtype=np.float64)
        if nan_to_num is not None:
            metrics = {
                key: np.nan_to_num(value, nan=nan_to_num) if isinstance(value, (float, np.ndarray)) else value
                for key, value in metrics.items()
            }
        return metrics


def _reference_lookup(label_map, reduce_labels: bool, ignore_index: int):
    """A lookup table over uint16 reference values for ``label_map`` then ``reduce_labels`` (or None)."""
    if not label_map and not reduce_labels:
        return None
    lookup = np.arange(65536, dtype=np.int64)
    if label_map:
        for old_id, new_id in label_map.items():
            lookup[old_id] = new_id
    if reduce_labels:
        lookup = np.where(lookup == 0, ignore_index, lookup - 1)
        lookup = np.where(lookup == ignore_index - 1, ignore_index, lookup)
    return lookup
