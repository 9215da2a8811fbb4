"""Trainer paths beyond the plain run: ``--push_to_hub`` to a loopback Hub, and ``--pseudo_labels offline``
initialised by two processes (torchrun, gloo on CPU) against a single-process initialisation."""

import json
import socket
import textwrap
from pathlib import Path

import huggingface_hub
import numpy as np
import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import ModelCard
from training_helpers import adaptation, run, run_two_processes
from training_helpers import tiny_argv as shared_tiny_argv

from cpsl_hf.data.synthetic import load_synthetic
from cpsl_hf.data.transforms import normalize, to_float
from cpsl_hf.hub import HubError
from cpsl_hf.selflabel import SelfLabeling
from cpsl_hf.training.arguments import ConfigurationError, parse_args
from cpsl_hf.training.building import build_model
from cpsl_hf.training.loop import Trainer
from cpsl_hf.training.pseudo_labels import OfflinePseudoLabels
from cpsl_hf.training.stages import CPSLStage
from cpsl_hf.training.views import cross_entropy_at

TOKEN = "hf_test_token"
IMAGE_SIZE = (32, 64)
#: Odd, so that two processes get unequal shards (5 + 4) of the target training set.
TRAIN_IMAGES = 9
VAL_IMAGES = 2
#: What ``save_pretrained`` of a CPSL model writes (weights, config, image processor, remote code).
MODEL_FILES = {
    "config.json",
    "model.safetensors",
    "preprocessor_config.json",
    "configuration_cpsl.py",
    "modeling_cpsl.py",
}


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory):
    """The three synthetic splits a run reads, generated once so that runs (and torchrun ranks) only read."""
    cache = tmp_path_factory.mktemp("synthetic_cache")
    for domain, split, count in (
        ("source", "train", TRAIN_IMAGES),
        ("target", "train", TRAIN_IMAGES),
        ("target", "validation", VAL_IMAGES),
    ):
        load_synthetic(domain, split, num_images=count, image_size=IMAGE_SIZE, seed=0, cache_dir=cache)
    return cache


def tiny_argv(output_dir, cache, *extra):
    """The shared tiny run cut to 1 warm-up + 1 CPSL step on this file's image counts, 2 validation strips."""
    return shared_tiny_argv(
        output_dir, cache,
        "--synthetic_train_images", str(TRAIN_IMAGES),
        "--synthetic_val_images", str(VAL_IMAGES),
        "--synthetic_image_size", *map(str, IMAGE_SIZE),
        "--eval_batch_size", "1",
        "--warmup_steps", "1",
        "--cpsl_steps", "1",
        "--save_predictions", "2",
        *extra,
    )  # fmt: skip


def _online(monkeypatch, tmp_path, endpoint: str, token: str = TOKEN) -> None:
    """Undo the test-wide offline mode for the in-process client; the token comes from HF_TOKEN only."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", token)


def _files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file()}


def _assert_local_export_complete(trainer: Trainer, folder: Path) -> None:
    """The exported model equals the trainer's student; metrics, card and prediction strips are written."""
    from transformers import AutoModel

    assert MODEL_FILES | {"metrics.json", "README.md"} <= _files(folder)
    saved = AutoModel.from_pretrained(folder).state_dict()
    live = trainer.student.state_dict()
    assert saved.keys() == live.keys()
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, live[name], rtol=0, atol=0, msg=name)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["final"]["step"] == trainer.step
    strips = sorted((folder / "predictions").glob("*.png"))
    assert len(strips) == VAL_IMAGES
    card = ModelCard.load(folder / "README.md")
    assert card.data.eval_results[0].metric_value == metrics["final"]["mean_iou"]
    assert f"predictions/{strips[0].name}" in card.text


# ---------------------------------------------------------------------------------------------- --push_to_hub


