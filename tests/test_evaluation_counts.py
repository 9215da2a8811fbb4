"""ConfusionMatrix.update's counts, bit for bit, against an independent numpy histogram.

Reference: ``np.bincount(label * C + prediction)`` over the pixels whose label is in ``0 .. C-1`` (not the ignore
index) and whose prediction is in ``0 .. C-1``; bad labels / bad predictions counted with numpy masks; for
logits, the prediction is the argmax of ``torch.nn.functional.interpolate`` of the whole tensor (bilinear,
``align_corners=False``, float32). Odd sizes, several dtypes, chunk sizes small enough for many chunks.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpsl_hf import evaluation
from cpsl_hf.evaluation import ConfusionMatrix

C = 19


def reference_counts(predictions: np.ndarray, labels: np.ndarray, num_classes: int, ignore_index: int):
    """(C x C matrix, bad labels, bad predictions) of int64 arrays of one shape, with numpy only."""
    predictions, labels = predictions.astype(np.int64).ravel(), labels.astype(np.int64).ravel()
    labelled = labels != ignore_index
    label_ok = (labels >= 0) & (labels < num_classes)
    prediction_ok = (predictions >= 0) & (predictions < num_classes)
    counted = labelled & label_ok & prediction_ok
    matrix = np.bincount(
        labels[counted] * num_classes + predictions[counted], minlength=num_classes * num_classes
    ).reshape(num_classes, num_classes)
    bad_labels = int((labelled & ~label_ok).sum())
    bad_predictions = int((labelled & label_ok & ~prediction_ok).sum())
    return matrix, bad_labels, bad_predictions


def random_labels(rng: np.random.Generator, shape, dtype, ignore_index: int = 255) -> np.ndarray:
    """Train ids with ignored pixels and a few out-of-range values (negative ones for signed dtypes)."""
    labels = rng.integers(0, C, size=shape)
    draw = rng.random(shape)
    labels[draw < 0.15] = ignore_index
    out_of_range = [C, C + 1, 100, 254]
    if np.dtype(dtype).kind == "i":
        out_of_range += [-1, -7]
    if np.dtype(dtype).itemsize >= 4:
        out_of_range += [256, 1000, 2**31 - 1] if np.dtype(dtype).itemsize == 4 else [256, 10**6, 2**40]
    labels[draw > 0.98] = rng.choice(out_of_range, size=int((draw > 0.98).sum()))
    return labels.astype(dtype)


def assert_counts(confusion: ConfusionMatrix, predictions, labels, ignore_index: int = 255, images=None):
    matrix, bad_labels, bad_predictions = reference_counts(predictions, labels, C, ignore_index)
    np.testing.assert_array_equal(confusion.matrix.numpy(), matrix)
    counters = confusion._counters.tolist()
    assert counters[1:] == [bad_labels, bad_predictions]
    assert counters[0] == (labels.shape[0] if images is None else images)
    assert confusion.matrix.dtype == torch.int64


@pytest.fixture(params=["default chunks", "small chunks", "one pass"])
def chunks(request, monkeypatch):
    if request.param == "small chunks":  # many chunks and bands, ragged last ones
        monkeypatch.setattr(evaluation, "CHUNK_PIXELS", 97)
        monkeypatch.setattr(evaluation, "UPSAMPLE_CHUNK_PIXELS", 1000)
    elif request.param == "one pass":  # the whole update at once, as on accelerators
        monkeypatch.setattr(evaluation, "CHUNK_PIXELS", None)
        monkeypatch.setattr(evaluation, "UPSAMPLE_CHUNK_PIXELS", None)
    return request.param


@pytest.mark.parametrize(
    "label_dtype, prediction_dtype",
    [(np.int64, np.int64), (np.uint8, np.uint8), (np.int32, np.int64), (np.int16, np.uint8)],
)
@pytest.mark.parametrize("shape", [(1, 37, 53), (3, 29, 131), (2, 1, 1)])
def test_class_id_counts_equal_numpy_bincount(chunks, label_dtype, prediction_dtype, shape):
    rng = np.random.default_rng(sum(shape))
    labels = random_labels(rng, shape, label_dtype)
    predictions = rng.integers(0, C, size=shape)
    bad = rng.random(shape) < 0.03
    wrong = [C, 200] + ([-1, -3] if np.dtype(prediction_dtype).kind == "i" else [])
    predictions[bad] = rng.choice(wrong, size=int(bad.sum()))
    predictions = predictions.astype(prediction_dtype)
    confusion = ConfusionMatrix(C)
    confusion.update(torch.from_numpy(predictions), torch.from_numpy(labels))
    assert_counts(confusion, predictions, labels)
    # a second update adds up
    confusion.update(torch.from_numpy(predictions), torch.from_numpy(labels))
    matrix, _, _ = reference_counts(predictions, labels, C, 255)
    np.testing.assert_array_equal(confusion.matrix.numpy(), 2 * matrix)


@pytest.mark.parametrize("ignore_index", [0, 7, -100, 10**6, -(10**9)])
def test_custom_ignore_index_counts_equal_numpy(chunks, ignore_index):
    rng = np.random.default_rng(abs(ignore_index) % 1000)
    labels = random_labels(rng, (2, 23, 41), np.int64, ignore_index=ignore_index)
    labels[:, :3] = 255  # 255 is an out-of-range label unless it is the ignore index
    predictions = rng.integers(0, C, size=labels.shape)
    predictions[0, 0, :5] = C  # a bad prediction on labelled and ignored pixels alike
    confusion = ConfusionMatrix(C, ignore_index=ignore_index)
    confusion.update(torch.from_numpy(predictions), torch.from_numpy(labels))
    assert_counts(confusion, predictions, labels, ignore_index)
    if 0 <= ignore_index < C:
        assert int(confusion.matrix[ignore_index].sum()) == 0


def interpolate_argmax(logits: torch.Tensor, size) -> np.ndarray:
    """The reference protocol: one F.interpolate of the whole tensor in float32, then the argmax."""
    upsampled = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
    return upsampled.argmax(1).numpy()


@pytest.mark.parametrize(
    "logit_size, label_size",
    [
        ((13, 37), (52, 148)),  # x4 in height (row bands), odd width ratio
        ((9, 33), (36, 132)),  # x4, width just above the small-output kernel threshold
        ((16, 40), (128, 160)),  # x8
        ((11, 35), (22, 129)),  # x2
        ((13, 37), (50, 101)),  # not a power-of-two factor: the whole tensor at once
        ((13, 37), (52, 60)),  # narrow output (H + W <= 128 kernel territory is avoided)
        ((13, 37), (13, 37)),  # already at label size: argmax only
        ((1, 40), (4, 160)),  # a single logit row
    ],
)
@pytest.mark.parametrize("ties", [False, True])
def test_logit_counts_equal_numpy_on_interpolate_argmax(chunks, logit_size, label_size, ties):
    rng = np.random.default_rng(logit_size[0] * label_size[1] + ties)
    generator = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    logits = torch.randn(2, C, *logit_size, generator=generator) * 3
    if ties:  # few distinct values: many exact ties after upsampling, where argmax picks the first class
        logits = logits.round().clamp(-1, 1)
    labels = random_labels(rng, (2, *label_size), np.int64)
    confusion = ConfusionMatrix(C)
    confusion.update(logits, torch.from_numpy(labels))
    assert_counts(confusion, interpolate_argmax(logits, label_size), labels)


def test_logits_in_bfloat16_and_non_contiguous_are_upsampled_in_float32(chunks):
    rng = np.random.default_rng(3)
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(2, C, 9, 40, generator=generator).to(torch.bfloat16)
    labels = random_labels(rng, (2, 36, 160), np.uint8)
    confusion = ConfusionMatrix(C)
    confusion.update(logits, torch.from_numpy(labels))
    assert_counts(confusion, interpolate_argmax(logits, (36, 160)), labels)
    channels_last = torch.randn(1, C, 9, 40, generator=generator).to(memory_format=torch.channels_last)
    other = ConfusionMatrix(C)
    other.update(channels_last, torch.from_numpy(labels[:1]))
    assert_counts(other, interpolate_argmax(channels_last, (36, 160)), labels[:1])
    # at label size the argmax runs on the logits' own dtype, as before
    same = ConfusionMatrix(C)
    same.update(logits[:, :, :, :36], torch.from_numpy(labels[:, :9, :36]))
    assert_counts(same, logits[:, :, :, :36].argmax(1).numpy(), labels[:, :9, :36])


def test_evaluate_like_sizes_agree_across_chunkings(monkeypatch):
    """A Cityscapes-shaped update (1/4-size logits, 1024 x 2048 labels, cropped to keep the test short) gives
    the same matrix for every chunk size, and the same as one whole-tensor interpolate."""
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(1, C, 24, 512, generator=generator)
    labels = torch.from_numpy(random_labels(np.random.default_rng(11), (1, 96, 2048), np.int64))
    matrices = []
    for chunk_pixels, upsample_pixels in ((1 << 15, 1 << 17), (4096, 2048), (10**9, 10**9)):
        monkeypatch.setattr(evaluation, "CHUNK_PIXELS", chunk_pixels)
        monkeypatch.setattr(evaluation, "UPSAMPLE_CHUNK_PIXELS", upsample_pixels)
        confusion = ConfusionMatrix(C)
        confusion.update(logits, labels)
        matrices.append(confusion.matrix.clone())
        assert_counts(confusion, interpolate_argmax(logits, (96, 2048)), labels.numpy())
    assert all(torch.equal(matrices[0], matrix) for matrix in matrices[1:])


def test_ties_nan_and_infinite_logits_pick_the_class_argmax_picks(chunks):
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(2, C, 9, 40, generator=generator).round()
    logits[0, 5, 3, 4] = logits[0, 7, 3, 4] = float("nan")
    logits[1, 2, 5, 5] = logits[1, 3, 5, 5] = float("inf")
    logits[1, :, 6, 6] = float("-inf")
    logits[0, :, 7, 7] = 0.0  # every class tied: class 0
    labels = random_labels(np.random.default_rng(5), (2, 36, 160), np.int64)
    for size in ((9, 40), (36, 160)):  # at label size (argmax only) and upsampled x4
        crop = labels[:, : size[0], : size[1]]
        confusion = ConfusionMatrix(C)
        confusion.update(logits, torch.from_numpy(crop))
        assert_counts(confusion, interpolate_argmax(logits, size), crop)


def test_evaluate_model_low_resolution_path_equals_upsampling_first(monkeypatch):
    """evaluate_model without flip / sliding window hands update() the model's 1/4-size logits; the matrix
    equals that of upsampling the whole batch first (predict_logits) and counting its argmax."""
    from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation
    from cpsl_hf.evaluation import evaluate_model
    from cpsl_hf.inference import predict_logits

    torch.manual_seed(0)
    config = CPSLConfig.from_preset(
        "segformer-tiny",
        num_labels=C,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        decoder_hidden_size=32,
    )
    model = CPSLForSemanticSegmentation(config).eval()
    rng = np.random.default_rng(8)
    batches = []
    for size in ((64, 160), (64, 160), (36, 52)):  # row bands (x4, wide) and the whole-tensor fallback
        labels = rng.integers(0, C, size=(2, *size))
        labels[rng.random(labels.shape) < 0.2] = 255
        pixel_values = rng.integers(0, 256, size=(2, 3, *size), dtype=np.uint8)
        batches.append({"pixel_values": torch.from_numpy(pixel_values), "labels": torch.from_numpy(labels)})
    low = predict_logits(model, batches[0]["pixel_values"], upsample=False)
    assert low.shape[-2:] == (16, 40) and low.dtype == torch.float32  # the model's own resolution
    with pytest.raises(ValueError, match="neither flip nor sliding_window"):
        predict_logits(model, batches[0]["pixel_values"], flip=True, upsample=False)
    with torch.inference_mode():
        upsampled = [predict_logits(model, batch["pixel_values"]) for batch in batches]
    predictions = np.concatenate([logits.argmax(1).numpy().ravel() for logits in upsampled])
    labels = np.concatenate([batch["labels"].numpy().ravel() for batch in batches])
    expected, _, _ = reference_counts(predictions, labels, C, 255)

    updates = []
    original_update = ConfusionMatrix.update

    def recording_update(self, logits, labels):
        updates.append((tuple(logits.shape), self))
        original_update(self, logits, labels)

    monkeypatch.setattr(ConfusionMatrix, "update", recording_update)
    metrics = evaluate_model(model, batches, num_classes=C, progress=False)
    assert [shape for shape, _ in updates] == [(2, C, 16, 40), (2, C, 16, 40), (2, C, 9, 13)]
    np.testing.assert_array_equal(updates[-1][1].matrix.numpy(), expected)
    assert metrics["num_images"] == 6
