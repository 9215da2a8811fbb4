"""What a Hub visitor sees: the card's metadata and provenance, its plots, and nothing local in a push.

The central scenario is the issue's: a warm-up run from a pretrained encoder on the Hub (here a tiny MiT in a local
Hugging Face cache, read offline as ``tester/mit-tiny``), then a CPSL run from that warm-up's local folder, pushed
to the loopback Hub through the real client.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id

from cpsl_hf import card_plots, hub, provenance
from cpsl_hf.utils import format_percent

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_token"
ENCODER_REPO = "tester/mit-tiny"

_TRAIN = """
import sys
sys.path.insert(0, {tests!r})
from training.training_helpers import run, tiny_argv
run(tiny_argv(sys.argv[1], sys.argv[2], *sys.argv[3:]))
"""


def _cache_encoder(cache: Path) -> None:
    """A random MiT of the segformer-tiny size saved as ``tester/mit-tiny`` in a Hugging Face hub cache."""
    from transformers import SegformerConfig, SegformerModel

    torch.manual_seed(0)
    config = SegformerConfig(
        hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], num_attention_heads=[1, 2, 4, 8],
        decoder_hidden_size=128,
    )  # fmt: skip
    revision = "0" * 40
    repo = cache / f"models--{ENCODER_REPO.replace('/', '--')}"
    SegformerModel(config).save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


def _train(output: Path, synthetic_cache: Path, hub_cache: Path, *flags: str) -> dict:
    """A tiny run in a fresh process reading the Hub cache offline; returns its metrics.json."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _TRAIN.format(tests=str(REPO / "tests")), str(output), str(synthetic_cache), *flags],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output / "metrics.json").read_text())


@pytest.fixture(scope="module")
def warm_then_cpsl(tmp_path_factory, synthetic_cache):
    """``(warm-up folder, CPSL folder, root)``: 3 warm-up steps from ``--backbone tester/mit-tiny``, then 4 CPSL
    steps from that folder (``--model_name_or_path``, ``--warmup_steps 0``) with tensorboard and periodic
    checkpoints."""
    root = tmp_path_factory.mktemp("card_runs")
    hub_cache = root / "hub_cache"
    _cache_encoder(hub_cache)
    warm, adapted = root / "warm_s0", root / "cpsl_s0"
    _train(
        warm, synthetic_cache, hub_cache, "--backbone", ENCODER_REPO, "--warmup_steps", "3", "--cpsl_steps", "0",
        "--save_predictions", "0",
    )  # fmt: skip
    _train(
        adapted, synthetic_cache, hub_cache, "--model_name_or_path", str(warm), "--warmup_steps", "0",
        "--cpsl_steps", "4", "--eval_steps", "2", "--save_predictions", "1", "--report_to", "tensorboard",
        "--checkpointing_steps", "2", "--config", str(REPO / "configs" / "synthetic_demo.yaml"),
    )  # fmt: skip
    return warm, adapted, root


def test_card_of_a_run_from_a_local_warmup_folder_names_the_hub_encoder_and_no_local_path(warm_then_cpsl):
    """base_model is the Hub encoder the chain started from, with base_model_relation: finetune, and the rendered
    metadata validates (repo ids, ModelCardData round trip, eval results); no local path is anywhere in it."""
    warm, adapted, root = warm_then_cpsl
    warm_card = ModelCard.load(warm / "README.md")
    assert warm_card.data.base_model == ENCODER_REPO
    card = ModelCard.load(adapted / "README.md")
    assert card.data.base_model == ENCODER_REPO
    assert card.data.to_dict()["base_model_relation"] == "finetune"
    validate_repo_id(card.data.base_model)
    assert card.data.datasets is None  # the built-in synthetic shift is no dataset on the Hub
    assert ModelCardData(**card.data.to_dict()).to_dict() == card.data.to_dict()
    assert card.data.eval_results and card.data.eval_results[0].metric_type == "mean_iou"
    assert f"[`{ENCODER_REPO}`](https://huggingface.co/{ENCODER_REPO})" in card.text
    text = (adapted / "README.md").read_text()
    assert str(root) not in text and os.path.realpath(root) not in text
    assert "| Architecture | SegFormer (MiT encoder) segformer-tiny, segformer decode head, D=128 |" in text
    assert "| Config | configs/synthetic_demo.yaml |" in text