def test_push_to_hub_uploads_exactly_the_exported_folder(tmp_path, monkeypatch, synthetic_cache, capsys):
    output = tmp_path / "run"
    with LocalHub(tmp_path / "server") as server:
        _online(monkeypatch, tmp_path, server.endpoint)
        trainer = run(
            tiny_argv(
                output, synthetic_cache, "--push_to_hub", "--hub_model_id", "tester/cpsl-run", "--hub_private"
            )
        )
    assert f"Pushed to {server.endpoint}/tester/cpsl-run" in capsys.readouterr().out
    assert server.unexpected == []
    assert server.created == [
        {"repo_id": "tester/cpsl-run", "name": "cpsl-run", "organization": "tester", "visibility": "private",
         "type": "model"}
    ]  # fmt: skip
    assert [commit["repo_id"] for commit in server.commits] == ["tester/cpsl-run"]
    assert sum(route == "/api/whoami-v2" for _, route in server.requests) == 1

    _assert_local_export_complete(trainer, output)
    arrived = server.repo_dir("tester/cpsl-run")
    local = _files(output)
    # The model, its metrics and card, the strips of the exported model and of each evaluation: all of it.
    strips = {f"predictions/{path.name}" for path in (output / "predictions").glob("*.png")}
    evaluations = {
        f"predictions/{folder}/{path.name}"
        for folder in ("warmup-step000001", "cpsl-step000002")
        for path in (output / "predictions" / folder).glob("*.png")
    }
    assert len(strips) == VAL_IMAGES and len(evaluations) == 2 * VAL_IMAGES
    plots = {
        "plots/miou_over_training.png",
        "plots/per_class_iou.png",
        "plots/pseudo_labels_over_training.png",
    }
    examples = {f"examples/{path.name}" for path in (output / "examples").glob("*.png")}
    assert {name.split("/")[1] for name in examples} == {name.split("/")[1] for name in strips}
    assert local == MODEL_FILES | {"metrics.json", "README.md"} | strips | evaluations | plots | examples
    assert _files(arrived) == local
    for name in local:
        if name == "metrics.json":  # uploaded with the local paths redacted (tests/test_card.py)
            pushed, kept = (json.loads((folder / name).read_text()) for folder in (arrived, output))
            assert pushed["final"] == kept["final"] and str(tmp_path) not in json.dumps(pushed)
        else:
            assert (arrived / name).read_bytes() == (output / name).read_bytes(), name
    card = ModelCard.load(arrived / "README.md")
    assert 'from_pretrained("tester/cpsl-run"' in card.text


def test_push_to_hub_keeps_resumable_checkpoints_local(tmp_path, monkeypatch, synthetic_cache):
    output = tmp_path / "run"
    with LocalHub(tmp_path / "server") as server:
        _online(monkeypatch, tmp_path, server.endpoint)
        run(
            tiny_argv(
                output, synthetic_cache, "--cpsl_steps", "0", "--save_predictions", "0",
                "--checkpointing_steps", "1", "--push_to_hub", "--hub_model_id", "tester/cpsl-ckpt",
            )
        )  # fmt: skip
    assert (output / "checkpoints" / "checkpoint-1" / "model.safetensors").is_file()  # kept locally
    plots = {name for name in _files(output) if name.startswith("plots/")}
    assert (
        plots
        and _files(server.repo_dir("tester/cpsl-ckpt")) == MODEL_FILES | {"metrics.json", "README.md"} | plots
    )


@pytest.mark.parametrize("hub_model_id", ["cpsl-bare", "a/b/c", "/cpsl", "tester/"])
def test_push_to_hub_needs_a_namespaced_repo_before_training(tmp_path, synthetic_cache, hub_model_id):
    # The card is written before the push and names the repo in its loading code, so a bare NAME (created as
    # USER/NAME by the Hub) would document a repo that does not exist: refused before any training.
    argv = tiny_argv(
        tmp_path / "run",
        synthetic_cache,
        "--cpsl_steps",
        "0",
        "--push_to_hub",
        "--hub_model_id",
        hub_model_id,
    )
    with pytest.raises(ConfigurationError, match="--hub_model_id USER/NAME"):
        parse_args(argv)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("failure", ["rejected token", "closed port"])
