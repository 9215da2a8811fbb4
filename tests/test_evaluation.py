"""Confusion-matrix mIoU against independent computations and the official Cityscapes evaluator."""

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cpsl_hf.data import protocols
from cpsl_hf.evaluation import ConfusionMatrix, format_metrics_table, metric_module_path, metrics_to_json


def numpy_metrics(predictions: np.ndarray, labels: np.ndarray, num_classes: int, ignore_index: int = 255):
    """Independent per-class IoU / accuracy with explicit set operations, one class at a time."""
    valid = labels != ignore_index
    ious, accuracies = [], []
    for c in range(num_classes):
        predicted = (predictions == c) & valid
        actual = (labels == c) & valid
        intersection = np.logical_and(predicted, actual).sum()
        union = np.logical_or(predicted, actual).sum()
        ious.append(intersection / union if union else math.nan)
        accuracies.append(intersection / actual.sum() if actual.sum() else math.nan)
    overall = (predictions[valid] == labels[valid]).mean()
    return np.array(ious), np.array(accuracies), overall


def random_batch(
    generator: torch.Generator, num_classes: int, shape=(3, 17, 23), absent=(), ignore_share=0.2
):
    """Labels with ignored pixels and predictions that agree with them about half of the time."""
    labels = torch.randint(0, num_classes, shape, generator=generator)
    for c in absent:
        labels[labels == c] = (c + 1) % num_classes
    labels[torch.rand(shape, generator=generator) < ignore_share] = 255
    predictions = torch.randint(0, num_classes, shape, generator=generator)
    agree = torch.rand(shape, generator=generator) < 0.5
    predictions = torch.where(agree & (labels != 255), labels, predictions)
    for c in absent:
        predictions[predictions == c] = (c + 2) % num_classes
    return predictions, labels


def assert_close_with_nan(ours, reference, tolerance=1e-12):
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(reference))
    np.testing.assert_allclose(ours[~np.isnan(ours)], reference[~np.isnan(reference)], rtol=0, atol=tolerance)


def test_confusion_matrix_matches_numpy_over_several_batches():
    generator = torch.Generator().manual_seed(0)
    confusion = ConfusionMatrix(19)
    all_predictions, all_labels = [], []
    for _ in range(4):
        predictions, labels = random_batch(generator, 19, absent=(16,))
        confusion.update(predictions, labels)
        all_predictions.append(predictions.numpy().ravel())
        all_labels.append(labels.numpy().ravel())
    predictions, labels = np.concatenate(all_predictions), np.concatenate(all_labels)
    metrics = confusion.reduce().compute()

    ious, accuracies, overall = numpy_metrics(predictions, labels, 19)
    assert math.isnan(ious[16]) and math.isnan(metrics["per_category_iou"][16])  # absent everywhere
    assert_close_with_nan(metrics["per_category_iou"], ious)
    assert_close_with_nan(metrics["per_category_accuracy"], accuracies)
    assert metrics["mean_iou"] == pytest.approx(np.nanmean(ious), abs=1e-12)
    assert metrics["mean_accuracy"] == pytest.approx(np.nanmean(accuracies), abs=1e-12)
    assert metrics["overall_accuracy"] == pytest.approx(overall, abs=1e-12)
    assert metrics["class_names"] == protocols.class_names(19)
    assert metrics["num_classes"] == 19 and metrics["num_images"] == 12
    assert "mean_iou_13" not in metrics
    # the matrix itself: rows ground truth, columns prediction
    valid = labels != 255
    expected = np.zeros((19, 19), dtype=np.int64)
    np.add.at(expected, (labels[valid], predictions[valid]), 1)
    np.testing.assert_array_equal(confusion.matrix.numpy(), expected)


def test_the_accelerator_histogram_equals_bincount():
    from cpsl_hf.evaluation import _scatter_histogram

    index = torch.randint(0, 362, (5000,), generator=torch.Generator().manual_seed(9))
    assert torch.equal(_scatter_histogram(index, 362), torch.bincount(index, minlength=362))


