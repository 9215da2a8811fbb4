"""Parquet preparation round trip, load_prepared, and the train / eval loaders (splits, epochs, resume)."""

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from cpsl_hf.data import loading, prepare, readers, testing

NUM_SAMPLES = 12


@pytest.fixture(autouse=True)
def no_thread_shutdown_sleep(monkeypatch):
    """datasets 5 sleeps 5 s whenever a shuffled parquet stream ends (a guard against an Arrow crash at
    interpreter exit, apache/arrow#45214); the tests end many short epochs, so skip the sleep."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)


@pytest.fixture(scope="module")
def gta5_dir(tmp_path_factory):
    rng = np.random.default_rng(0)
    maps = {f"{i:05d}": rng.integers(0, 34, size=(6, 10)).astype(np.uint8) for i in range(NUM_SAMPLES)}
    return testing.write_gta5(tmp_path_factory.mktemp("gta5") / "gta5", maps)


@pytest.fixture(scope="module")
def mapped(gta5_dir, tmp_path_factory):
    return readers.load_gta5(gta5_dir, cache_dir=tmp_path_factory.mktemp("cache"), progress=False)


@pytest.fixture(scope="module")
def prepared(gta5_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare.prepare_dataset("gta5", gta5_dir, out, num_shards=4, progress=False)
    return out


def test_parquet_round_trip_preserves_image_bytes_and_labels(gta5_dir, mapped, prepared):
    files = sorted((prepared / "data").glob("train-*.parquet"))
    assert [f.name for f in files] == [f"train-{i:05d}-of-00004.parquet" for i in range(4)]
    raw = readers.load_prepared(prepared, "train", streaming=False)
    raw = raw.cast_column("image", datasets.Image(decode=False))
    assert len(raw) == NUM_SAMPLES
    expected_labels = {example["name"]: np.asarray(example["label"]) for example in mapped}
    for example in raw:
        assert example["image"]["bytes"] == (gta5_dir / "images" / f"{example['name']}.png").read_bytes()
    decoded = readers.load_prepared(prepared, "train", streaming=True)
    for example in decoded:
        np.testing.assert_array_equal(np.asarray(example["label"]), expected_labels[example["name"]])
    card = (prepared / "README.md").read_text()
    info = json.loads((prepared / prepare.INFO_FILE).read_text())
    report = readers.DataReport.from_dict(info["splits"]["train"]["report"])
    assert report.num_kept == NUM_SAMPLES and info["splits"]["train"]["num_shards"] == 4
    all_labels = np.concatenate([label.ravel() for label in expected_labels.values()])
    road = int((all_labels == 0).sum())
    assert report.class_pixels[0] == road and f"| road | {road} |" in card
    assert "path: data/train-*.parquet" in card


def test_prepare_skips_and_documents_bad_samples(tmp_path):
    root = testing.write_gta5(
        tmp_path / "gta5", {name: np.full((4, 4), 7, np.uint8) for name in "abc"}, image_sizes={"b": (5, 4)}
    )
    with pytest.raises(readers.BadSampleError, match="size mismatch"):
        prepare.prepare_dataset("gta5", root, tmp_path / "out", progress=False)
    result = prepare.prepare_dataset("gta5", root, tmp_path / "out", on_bad_sample="skip", progress=False)
    assert result.report.num_kept == 2 and [bad.name for bad in result.report.skipped] == ["b"]
    assert len(result.shard_files) == 2  # largest power of two <= 2 samples
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| b | `" in card and "size mismatch" in card
    assert sorted(readers.load_prepared(tmp_path / "out", "train", streaming=False)["name"]) == ["a", "c"]


def test_prepare_argument_errors_and_offline_push(tmp_path, gta5_dir, monkeypatch):
    with pytest.raises(ValueError, match="power of two"):
        prepare.prepare_dataset("gta5", gta5_dir, tmp_path / "o", num_shards=3, progress=False)
    with pytest.raises(ValueError, match="more than the 12 samples"):
        prepare.prepare_dataset("gta5", gta5_dir, tmp_path / "o", num_shards=16, progress=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        prepare.prepare_dataset("gta5", gta5_dir, tmp_path / "o", push_to_hub="me/gta5", progress=False)
    assert not (tmp_path / "o").exists()  # failed before any work
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        readers.load_prepared("me/gta5", "train")
    with pytest.raises(readers.LayoutError, match="splits found"):
        readers.load_prepared(tmp_path.parent, "validation")


def test_push_needs_a_token_before_any_work(tmp_path, gta5_dir, monkeypatch):
    """(The push itself, through the real client, is tested against the loopback Hub in tests/test_hub_datasets.py.)"""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(PermissionError, match="no token found"):
        prepare.prepare_dataset("gta5", gta5_dir, tmp_path / "o", push_to_hub="me/gta5", progress=False)
    assert not (tmp_path / "o").exists()


def test_an_interrupted_preparation_or_copy_never_loads_as_a_smaller_dataset(tmp_path, gta5_dir, monkeypatch):
    folder = tmp_path / "out"
    prepare.prepare_dataset("gta5", gta5_dir, folder, num_shards=4, progress=False)
    written = prepare._write_shard

    def fail_on_the_third(path, rows, schema):
        if "-00002-of-" in path.name:
            raise KeyboardInterrupt  # the user stops the preparation of the split again
        return written(path, rows, schema)

    monkeypatch.setattr(prepare, "_write_shard", fail_on_the_third)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset("gta5", gta5_dir, folder, num_shards=4, progress=False)
    assert sorted(path.name for path in (folder / "data").glob("*.parquet")) == []  # none visible, old or new
    with pytest.raises(readers.LayoutError, match="no parquet shards for split 'train'"):
        readers.load_prepared(folder, "train")

    monkeypatch.setattr(prepare, "_write_shard", written)
    prepare.prepare_dataset("gta5", gta5_dir, folder, num_shards=4, progress=False)
    assert sorted(path.name for path in (folder / "data").iterdir()) == [
        f"train-{i:05d}-of-00004.parquet" for i in range(4)
    ]  # the hidden partial files of the stopped run are gone too
    other = tmp_path / "other"
    prepare.prepare_dataset("gta5", gta5_dir, other, num_shards=2, progress=False)
    shutil.copy(other / "data" / "train-00000-of-00002.parquet", folder / "data")  # two preparations mixed
    with pytest.raises(readers.LayoutError, match=r"another preparation are mixed in \(train-00000-of-00002"):
        readers.load_prepared(folder, "train")
    (folder / "data" / "train-00000-of-00002.parquet").unlink()
    (folder / "data" / "train-00001-of-00004.parquet").unlink()  # a copy that lost a file
    with pytest.raises(readers.LayoutError, match=r"1 of its 4 shards are missing \(train-00001-of-00004"):
        readers.load_prepared(folder, "train")


def test_choose_num_shards_is_a_power_of_two():
    assert prepare.choose_num_shards(5, 10) == 4
    assert prepare.choose_num_shards(25_000, 60 * 2**30) == 128
    assert prepare.choose_num_shards(3000, 6 * 2**30) == 32
    for samples, size in [(1, 1), (100, 2**20), (10**6, 10**13)]:
        shards = prepare.choose_num_shards(samples, size)
        assert shards & (shards - 1) == 0 and 1 <= shards <= samples


def test_script_end_to_end(tmp_path, gta5_dir, capsys):
    # Loaded from its file: putting scripts/ on sys.path would let scripts/evaluate.py shadow the evaluate package.
    script = Path(__file__).resolve().parents[2] / "scripts" / "prepare_dataset.py"
    spec = importlib.util.spec_from_file_location("prepare_dataset_script", script)
    prepare_dataset = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_dataset)

    assert (
        prepare_dataset.main(["gta5", "--data_dir", str(gta5_dir), "--output_dir", str(tmp_path / "o")]) == 0
    )
    assert "12 kept" in capsys.readouterr().out
    from cpsl_hf.cli import run

    wrong = ["gta5", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "p")]
    assert run(prepare_dataset.main, wrong) == 2  # a bad --data_dir is a usage error
    assert "Expected layout: GTA5" in capsys.readouterr().err


def test_train_batches_have_the_contract_format_and_resize(mapped):
    loader = loading.build_train_loader(mapped, batch_size=4, image_size=(3, 5), seed=0)
    batch = next(loader)
    assert batch["pixel_values"].dtype == torch.uint8 and batch["pixel_values"].shape == (4, 3, 3, 5)
    assert batch["labels"].dtype == torch.int64 and batch["labels"].shape == (4, 3, 5)
    by_name = {example["name"]: example for example in mapped}
    for index, name in enumerate(batch["name"]):
        image, label = by_name[name]["image"], by_name[name]["label"]
        expected_image = np.asarray(image.resize((5, 3), Image.Resampling.BILINEAR))
        expected_label = np.asarray(label.resize((5, 3), Image.Resampling.NEAREST))
        np.testing.assert_array_equal(batch["pixel_values"][index].permute(1, 2, 0).numpy(), expected_image)
        np.testing.assert_array_equal(batch["labels"][index].numpy(), expected_label)
    original = next(loading.build_train_loader(mapped, batch_size=2))
    assert original["pixel_values"].shape == (2, 3, 6, 10)


def names_of(loader, count):
    return [name for _ in range(count) for name in next(loader)["name"]]


@pytest.mark.parametrize("source", ["mapped", "streaming"])
def test_epochs_cover_every_sample_and_reshuffle(source, mapped, prepared):
    dataset = mapped if source == "mapped" else readers.load_prepared(prepared, "train")
    loader = loading.build_train_loader(dataset, batch_size=3, seed=5)
    first, second = names_of(loader, 4), names_of(loader, 4)
    assert sorted(first) == sorted(second) == [f"{i:05d}" for i in range(NUM_SAMPLES)]
    assert first != second
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["batches_in_epoch"] == 4
    assert names_of(loading.build_train_loader(dataset, batch_size=3, seed=5), 4) == first


@pytest.mark.parametrize(
    ("source", "num_workers"), [("mapped", 0), ("streaming", 0), ("mapped", 2), ("streaming", 2)]
)
def test_resume_continues_at_the_exact_next_sample(source, num_workers, mapped, prepared):
    dataset = mapped if source == "mapped" else readers.load_prepared(prepared, "train")
    reference = loading.build_train_loader(dataset, batch_size=2, seed=3, process_index=1, num_processes=2)
    uninterrupted = [next(reference) for _ in range(7)]  # 3 batches per epoch: crosses two epochs
    interrupted = loading.build_train_loader(dataset, batch_size=2, seed=3, process_index=1, num_processes=2)
    for _ in range(4):
        next(interrupted)
    state = interrupted.state_dict()
    assert state["epoch"] == 1 and state["samples_in_epoch"] == 2
    resumed = loading.build_train_loader(
        dataset, batch_size=2, seed=3, num_workers=num_workers, process_index=1, num_processes=2
    )
    resumed.load_state_dict(state)
    for expected in uninterrupted[4:]:
        batch = next(resumed)
        assert batch["name"] == expected["name"]
        assert torch.equal(batch["pixel_values"], expected["pixel_values"])
        assert torch.equal(batch["labels"], expected["labels"])
    with pytest.raises(ValueError, match="seed=3 but this one has 4"):
        loading.build_train_loader(
            dataset, batch_size=2, seed=4, process_index=1, num_processes=2
        ).load_state_dict(state)


@pytest.mark.parametrize("source", ["mapped", "streaming"])
def test_two_ranks_see_disjoint_samples_that_cover_the_dataset(source, mapped, prepared):
    dataset = mapped if source == "mapped" else readers.load_prepared(prepared, "train")
    everything = sorted(f"{i:05d}" for i in range(NUM_SAMPLES))
    train = [
        names_of(loading.build_train_loader(dataset, 2, seed=1, process_index=r, num_processes=2), 3)
        for r in (0, 1)
    ]
    evaluation = [
        [
            n
            for batch in loading.build_eval_loader(dataset, 5, process_index=r, num_processes=2)
            for n in batch["name"]
        ]
        for r in (0, 1)
    ]
    for rank0, rank1 in (train, evaluation):
        assert not set(rank0) & set(rank1)
        assert sorted(rank0 + rank1) == everything


def test_eval_loader_rejects_mixed_sizes_without_image_size(tmp_path):
    root = testing.write_gta5(
        tmp_path / "g", {"a": np.zeros((4, 6), np.uint8), "b": np.zeros((5, 6), np.uint8)}
    )
    dataset = readers.load_gta5(root, cache_dir=tmp_path / "c", progress=False)
    assert [b["labels"].shape for b in loading.build_eval_loader(dataset)] == [(1, 4, 6), (1, 5, 6)]
    with pytest.raises(ValueError, match="differ in size"):
        list(loading.build_eval_loader(dataset, batch_size=2))
    resized = list(loading.build_eval_loader(dataset, batch_size=2, image_size=(8, 8)))
    assert resized[0]["pixel_values"].shape == (2, 3, 8, 8)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, prepared_dir: str, results: str):
    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    dataset = readers.load_prepared(prepared_dir, "train")
    evaluated = [n for b in loading.build_eval_loader(dataset, 2, rank, world_size) for n in b["name"]]
    trained = names_of(loading.build_train_loader(dataset, 2, seed=0, process_index=rank, num_processes=2), 3)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, {"eval": evaluated, "train": trained})
    if rank == 0:
        with open(results, "w") as handle:
            json.dump(gathered, handle)
    dist.destroy_process_group()


@pytest.mark.slow
def test_real_two_process_run_splits_the_stream(prepared, tmp_path):
    results = tmp_path / "results.json"
    args = (2, _free_port(), str(prepared), str(results))
    mp.start_processes(_distributed_worker, args=args, nprocs=2, join=True, start_method="fork")
    gathered = json.loads(results.read_text())
    everything = sorted(f"{i:05d}" for i in range(NUM_SAMPLES))
    for key in ("eval", "train"):
        rank0, rank1 = gathered[0][key], gathered[1][key]
        assert not set(rank0) & set(rank1) and sorted(rank0 + rank1) == everything