def test_card_warmup_column_is_the_warmup_models_own_evaluation(warm_then_cpsl):
    """The run from the warm-up folder evaluates the loaded model at step 0: the card's warm-up column equals the
    warm-up run's final per-class IoU, and the change column is the difference to the adapted model's."""
    warm, adapted, _ = warm_then_cpsl
    warm_final = json.loads((warm / "metrics.json").read_text())["final"]
    final = json.loads((adapted / "metrics.json").read_text())["final"]
    text = (adapted / "README.md").read_text()
    assert "| Class | Warm-up IoU (%) | IoU (%) | Change (points) |" in text
    for name, before, after in zip(
        final["class_names"], warm_final["per_category_iou"], final["per_category_iou"]
    ):
        change = "n/a" if before is None or after is None else f"{100 * (after - before):+.2f}"
        assert f"| {name} | {format_percent(before)} | {format_percent(after)} | {change} |" in text
    assert f"from **{format_percent(warm_final['mean_iou'])}** at the start" in text


def test_plots_have_one_point_per_evaluation_and_logged_window(warm_then_cpsl):
    """The PNGs exist and are linked from the card; the curve has a point per evaluation of each network, the bars
    one pair per class defined in both evaluations sorted by gain, the pseudo-label curve a point per window."""
    _, adapted, _ = warm_then_cpsl
    document = json.loads((adapted / "metrics.json").read_text())
    text = (adapted / "README.md").read_text()
    for name in ("miou_over_training.png", "per_class_iou.png", "pseudo_labels_over_training.png"):
        assert (adapted / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{name})" in text

    figure = card_plots.miou_figure(document)
    lines = {line.get_label(): line for line in figure.axes[0].lines}
    # evaluations: step 0 (the loaded warm-up model, student only), 2 and 4 (student and teacher)
    assert list(lines["student"].get_xdata()) == [0, 2, 4]
    assert list(lines["teacher"].get_xdata()) == [2, 4]
    assert list(lines["student"].get_ydata()) == pytest.approx(
        [100 * document["history"][stage][step]["student"]["mean_iou"] for stage, step in
         (("warmup", "0"), ("cpsl", "2"), ("cpsl", "4"))]
    )  # fmt: skip
    assert card_plots.stage_spans(document) == [("CPSL", 0, 4)]  # the warm-up ran 0 steps: not shaded

    reference = document["history"]["warmup"]["0"]["student"]
    bars = card_plots.per_class_figure(reference, document["final"]).axes[0].patches
    defined = [
        index for index, (before, after) in
        enumerate(zip(reference["per_category_iou"], document["final"]["per_category_iou"]))
        if before is not None and after is not None
    ]  # fmt: skip
    assert len(bars) == 2 * len(defined)
    gains = [row[3] for row in card_plots.per_class_gains(reference, document["final"])]
    assert gains == sorted(gains, reverse=True) and len(gains) == len(defined)

    series = card_plots.pseudo_label_series(document)
    windows = [entry["step"] for entry in document["logs"] if "pseudo_p_st_miou" in entry]
    assert windows == [1, 2, 3, 4]  # --logging_steps 1, every CPSL step
    curve = card_plots.pseudo_label_figure(document).axes[0].lines
    assert [list(line.get_xdata()) for line in curve] == [windows] * len(series) and len(series) == 3


