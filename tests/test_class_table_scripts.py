"""scripts/evaluate.py and scripts/predict.py with a class table: a tiny 4-class model on a folder dataset, against
an independent computation; names, palette and label ids come from the table."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
NAMES = ["field", "forest", "water", "road"]
COLOURS = [[200, 180, 40], [20, 120, 30], [30, 60, 220], [128, 128, 128]]
LABEL_IDS = [11, 12, 13, 14]
VALUE_TO_ID = {1: 0, 2: 0, 5: 1, 9: 2, 40: 3}  # many-to-one: 1 and 2 are both 'field'
TABLE = """\
void_values: [0]
classes:
  - {name: field, values: [1, 2], color: [200, 180, 40], label_id: 11}
  - {name: forest, values: [5], color: [20, 120, 30], label_id: 12}
  - {name: water, values: [9], color: [30, 60, 220], label_id: 13}
  - {name: road, values: [40], color: [128, 128, 128], label_id: 14}
"""


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation

    root = tmp_path_factory.mktemp("table_scripts")
    (root / "classes.yaml").write_text(TABLE)
    torch.manual_seed(0)
    config = CPSLConfig.from_preset(
        "segformer-tiny",
        num_labels=4,
        id2label=dict(enumerate(NAMES)),
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        decoder_hidden_size=32,
    )
    CPSLForSemanticSegmentation(config).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    for index in range(3):
        for sub in ("images", "masks"):
            (root / "data" / "val" / sub).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).save(
            root / "data" / "val" / "images" / f"tile{index}.jpg", quality=95
        )
        values = rng.choice(np.array([0, 1, 2, 5, 9, 40, 77], dtype=np.uint8), size=(32, 48))
        Image.fromarray(values).save(root / "data" / "val" / "masks" / f"tile{index}.png")
    return root


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"{name}_script", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def independent_predictions(root, image_path):
    from transformers import AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(root / "model").eval()
    image = torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))).permute(2, 0, 1)[None]
    with torch.no_grad():
        logits = model(pixel_values=(image.float() / 255 - MEAN) / STD).logits
    logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return logits.argmax(1)[0].numpy()


def test_evaluate_folder_with_a_class_table(root, tmp_path):
    output = tmp_path / "metrics.json"
    argv = ["--model", str(root / "model"), "--dataset", "folder", "--data_dir", str(root / "data")]
    argv += ["--class_table", str(root / "classes.yaml"), "--cache_dir", str(tmp_path / "c"), "--no_progress"]
    metrics = load_script("evaluate").main([*argv, "--output", str(output)])
    predictions, labels = [], []
    for mask in sorted((root / "data" / "val" / "masks").glob("*.png")):
        values = np.array(Image.open(mask))
        labels.append(np.vectorize(lambda v: VALUE_TO_ID.get(int(v), 255))(values).ravel())
        predictions.append(
            independent_predictions(root, root / "data" / "val" / "images" / f"{mask.stem}.jpg").ravel()
        )
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    valid = labels != 255
    ious = [
        ((predictions == c) & (labels == c) & valid).sum()
        / (((predictions == c) | (labels == c)) & valid).sum()
        for c in range(4)
    ]
    saved = json.loads(output.read_text())
    assert saved["class_names"] == NAMES and saved["num_classes"] == 4 and "mean_iou_13" not in saved
    assert saved["per_category_iou"] == pytest.approx(ious, abs=1e-9)
    assert metrics["num_images"] == 3 and "class table" in saved["protocol"]
    with pytest.raises(ValueError, match=r"--num_classes 19 disagrees with --class_table .*4 classes"):
        load_script("evaluate").main([*argv, "--num_classes", "19"])
    with pytest.raises(ValueError, match="--dataset folder needs --class_table"):
        load_script("evaluate").main(argv[:6])


def test_predict_colours_label_ids_and_labels_from_the_table(root, tmp_path):
    out = tmp_path / "out"
    argv = ["--model", str(root / "model"), "--images", str(root / "data" / "val" / "images")]
    argv += ["--output_dir", str(out), "--format", "color", "labelids", "trainids", "--no_progress"]
    argv += ["--labels", str(root / "data" / "val" / "masks"), "--class_table", str(root / "classes.yaml")]
    assert load_script("predict").main(argv) == 0
    image = root / "data" / "val" / "images" / "tile0.jpg"
    expected = independent_predictions(root, image)
    train_ids = np.array(Image.open(out / "trainids" / "tile0.png"))
    assert (train_ids == expected).all()
    colours = np.array(Image.open(out / "color" / "tile0.png").convert("RGB"))
    assert (colours == np.array(COLOURS, dtype=np.uint8)[expected]).all()
    label_ids = np.array(Image.open(out / "labelids" / "tile0.png"))
    assert (label_ids == np.array(LABEL_IDS)[expected]).all()
    strip = np.array(Image.open(out / "strips" / "tile0.png").convert("RGB"))
    truth = np.vectorize(lambda v: VALUE_TO_ID.get(int(v), 255))(
        np.array(Image.open(root / "data/val/masks/tile0.png"))
    )
    painted = np.zeros((32, 48, 3), dtype=np.uint8)  # ignored pixels are black
    painted[truth != 255] = np.array(COLOURS, dtype=np.uint8)[truth[truth != 255]]
    assert (strip[-32:, 48 + 4 : 2 * 48 + 4] == painted).all()  # the ground-truth panel, after the image's


def test_predict_needs_the_table_for_other_classes(root, tmp_path):
    argv = ["--model", str(root / "model"), "--images", str(root / "data" / "val" / "images")]
    argv += ["--output_dir", str(tmp_path / "out"), "--no_progress"]
    with pytest.raises(ValueError, match="pass the model's --class_table"):
        load_script("predict").main(argv)
    no_ids = tmp_path / "no_ids.yaml"
    no_ids.write_text(
        TABLE.replace(", label_id: 11", "")
        .replace(", label_id: 12", "")
        .replace(", label_id: 13", "")
        .replace(", label_id: 14", "")
    )
    with pytest.raises(ValueError, match="--format labelids: .* gives no classes\\[\\]\\.label_id"):
        load_script("predict").main([*argv, "--class_table", str(no_ids), "--format", "labelids"])
