"""predict_logits (normalisation, whole image, sliding window, flip), load_model and evaluate_model."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpsl_hf.evaluation import ConfusionMatrix, evaluate_model
from cpsl_hf.inference import load_model, parse_sliding_window, predict_logits

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


class CropDependentModel(torch.nn.Module):
    """Logits at 1/2 resolution that depend on the whole input (its mean), so windows differ from the whole."""

    def __init__(self, num_classes=5):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(num_classes, 3, generator=generator))
        self.bias = torch.nn.Parameter(torch.randn(num_classes, generator=generator))

    def forward(self, pixel_values):
        centred = pixel_values - pixel_values.mean(dim=(2, 3), keepdim=True)
        logits = torch.einsum("nchw,kc->nkhw", centred, self.weight) + self.bias.view(1, -1, 1, 1)
        return SimpleNamespace(logits=F.avg_pool2d(logits, 2))


def upsample(logits, size):
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def images(shape, seed=0):
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised(pixel_values):
    return (pixel_values.float() / 255 - MEAN) / STD


def test_whole_image_logits_are_normalised_and_upsampled_to_the_input_size():
    model = CropDependentModel()
    pixel_values = images((2, 3, 20, 30))
    logits = predict_logits(model, pixel_values)
    expected = F.interpolate(
        model(normalised(pixel_values)).logits, size=(20, 30), mode="bilinear", align_corners=False
    )
    assert logits.shape == (2, 5, 20, 30) and logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


def test_sliding_window_averages_the_overlapping_windows():
    model = CropDependentModel()
    pixel_values = images((1, 3, 40, 50), seed=1)
    logits = predict_logits(model, pixel_values, sliding_window=(24, 32, 16, 16))
    # windows written out by hand: rows start at 0, 16 (40 - 24); columns at 0, 16, 18 (50 - 32)
    total = torch.zeros(1, 5, 40, 50)
    count = torch.zeros(40, 50)
    x = normalised(pixel_values)
    for top in (0, 16):
        for left in (0, 16, 18):
            crop = x[:, :, top : top + 24, left : left + 32]
            crop_logits = F.interpolate(
                model(crop).logits, size=(24, 32), mode="bilinear", align_corners=False
            )
            total[:, :, top : top + 24, left : left + 32] += crop_logits
            count[top : top + 24, left : left + 32] += 1
    torch.testing.assert_close(logits, total / count, rtol=0, atol=1e-5)
    assert not torch.allclose(logits, predict_logits(model, pixel_values), atol=1e-3)
    # a window as large as the image is the whole-image answer
    torch.testing.assert_close(
        predict_logits(model, pixel_values, sliding_window=(64, 64, 32, 32)),
        predict_logits(model, pixel_values),
    )


def test_flip_averages_probabilities_of_the_image_and_its_mirror():
    model = CropDependentModel()
    pixel_values = images((2, 3, 16, 24), seed=2)
    logits = predict_logits(model, pixel_values, flip=True)
    plain = predict_logits(model, pixel_values).softmax(1)
    mirrored = predict_logits(model, pixel_values.flip(-1)).softmax(1).flip(-1)
    torch.testing.assert_close(logits.softmax(1), (plain + mirrored) / 2, rtol=0, atol=1e-6)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(2, 16, 24), rtol=0, atol=1e-5)


def test_predict_logits_rejects_float_images_and_bad_windows():
    model = CropDependentModel()
    with pytest.raises(TypeError, match="uint8"):
        predict_logits(model, torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="N x 3 x H x W"):
        predict_logits(model, images((1, 4, 8, 8)))
    with pytest.raises(ValueError, match="stride larger than the crop"):
        predict_logits(model, images((1, 3, 8, 8)), sliding_window=(4, 4, 8, 2))
    assert parse_sliding_window("512,1024") == (512, 1024, 256, 512)
    assert parse_sliding_window("512,1024,341,683") == (512, 1024, 341, 683)
    assert parse_sliding_window(None) is None
    with pytest.raises(ValueError, match="2 or 4 integers"):
        parse_sliding_window("1,2,3")


def test_autocast_returns_float32_logits_close_to_full_precision():
    model = CropDependentModel()
    pixel_values = images((1, 3, 16, 16), seed=3)
    logits = predict_logits(model, pixel_values, autocast_dtype=torch.bfloat16)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, predict_logits(model, pixel_values), rtol=0.05, atol=0.1)


def test_evaluate_model_matches_an_independent_computation_and_restores_the_mode():
    model = CropDependentModel().train()
    generator = torch.Generator().manual_seed(5)
    batches = []
    for size in ((16, 20), (16, 20), (12, 8)):
        labels = torch.randint(0, 5, (2, *size), generator=generator)
        labels[:, 0] = 255
        batches.append(
            {"pixel_values": images((2, 3, *size), seed=len(batches)), "labels": labels, "name": ["a", "b"]}
        )
    metrics = evaluate_model(model, batches, num_classes=5, flip=True, progress=False)
    assert model.training
    streamed = evaluate_model(model, (batch for batch in batches), num_classes=5, flip=True, progress=True)
    assert streamed == metrics  # a loader without a length (streaming) works, with a progress bar

    predictions, labels = [], []
    for batch in batches:
        x = normalised(batch["pixel_values"])
        size = x.shape[-2:]
        probabilities = upsample(model(x).logits, size).softmax(1) + upsample(
            model(x.flip(-1)).logits, size
        ).softmax(1).flip(-1)
        predictions.append(probabilities.argmax(1).flatten())
        labels.append(batch["labels"].flatten())
    predictions, labels = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    valid = labels != 255
    ious = []
    for c in range(5):
        intersection = ((predictions == c) & (labels == c) & valid).sum()
        union = (((predictions == c) | (labels == c)) & valid).sum()
        ious.append(intersection / union)
    assert metrics["mean_iou"] == pytest.approx(np.mean(ious), abs=1e-12)
    assert metrics["num_images"] == 6 and metrics["class_names"] == ["0", "1", "2", "3", "4"]


def test_a_saved_cpsl_checkpoint_loads_and_predicts_like_the_model(tmp_path):
    from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation

    torch.manual_seed(0)
    config = CPSLConfig.from_preset(
        "segformer-tiny",
        num_labels=19,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        decoder_hidden_size=32,
    )
    model = CPSLForSemanticSegmentation(config).eval()
    model.save_pretrained(tmp_path / "checkpoint")
    loaded = load_model(tmp_path / "checkpoint")
    assert not loaded.training
    pixel_values = images((1, 3, 32, 48), seed=4)
    logits = predict_logits(loaded, pixel_values)
    assert logits.shape == (1, 19, 32, 48)
    torch.testing.assert_close(logits, predict_logits(model, pixel_values), rtol=0, atol=0)
    confusion = ConfusionMatrix(19)
    confusion.update(logits, torch.zeros(1, 32, 48, dtype=torch.long))
    assert int(confusion.matrix.sum()) == 32 * 48

    with pytest.raises(OSError, match="no-such-checkpoint: no such folder"):  # a FileNotFoundError
        load_model(tmp_path / "no-such-checkpoint")


def test_evaluate_model_runs_the_module_inside_distributed_data_parallel(tmp_path):
    import torch.distributed as dist

    from cpsl_hf.inference import unwrap_model

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = CropDependentModel()
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        assert unwrap_model(wrapped) is model
        labels = torch.randint(0, 5, (1, 8, 8), generator=torch.Generator().manual_seed(6))
        batches = [{"pixel_values": images((1, 3, 8, 8), seed=6), "labels": labels}]
        through_ddp = evaluate_model(wrapped, batches, num_classes=5, progress=False)
        assert through_ddp == evaluate_model(model, batches, num_classes=5, progress=False)
    finally:
        dist.destroy_process_group()
