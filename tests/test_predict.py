"""Predictions people can look at: colour masks, overlays, strips, and scripts/predict.py end to end."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cpsl_hf.data.protocols import IGNORE_INDEX, colorize, label_id_lut, palette, train_id_to_label_id
from cpsl_hf.visualization import color_mask, overlay, save_prediction_strips, side_by_side

REPO = Path(__file__).resolve().parents[1]
IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


def _tiny_model(num_labels: int = 19):
    """A random ``segformer-tiny`` CPSL model whose classifier is scaled up so predictions vary over the image."""
    from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation

    torch.manual_seed(0)
    model = CPSLForSemanticSegmentation(CPSLConfig.from_preset("segformer-tiny", num_labels=num_labels))
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith("classifier") and isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0.0, 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = _tiny_model()
    folder = tmp_path_factory.mktemp("ckpt")
    model.save_pretrained(folder)
    return folder, model


def _reference_train_ids(model, image_rgb: np.ndarray) -> np.ndarray:
    """Independent arg-max: normalise, forward, bilinear upsample to the image size, arg-max."""
    pixels = torch.from_numpy(image_rgb).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        logits = model(pixel_values=(pixels - IMAGENET_MEAN) / IMAGENET_STD).logits
    logits = F.interpolate(logits, size=image_rgb.shape[:2], mode="bilinear", align_corners=False)
    return logits[0].argmax(0).numpy().astype(np.uint8)


def test_color_mask_uses_palette_and_blacks_out_ignore():
    ids = np.array([[0, 1, 18], [IGNORE_INDEX, 19, 5]], dtype=np.int64)
    mask = np.asarray(color_mask(torch.from_numpy(ids), 19))
    table = palette(19)
    assert mask.shape == (2, 3, 3)
    np.testing.assert_array_equal(mask[0], table[[0, 1, 18]])
    np.testing.assert_array_equal(mask[1, :2], 0)  # 255 and the out-of-protocol id 19
    np.testing.assert_array_equal(mask[1, 2], table[5])
    # 16-class protocol: train id 9 is "sky" there (terrain is dropped)
    np.testing.assert_array_equal(np.asarray(color_mask(np.array([[9]]), 16))[0, 0], (70, 130, 180))


def test_overlay_blends_classes_and_keeps_ignored_pixels():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    ids = rng.integers(0, 19, size=(5, 7))
    ids[0, :] = IGNORE_INDEX
    out = np.asarray(overlay(torch.from_numpy(image).permute(2, 0, 1), ids, 19, alpha=0.25)).astype(int)
    expected = np.rint(0.75 * image + 0.25 * palette(19)[np.clip(ids, 0, 18)]).astype(int)
    np.testing.assert_array_equal(out[1:], expected[1:])
    np.testing.assert_array_equal(out[0], image[0])
    with pytest.raises(ValueError, match="differs from image size"):
        overlay(image, ids[:, :3], 19)


def test_side_by_side_layout_and_panels():
    image = np.full((20, 30, 3), 200, dtype=np.uint8)
    ground_truth = np.zeros((10, 15), dtype=np.uint8)  # half size, like some GTA5 pairs: resized nearest
    ground_truth[:, 8:] = 13
    prediction = np.full((20, 30), 2, dtype=np.uint8)

    strip = np.asarray(side_by_side(image, ground_truth, prediction, 19, captions=None, gap=4))
    assert strip.shape == (20, 3 * 30 + 2 * 4, 3)
    np.testing.assert_array_equal(strip[:, :30], image)
    gt_panel = strip[:, 34:64]
    np.testing.assert_array_equal(gt_panel[:, :16], np.broadcast_to(palette(19)[0], (20, 16, 3)))
    np.testing.assert_array_equal(gt_panel[:, 16:], np.broadcast_to(palette(19)[13], (20, 14, 3)))
    np.testing.assert_array_equal(strip[:, 68:], colorize(prediction, 19))
    np.testing.assert_array_equal(strip[:, 30:34], 255)

    captioned = side_by_side(image, None, prediction, 19)  # no ground truth: two panels and a caption bar
    assert captioned.width == 2 * 30 + 4 and captioned.height > 20
    bar = captioned.height - 20
    np.testing.assert_array_equal(np.asarray(captioned)[bar:, 34:], colorize(prediction, 19))
    assert (np.asarray(captioned)[:bar] < 128).any()  # caption text was drawn


def test_save_prediction_strips_restores_mode_and_shows_the_prediction(tmp_path, checkpoint):
    _, model = checkpoint
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=(3, 32, 48), dtype=np.uint8) for _ in range(3)]
    samples = [
        {
            "pixel_values": torch.from_numpy(images[0]),
            "labels": torch.zeros(32, 48, dtype=torch.long),
            "name": "a/x.png",
        },
        {  # a loader batch of two
            "pixel_values": torch.from_numpy(np.stack(images[1:])),
            "labels": torch.full((2, 32, 48), IGNORE_INDEX),
            "name": ["y", "z"],
        },
    ]
    model.train()
    paths = save_prediction_strips(model, samples, tmp_path / "predictions", num_classes=19, max_images=2)
    assert model.training
    model.eval()
    assert [path.name for path in paths] == ["00_a_x.png", "01_y.png"]
    strip = np.asarray(Image.open(paths[1]))
    bar = strip.shape[0] - 32
    expected = colorize(_reference_train_ids(model, images[1].transpose(1, 2, 0)), 19)
    np.testing.assert_array_equal(strip[bar:, -48:], expected)
    np.testing.assert_array_equal(strip[bar:, 52:100], 0)  # all-ignore ground truth is black


def test_save_prediction_strips_keeps_the_inputs_as_they_were(tmp_path, checkpoint):
    """inputs_dir: each shown image saved losslessly beside its strip's name (the demo Space's examples)."""
    _, model = checkpoint
    images = np.random.default_rng(2).integers(0, 256, size=(3, 3, 32, 48), dtype=np.uint8)
    samples = [{"pixel_values": torch.from_numpy(images), "name": ["p", "q", "r"]}]
    paths = save_prediction_strips(
        model, samples, tmp_path / "strips", 19, max_images=2, inputs_dir=tmp_path / "ex"
    )
    assert sorted(path.name for path in (tmp_path / "ex").iterdir()) == [path.name for path in paths]
    for path, image in zip(paths, images):
        np.testing.assert_array_equal(
            np.asarray(Image.open(tmp_path / "ex" / path.name)), image.transpose(1, 2, 0)
        )
    assert not (tmp_path / "no_inputs").exists()
    save_prediction_strips(model, samples, tmp_path / "strips2", 19, max_images=1)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["ex", "strips", "strips2"]


def _load_predict_script():
    spec = importlib.util.spec_from_file_location("predict_script", REPO / "scripts" / "predict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_predict_script_all_formats_any_mode_and_size(tmp_path, checkpoint, capsys):
    folder, model = checkpoint
    rng = np.random.default_rng(2)
    images_dir = tmp_path / "images" / "city"
    images_dir.mkdir(parents=True)
    gray = rng.integers(0, 256, size=(37, 53), dtype=np.uint8)  # odd size, grayscale
    Image.fromarray(gray, mode="L").save(images_dir / "scene_leftImg8bit.png")
    rgba = rng.integers(0, 256, size=(29, 41, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(images_dir / "photo.png")
    (images_dir / "broken.png").write_bytes(b"this is not a PNG")
    labels_dir = tmp_path / "gt"
    labels_dir.mkdir()
    label_ids = rng.choice([0, 7, 8, 11, 26, 33], size=(37, 53)).astype(np.uint8)
    Image.fromarray(label_ids, mode="L").save(labels_dir / "scene_gtFine_labelIds.png")
    out = tmp_path / "out"

    status = _load_predict_script().main(
        [
            "--model", str(folder), "--images", str(tmp_path / "images"), "--output_dir", str(out),
            "--format", "color", "overlay", "labelids", "trainids", "--labels", str(labels_dir),
            "--no_progress", "--device", "cpu",
        ]
    )  # fmt: skip

    assert status == 1  # the unreadable file is reported, the others are written
    err = capsys.readouterr().err
    assert "broken.png" in err and "cannot identify image file" in err
    inputs = {
        "city/scene_leftImg8bit.png": np.repeat(gray[..., None], 3, axis=2),
        "city/photo.png": rgba[..., :3],
    }
    for relpath, rgb in inputs.items():
        height, width = rgb.shape[:2]
        train_ids = np.asarray(Image.open(out / "trainids" / relpath))
        label_png = Image.open(out / "labelids" / relpath)
        assert label_png.mode == "L" and label_png.size == (width, height)
        assert train_ids.shape == (height, width)
        np.testing.assert_array_equal(train_ids, _reference_train_ids(model, rgb))
        assert len(np.unique(train_ids)) > 1  # a real prediction, not a constant map
        np.testing.assert_array_equal(
            label_id_lut(19)[np.asarray(label_png)], train_ids
        )  # label ids map back
        np.testing.assert_array_equal(np.asarray(label_png), train_id_to_label_id(19)[train_ids])
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / "color" / relpath)), colorize(train_ids, 19)
        )
        blended = np.asarray(Image.open(out / "overlay" / relpath)).astype(int)
        expected = np.rint(0.5 * rgb + 0.5 * palette(19)[train_ids]).astype(int)
        np.testing.assert_array_equal(blended, expected)
    assert not (out / "color" / "city" / "broken.png").exists()

    strip = np.asarray(Image.open(out / "strips" / "city" / "scene_leftImg8bit.png"))
    assert strip.shape[1] == 3 * 53 + 2 * 4
    bar = strip.shape[0] - 37
    np.testing.assert_array_equal(strip[bar:, 57:110], colorize(label_id_lut(19)[label_ids], 19))
    assert not (out / "strips" / "city" / "photo.png").exists()  # no label for it


def test_predict_rejects_protocol_mismatch_and_missing_inputs(tmp_path, checkpoint):
    from cpsl_hf.predict import predict

    folder, model = checkpoint
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="does not match the model's 19"):
        predict(model, [tmp_path / "a.png"], tmp_path / "out", num_classes=16, progress=False)
    with pytest.raises(FileNotFoundError, match="nowhere.png: does not exist"):
        predict(model, [tmp_path / "nowhere.png"], tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="formats must be"):
        predict(model, [tmp_path / "a.png"], tmp_path / "out", formats=["jpeg"], progress=False)


def test_predict_sixteen_classes_with_flip_label_ids_round_trip(tmp_path):
    from cpsl_hf.predict import predict

    model = _tiny_model(num_labels=16)
    rgb = np.random.default_rng(3).integers(0, 256, size=(33, 45, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.jpg", quality=100)
    rgb = np.array(Image.open(tmp_path / "a.jpg").convert("RGB"))  # what the decoder gives back
    report = predict(
        model, [tmp_path / "a.jpg"], tmp_path / "out", formats=["labelids", "trainids"], flip=True
    )
    assert report.ok and report.num_predicted == 1 and len(report.written) == 2

    pixels = (torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    with torch.no_grad():
        plain = F.interpolate(model(pixel_values=pixels).logits, size=(33, 45), mode="bilinear")
        mirrored = F.interpolate(model(pixel_values=pixels.flip(-1)).logits, size=(33, 45), mode="bilinear")
    probabilities = plain.softmax(1) + mirrored.flip(-1).softmax(1)
    expected = probabilities[0].argmax(0).numpy().astype(np.uint8)

    train_ids = np.asarray(Image.open(tmp_path / "out" / "trainids" / "a.png"))
    label_ids = np.asarray(Image.open(tmp_path / "out" / "labelids" / "a.png"))
    np.testing.assert_array_equal(train_ids, expected)
    assert train_ids.max() < 16 and len(np.unique(train_ids)) > 1
    np.testing.assert_array_equal(label_id_lut(16)[label_ids], train_ids)
    assert set(np.unique(label_ids)) <= set(train_id_to_label_id(16)[:16].tolist())
