"""Every script's bad input, as a user meets it: each case runs the script in a real subprocess and must end with
ONE line on stderr that names the argument and the reason, exit status 2 (a bad argument value, found before
any work) or 1 (a failure while running), and no traceback (the convention of :mod:`cpsl_hf.cli`)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpsl_hf.data.synthetic import load_synthetic
from cpsl_hf.data.testing import cityscapes_stem, random_label_ids, write_cityscapes, write_gta5

REPO = Path(__file__).resolve().parents[1]


def _save_tiny_model(folder: Path, num_labels: int) -> Path:
    from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation

    torch.manual_seed(0)
    config = CPSLConfig.from_preset(
        "segformer-tiny",
        num_labels=num_labels,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        decoder_hidden_size=32,
    )
    CPSLForSemanticSegmentation(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """Small files of every kind the cases need, made once: models, data folders, images, JSON."""
    root = tmp_path_factory.mktemp("bad_input")
    rng = np.random.default_rng(0)
    paths = {
        "root": root,
        "missing": root / "does-not-exist",
        "model19": _save_tiny_model(root / "model19", 19),
        "model16": _save_tiny_model(root / "model16", 16),
        "not_a_model": root / "not_a_model",
        "empty": root / "empty",
        "images": root / "images",
        "text_file": root / "notes.txt",
        "cityscapes": root / "cityscapes",
        "gta5_broken": root / "gta5_broken",
        "wrong_metrics": root / "wrong_metrics.json",
    }
    paths["not_a_model"].mkdir()
    (paths["not_a_model"] / "notes.txt").write_text("not a checkpoint")
    paths["empty"].mkdir()
    paths["images"].mkdir()
    Image.fromarray(rng.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)).save(paths["images"] / "a.png")
    paths["text_file"].write_text("this is not an image")
    write_cityscapes(
        paths["cityscapes"],
        {cityscapes_stem("aachen", 0): random_label_ids("cityscapes", 16, 32, rng)},
        "val",
    )
    write_gta5(paths["gta5_broken"], {"00001": random_label_ids("gta5", 8, 8, rng)})
    (paths["gta5_broken"] / "images" / "00001.png").write_bytes(b"not a PNG at all")
    paths["wrong_metrics"].write_text(json.dumps({"accuracy": 0.5}))
    for domain, split in (
        ("source", "train"),
        ("target", "train"),
        ("target", "validation"),
    ):  # read, not made
        load_synthetic(domain, split, num_images=4, image_size=(32, 64), seed=0, cache_dir=root / "synthetic")
    return paths


# (id, script, arguments with {placeholders} for the fixture's paths, exit status, argument named, reason)
CASES = [
    # ---------------------------------------------------------------------------------------- train.py
    ("train-missing-config", "train.py", ["--config", "{missing}.yaml"], 2, "--config", "no such file"),
    ("train-missing-source-dir", "train.py", ["--source", "gta5", "--source_dir", "{missing}"], 2,
     "--source_dir", "does not exist"),
    ("train-not-a-model", "train.py", ["--model_name_or_path", "{not_a_model}"], 2, "--model_name_or_path",
     "not a model folder (it has no config.json)"),
    ("train-classes-disagree", "train.py", ["--model_name_or_path", "{model16}"], 2, "--model_name_or_path",
     "the checkpoint has 16 classes, --num_classes is 19"),
    # ------------------------------------------------------------------------------------- evaluate.py
    ("evaluate-missing-model", "evaluate.py", ["--model", "{missing}", "--data_dir", "{cityscapes}"], 2,
     "--model", "no such folder"),
    ("evaluate-not-a-model", "evaluate.py", ["--model", "{not_a_model}", "--data_dir", "{cityscapes}"], 2,
     "--model", "not a model folder"),
    ("evaluate-classes-disagree", "evaluate.py",
     ["--model", "{model19}", "--data_dir", "{cityscapes}", "--num_classes", "16"], 2, "--num_classes",
     "predicts 19 classes"),
    ("evaluate-missing-data", "evaluate.py", ["--model", "{model19}", "--data_dir", "{missing}"], 2,
     "--data_dir", "does not exist"),
    ("evaluate-empty-data", "evaluate.py", ["--model", "{model19}", "--data_dir", "{empty}"], 2, "--data_dir",
     "missing folder leftImg8bit/val/"),
    # -------------------------------------------------------------------------------------- predict.py
    ("predict-not-a-model", "predict.py", ["--model", "{not_a_model}", "--images", "{images}"], 2, "--model",
     "not a model folder"),
    ("predict-classes-disagree", "predict.py", ["--model", "{model19}", "--images", "{images}",
     "--num_classes", "16"], 2, "--num_classes", "does not match the model's 19 output classes"),
    ("predict-missing-images", "predict.py", ["--model", "{model19}", "--images", "{missing}"], 2, "--images",
     "does not exist"),
    ("predict-empty-images", "predict.py", ["--model", "{model19}", "--images", "{empty}"], 2, "--images",
     "no image files"),
    ("predict-not-an-image", "predict.py", ["--model", "{model19}", "--images", "{text_file}", "--no_progress"], 1,
     "--images",
     "cannot read image"),
    # ------------------------------------------------------------------------------ prepare_dataset.py
    ("prepare-missing-data", "prepare_dataset.py", ["gta5", "--data_dir", "{missing}"], 2, "--data_dir",
     "does not exist"),
    ("prepare-empty-data", "prepare_dataset.py", ["gta5", "--data_dir", "{empty}"], 2, "--data_dir",
     "missing folder images/"),
    ("prepare-not-an-image", "prepare_dataset.py", ["gta5", "--data_dir", "{gta5_broken}"], 1,
     "--on_bad_sample", "00001.png: unreadable image"),
    # ---------------------------------------------------------------------------------- push_to_hub.py
    ("push-missing-checkpoint", "push_to_hub.py", ["--checkpoint", "{missing}", "--repo_id", "me/x"], 2,
     "--checkpoint", "does not exist"),
    ("push-not-a-model", "push_to_hub.py", ["--checkpoint", "{not_a_model}", "--repo_id", "me/x"], 2,
     "--checkpoint", "has no config.json"),
    ("push-missing-metrics", "push_to_hub.py", ["--checkpoint", "{model19}", "--repo_id", "me/x",
     "--metrics", "{missing}.json"], 2, "--metrics", "no such file"),
    ("push-wrong-metrics", "push_to_hub.py", ["--checkpoint", "{model19}", "--repo_id", "me/x",
     "--metrics", "{wrong_metrics}"], 2, "--metrics", "neither the output of scripts/evaluate.py"),
    ("push-bad-repo-id", "push_to_hub.py", ["--checkpoint", "{model19}", "--repo_id", "a/b/c"], 2,
     "--repo_id", "must be 'NAME' or 'USER/NAME'"),
]  # fmt: skip


def _run(script: str, argv: list[str], root: Path, progress_bars: bool = True) -> subprocess.CompletedProcess:
    env = {
        **({} if progress_bars else {"HF_HUB_DISABLE_PROGRESS_BARS": "1"}),
        **os.environ,
        "PYTHONPATH": str(REPO),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(root / "hf_home"),
        "CPSL_HF_CACHE": str(root / "cpsl_cache"),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / script), *argv],
        env=env, capture_output=True, text=True, timeout=120, cwd=root,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("script", "argv", "status", "argument", "reason"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_gives_one_line_and_an_exit_status(
    inputs, tmp_path, script, argv, status, argument, reason
):
    argv = [value.format(**{key: str(path) for key, path in inputs.items()}) for value in argv]
    if script == "train.py":
        argv += [
            "--output_dir", str(tmp_path / "run"), "--synthetic_cache_dir", str(inputs["root"] / "synthetic"),
            "--synthetic_train_images", "4", "--synthetic_val_images", "4", "--synthetic_image_size", "32", "64",
                "--crop_size", "32", "32", "--source_batch_size", "2", "--target_batch_size", "2",
                "--eval_batch_size", "2",
        ]  # fmt: skip
    if script in ("predict.py", "prepare_dataset.py"):
        argv += ["--output_dir", str(tmp_path / "out")]
    # a failure while running (status 1) comes after the work began, whose progress bars are not the point here
    result = _run(script, argv, inputs["root"], progress_bars=status == 2)
    lines = result.stderr.splitlines()
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == status, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and argument in lines[0] and reason in lines[0], lines[0]
    if script == "train.py":
        assert not (tmp_path / "run" / "model.safetensors").exists()  # it stopped before training


def test_push_offline_is_a_failure_while_running(inputs, tmp_path):
    """The checkpoint and its metrics are fine; the Hub cannot be used (HF_HUB_OFFLINE=1): status 1."""
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (folder / name).write_bytes((inputs["model19"] / name).read_bytes())
    metrics = {"mean_iou": 0.25, "per_category_iou": [0.25] * 19, "num_classes": 19}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    result = _run("push_to_hub.py", ["--checkpoint", str(folder), "--repo_id", "me/x"], inputs["root"])
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        "error: HF_HUB_OFFLINE=1 is set: not pushing to the Hub (unset it to push)"
    ]