def test_predicted_but_absent_class_counts_as_zero_and_missing_class_is_nan():
    labels = torch.tensor([[[0, 0, 1, 255]]])
    predictions = torch.tensor([[[0, 2, 1, 2]]])  # class 2 predicted once on a labelled pixel, never in GT
    confusion = ConfusionMatrix(4)
    confusion.update(predictions, labels)
    metrics = confusion.compute(class_names=["a", "b", "c", "d"])
    assert metrics["per_category_iou"][:3] == [0.5, 1.0, 0.0]
    assert math.isnan(metrics["per_category_iou"][3])
    assert metrics["mean_iou"] == pytest.approx(0.5)
    assert metrics["per_category_accuracy"][:2] == [0.5, 1.0] and math.isnan(
        metrics["per_category_accuracy"][2]
    )
    assert metrics["overall_accuracy"] == pytest.approx(2 / 3)
    assert metrics["class_names"] == ["a", "b", "c", "d"]


def test_ignored_pixels_change_nothing_whatever_is_predicted_there():
    generator = torch.Generator().manual_seed(1)
    predictions, labels = random_batch(generator, 19, ignore_share=0.4)
    other_predictions = torch.where(
        labels == 255, torch.randint(0, 19, labels.shape, generator=generator), predictions
    )
    first, second = ConfusionMatrix(19), ConfusionMatrix(19)
    first.update(predictions, labels)
    second.update(other_predictions, labels)
    assert torch.equal(first.matrix, second.matrix)
    assert int(first.matrix.sum()) == int((labels != 255).sum())
    # a custom ignore index
    custom = ConfusionMatrix(19, ignore_index=0)
    relabelled = labels.clamp(max=18)
    custom.update(predictions, relabelled)
    assert int(custom.matrix[0].sum()) == 0
    assert int(custom.matrix.sum()) == int((relabelled != 0).sum())


def test_bad_labels_and_shapes_are_reported():
    confusion = ConfusionMatrix(19)
    confusion.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.tensor([[[0, 19], [255, 3]]]))
    with pytest.raises(ValueError, match="outside 0..18 and not the ignore index 255"):
        confusion.compute()
    with pytest.raises(ValueError, match="labels' shape"):
        ConfusionMatrix(19).update(
            torch.zeros(1, 3, 3, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long)
        )
    with pytest.raises(ValueError, match="logits have 5 classes"):
        ConfusionMatrix(19).update(torch.zeros(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integer tensor N x H x W"):
        ConfusionMatrix(19).update(torch.zeros(1, 19, 2, 2), torch.zeros(1, 2, 2))
    reduced = ConfusionMatrix(19).reduce()
    with pytest.raises(RuntimeError, match="after reduce"):
        reduced.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))


def test_logits_are_upsampled_bilinearly_to_the_label_size():
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 19, 8, 12, generator=generator)
    _, labels = random_batch(generator, 19, shape=(2, 32, 48))
    confusion = ConfusionMatrix(19)
    confusion.update(logits, labels)

    # independent upsampling: bilinear with align_corners=False is, for an exact x4 factor, the
    # separable interpolation at source coordinates (i + 0.5) / 4 - 0.5, clamped at the borders.
    def axis_weights(source: int, target: int) -> np.ndarray:
        position = np.clip((np.arange(target) + 0.5) * source / target - 0.5, 0, source - 1)
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, source - 1)
        weights = np.zeros((target, source))
        weights[np.arange(target), low] += 1 - (position - low)
        weights[np.arange(target), high] += position - low
        return weights

    rows, cols = axis_weights(8, 32), axis_weights(12, 48)
    upsampled = np.einsum("hy,ncyx,wx->nchw", rows, logits.double().numpy(), cols)
    predictions = upsampled.argmax(1)
    reference = torch.from_numpy(predictions)
    expected = ConfusionMatrix(19)
    expected.update(reference, labels)
    assert torch.equal(confusion.matrix, expected.matrix)
    # and it is not the nearest-neighbour answer
    nearest = F.interpolate(logits, size=(32, 48), mode="nearest").argmax(1)
    assert not torch.equal(nearest, reference)