def test_push_of_the_run_uploads_curves_and_no_local_path_in_any_text_file(
    tmp_path, monkeypatch, warm_then_cpsl
):
    """Through the real client to the loopback Hub: the tensorboard event files arrive under runs/, resumable
    checkpoints do not, and no text file that arrives names a local folder (run, warm-up, caches, home, cwd)."""
    _, adapted, root = warm_then_cpsl
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    local = json.loads((adapted / "metrics.json").read_text())
    assert str(root) in json.dumps(local)  # the local record keeps the paths (for the author)
    with LocalHub(tmp_path / "server") as server:
        hub.publish_checkpoint(adapted, "tester/cpsl-card", token=TOKEN, endpoint=server.endpoint)
    assert server.unexpected == []
    arrived = server.repo_dir("tester/cpsl-card")
    names = sorted(path.relative_to(arrived).as_posix() for path in arrived.rglob("*") if path.is_file())
    assert any(name.startswith("runs/") and "events.out.tfevents" in name for name in names), names
    assert not any(name.startswith("checkpoints/") for name in names), names
    assert {"plots/miou_over_training.png", "metrics.json", "README.md"} <= set(names)
    forbidden = {str(root), os.path.realpath(root), os.getcwd(), os.path.expanduser("~")}
    for name in names:
        if Path(name).suffix in provenance.TEXT_SUFFIXES:
            text = (arrived / name).read_text()
            assert not [path for path in forbidden if path in text], name
    pushed = json.loads((arrived / "metrics.json").read_text())
    assert pushed["final"] == local["final"] and pushed["history"] == local["history"]
    assert pushed["training"]["arguments"]["training"]["output_dir"] == "<local>/cpsl_s0"
    assert ModelCard.load(arrived / "README.md").data.base_model == ENCODER_REPO