def test_failed_push_ends_the_run_after_the_local_export(
    tmp_path, monkeypatch, synthetic_cache, failure, capsys
):
    output = tmp_path / "run"
    argv = tiny_argv(
        output, synthetic_cache, "--cpsl_steps", "0", "--push_to_hub", "--hub_model_id", "tester/cpsl-fail"
    )
    with LocalHub(tmp_path / "server") as server:
        if failure == "rejected token":
            _online(monkeypatch, tmp_path, server.endpoint, token="hf_wrong")
            expected = f"the Hub at {server.endpoint} rejected the token"
        else:
            with socket.socket() as probe:  # a port nobody listens on
                probe.bind(("127.0.0.1", 0))
                closed = f"http://127.0.0.1:{probe.getsockname()[1]}"
            _online(monkeypatch, tmp_path, closed)
            expected = f"cannot reach the Hugging Face Hub at {closed}"
        trainer = Trainer(parse_args(argv))
        with pytest.raises(HubError, match=expected) as raised:
            trainer.train()
    assert trainer.step == 1
    _assert_local_export_complete(trainer, output)
    # The error says where the complete run is and how to push it later; the table and paths were printed.
    message = str(raised.value)
    assert str(output.resolve()) in message
    assert f"scripts/push_to_hub.py --checkpoint {output} --repo_id tester/cpsl-fail" in message
    printed = capsys.readouterr().out
    assert "| **mIoU** |" in printed and f"Metrics: {(output / 'metrics.json').resolve()}" in printed
    assert "Pushed to" not in printed
    assert server.created == [] and server.commits == []
    assert server.requests == ([("GET", "/api/whoami-v2")] if failure == "rejected token" else [])


# ------------------------------------------------------------------------------------ --pseudo_labels offline

DRIVER = textwrap.dedent(
    """
    import sys
    import torch
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    def adaptation(run):
        return next(stage for stage in run.stages if stage.name == "cpsl")

    out = sys.argv[1]


    class Recorded(Trainer):
        def start_stage(self, stage):
            if stage.name != "cpsl":
                return super().start_stage(stage)
            rank = self.accelerator.process_index
            warmup = {name: tensor.clone() for name, tensor in self.student.state_dict().items()}
            super().start_stage(stage)
            torch.save(
                {
                    "warmup": warmup,
                    "offline": stage.offline_labels.state_dict(),
                    "prototypes": self.student.self_labeling_head.prototypes.detach().clone(),
                    "prior": stage.self_labeling.state_dict(),
                },
                f"{out}/init_rank{rank}.pt",
            )


    trainer = Recorded(parse_args(sys.argv[2:]))
    trainer.train()
    final = {
        "student": trainer.student.state_dict(),
        "teacher": adaptation(trainer).teacher.module.state_dict(),
        "selflabel": adaptation(trainer).self_labeling.state_dict(),
        "offline": adaptation(trainer).offline_labels.state_dict(),
        "world": trainer.accelerator.num_processes,
    }
    torch.save(final, f"{out}/final_rank{trainer.accelerator.process_index}.pt")
    """
)


