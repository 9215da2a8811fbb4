"""Model cards and pushing checkpoints through the real huggingface_hub client to a loopback Hub."""

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from cpsl_hf import hub
from cpsl_hf.data.protocols import class_names
from cpsl_hf.hub import HubError, publish_checkpoint, push_checkpoint, render_model_card, write_model_card

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_token"

METRICS_19 = {
    "mean_iou": 0.41234567891,
    "mean_accuracy": 0.52,
    "overall_accuracy": 0.8765,
    "per_category_iou": [0.9 - 0.04 * index for index in range(18)] + [float("nan")],
    "per_category_accuracy": [0.5] * 19,
    "class_names": class_names(19),
    "num_classes": 19,
}
INFO = {
    "model_name": "cpsl-segformer-tiny-gta5",
    "repo_id": "tester/cpsl-segformer-tiny-gta5",
    "base_model": "nvidia/mit-b0",
    "config": "configs/demo.yaml",
    "steps": 1200,
    "seed": 3,
    "hardware": "2 CPU cores",
    "training_time_s": 754,
    "hyperparameters": {"lr": 6e-5, "lambda_sl": 0.1},
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny CPSL model with metrics, a prediction strip, and training state that must stay local."""
    from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation

    torch.manual_seed(0)
    model = CPSLForSemanticSegmentation(CPSLConfig.from_preset("segformer-tiny"))
    folder = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps(METRICS_19))
    (folder / "training_info.json").write_text(json.dumps(INFO))
    (folder / "predictions").mkdir()
    (folder / "predictions" / "00_frankfurt.png").write_bytes(b"\x89PNG placeholder")
    torch.save({"step": 1}, folder / "optimizer.pt")
    return folder


def _online(monkeypatch, tmp_path):
    """Undo the test-wide offline mode for the in-process client, with no token from the environment or disk."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


# ---------------------------------------------------------------------------------------------- model card


def test_model_card_round_trips_measured_numbers(tmp_path):
    (tmp_path / "predictions").mkdir()
    (tmp_path / "predictions" / "01_b.png").write_bytes(b"png")
    (tmp_path / "predictions" / "00_a.png").write_bytes(b"png")
    path = write_model_card(tmp_path, METRICS_19, INFO)

    card = ModelCard.load(path)
    assert card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "image-segmentation"
    assert card.data.library_name == "transformers"
    assert card.data.base_model == "nvidia/mit-b0"
    assert card.data.datasets == ["gta5", "cityscapes"]
    assert card.data.model_name == "cpsl-segformer-tiny-gta5"
    results = {result.metric_name: result for result in card.data.eval_results}
    assert results["mIoU (19 classes)"].metric_value == METRICS_19["mean_iou"]  # exactly, not rounded
    assert results["mIoU (19 classes)"].metric_type == "mean_iou"
    assert results["Pixel accuracy"].metric_value == METRICS_19["overall_accuracy"]
    assert {result.task_type for result in results.values()} == {"image-segmentation"}
    assert {result.dataset_split for result in results.values()} == {"validation"}
    assert card.data.to_dict()["model-index"][0]["name"] == "cpsl-segformer-tiny-gta5"

    text = card.text
    assert "| mIoU (19 classes) | 41.23 |" in text
    assert "| road | 90.00 | 50.00 |" in text and "| bicycle | n/a | 50.00 |" in text
    assert "| Training steps | 1200 |" in text and "| Training time | 12 min 34 s |" in text
    assert text.index("predictions/00_a.png") < text.index("predictions/01_b.png")
    assert 'from_pretrained("tester/cpsl-segformer-tiny-gta5", trust_remote_code=True)' in text
    assert 'pipeline("image-segmentation"' in text
    assert "Class-Balanced Pixel-Level Self-Labeling for Domain Adaptive Semantic Segmentation" in text
    assert "Limitations" in text


@pytest.mark.parametrize(
    ("method", "pseudo_labels", "says", "never"),
    [
        ("cpsl", "frozen", "the frozen warm-up model gives soft pseudo labels", "mean-teacher baseline"),
        ("cpsl", "teacher", "the EMA teacher gives soft pseudo labels", "mean-teacher baseline"),
        ("mean_teacher", "teacher", "**mean-teacher baseline**", "with **CPSL**"),
    ],
)
def test_model_card_describes_the_method_that_trained_it(tmp_path, method, pseudo_labels, says, never):
    text = write_model_card(tmp_path, METRICS_19, {**INFO, "method": method, "pseudo_labels": pseudo_labels})
    text = ModelCard.load(text).text
    assert says in text and never not in text


def test_model_card_sixteen_classes_reports_thirteen_class_miou():
    metrics = {
        "mean_iou": 0.375,
        "mean_iou_13": 0.4375,
        "per_category_iou": [0.375] * 16,
        "num_classes": 16,
    }
    card = ModelCard(render_model_card(metrics, {}))
    values = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert values == {"mIoU (16 classes)": 0.375, "mIoU (13 classes)": 0.4375}
    assert card.data.datasets == ["synthia", "cityscapes"]
    assert "terrain" not in card.text and "| sky | 37.50 |" in card.text
    assert "No example predictions were saved" in card.text


def test_model_card_rejects_bad_input_and_uses_template_override(tmp_path):
    with pytest.raises(ValueError, match="no 'mean_iou'"):
        render_model_card({"per_category_iou": [0.5] * 19}, {})
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\]"):
        render_model_card({**METRICS_19, "mean_iou": 41.2}, {})
    with pytest.raises(ValueError, match="per_category_iou has 3 values"):
        render_model_card({"mean_iou": 0.5, "per_category_iou": [0.5] * 3, "num_classes": 19}, {})
    with pytest.raises(FileNotFoundError, match="missing.jinja not found"):
        render_model_card(METRICS_19, {}, template_path=tmp_path / "missing.jinja")
    template = tmp_path / "short.md.jinja"
    template.write_text("---\n{{ card_data }}\n---\n{{ model_name }}: {{ headline[0][1] }}\n")
    text = render_model_card(METRICS_19, INFO, template_path=template)
    assert text.endswith("cpsl-segformer-tiny-gta5: 41.23\n")
    assert ModelCard(text).data.eval_results[0].metric_value == METRICS_19["mean_iou"]