def test_sixteen_classes_report_the_thirteen_class_miou_from_the_same_matrix():
    generator = torch.Generator().manual_seed(3)
    predictions, labels = random_batch(generator, 16, shape=(2, 20, 20), absent=(1,))
    confusion = ConfusionMatrix(16)
    confusion.update(predictions, labels)
    metrics = confusion.compute()
    ious, _, _ = numpy_metrics(predictions.numpy(), labels.numpy(), 16)
    thirteen = [protocols.class_names(16).index(name) for name in protocols.class_names(13)]
    assert list(protocols.THIRTEEN_OF_SIXTEEN) == thirteen
    assert metrics["mean_iou"] == pytest.approx(np.nanmean(ious), abs=1e-12)
    assert metrics["mean_iou_13"] == pytest.approx(np.nanmean(ious[thirteen]), abs=1e-12)
    assert metrics["mean_iou_13"] != pytest.approx(metrics["mean_iou"], abs=1e-6)
    assert metrics["class_names"] == protocols.class_names(16)
    table = format_metrics_table(metrics)
    assert "mIoU (13 classes)" in table and f"{100 * metrics['mean_iou_13']:.2f}" in table
    assert "n/a" in table  # class 1 (sidewalk) has no IoU


def test_json_output_is_strict_and_keeps_nan_as_null(tmp_path):
    import json

    confusion = ConfusionMatrix(3)
    confusion.update(torch.tensor([[[0, 1]]]), torch.tensor([[[0, 1]]]))
    metrics = confusion.compute()
    text = metrics_to_json(metrics, tmp_path / "out" / "metrics.json", protocol="test")
    loaded = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert text == (tmp_path / "out" / "metrics.json").read_text()
    assert loaded["per_category_iou"] == [1.0, 1.0, None]
    assert loaded["protocol"] == "test" and loaded["mean_iou"] == 1.0


# --------------------------------------------------------------------------- the official evaluator


def write_official_layout(root: Path, num_classes: int, seed: int):
    """Cityscapes-layout ground truth (*_gtFine_labelIds.png) and label-id prediction PNGs.

    Returns our confusion matrix over the same pixels (predictions in protocol train ids; ground truth
    converted from label ids with the protocol's table).
    """
    rng = np.random.default_rng(seed)
    label_id_to_train_id = protocols.label_id_lut(num_classes)
    train_id_to_label_id = protocols.train_id_to_label_id(num_classes)
    # label ids of all 34 Cityscapes classes (ignored ones included), minus those outside the protocol
    # for the 16-class case: the official script scores the 19 classes, so the 3 dropped ones must
    # be absent from ground truth and predictions to make it score the protocol's classes.
    dropped_19 = {22, 27, 31} if num_classes == 16 else set()
    label_ids = np.array([i for i in range(34) if i not in dropped_19])
    confusion = ConfusionMatrix(num_classes)
    names = []
    for city, frame, shape in (("aachen", 19, (24, 48)), ("bremen", 7, (32, 40)), ("bremen", 8, (16, 64))):
        name = f"{city}_{frame:06d}_{frame * 3:06d}"
        ground_truth = rng.choice(label_ids, size=shape).astype(np.uint8)
        # one evaluated class absent from everything (bus, label id 28) -> NaN, excluded by both
        ground_truth[ground_truth == 28] = 26
        train_ids = label_id_to_train_id[ground_truth].astype(np.int64)
        predictions = rng.integers(0, num_classes, size=shape)
        predictions = np.where((rng.random(shape) < 0.6) & (train_ids != 255), train_ids, predictions)
        bus = protocols.class_names(num_classes).index("bus")
        predictions[predictions == bus] = 0
        gt_dir = root / "gtFine" / "val" / city
        pred_dir = root / "results" / city
        gt_dir.mkdir(parents=True, exist_ok=True)
        pred_dir.mkdir(parents=True, exist_ok=True)
        Image.fromarray(ground_truth).save(gt_dir / f"{name}_gtFine_labelIds.png")
        Image.fromarray(train_id_to_label_id[predictions]).save(pred_dir / f"{name}_leftImg8bit.png")
        confusion.update(torch.from_numpy(predictions)[None], torch.from_numpy(train_ids)[None])
        names.append(name)
    return confusion


