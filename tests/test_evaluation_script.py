"""scripts/evaluate.py end to end: a tiny saved checkpoint on a Cityscapes-layout fixture, one process
in-process and two gloo processes under ``accelerate launch``, against an independent computation."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cpsl_hf.data import protocols
from cpsl_hf.data.testing import cityscapes_stem, random_label_ids, write_cityscapes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "evaluate.py"
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def fixture_dirs(tmp_path_factory):
    from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation

    root = tmp_path_factory.mktemp("evaluate_script")
    torch.manual_seed(0)
    config = CPSLConfig.from_preset(
        "segformer-tiny",
        num_labels=19,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        decoder_hidden_size=32,
    )
    CPSLForSemanticSegmentation(config).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    # five images (an odd count: uneven shards over two processes), two sizes
    stems = [cityscapes_stem("aachen", i) for i in range(3)] + [cityscapes_stem("bonn", i) for i in range(2)]
    label_maps = {
        stem: random_label_ids("cityscapes", 32, 48 + 16 * (i % 2), rng) for i, stem in enumerate(stems)
    }
    write_cityscapes(root / "cityscapes", label_maps, split="val")
    return root


def run_script(argv):
    spec = importlib.util.spec_from_file_location("evaluate_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def independent_metrics(root: Path):
    """Read the PNGs, normalise by hand, run the model, upsample, argmax, count with numpy."""
    from transformers import AutoModelForSemanticSegmentation

    model = AutoModelForSemanticSegmentation.from_pretrained(root / "model").eval()
    lut = protocols.label_id_lut(19)
    predictions, labels = [], []
    for label_path in sorted((root / "cityscapes" / "gtFine" / "val").glob("*/*_gtFine_labelIds.png")):
        image_path = (
            str(label_path).replace("gtFine", "leftImg8bit").replace("_leftImg8bit_labelIds", "_leftImg8bit")
        )
        image = torch.from_numpy(np.array(Image.open(image_path).convert("RGB"))).permute(2, 0, 1)[None]
        with torch.no_grad():
            logits = model(pixel_values=(image.float() / 255 - MEAN) / STD).logits
        logits = F.interpolate(logits, size=image.shape[-2:], mode="bilinear", align_corners=False)
        predictions.append(logits.argmax(1).flatten().numpy())
        labels.append(lut[np.array(Image.open(label_path))].flatten())
    predictions, labels = np.concatenate(predictions), np.concatenate(labels)
    valid = labels != 255
    ious = []
    for c in range(19):
        union = (((predictions == c) | (labels == c)) & valid).sum()
        ious.append(((predictions == c) & (labels == c) & valid).sum() / union if union else np.nan)
    return np.array(ious), (predictions[valid] == labels[valid]).mean()


def test_evaluate_script_one_process_then_two_processes(fixture_dirs, tmp_path, capsys):
    root = fixture_dirs
    common = [
        "--model",
        str(root / "model"),
        "--dataset",
        "cityscapes",
        "--data_dir",
        str(root / "cityscapes"),
    ]
    common += ["--cache_dir", str(root / "cache"), "--no_progress"]
    metrics = run_script([*common, "--output", str(tmp_path / "one.json")])
    printed = capsys.readouterr().out
    saved = json.loads((tmp_path / "one.json").read_text())

    ious, overall = independent_metrics(root)
    assert metrics["num_images"] == 5 and metrics["num_processes"] == 1
    assert metrics["mean_iou"] == pytest.approx(np.nanmean(ious), abs=1e-9)
    assert metrics["overall_accuracy"] == pytest.approx(overall, abs=1e-9)
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"):
        assert key in saved
    assert saved["class_names"] == protocols.class_names(19) and saved["num_classes"] == 19
    assert saved["protocol"].startswith("19 classes") and saved["inference"]["flip"] is False
    assert saved["inference"]["sliding_window"] is None
    assert f"{100 * metrics['mean_iou']:.2f}" in printed and "traffic light" in printed

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    completed = subprocess.run(
        [*launch, str(SCRIPT), *common, "--output", str(tmp_path / "two.json")],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["num_processes"] == 2 and two["num_images"] == 5  # each image once
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"):
        assert two[key] == saved[key], key


def test_evaluate_script_rejects_a_protocol_the_model_does_not_predict(fixture_dirs):
    root = fixture_dirs
    with pytest.raises(ValueError, match="--num_classes 16 but the model .* predicts 19 classes"):
        run_script(
            ["--model", str(root / "model"), "--data_dir", str(root / "cityscapes"), "--num_classes", "16"]
        )


def test_synthetic_datasets_are_the_target_validation_splits_of_each_variant(tmp_path):
    from cpsl_hf.data.synthetic import generate_synthetic
    from cpsl_hf.evaluation import load_eval_dataset

    default = load_eval_dataset("synthetic", tmp_path, split="val")
    hard = load_eval_dataset("synthetic-hard", tmp_path, split="val")
    assert len(default) == len(hard) == 100
    assert default[0]["name"] == "synthetic_target_validation_s0_00000"
    assert hard[0]["name"] == "synthetic-hard_target_validation_s0_00000"
    images, _, _ = generate_synthetic("target", "validation", 1, (128, 256), seed=0, variant="hard")
    assert np.array_equal(np.asarray(hard[0]["image"]), images[0])
    with pytest.raises(ValueError, match="19 classes"):
        load_eval_dataset("synthetic-hard", tmp_path, num_classes=16)
