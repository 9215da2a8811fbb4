"""A prepared dataset on the Hub, through the real clients: ``scripts/prepare_dataset.py --push_to_hub`` uploads it
with ``huggingface_hub``, and ``load_prepared`` / the trainer's ``--source USER/NAME --streaming`` read it back with
``datasets`` (``hf://`` paths, ``HfFileSystem``, HTTP range requests), all against the loopback Hub of
``tests/hub_server.py``. Every client runs in a fresh subprocess with ``HF_ENDPOINT`` pointing at the server, as a
user's run does (``huggingface_hub`` reads it once, at import)."""

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import huggingface_hub
import numpy as np
import pyarrow.parquet as pq
import pytest
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from hub_server import LocalHub
from huggingface_hub import constants as hub_constants
from PIL import Image
from test_readme_workflow import filled, readme_command

from cpsl_hf.data import testing

REPO = Path(__file__).resolve().parents[1]
TOKEN = "hf_test_token"
REPO_ID = "tester/gta5-cpsl"
NUM_SAMPLES, NUM_SHARDS = 16, 4


def client_env(hub: LocalHub, home: Path, token: str | None = TOKEN) -> dict:
    """The environment of a user's process that talks to ``hub`` (no token on disk; ``token`` in HF_TOKEN)."""
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_OFFLINE": "0",
        "HF_DATASETS_OFFLINE": "0",
        "HF_HOME": str(home),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_XET": "1",  # the loopback Hub speaks LFS, not Xet
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("HF_TOKEN", None)
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run_python(code: str, env: dict, *args: str, timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )  # fmt: skip


def push(hub: LocalHub, env: dict, data_dir: Path, output_dir: Path, repo_id: str, *flags: str):
    return subprocess.Popen(
        [sys.executable, str(REPO / "scripts" / "prepare_dataset.py"), "gta5", "--data_dir", str(data_dir),
         "--output_dir", str(output_dir), "--push_to_hub", repo_id, *flags],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )  # fmt: skip


def train_ids(label_ids: np.ndarray) -> np.ndarray:
    """19-class train ids from the Cityscapes label table (independent of cpsl_hf's lookup tables)."""
    lut = np.full(256, 255, dtype=np.uint8)
    for label in cityscapes_labels:
        if 0 <= label.id < 256 and 0 <= label.trainId < 19:
            lut[label.id] = label.trainId
    return lut[label_ids]


def shard_rows(folder: Path) -> dict[str, list[dict]]:
    """The rows of every local shard, read with pyarrow alone: shard name -> rows (image, label, name)."""
    return {
        path.name: pq.read_table(path).to_pylist() for path in sorted((folder / "data").glob("*.parquet"))
    }


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    with LocalHub(tmp_path_factory.mktemp("hub"), lfs_patterns=("*.parquet",)) as server:
        yield server


@pytest.fixture(scope="module")
def gta5(tmp_path_factory):
    """A GTA5 download of 16 images of 32 x 48 (raw label ids 0..33, so some are outside the 19 classes)."""
    rng = np.random.default_rng(0)
    maps = {f"{i:05d}": rng.integers(0, 34, size=(32, 48)).astype(np.uint8) for i in range(NUM_SAMPLES)}
    root = testing.write_gta5(tmp_path_factory.mktemp("gta5") / "gta5", maps, seed=1)
    return root, maps


@pytest.fixture(scope="module")
def pushed(hub, gta5, tmp_path_factory):
    """The README's ``scripts/prepare_dataset.py gta5 ... --push_to_hub USER/gta5-cpsl`` (+ ``--num_shards 4``)."""
    root = tmp_path_factory.mktemp("pushed")
    env = client_env(hub, root / "hf_home")
    command = readme_command("python", "scripts/prepare_dataset.py")  # the README's, placeholders filled in
    places = {
        "/data/gta5": str(gta5[0]),
        "/data/gta5-parquet": str(root / "gta5-parquet"),
        "USER/gta5-cpsl": REPO_ID,
    }
    command = [sys.executable, *filled(command, places)[1:], "--num_shards", str(NUM_SHARDS)]
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 0, stderr
    return {"folder": root / "gta5-parquet", "stdout": stdout, "requests": list(hub.requests)}


# --------------------------------------------------------------------------------------------------- push


