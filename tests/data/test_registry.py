"""The dataset registry: every name loads through load_dataset exactly as its reader does, the trainer's and
the evaluator's names agree with it, and unknown names fail clearly."""

import json

import numpy as np
import pytest
from PIL import Image

from cpsl_hf.data import benchmarks, prepare, readers, registry, synthetic, testing
from cpsl_hf.data import folder as folder_reader
from cpsl_hf.data.registry import DATASETS, dataset_kind, dataset_spec, load_dataset

SYNTHETIC = {"num_images": 2, "image_size": (32, 64), "seed": 3}


def samples(dataset) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, image pixels, label pixels) of every sample, in order."""
    return [
        (example["name"], np.asarray(example["image"]), np.asarray(example["label"])) for example in dataset
    ]


def assert_same_samples(actual, expected) -> None:
    actual, expected = samples(actual), samples(expected)
    assert [name for name, _, _ in actual] == [name for name, _, _ in expected]
    assert len(actual) > 0
    for (name, image, label), (_, expected_image, expected_label) in zip(actual, expected):
        np.testing.assert_array_equal(image, expected_image, err_msg=name)
        np.testing.assert_array_equal(label, expected_label, err_msg=name)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    """Small GTA5, SYNTHIA and Cityscapes folders in their official layouts, and a prepared GTA5 folder."""
    root = tmp_path_factory.mktemp("downloads")
    rng = np.random.default_rng(0)
    gta5 = {f"{i:05d}": testing.random_label_ids("gta5", 6, 8, rng) for i in range(3)}
    synthia = {f"{i:07d}": testing.random_label_ids("synthia", 6, 8, rng) for i in range(3)}
    testing.write_gta5(root / "gta5", gta5)
    testing.write_synthia(root / "synthia", synthia)
    for split, cities in (("train", [("aachen", 0), ("bochum", 1)]), ("val", [("frankfurt", 2)])):
        maps = {
            testing.cityscapes_stem(city, index): testing.random_label_ids("cityscapes", 6, 8, rng)
            for city, index in cities
        }
        testing.write_cityscapes(root / "cityscapes", maps, split=split)
    prepare.prepare_dataset("gta5", root / "gta5", root / "gta5-prepared", num_shards=1, progress=False)
    # your own folder: images/ + masks/ whose values are GTA5's (Cityscapes label ids), with a 2-class table
    for index, label_ids in enumerate(gta5.values()):
        for sub, array in (("images", testing.random_image(6, 8, rng)), ("masks", label_ids)):
            (root / "folder" / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / "folder" / sub / f"f{index}.png")
    # the target benchmarks, one labelled image each in their official layouts
    ids = testing.random_label_ids("cityscapes", 6, 8, rng)
    for kind, image, label in (
        ("acdc", "rgb_anon/fog/val/S/a_rgb_anon.png", "gt/fog/val/S/a_gt_labelIds.png"),
        ("dark_zurich", "rgb_anon/val/night/S/a_rgb_anon.png", "gt/val/night/S/a_gt_labelIds.png"),
        ("bdd100k", "images/10k/val/a.jpg", "labels/sem_seg/masks/val/a.png"),
        ("mapillary", "validation/images/a.jpg", "validation/v1.2/labels/a.png"),
    ):
        for path, array in ((image, testing.random_image(6, 8, rng)), (label, ids % 19)):
            (root / kind / path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(root / kind / path)
    labels = [
        {"name": name} for name in ("nature--sky", "construction--flat--road", "construction--flat--sidewalk")
    ]
    labels += [
        {"name": f"object--vehicle--{name}"} for name in ("car", "truck", "bus", "on-rails", "motorcycle")
    ]
    labels += [
        {"name": name} for name in ("object--vehicle--bicycle", "human--person", "human--rider--bicyclist")
    ]
    labels += [
        {"name": f"construction--{name}"}
        for name in ("structure--building", "barrier--wall", "barrier--fence")
    ]
    labels += [
        {"name": name} for name in ("object--support--pole", "object--traffic-light", "nature--terrain")
    ]
    labels += [{"name": "object--traffic-sign--front"}, {"name": "nature--vegetation"}]
    (root / "mapillary" / "config_v1.2.json").write_text(json.dumps({"labels": labels}))
    (root / "folder.yaml").write_text("classes: [{name: road, values: [7]}, {name: car, values: [26, 27]}]")
    return {"root": root, "names": {"gta5": sorted(gta5), "synthia": sorted(synthia)}}


def load_both(name, downloads, tmp_path):
    """``(load_dataset(name, ...), the same data from the dataset's own reader)``, for every registered name."""
    root = tmp_path / "caches"
    folder = downloads["root"] / name
    if name == "synthetic":
        through = load_dataset(name, split="val", domain="target", cache_dir=root / "a", **SYNTHETIC)
        direct = synthetic.load_synthetic("target", "validation", cache_dir=root / "b", **SYNTHETIC)
    elif name == "synthetic-hard":
        through = load_dataset(name, root / "a", split="train", **SYNTHETIC)  # data_dir: the cache folder
        direct = synthetic.load_synthetic(
            "source", "train", cache_dir=root / "b", variant="hard", **SYNTHETIC
        )
    elif name == "gta5":
        through = load_dataset(name, folder, label_cache_dir=root / "a", progress=False)
        direct = readers.load_gta5(folder, cache_dir=root / "b", progress=False)
    elif name == "synthia":
        through = load_dataset(name, folder, num_classes=13, label_cache_dir=root / "a", progress=False)
        direct = readers.load_synthia(folder, num_classes=13, cache_dir=root / "b", progress=False)
    elif name == "cityscapes":
        through = load_dataset(name, folder, split="val", num_classes=16, label_cache_dir=root / "a")
        direct = readers.load_cityscapes(folder, split="val", num_classes=16, cache_dir=root / "b")
    elif name in ("acdc", "dark_zurich", "bdd100k", "mapillary"):
        through = load_dataset(name, folder, split="val", label_cache_dir=root / "a")
        reader = getattr(benchmarks, f"load_{name}")
        direct = reader(folder, "val", cache_dir=root / "b")
    elif name == "folder":
        table = downloads["root"] / "folder.yaml"
        through = load_dataset(name, folder, "train", class_table=table, label_cache_dir=root / "a")
        direct = folder_reader.load_folder(folder, table, "train", cache_dir=root / "b")
    elif name == "prepared":
        prepared = downloads["root"] / "gta5-prepared"
        through = load_dataset(name, prepared, split="train", streaming=True)
        direct = readers.load_prepared(prepared, split="train", streaming=True)
    else:
        raise AssertionError(f"no fixture for the registered dataset {name!r}: add one here")
    return through, direct


@pytest.mark.parametrize("name", DATASETS)
def test_every_registered_name_loads_the_samples_of_its_reader(name, downloads, tmp_path):
    through, direct = load_both(name, downloads, tmp_path)
    assert_same_samples(through, direct)
    assert dataset_spec(name).reader_function() is READERS[name]


READERS = {
    "synthetic": synthetic.load_synthetic,
    "synthetic-hard": synthetic.load_synthetic,
    "gta5": readers.load_gta5,
    "synthia": readers.load_synthia,
    "cityscapes": readers.load_cityscapes,
    "prepared": readers.load_prepared,
    "folder": folder_reader.load_folder,
    "acdc": benchmarks.load_acdc,
    "dark_zurich": benchmarks.load_dark_zurich,
    "bdd100k": benchmarks.load_bdd100k,
    "mapillary": benchmarks.load_mapillary,
}


def test_the_registry_holds_the_datasets_the_package_reads():
    assert set(DATASETS) == {
        "synthetic",
        "synthetic-hard",
        "gta5",
        "synthia",
        "cityscapes",
        "acdc",
        "dark_zurich",
        "bdd100k",
        "mapillary",
        "folder",
        "prepared",
    }
    assert registry.DOWNLOADS == ("gta5", "synthia", "cityscapes")
    assert readers.LAYOUTS == {name: dataset_spec(name).layout for name in ("gta5", "synthia", "cityscapes")}
    assert (
        dataset_spec("synthia").num_classes == (16, 13) and dataset_spec("synthia").default_num_classes == 16
    )
    assert dataset_spec("synthia").long_name == "SYNTHIA-RAND-CITYSCAPES"
    assert [dataset_spec(name).official_split for name in registry.DOWNLOADS] == [False, False, True]


def test_names_resolve_to_loaded_data(downloads, tmp_path):
    root = downloads["root"]
    # the same samples whatever split is asked of a dataset without an official split
    whole = load_dataset("gta5", root / "gta5", split="val", label_cache_dir=tmp_path, progress=False)
    assert sorted(whole["name"]) == downloads["names"]["gta5"]
    synthia = load_dataset("synthia", root / "synthia", label_cache_dir=tmp_path, progress=False)
    assert sorted(synthia["name"]) == downloads["names"]["synthia"]
    train_ids = np.concatenate([np.asarray(label).ravel() for label in synthia["label"]])
    assert train_ids[train_ids != 255].max() == 15  # the 16-class protocol by default
    # a Cityscapes split is the folder of that name
    train = load_dataset("cityscapes", root / "cityscapes", label_cache_dir=tmp_path, progress=False)
    assert sorted(train["name"]) == ["aachen_000000_000000", "bochum_000000_000001"]
    # streaming goes to the reader's streaming mode
    streamed = load_dataset("gta5", root / "gta5", streaming=True, progress=False)
    assert_same_samples(streamed, readers.load_gta5(root / "gta5", streaming=True, progress=False))
    # a prepared folder (or Hub id) is also a name by itself, as the trainer's --source takes it
    by_folder = load_dataset(str(root / "gta5-prepared"), streaming=True)
    assert_same_samples(by_folder, readers.load_prepared(root / "gta5-prepared", streaming=True))
    assert sorted(example["name"] for example in by_folder) == downloads["names"]["gta5"]
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):  # a Hub id goes to load_prepared
        load_dataset("someone/gta5-prepared")


