"""The README's commands in order, as a new user runs them: train (``accelerate launch scripts/train.py``), evaluate,
predict, publish. The commands are read out of README.md's bash blocks, so the test breaks when the README's
commands do; only their placeholders (``PATH_OR_REPO``, ``/data/cityscapes``, ``USER/NAME``) are filled in, tiny
overrides are appended to the training command, and every step is a real subprocess in a scratch folder that
holds ``scripts/`` (a link to the repository's), as a checkout does."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import psutil
from hub_server import LocalHub
from huggingface_hub import ModelCard
from PIL import Image

from cpsl_hf.data.testing import cityscapes_stem, random_label_ids, write_cityscapes

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_token"
RUN = "outputs/synthetic_to_synthetic_segformer-tiny"  # where the README says the demo's run goes
TINY = [
    "--synthetic_train_images", "8", "--synthetic_val_images", "2", "--synthetic_image_size", "32", "64",
    "--crop_size", "32", "32", "--source_batch_size", "2", "--target_batch_size", "2", "--eval_batch_size", "2",
    "--samples_per_image", "16", "--bank_size", "48", "--warmup_steps", "1", "--cpsl_steps", "1",
    "--lr_warmup_steps", "0", "--logging_steps", "1", "--no_progress_bar", "--save_predictions", "1",
]  # fmt: skip


def readme_commands() -> list[list[str]]:
    """Every command of README.md's bash blocks, continuation lines joined, comments and ``[optional]`` parts
    dropped, split into words."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = re.sub(r"\[[^\]]*\]", " ", command.split("  #")[0])
            if command.strip():
                commands.append(shlex.split(command))
    return commands


def readme_command(*prefix: str) -> list[str]:
    """The README's first command that starts with ``prefix`` (exactly the README's words)."""
    for command in readme_commands():
        if command[: len(prefix)] == list(prefix):
            return command
    raise AssertionError(f"README.md no longer shows a command starting with {' '.join(prefix)!r}")


def filled(command: list[str], values: dict[str, str]) -> list[str]:
    """``command`` with each placeholder word replaced; every placeholder must be there (the README changed
    otherwise)."""
    missing = sorted(set(values) - set(command))
    assert not missing, f"README command {' '.join(command)} no longer has {missing}"
    return [values.get(word, word) for word in command]


def test_readme_commands_train_evaluate_predict_publish(tmp_path):
    train = readme_command("accelerate", "launch", "scripts/train.py")
    assert train == ["accelerate", "launch", "scripts/train.py"]  # the Quick start's command, nothing more
    evaluate = readme_command("python", "scripts/evaluate.py")
    predict = readme_command("python", "scripts/predict.py")
    push = readme_command("python", "scripts/push_to_hub.py")
    assert RUN in push  # the README publishes the folder the demo writes

    (tmp_path / "scripts").symlink_to(REPO / "scripts")
    rng = np.random.default_rng(0)
    write_cityscapes(
        tmp_path / "cityscapes",
        {cityscapes_stem("aachen", index): random_label_ids("cityscapes", 32, 64, rng) for index in range(2)},
        split="val",
    )
    images = tmp_path / "leftImg8bit" / "val" / "bonn"  # the README's --images leftImg8bit/val
    images.mkdir(parents=True)
    sizes = {"a_leftImg8bit.png": (64, 48), "b_leftImg8bit.png": (75, 37), "c_leftImg8bit.png": (96, 64)}
    for name, size in sizes.items():
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(images / name)

    env = {
        **{key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"},  # a new user's shell
        "PYTHONPATH": str(REPO),
        "HF_HOME": str(tmp_path / "hf_home"),  # no accelerate config or token of the machine's user
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "CPSL_HF_CACHE": str(tmp_path / "cache"),
    }

    def step(command: list[str], **extra_env) -> subprocess.CompletedProcess:
        if command[0] == "python":
            command = [sys.executable, *command[1:]]
        elif command[0] == "accelerate":  # the venv's accelerate, as a user whose venv is active runs it
            command = [str(Path(sys.executable).parent / "accelerate"), *command[1:]]
        result = subprocess.run(
            command, cwd=tmp_path, env={**env, **extra_env}, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (
            f"{' '.join(command)}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
        return result

    # 1. train: the demo, cut to one warm-up and one CPSL step on tiny images; on every physical core, though
    # accelerate launch (no config, no GPU) exports OMP_NUM_THREADS=1 (--cpu_threads auto overrides it)
    result = step(
        [*train, *TINY, "--output_dir", str(tmp_path / RUN), "--synthetic_cache_dir", str(tmp_path / "cache")]
    )
    cores = min(psutil.cpu_count(logical=False) or 1, len(os.sched_getaffinity(0)))
    assert f"training on {cores} CPU threads (auto:" in result.stderr, result.stderr[-3000:]
    run = tmp_path / RUN
    assert {"config.json", "model.safetensors", "metrics.json", "README.md"} <= {
        p.name for p in run.iterdir()
    }
    final = json.loads((run / "metrics.json").read_text())["final"]

    # 2. evaluate the exported model as the README shows (on a Cityscapes-layout folder)
    step(
        filled(evaluate, {"PATH_OR_REPO": RUN, "/data/cityscapes": str(tmp_path / "cityscapes")}),
        OMP_NUM_THREADS="1",
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())  # --output metrics.json
    assert metrics["num_images"] == 2 and metrics["num_classes"] == 19 and 0.0 <= metrics["mean_iou"] <= 1.0

    # 3. predict a folder of images as the README shows
    step(filled(predict, {"CHECKPOINT_OR_REPO": RUN}), OMP_NUM_THREADS="1")
    for form in ("color", "overlay", "labelids"):  # the README's --format color overlay labelids
        for name, size in sizes.items():
            written = tmp_path / "predictions" / form / "bonn" / name
            assert Image.open(written).size == size, written

    # 4. publish the run folder to a loopback Hub as the README shows
    with LocalHub(tmp_path / "server") as server:
        result = step(
            filled(push, {"USER/NAME": "tester/cpsl-demo"}),
            HF_HUB_OFFLINE="0",
            TRANSFORMERS_OFFLINE="0",
            HF_TOKEN=TOKEN,
            HF_ENDPOINT=server.endpoint,
        )
    assert result.stdout.strip().splitlines()[-1] == f"{server.endpoint}/tester/cpsl-demo"
    assert server.unexpected == []
    arrived = server.repo_dir("tester/cpsl-demo")
    assert (arrived / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()
    assert (arrived / "config.json").read_bytes() == (run / "config.json").read_bytes()
    card = ModelCard.load(arrived / "README.md")
    assert card.data.eval_results[0].metric_value == final["mean_iou"]  # the exported model's final mIoU
    assert 'from_pretrained("tester/cpsl-demo"' in card.text