def test_push_lands_the_prepared_folder_in_a_private_dataset_repo(hub, pushed, gta5):
    assert hub.unexpected == []
    assert pushed["stdout"].strip().splitlines()[-1] == f"pushed to {hub.endpoint}/datasets/{REPO_ID}"
    created = [entry for entry in hub.created if entry["repo_id"] == REPO_ID]
    assert created == [
        {"repo_id": REPO_ID, "name": "gta5-cpsl", "organization": "tester", "visibility": "private", "type": "dataset"}
    ]  # fmt: skip
    folder, arrived = pushed["folder"], hub.repo_dir(REPO_ID, "dataset")
    local = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    remote = sorted(p.relative_to(arrived).as_posix() for p in arrived.rglob("*") if p.is_file())
    shards = [f"data/train-{i:05d}-of-{NUM_SHARDS:05d}.parquet" for i in range(NUM_SHARDS)]
    assert local == remote == ["README.md", "cpsl_prepare.json", *shards]
    for name in local:
        assert (arrived / name).read_bytes() == (folder / name).read_bytes()
    for name in shards:  # the shards went through the LFS batch API, as large files do on the Hub
        assert ("PUT", f"/lfs-objects/{digest((folder / name).read_bytes())}") in pushed["requests"]
    commits = [commit for commit in hub.commits if commit["repo_id"] == REPO_ID]
    assert len(commits) == 1 and commits[0]["repo_type"] == "dataset"  # one commit: all files or none
    card = (arrived / "README.md").read_text()
    assert "license: other" in card and "do not make this repository public" in card


def test_a_second_push_with_other_shards_replaces_the_old_ones(hub, gta5, tmp_path):
    """Preparing a split again with another shard count and pushing it deletes the old shards in the same
    commit: the repo never holds two preparations of one split (their samples would be read twice). A push of
    another split leaves the first one's shards alone."""
    env = client_env(hub, tmp_path / "hf_home")
    repo_id = "tester/gta5-reshard"
    for shards in ("4", "2"):
        process = push(hub, env, gta5[0], tmp_path / f"out{shards}", repo_id, "--num_shards", shards)
        assert process.wait(timeout=180) == 0, process.stderr.read()
    data = sorted(path.name for path in (hub.repo_dir(repo_id, "dataset") / "data").iterdir())
    assert data == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    last = [commit for commit in hub.commits if commit["repo_id"] == repo_id][-1]
    assert last["deleted"] == [f"data/train-{i:05d}-of-00004.parquet" for i in range(4)]
    # another split, prepared in another folder: the train shards stay
    process = push(hub, env, gta5[0], tmp_path / "val", repo_id, "--split", "val", "--num_shards", "1")
    assert process.wait(timeout=180) == 0, process.stderr.read()
    data = sorted(path.name for path in (hub.repo_dir(repo_id, "dataset") / "data").iterdir())
    assert data == [
        "train-00000-of-00002.parquet",
        "train-00001-of-00002.parquet",
        "val-00000-of-00001.parquet",
    ]


def test_a_rejected_token_stops_the_push_before_any_work(hub, gta5, tmp_path):
    process = push(
        hub, client_env(hub, tmp_path / "hf_home", "hf_wrong"), gta5[0], tmp_path / "out", "tester/gta5-x"
    )
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 2
    assert stderr.strip().splitlines() == [
        f"error: cannot push to the Hub: the Hub at {hub.endpoint} rejected the token (401); set HF_TOKEN to a "
        "write token or run `hf auth login`"
    ]
    assert not (tmp_path / "out").exists() and all(
        entry["repo_id"] != "tester/gta5-x" for entry in hub.created
    )


# --------------------------------------------------------------------------------------------------- read

READ_SAMPLES = """
    import hashlib, json, sys
    import datasets
    from cpsl_hf.data import load_prepared

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    loaded = load_prepared(sys.argv[1], "train", streaming=sys.argv[2] == "stream")
    raw = loaded.cast_column("image", datasets.Image(decode=False)).cast_column("label", datasets.Image(decode=False))
    rows = [(r["name"], hashlib.sha256(r["image"]["bytes"]).hexdigest(), r["label"]["bytes"].hex()) for r in raw]
    print(json.dumps({"type": type(loaded).__name__, "rows": rows}))
"""