def test_synthetic_options_and_data_dir(tmp_path):
    # data_dir of the synthetic shift is the folder its generated splits are kept in
    load_dataset("synthetic", tmp_path / "here", domain="source", **SYNTHETIC)
    assert [path.name.split("-")[:2] for path in (tmp_path / "here").iterdir()] == [["source", "train"]]
    # other datasets ignore the synthetic options, so one call serves every name
    with pytest.raises(ValueError, match="needs data_dir"):
        load_dataset("gta5", domain="target", cache_dir=tmp_path, **SYNTHETIC)
    with pytest.raises(TypeError, match="unexpected option.*num_image\\b"):
        load_dataset("synthetic", num_image=3)
    with pytest.raises(ValueError, match="two folders"):
        load_dataset("synthetic", tmp_path / "a", cache_dir=tmp_path / "b", **SYNTHETIC)
    with pytest.raises(ValueError, match="'hard' variant"):
        load_dataset("synthetic-hard", variant="default", **SYNTHETIC)
    with pytest.raises(ValueError, match="unknown split='test'"):
        load_dataset("synthetic", split="test", cache_dir=tmp_path, **SYNTHETIC)


def test_protocols_a_dataset_does_not_provide_are_refused(tmp_path):
    with pytest.raises(ValueError, match="synthetic provides 19 classes, got num_classes=16"):
        load_dataset("synthetic", num_classes=16, cache_dir=tmp_path, **SYNTHETIC)
    with pytest.raises(ValueError, match="synthia provides 16 or 13 classes, got num_classes=19"):
        load_dataset("synthia", tmp_path, num_classes=19)