@pytest.fixture(scope="module")
def two_process_offline_run(tmp_path_factory, synthetic_cache):
    """One torchrun of 2 gloo processes with --pseudo_labels offline on 9 target images, pushing to a loopback
    Hub at the end; returns (folder with the ranks' records, argv, the server, the ranks' stdout)."""
    folder = tmp_path_factory.mktemp("ddp")
    argv = tiny_argv(
        folder / "run", synthetic_cache, "--pseudo_labels", "offline", "--cpsl_steps", "2",
        "--source_batch_size", "1", "--target_batch_size", "1", "--save_predictions", "0",
    )  # fmt: skip
    with LocalHub(folder / "server") as server:
        hub_env = {
            "HF_HUB_OFFLINE": "0",
            "HF_ENDPOINT": server.endpoint,
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(folder / "hf_home"),
        }
        push = ["--push_to_hub", "--hub_model_id", "tester/cpsl-ddp"]
        result = run_two_processes(DRIVER, folder, [*argv, *push], hub_env)
    return folder, argv, server, result.stdout


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.mark.slow
def test_offline_pseudo_labels_two_processes_equal_one(two_process_offline_run):
    folder, argv, _, _ = two_process_offline_run
    init = [_load(folder / f"init_rank{rank}.pt") for rank in (0, 1)]
    final = [_load(folder / f"final_rank{rank}.pt") for rank in (0, 1)]
    assert final[0]["world"] == final[1]["world"] == 2  # real data parallelism, not two lone runs

    # Both ranks hold the same maps, in the same order, covering every target training image exactly once.
    names = init[0]["offline"]["names"]
    assert init[1]["offline"]["names"] == names
    assert torch.equal(init[0]["offline"]["probabilities"], init[1]["offline"]["probabilities"])
    target = load_synthetic(
        "target", "train", num_images=TRAIN_IMAGES, image_size=IMAGE_SIZE, seed=0,
        cache_dir=argv[argv.index("--synthetic_cache_dir") + 1],
    )  # fmt: skip
    assert len(names) == len(set(names)) == TRAIN_IMAGES
    assert sorted(names) == sorted(target["name"])
    stored = OfflinePseudoLabels.from_state_dict(init[0]["offline"])
    assert stored.probabilities.dtype == torch.float16
    assert stored.probabilities.shape == (TRAIN_IMAGES, 19, IMAGE_SIZE[0] // 4, IMAGE_SIZE[1] // 4)
    assert len(stored.index) == TRAIN_IMAGES

    # A single-process initialisation from the same warm-up weights stores the same maps, byte for byte.
    for name, tensor in init[0]["warmup"].items():
        torch.testing.assert_close(init[1]["warmup"][name], tensor, rtol=0, atol=0, msg=name)
    single_argv = list(argv)
    single_argv[argv.index("--output_dir") + 1] = str(folder / "single")
    single = Trainer(parse_args(single_argv))
    single.setup()
    single.student.load_state_dict(init[0]["warmup"])
    adaptation(single).start(single.stages[0])
    assert sorted(adaptation(single).offline_labels.index) == sorted(names)
    for name in names:
        assert torch.equal(
            stored.probabilities[stored.index[name]],
            adaptation(single).offline_labels.probabilities[adaptation(single).offline_labels.index[name]],
        ), name
    # ... and both equal the warm-up model's softmax computed here image by image (float16).
    model = build_model(single.args)
    model.load_state_dict(init[0]["warmup"])
    model.eval()
    for sample in target:
        pixels = torch.from_numpy(np.asarray(sample["image"]).copy()).permute(2, 0, 1)[None]
        with torch.no_grad():
            probs = model(normalize(to_float(pixels))).logits.softmax(dim=1)
        expected = probs.half()[0]
        assert torch.equal(stored.probabilities[stored.index[sample["name"]]], expected), sample["name"]
    # The prior (a histogram of integer counts) is exact; the prototypes (all-reduced class means) agree up to
    # the order of the sums.
    prior = adaptation(single).self_labeling.prior.distribution
    for rank in (0, 1):
        torch.testing.assert_close(init[rank]["prior"]["prior.distribution"], prior, rtol=0, atol=0)
        torch.testing.assert_close(
            init[rank]["prototypes"], single.student.self_labeling_head.prototypes, rtol=1e-5, atol=1e-6
        )

    # The run completes with identical networks, self-labeling state and stored maps on both ranks.
    for part in ("student", "teacher", "selflabel"):
        for name, tensor in final[0][part].items():
            torch.testing.assert_close(final[1][part][name], tensor, rtol=0, atol=0, msg=f"{part}.{name}")
    assert final[0]["offline"]["names"] == final[1]["offline"]["names"] == names
    assert torch.equal(final[0]["offline"]["probabilities"], init[0]["offline"]["probabilities"])


@pytest.mark.slow
def test_only_the_main_process_pushes(two_process_offline_run):
    folder, _, server, stdout = two_process_offline_run
    assert stdout.count(f"Pushed to {server.endpoint}/tester/cpsl-ddp") == 1
    assert server.unexpected == []
    assert [repo["visibility"] for repo in server.created] == ["public"]
    routes = [route for _, route in server.requests]
    assert routes.count("/api/whoami-v2") == 1
    assert routes.count("/api/repos/create") == 1
    assert [commit["repo_id"] for commit in server.commits] == ["tester/cpsl-ddp"]
    arrived = server.repo_dir("tester/cpsl-ddp")
    plots = {name for name in _files(arrived) if name.startswith("plots/")}
    assert _files(arrived) == MODEL_FILES | {"metrics.json", "README.md"} | plots and plots
    assert (arrived / "model.safetensors").read_bytes() == (folder / "run" / "model.safetensors").read_bytes()
    assert json.loads((arrived / "metrics.json").read_text())["training"]["num_processes"] == 2


def test_offline_pseudo_labels_with_init_max_images_fail_before_training(tmp_path, synthetic_cache):
    argv = tiny_argv(
        tmp_path / "run", synthetic_cache, "--pseudo_labels", "offline", "--init_max_images", "2",
        "--cpsl_steps", "3", "--save_predictions", "0",
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="--init_max_images"):
        run(argv)
    assert not (tmp_path / "run" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------------------ trackers


def test_tensorboard_tracker_records_losses_rates_and_evaluations(tmp_path, synthetic_cache):
    """--report_to tensorboard: every logged loss and rate per --logging_steps, and each evaluation's mIoU, as
    stored in metrics.json, in OUTPUT/runs/ (what the Hub's training-metrics tab reads); metrics.json's ``logs``
    hold the same scalars; the recorded hyperparameters name no local path."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output = tmp_path / "run"
    trainer = run(
        tiny_argv(
            output, synthetic_cache, "--warmup_steps", "2", "--cpsl_steps", "2", "--eval_steps", "2",
            "--save_predictions", "0", "--report_to", "tensorboard",
        )
    )  # fmt: skip
    event_files = list((output / "runs").rglob("events.out.tfevents.*"))
    assert event_files, sorted(p.relative_to(output).as_posix() for p in output.rglob("*"))
    scalars = {}
    for event_file in event_files:
        accumulator = EventAccumulator(str(event_file))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    assert sorted(scalars["loss_source"]) == [1, 2, 3, 4]  # --logging_steps 1
    assert sorted(scalars["loss_sl"]) == [3, 4] and sorted(scalars["changed_share"]) == [3, 4]
    for name in ("lr_backbone", "lr_head", "lr_prototypes", "images_per_second", "prior_entropy"):
        assert name in scalars, name
    assert scalars["lr_backbone"][4] == 0.0  # the poly schedule ends at 0
    history = json.loads((output / "metrics.json").read_text())["history"]
    assert scalars["eval/student_miou"][2] == pytest.approx(history["warmup"]["2"]["student"]["mean_iou"])
    assert scalars["eval/student_miou"][4] == pytest.approx(history["cpsl"]["4"]["student"]["mean_iou"])
    assert scalars["eval/teacher_miou"][4] == pytest.approx(history["cpsl"]["4"]["teacher"]["mean_iou"])
    assert trainer.step == 4
    logs = json.loads((output / "metrics.json").read_text())["logs"]
    assert [(entry["step"], entry["stage"]) for entry in logs] == [
        (1, "warmup"),
        (2, "warmup"),
        (3, "cpsl"),
        (4, "cpsl"),
    ]
    for entry in logs:
        for tag in ("loss_source", "lr_backbone"):
            assert scalars[tag][entry["step"]] == pytest.approx(entry[tag], rel=1e-6)
    hparams = [path.read_text() for path in (output / "runs").rglob("hparams.yml")]
    assert hparams and "synthetic_cache_dir: <local>/" in hparams[0]
    assert not any(str(tmp_path) in text for text in hparams)


class _NothingLabelled(SelfLabeling):
    """The self-labeling step with every rectified label ignored (as a high --rectify_threshold can do)."""

    def forward(self, *args, **kwargs):
        result = super().forward(*args, **kwargs)
        result.labels = torch.full_like(result.labels, 255)
        return result


class _NothingLabelledStage(CPSLStage):
    def build_self_labeling(self):
        built = super().build_self_labeling()
        built.__class__ = _NothingLabelled
        return built


class _NothingLabelledTrainer(Trainer):
    def __init__(self, args):
        super().__init__(args)
        adaptation(self).__class__ = _NothingLabelledStage


def test_a_batch_without_any_labelled_target_pixel_trains_on_the_rest(tmp_path, synthetic_cache):
    """No labelled target pixel in a batch (a high --rectify_threshold, a crop of ignored source pixels): the
    cross-entropy term is 0, not NaN, so the step still trains on everything else and no parameter is NaN."""
    trainer = run(
        tiny_argv(tmp_path / "run", synthetic_cache, "--save_predictions", "0"), _NothingLabelledTrainer
    )
    assert isinstance(adaptation(trainer).self_labeling, _NothingLabelled)
    for network in (trainer.student, adaptation(trainer).teacher.module):
        for name, parameter in network.named_parameters():
            assert torch.isfinite(parameter).all(), name
    # Same for the source term: a crop whose labels are all ignored.
    logits = torch.randn(2, 19, 4, 4, requires_grad=True)
    loss = cross_entropy_at(logits, torch.full((2, 8, 8), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    labels = torch.randint(0, 19, (2, 4, 4))
    labels[0] = 255
    expected = torch.nn.functional.cross_entropy(logits, labels, ignore_index=255)
    torch.testing.assert_close(cross_entropy_at(logits, labels), expected)


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state whose mixed precision cannot change once set: start and leave
    the test without one, so an earlier fp32 run does not block a bf16 run (and the bf16 state does not leak)."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=False)
    yield
    AcceleratorState._reset_state(reset_partial_state=False)


@pytest.mark.parametrize("consistency", ["symmetric", "reference"])
def test_bf16_autocast_run_keeps_float32_weights_and_finite_losses(
    tmp_path, synthetic_cache, consistency, fresh_accelerator_state
):
    """--mixed_precision bf16 (autocast on this CPU): every stage runs, the weights stay float32 and finite and
    the self-labeling state (bank, prior) stays float32, as on a GPU."""
    trainer = run(
        tiny_argv(
            tmp_path / "run", synthetic_cache, "--mixed_precision", "bf16", "--consistency", consistency,
            "--save_predictions", "0", "--distill_rounds", "1", "--distill_steps", "1", "--distill_threshold", "0",
        )
    )  # fmt: skip
    assert trainer.accelerator.mixed_precision == "bf16"
    for network in (trainer.student, adaptation(trainer).teacher.module):
        for name, parameter in network.named_parameters():
            assert parameter.dtype == torch.float32 and torch.isfinite(parameter).all(), name
    for name, state in adaptation(trainer).self_labeling.state_dict().items():
        if state.is_floating_point():
            assert state.dtype == torch.float32 and torch.isfinite(state).all(), name
    assert set(trainer.history) == {"warmup", "cpsl", "distill1"}