def official_miou(root: Path, monkeypatch) -> dict:
    monkeypatch.setenv("CITYSCAPES_DATASET", str(root))
    monkeypatch.setenv("CITYSCAPES_RESULTS", str(root / "results"))
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = copy.copy(official.args)
    args.cityscapesPath = str(root)
    args.groundTruthSearch = str(root / "gtFine" / "val" / "*" / "*_gtFine_labelIds.png")
    args.predictionPath = None  # found through CITYSCAPES_RESULTS by the official getPrediction
    args.predictionWalk = None
    args.evalInstLevelScore = False  # instance-weighted iIoU needs instance PNGs; not part of mIoU
    args.JSONOutput = False
    args.quiet = True
    ground_truth = sorted(str(path) for path in (root / "gtFine" / "val").glob("*/*_gtFine_labelIds.png"))
    predictions = [official.getPrediction(args, path) for path in ground_truth]
    return official.evaluateImgLists(predictions, ground_truth, args)


@pytest.mark.parametrize("num_classes", [19, 16])
def test_official_cityscapes_evaluator_agrees(tmp_path, monkeypatch, num_classes):
    confusion = write_official_layout(tmp_path, num_classes, seed=num_classes)
    ours = confusion.compute()
    results = official_miou(tmp_path, monkeypatch)

    assert abs(results["averageScoreClasses"] - ours["mean_iou"]) <= 1e-6
    by_name = dict(zip(ours["class_names"], ours["per_category_iou"]))
    assert math.isnan(by_name["bus"])
    for name, iou in results["classScores"].items():
        if name in by_name:
            assert (math.isnan(iou) and math.isnan(by_name[name])) or abs(iou - by_name[name]) <= 1e-9, name
        else:
            assert math.isnan(iou), name  # classes outside the protocol are never scored
    if num_classes == 16:
        thirteen = [results["classScores"][name] for name in protocols.class_names(13)]
        assert ours["mean_iou_13"] == pytest.approx(np.nanmean(thirteen), abs=1e-6)


# --------------------------------------------------------------------------- the evaluate metric module


def test_evaluate_metric_module_gives_identical_numbers():
    import evaluate

    generator = torch.Generator().manual_seed(4)
    confusion = ConfusionMatrix(16)
    predictions, references = [], []
    for shape in ((1, 9, 14), (1, 12, 7), (1, 5, 5)):
        prediction, label = random_batch(generator, 16, shape=shape, absent=(2,))
        confusion.update(prediction, label)
        predictions.append(prediction[0].numpy())
        references.append(label[0].numpy())
    ours = confusion.compute()

    metric = evaluate.load(metric_module_path())
    results = metric.compute(predictions=predictions, references=references, num_labels=16, ignore_index=255)
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "mean_iou_13"):
        assert results[key] == ours[key], key
    assert_close_with_nan(results["per_category_iou"], ours["per_category_iou"], tolerance=0)
    assert_close_with_nan(results["per_category_accuracy"], ours["per_category_accuracy"], tolerance=0)
    assert results["class_names"] == ours["class_names"]

    # batched through add_batch, and with nan_to_num / reduce_labels like evaluate's mean_iou
    metric.add_batch(predictions=predictions[:2], references=references[:2])
    metric.add_batch(predictions=predictions[2:], references=references[2:])
    batched = metric.compute(num_labels=16, ignore_index=255, nan_to_num=-1.0)
    assert batched["mean_iou"] == ours["mean_iou"]
    assert batched["per_category_iou"][2] == -1.0
    shifted = [np.where(reference == 255, 0, reference + 1) for reference in references]
    reduced = metric.compute(
        predictions=predictions, references=shifted, num_labels=16, ignore_index=255, reduce_labels=True
    )
    assert reduced["mean_iou"] == ours["mean_iou"]