@pytest.mark.parametrize("mode", ["stream", "download"])
def test_load_prepared_from_the_hub_gives_exactly_the_pushed_samples(hub, pushed, gta5, tmp_path, mode):
    root, label_maps = gta5
    hub.served.clear()
    result = run_python(READ_SAMPLES, client_env(hub, tmp_path / "hf_home"), REPO_ID, mode)
    assert result.returncode == 0, result.stderr[-3000:]
    output = json.loads(result.stdout.strip().splitlines()[-1])
    assert output["type"] == ("IterableDataset" if mode == "stream" else "Dataset")
    rows = output["rows"]
    # the pushed shards' rows, in shard order, read with pyarrow from the local folder
    expected = [row for shard in shard_rows(pushed["folder"]).values() for row in shard]
    assert [name for name, _, _ in rows] == [row["name"] for row in expected]
    assert sorted(name for name, _, _ in rows) == sorted(label_maps)
    for (name, image_digest, label_hex), row in zip(rows, expected, strict=True):
        assert image_digest == digest((root / "images" / f"{name}.png").read_bytes())  # the original file
        assert bytes.fromhex(label_hex) == row["label"]["bytes"]
        label = np.asarray(Image.open(io.BytesIO(bytes.fromhex(label_hex))))
        np.testing.assert_array_equal(label, train_ids(label_maps[name]))
    assert hub.unexpected == []
    shard_bytes = {
        f"/datasets/{REPO_ID}/resolve/{hub.repos[('dataset', REPO_ID)].sha}/data/{name}": (
            pushed["folder"] / "data" / name
        )
        .stat()
        .st_size
        for name in shard_rows(pushed["folder"])
    }
    read = {}
    for method, path, _, size in hub.served:
        if path in shard_bytes and method == "GET":
            read[path] = read.get(path, 0) + size
    # pinned to the pushed commit, every shard read, and (small shards: one block each) read exactly once
    assert read == shard_bytes


# ------------------------------------------------------------------------------------ errors: one line each

LOAD_CASES = """
    import json, sys
    from cpsl_hf.cli import error_line, EXIT_USAGE, EXIT_FAILURE
    from cpsl_hf.data import load_prepared
    from cpsl_hf.utils import UsageError

    results = []
    for repo_id, split, token, num_classes in json.loads(sys.argv[1]):
        try:
            loaded = load_prepared(repo_id, split, token=token, num_classes=num_classes)
            results.append({"loaded": sorted(row["name"] for row in loaded)})
        except (UsageError, OSError, ValueError) as error:
            status = EXIT_USAGE if isinstance(error, UsageError) else EXIT_FAILURE
            results.append({"error": error_line(error), "type": type(error).__name__, "status": status})
    print(json.dumps(results))
"""


def load_cases(
    hub: LocalHub, home: Path, cases: list[tuple[str, str, str | None]], env_token=None
) -> list[dict]:
    result = run_python(LOAD_CASES, client_env(hub, home, env_token), json.dumps(cases))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_wrong_token_missing_repo_and_missing_split_each_give_one_clear_line(hub, pushed, tmp_path):
    wrong, no_token, missing, no_split, protocol = load_cases(
        hub, tmp_path / "hf_home",
        [(REPO_ID, "train", "hf_wrong", None), (REPO_ID, "train", None, None),
         ("tester/nothing-here", "train", TOKEN, None), (REPO_ID, "val", TOKEN, None), (REPO_ID, "train", TOKEN, 16)],
    )  # fmt: skip
    assert wrong == {
        "error": f"error: Hub dataset '{REPO_ID}': the Hub rejected the token (401); set HF_TOKEN to a valid "
        "token or run `hf auth login`",
        "type": "HubDatasetError",
        "status": 2,
    }
    for case in (no_token, missing):  # a private repo read without a token looks missing, as on the Hub
        assert case["type"] == "HubDatasetError" and case["status"] == 2
        assert "not found at http://127.0.0.1" in case["error"] and "private" in case["error"]
    assert "'tester/nothing-here' not found" in missing["error"]
    assert no_split["type"] == "LayoutError" and no_split["status"] == 2
    assert f"Hub dataset {REPO_ID} (commit" in no_split["error"]
    assert "no parquet shards for split 'val' (splits found: train)" in no_split["error"]
    assert protocol["type"] == "UsageError" and protocol["status"] == 2
    assert "--num_classes 16 disagrees with Hub dataset tester/gta5-cpsl (commit" in protocol["error"]
    assert "prepared with the 19-class protocol" in protocol["error"]
    for case in (wrong, no_token, missing, no_split, protocol):
        assert "\n" not in case["error"]