def test_a_download_without_data_dir_names_its_layout(tmp_path):
    with pytest.raises(ValueError, match="'cityscapes' needs data_dir.*leftImg8bit/\\{split\\}"):
        load_dataset("cityscapes")
    with pytest.raises(ValueError, match="'prepared' needs data_dir.*prepare_dataset.py"):
        load_dataset("prepared")
    with pytest.raises(readers.LayoutError, match="Expected layout: GTA5: DATA_DIR/images"):
        load_dataset("gta5", tmp_path / "missing")


@pytest.mark.parametrize("call", [dataset_spec, load_dataset])
def test_unknown_names_say_what_is_accepted(call):
    with pytest.raises(ValueError) as raised:
        call("gta6")
    message = str(raised.value)
    assert "unknown dataset 'gta6'" in message
    for name in DATASETS:
        assert name in message
    assert "a folder written by scripts/prepare_dataset.py" in message and "owner/name" in message


def test_dataset_kind_tells_the_forms_of_a_name_apart(tmp_path):
    assert [dataset_kind(name) for name in DATASETS] == list(DATASETS)
    assert dataset_kind(str(tmp_path)) == "prepared_dir"
    assert dataset_kind("someone/gta5-prepared") == "hub"
    assert dataset_kind("gta6") == "unknown"
    assert dataset_kind("synthetic-hard", known=("synthetic",)) == "unknown"
    assert dataset_spec(str(tmp_path)).loader == "prepared" and not dataset_spec(str(tmp_path)).needs_data_dir
    assert dataset_spec("prepared").needs_data_dir