def test_pushed_card_survives_huggingface_hubs_metadata_update(tmp_path, monkeypatch, warm_then_cpsl):
    """huggingface_hub's own metadata_update reads the pushed README.md back from the (loopback) Hub, parses and
    rewrites its metadata and commits it: the model-index, base model and everything else come back unchanged."""
    _, adapted, _ = warm_then_cpsl
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    update = (
        "import sys\nfrom huggingface_hub import ModelCard, metadata_update\n"
        "tags = ModelCard.load(sys.argv[1]).data.tags\n"  # read back from the Hub by repo id
        "print(metadata_update(sys.argv[1], {'tags': [*tags, 'reviewed']}, overwrite=True))\n"
    )
    with LocalHub(tmp_path / "server") as server:
        hub.publish_checkpoint(adapted, "tester/cpsl-meta", token=TOKEN, endpoint=server.endpoint)
        before = ModelCard.load(server.repo_dir("tester/cpsl-meta") / "README.md").data.to_dict()
        env = {
            **os.environ, "HF_ENDPOINT": server.endpoint, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf_home"),
        }  # fmt: skip
        result = subprocess.run(
            [sys.executable, "-c", update, "tester/cpsl-meta"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    assert server.unexpected == [] and len(server.commits) == 2
    after = ModelCard.load(server.repo_dir("tester/cpsl-meta") / "README.md").data.to_dict()
    assert after.pop("tags") == [*before.pop("tags"), "reviewed"]
    assert after == before


# ------------------------------------------------------------------------------------- provenance, one by one


def test_hub_base_model_cases(tmp_path):
    presets = ("segformer-tiny",)
    assert provenance.hub_base_model("segformer-tiny", None, presets) is None
    assert provenance.hub_base_model("nvidia/mit-b5", None, presets) == "nvidia/mit-b5"
    encoder = tmp_path / "my" / "encoder"
    encoder.mkdir(parents=True)
    assert provenance.hub_base_model(str(encoder), None, presets) is None  # a local encoder: origin unknown
    assert provenance.hub_base_model("segformer-tiny", "someone/cpsl-warm", presets) == "someone/cpsl-warm"
    recorded = tmp_path / "warm"
    recorded.mkdir()
    (recorded / "metrics.json").write_text(json.dumps({"training": {"base_model": "nvidia/mit-b2"}}))
    assert provenance.hub_base_model("segformer-tiny", str(recorded), presets) == "nvidia/mit-b2"
    (recorded / "metrics.json").write_text(json.dumps({"training": {"base_model": str(encoder)}}))
    assert provenance.hub_base_model("segformer-tiny", str(recorded), presets) is None
    downloaded = tmp_path / "downloaded"
    downloaded.mkdir()
    (downloaded / "README.md").write_text("---\nbase_model: nvidia/mit-b5\n---\n# card\n")
    assert provenance.hub_base_model("segformer-tiny", str(downloaded), presets) == "nvidia/mit-b5"


def test_redaction_replaces_every_listed_path_longest_first(tmp_path):
    run = tmp_path / "runs" / "warm_s0"
    run.mkdir(parents=True)
    records = {"arguments": {"output_dir": str(run), "cache": str(tmp_path / "runs"), "name": "road"}}
    paths = provenance.local_paths(records)
    assert paths.index(str(run)) < paths.index(str(tmp_path / "runs"))
    text = f"saved to {run}/metrics.json; cache {tmp_path / 'runs'}; class road"
    redacted = provenance.redact_local_paths(text, paths)
    assert redacted == "saved to <local>/warm_s0/metrics.json; cache <local>/runs; class road"
    assert provenance.leaked_paths(redacted, paths) == []


def test_card_dataset_ids_and_display_names(tmp_path):
    prepared = tmp_path / "gta5_prepared"
    prepared.mkdir()
    (prepared / "cpsl_prepare.json").write_text(json.dumps({"dataset": "gta5", "splits": {}}))
    unknown = tmp_path / "mystery"
    unknown.mkdir()
    names = [
        "synthetic",
        "gta5",
        "someone/cityscapes-cpsl",
        str(prepared),
        str(unknown),
        "cityscapes",
        "gta5",
    ]
    assert provenance.card_dataset_ids(names) == ["gta5", "someone/cityscapes-cpsl", "cityscapes"]
    assert provenance.dataset_display_name(str(prepared)) == "GTA5"
    assert provenance.dataset_display_name(str(unknown)) == "mystery"
    assert provenance.dataset_display_name("someone/cityscapes-cpsl") == "someone/cityscapes-cpsl"


def test_render_refuses_a_local_path_as_base_model(tmp_path):
    metrics = {"mean_iou": 0.5, "per_category_iou": [0.5] * 19, "num_classes": 19}
    with pytest.raises(ValueError, match="base_model.*Hub repo id"):
        hub.render_model_card(metrics, {"base_model": str(tmp_path / "warm_s0")})
    card = hub.render_model_card(metrics, {"base_model": "nvidia/mit-b5"})
    assert "base_model_relation: finetune" in card


def test_matching_preset_and_architecture_words():
    from cpsl_hf.configuration_cpsl import CPSLConfig, describe_architecture, matching_preset

    assert matching_preset(CPSLConfig.from_preset("segformer-b5")) == "segformer-b5"
    assert matching_preset(CPSLConfig.from_preset("deeplabv2-r101")) == "deeplabv2-r101"
    custom = CPSLConfig.from_preset("segformer-tiny", hidden_sizes=[8, 16, 32, 64])
    assert matching_preset(custom) is None
    assert describe_architecture(custom).startswith(
        "SegFormer (MiT encoder) custom size, segformer decode head"
    )


def test_card_words_follow_the_class_set_and_the_source():
    """A Cityscapes-protocol card from GTA5 speaks of renders and street scenes and is tagged cityscapes; a card of
    a class table's 7 classes from a folder speaks of its own classes, and is not."""
    from cpsl_hf.data.protocols import class_names

    street = {
        "mean_iou": 0.5,
        "per_category_iou": [0.5] * 19,
        "class_names": class_names(19),
        "num_classes": 19,
    }
    card = hub.render_model_card(street, {"source_dataset": "GTA5", "target_dataset": "Cityscapes"})
    assert "(labelled renders)" in card and "urban street scenes" in card
    assert "- cityscapes" in card.split("---")[1]
    names = ["flat", "construction", "object", "nature", "sky", "human", "vehicle"]
    own = {"mean_iou": 0.5, "per_category_iou": [0.5] * 7, "class_names": names, "num_classes": 7}
    card = hub.render_model_card(
        own, {"source_dataset": "potsdam (folder)", "target_dataset": "vaihingen (folder)"}
    )
    assert "(labelled)" in card and "renders" not in card and "street scenes" not in card
    assert "7 classes of its own class table" in card and "cityscapes" not in card.split("---")[1]