def test_an_unreachable_hub_fails_at_once_in_one_line(hub, tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {**client_env(hub, tmp_path / "hf_home"), "HF_ENDPOINT": endpoint}
    start = time.monotonic()
    result = run_python(LOAD_CASES, env, json.dumps([(REPO_ID, "train", None, None)]))
    assert time.monotonic() - start < 30
    (case,) = json.loads(result.stdout.strip().splitlines()[-1])
    assert case["type"] == "ConnectionError" and case["status"] == 1
    assert case["error"].startswith(
        f"error: cannot reach the Hugging Face Hub at {endpoint} to read '{REPO_ID}' ("
    )


def test_trainer_reports_a_rejected_token_in_one_line(hub, pushed, tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "train.py"), "--source", REPO_ID, "--streaming",
         "--output_dir", str(tmp_path / "run"), "--synthetic_cache_dir", str(tmp_path / "cache"),
         "--synthetic_train_images", "4", "--synthetic_val_images", "2", "--synthetic_image_size", "32", "64",
         "--crop_size", "32", "32", "--warmup_steps", "1", "--cpsl_steps", "0", "--no_progress_bar"],
        env=client_env(hub, tmp_path / "hf_home", "hf_wrong"), capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: Hub dataset '{REPO_ID}': the Hub rejected the token (401); set HF_TOKEN to a valid token or run "
        "`hf auth login`"
    )


def _online(monkeypatch, tmp_path):
    """The in-process client, online, LFS uploads (no Xet), no token from the environment or disk."""
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hub_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))


def test_an_interrupted_upload_leaves_no_dataset_that_loads_as_complete(
    hub, pushed, gta5, tmp_path, monkeypatch
):
    """Killed while its commit is in flight, a push leaves an empty repo; a split whose shards arrived only in
    part (a multi-commit upload stopped midway) is refused, naming the missing shard; pushed again, it loads."""
    env = client_env(hub, tmp_path / "hf_home")
    hub.stalled.clear()
    hub.release.clear()
    hub.stall_on = lambda method, path: (
        method == "POST" and path == "/api/datasets/tester/gta5-stop/commit/main"
    )
    try:
        process = push(
            hub, env, gta5[0], tmp_path / "stop", "tester/gta5-stop", "--num_shards", str(NUM_SHARDS)
        )
        assert hub.stalled.wait(120), process.communicate(timeout=5)
        process.send_signal(signal.SIGKILL)  # the user's machine goes away mid-upload
        process.wait(timeout=30)
    finally:
        hub.stall_on = None
        hub.release.set()

    # a repo with 3 of the 4 shards, uploaded by the real client in one commit of a partial folder
    _online(monkeypatch, tmp_path)
    api = huggingface_hub.HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_repo("tester/gta5-part", repo_type="dataset", private=True)
    api.upload_folder(
        folder_path=str(pushed["folder"]), repo_id="tester/gta5-part", repo_type="dataset",
        ignore_patterns=[f"data/train-00003-of-{NUM_SHARDS:05d}.parquet"],
    )  # fmt: skip

    stopped, partial = load_cases(
        hub,
        tmp_path / "hf_home",
        [("tester/gta5-stop", "train", None, None), ("tester/gta5-part", "train", None, None)],
        TOKEN,
    )
    assert stopped["type"] == "LayoutError"
    assert (
        "tester/gta5-stop" in stopped["error"] and "no parquet shards for split 'train'" in stopped["error"]
    )
    assert partial["type"] == "LayoutError"
    assert (
        "split 'train' is incomplete: 1 of its 4 shards are missing (train-00003-of-00004.parquet)"
        in (partial["error"])
    )

    again = push(hub, env, gta5[0], tmp_path / "stop", "tester/gta5-stop", "--num_shards", str(NUM_SHARDS))
    assert again.wait(timeout=180) == 0, again.stderr.read()
    (loaded,) = load_cases(hub, tmp_path / "hf_home", [("tester/gta5-stop", "train", None, None)], TOKEN)
    assert loaded == {"loaded": sorted(gta5[1])}
    assert hub.unexpected == []


# ------------------------------------------------------------------------------------------- training

RECORD_DRIVER = textwrap.dedent(
    """
    import json, sys
    import datasets
    from cpsl_hf.training.arguments import parse_args
    from cpsl_hf.training.loop import Trainer

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    seen = []

    class Recording(Trainer):
        def next_batch(self, loader):
            batch = super().next_batch(loader)
            if loader is self.source_loader:
                seen.append(list(batch["name"]))
            return batch

    trainer = Recording(parse_args(sys.argv[2:]))
    trainer.train()
    rank = trainer.accelerator.process_index
    with open(f"{sys.argv[1]}/names{rank}.json", "w") as handle:
        json.dump({"names": seen, "world": trainer.accelerator.num_processes, "step": trainer.step}, handle)
    """
)