def test_the_trainer_accepts_exactly_the_names_and_protocols_the_registry_loads(downloads, tmp_path):
    from cpsl_hf.training import arguments
    from cpsl_hf.training.arguments import ConfigurationError, parse_args

    assert set(arguments.KNOWN_DATASETS) <= set(DATASETS)
    assert arguments.KNOWN_DATASETS == (
        "synthetic",
        "gta5",
        "synthia",
        "cityscapes",
        "acdc",
        "dark_zurich",
        "bdd100k",
        "mapillary",
        "folder",
    )
    assert (
        arguments.dataset_kind("folder") == "folder"
    )  # its classes come from --class_table (test_folder_run)
    for name in ("synthetic", "gta5", "synthia", "cityscapes"):
        assert arguments.dataset_kind(name) == name
        for num_classes in (19, 16, 13):
            folder = downloads["root"] / name
            argv = ["--num_classes", str(num_classes), "--crop_size", "32", "32"]
            for flag in ("source", "target"):
                argv += [f"--{flag}", name] + ([f"--{flag}_dir", str(folder)] if name != "synthetic" else [])
            try:
                parse_args(argv)
                accepted = True
            except ConfigurationError as error:
                assert "disagrees" in str(error)
                accepted = False
            try:
                load_dataset(
                    name,
                    folder if name != "synthetic" else None,
                    num_classes=num_classes,
                    label_cache_dir=tmp_path,
                    progress=False,
                    cache_dir=tmp_path,
                    **SYNTHETIC,
                )
                loaded = True
            except ValueError as error:
                assert "provides" in str(error)
                loaded = False
            assert accepted == loaded, (name, num_classes)
    # the trainer takes a prepared dataset by its folder or repo id, not by the evaluator's names
    assert arguments.dataset_kind(str(downloads["root"] / "gta5-prepared")) == "prepared_dir"
    assert arguments.dataset_kind("someone/gta5-prepared") == "hub"
    assert arguments.dataset_kind("synthetic-hard") == "unknown"
    with pytest.raises(ConfigurationError, match="--source: unknown dataset 'gta6'"):
        parse_args(["--source", "gta6"])


def test_the_evaluator_reads_the_registry(downloads, tmp_path):
    from cpsl_hf import evaluation

    assert evaluation.DATASETS == DATASETS
    folder = downloads["root"] / "cityscapes"
    evaluated = evaluation.load_eval_dataset("cityscapes", folder, "val", 13, tmp_path / "a", progress=False)
    assert_same_samples(evaluated, readers.load_cityscapes(folder, "val", 13, cache_dir=tmp_path / "b"))
    prepared = evaluation.load_eval_dataset("prepared", downloads["root"] / "gta5-prepared", "train")
    assert_same_samples(prepared, readers.load_prepared(downloads["root"] / "gta5-prepared", "train"))
    with pytest.raises(ValueError, match="--dataset 'gta6': expected one of"):
        evaluation.load_eval_dataset("gta6", folder)