def test_card_inputs_reads_both_metrics_layouts_and_names_a_file_that_is_neither():
    flat, facts = hub.card_inputs(METRICS_19)
    assert flat == METRICS_19 and facts == {}
    trainer_layout = {
        "exported_model": "teacher",
        "final": {"stage": "cpsl", "step": 300, **METRICS_19},
        "history": {},
        "pseudo_labels": {},
        "training": {"source": "gta5", "target": "cityscapes", "seed": 3, "final_stage": "cpsl",
                     "stages": [{"name": "warmup", "steps": 1000}, {"name": "cpsl", "steps": 300}]},
    }  # fmt: skip
    metrics, facts = hub.card_inputs(trainer_layout)
    assert metrics == METRICS_19  # the final evaluation without its stage and step
    assert (
        facts["source_dataset"] == "GTA5" and facts["target_dataset"] == "Cityscapes" and facts["seed"] == 3
    )
    assert facts["stage"] == "cpsl (teacher)" and facts["steps"] == "1000 warmup + 300 cpsl"
    with pytest.raises(
        hub.UsageError, match=r"--metrics runs/m.json: neither the output of scripts/evaluate.py"
    ):
        hub.card_inputs({"accuracy": 0.5}, "runs/m.json")


# --------------------------------------------------------------------------------------------------- push


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The folder a real (tiny) training run exported: its metrics.json has the trainer's layout."""
    from training.training_helpers import run, tiny_argv

    root = tmp_path_factory.mktemp("trained")
    run(tiny_argv(root / "run", root / "cache", "--warmup_steps", "1", "--cpsl_steps", "1"))
    return root / "run"