def tiny_train_argv(output_dir: Path, cache: Path, source: str, *extra: str) -> list[str]:
    return [
        "--source", source, "--streaming", "--target", "synthetic",
        "--output_dir", str(output_dir), "--synthetic_cache_dir", str(cache),
        "--synthetic_train_images", "4", "--synthetic_val_images", "2", "--synthetic_image_size", "32", "64",
        "--crop_size", "32", "32", "--source_batch_size", "2", "--target_batch_size", "2",
        "--eval_batch_size", "2", "--warmup_steps", "4", "--cpsl_steps", "0", "--lr_warmup_steps", "0",
        "--save_predictions", "0", "--no_progress_bar", "--logging_steps", "1",
        *extra,
    ]  # fmt: skip


def local_stream_names(folder: Path, process_index: int, num_processes: int, batches: int, seed: int) -> list:
    """What the trainer's source loader yields from the local folder (the reference for the Hub stream)."""
    import datasets

    from cpsl_hf.data import build_train_loader, load_prepared

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    loader = build_train_loader(
        load_prepared(folder, "train"), 2, seed=seed, process_index=process_index, num_processes=num_processes
    )
    return [list(next(loader)["name"]) for _ in range(batches)]


@pytest.mark.slow
def test_two_processes_stream_disjoint_whole_shards_from_the_hub_as_from_the_local_folder(
    hub, pushed, tmp_path
):
    """``torchrun --nproc_per_node 2 ... --source tester/gta5-cpsl --streaming``: each process reads whole shards
    of its own (together all 16 samples, none twice in the epoch of 4 steps), sample for sample as the same
    loader reads the local folder."""
    (tmp_path / "driver.py").write_text(RECORD_DRIVER)
    env = {**client_env(hub, tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(tmp_path / "driver.py"), str(tmp_path), *tiny_train_argv(tmp_path / "run", tmp_path / "cache", REPO_ID),
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"names{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["world"] for rank in ranks] == [2, 2] and [rank["step"] for rank in ranks] == [4, 4]
    per_rank = [{name for batch in rank["names"] for name in batch} for rank in ranks]
    shards = [{row["name"] for row in rows} for rows in shard_rows(pushed["folder"]).values()]
    assert per_rank[0].isdisjoint(per_rank[1]) and per_rank[0] | per_rank[1] == set().union(*shards)
    for names in per_rank:  # whole shards: each process's samples are the union of two of the four shards
        assert len(names) == 8 and sum(shard <= names for shard in shards) == 2
    for rank in (0, 1):
        assert ranks[rank]["names"] == local_stream_names(pushed["folder"], rank, 2, 4, seed=0), rank


@pytest.mark.slow
def test_a_resumed_hub_stream_continues_at_the_next_sample(hub, pushed, tmp_path):
    """Stopped after 3 of 6 steps (mid-epoch) and resumed from its checkpoint, a run streaming from the Hub reads
    the batches an uninterrupted run reads at steps 4-6."""
    (tmp_path / "driver.py").write_text(RECORD_DRIVER)
    env = client_env(hub, tmp_path / "hf_home")
    steps = ("--warmup_steps", "6")

    def train(folder: Path, *flags: str) -> list:
        folder.mkdir()
        argv = tiny_train_argv(tmp_path / folder.name / "run", tmp_path / "cache", REPO_ID, *steps, *flags)
        result = subprocess.run(
            [sys.executable, str(tmp_path / "driver.py"), str(folder), *argv],
            env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-4000:]
        return json.loads((folder / "names0.json").read_text())["names"]

    whole = train(tmp_path / "whole")
    first = train(tmp_path / "part", "--checkpointing_steps", "3", "--stop_at_step", "3")
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    argv = tiny_train_argv(tmp_path / "part" / "run", tmp_path / "cache", REPO_ID, *steps)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), str(resumed_dir), *argv, "--resume_from_checkpoint", "latest"],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    rest = json.loads((resumed_dir / "names0.json").read_text())["names"]
    assert len(whole) == 6 and first == whole[:3] and rest == whole[3:]
    assert len({name for batch in whole for name in batch}) == 12  # 6 batches of 2, all different: mid-epoch