def test_publish_a_training_run_renders_the_card_from_its_final_evaluation(
    tmp_path, monkeypatch, trained_run
):
    """The README's sequence: train, then push the run folder; the card shows the exported model's numbers."""
    _online(monkeypatch, tmp_path)
    folder = tmp_path / "run"
    shutil.copytree(trained_run, folder)
    document = json.loads((folder / "metrics.json").read_text())
    assert "mean_iou" not in document and set(document) >= {"exported_model", "final", "training"}
    final = document["final"]
    with LocalHub(tmp_path / "server") as server:
        url = publish_checkpoint(folder, "tester/cpsl-trained", token=TOKEN, endpoint=server.endpoint)
    assert url == f"{server.endpoint}/tester/cpsl-trained" and server.unexpected == []
    arrived = server.repo_dir("tester/cpsl-trained")
    assert (arrived / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    card = ModelCard.load(arrived / "README.md")
    results = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert results["mIoU (19 classes)"] == final["mean_iou"]
    assert results["Pixel accuracy"] == final["overall_accuracy"]
    from cpsl_hf.utils import format_percent

    first_class = final["class_names"][0]
    warmup = document["history"]["warmup"]["1"]["student"]  # the warm-up column: the start of adaptation
    before, after = (format_percent(m["per_category_iou"][0]) for m in (warmup, final))
    assert f"| {first_class} | {before} | {after} |" in card.text
    assert f"{final['stage']} ({document['exported_model']})" in card.text
    assert 'from_pretrained("tester/cpsl-trained"' in card.text


def test_push_script_through_real_client_lands_loadable_files(tmp_path, checkpoint):
    """scripts/push_to_hub.py in a subprocess with HF_ENDPOINT: the default (hf_xet) upload pipeline."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "0",
        "TRANSFORMERS_OFFLINE": "0",
        "HF_TOKEN": TOKEN,
        "HF_HOME": str(tmp_path / "hf_home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "PYTHONPATH": str(REPO),
    }
    with LocalHub(tmp_path / "server") as server:
        env["HF_ENDPOINT"] = server.endpoint
        result = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "push_to_hub.py"), "--checkpoint", str(checkpoint),
             "--repo_id", "tester/cpsl-tiny", "--private"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().splitlines()[-1] == f"{server.endpoint}/tester/cpsl-tiny"
        assert server.unexpected == []
        assert server.created == [
            {"repo_id": "tester/cpsl-tiny", "name": "cpsl-tiny", "organization": "tester", "visibility": "private",
             "type": "model"}
        ]  # fmt: skip
        routes = {route for _, route in server.requests}
        assert {"/api/whoami-v2", "/api/repos/create", "/api/models/tester/cpsl-tiny/commit/main"} <= routes

    arrived = server.repo_dir("tester/cpsl-tiny")
    names = sorted(path.relative_to(arrived).as_posix() for path in arrived.rglob("*") if path.is_file())
    assert "optimizer.pt" not in names  # training state stays local
    assert {
        "README.md",
        "config.json",
        "model.safetensors",
        "metrics.json",
        "predictions/00_frankfurt.png",
    } <= set(names)
    assert (arrived / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()

    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(arrived)
    reference = load_file(checkpoint / "model.safetensors")
    for name, tensor in loaded.state_dict().items():
        if name in reference:
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
    assert type(loaded).__name__ == "CPSLForSemanticSegmentation"

    from PIL import Image
    from transformers import pipeline

    segmenter = pipeline("image-segmentation", model=str(arrived))  # the card's third loading recipe
    masks = segmenter(Image.new("RGB", (48, 32), (90, 120, 60)))
    assert masks and {mask["label"] for mask in masks} <= set(class_names(19))
    assert all(mask["mask"].size == (48, 32) for mask in masks)

    card = ModelCard.load(arrived / "README.md")
    assert card.data.eval_results[0].metric_value == METRICS_19["mean_iou"]
    assert card.data.model_name == "cpsl-segformer-tiny-gta5"
    assert "![example prediction 1](predictions/00_frankfurt.png)" in card.text


def test_push_lfs_upload_path_and_existing_repo(tmp_path, monkeypatch, checkpoint):
    """Without hf_xet the client uploads large files through the LFS batch API; a second push reuses the repo."""
    _online(monkeypatch, tmp_path)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    with LocalHub(tmp_path / "server", lfs_patterns=("*.safetensors",)) as server:
        url = push_checkpoint(checkpoint, "cpsl-lfs", token=TOKEN, endpoint=server.endpoint)
        url_again = push_checkpoint(checkpoint, "tester/cpsl-lfs", token=TOKEN, endpoint=server.endpoint)
    assert url == url_again == f"{server.endpoint}/tester/cpsl-lfs"
    assert server.unexpected == []
    oid = hashlib.sha256((checkpoint / "model.safetensors").read_bytes()).hexdigest()
    assert ("PUT", f"/lfs-objects/{oid}") in server.requests
    assert len(server.created) == 1 and len(server.commits) == 2
    arrived = server.repo_dir("tester/cpsl-lfs")
    assert (arrived / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()


def test_publish_with_a_bare_name_writes_the_created_repo_into_the_card(tmp_path, monkeypatch, checkpoint):
    """``--repo_id NAME``: the repo is created as USER/NAME, and the card's loading code must name that, not
    NAME and not the repo_id an older training_info.json recorded."""
    _online(monkeypatch, tmp_path)
    folder = tmp_path / "checkpoint"
    shutil.copytree(checkpoint, folder)
    with LocalHub(tmp_path / "server") as server:
        url = publish_checkpoint(folder, "cpsl-bare", token=TOKEN, endpoint=server.endpoint)
    assert url == f"{server.endpoint}/tester/cpsl-bare"
    assert [created["repo_id"] for created in server.created] == ["tester/cpsl-bare"]
    card = (server.repo_dir("tester/cpsl-bare") / "README.md").read_text()
    assert 'from_pretrained("tester/cpsl-bare"' in card
    assert 'from_pretrained("cpsl-bare"' not in card and INFO["repo_id"] not in card


def test_offline_mode_never_contacts_the_hub(tmp_path, checkpoint):
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1
    with LocalHub(tmp_path / "server") as server:
        with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 is set"):
            push_checkpoint(checkpoint, "tester/x", token=TOKEN, endpoint=server.endpoint)
    assert server.requests == []


def test_offline_environment_variable_set_after_import_is_honoured(tmp_path, monkeypatch, checkpoint):
    _online(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE=1 is set"):
        push_checkpoint(checkpoint, "tester/x", token=TOKEN, endpoint="http://127.0.0.1:9")


def test_no_token_fails_before_any_request(tmp_path, monkeypatch, checkpoint):
    _online(monkeypatch, tmp_path)
    with LocalHub(tmp_path / "server") as server:
        with pytest.raises(HubError, match="no Hugging Face token"):
            push_checkpoint(checkpoint, "tester/x", endpoint=server.endpoint)
    assert server.requests == []


def test_rejected_token_says_so(tmp_path, monkeypatch, checkpoint):
    _online(monkeypatch, tmp_path)
    with LocalHub(tmp_path / "server") as server:
        with pytest.raises(HubError, match="rejected the token"):
            push_checkpoint(checkpoint, "tester/x", token="hf_wrong", endpoint=server.endpoint)
    assert server.requests == [("GET", "/api/whoami-v2")]


def test_unreachable_hub_fails_at_once(tmp_path, monkeypatch, checkpoint):
    _online(monkeypatch, tmp_path)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(HubError, match=f"cannot reach the Hugging Face Hub at http://127.0.0.1:{port}"):
        push_checkpoint(checkpoint, "tester/x", token=TOKEN, endpoint=f"http://127.0.0.1:{port}")
    assert time.monotonic() - start < 5


def test_silent_hub_times_out_quickly(tmp_path, monkeypatch, checkpoint):
    """A host that accepts connections but never answers (a black-holed network) ends after the short timeout."""
    _online(monkeypatch, tmp_path)
    monkeypatch.setattr(hub, "HUB_CHECK_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(HubError, match="cannot reach.*Timeout"):
            push_checkpoint(checkpoint, "tester/x", token=TOKEN, endpoint=endpoint)
        assert time.monotonic() - start < 5


def test_checkpoint_is_validated_first(tmp_path, checkpoint):
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    (incomplete / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="has no model.safetensors"):
        push_checkpoint(incomplete, "tester/x", token=TOKEN)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_checkpoint(tmp_path / "nowhere", "tester/x", token=TOKEN)
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((checkpoint / name).read_bytes())
    with pytest.raises(FileNotFoundError, match="no README.md and no metrics.json"):
        hub.publish_checkpoint(bare, "tester/x", token=TOKEN)
