"""ACDC, Dark Zurich, BDD100K and Mapillary Vistas readers on generated fixtures in each official layout: exact
train ids against an independent decoding, conditions and times, unlabelled splits, layout errors, the registry."""

import json

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as CITYSCAPES_LABELS
from PIL import Image

from cpsl_hf.data import benchmarks
from cpsl_hf.data.readers import BadSampleError, LayoutError
from cpsl_hf.data.registry import load_dataset

NAMES_19 = [
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
]  # fmt: skip
NAMES_16 = [name for name in NAMES_19 if name not in ("terrain", "truck", "train")]


def label_id_to_name():
    """Cityscapes label id -> class name, for the 19 evaluated classes (straight from cityscapesscripts)."""
    return {label.id: label.name for label in CITYSCAPES_LABELS if label.name in NAMES_19}


def expected_from_names(raw: np.ndarray, value_to_name: dict[int, str], names=NAMES_19) -> np.ndarray:
    index = {name: i for i, name in enumerate(names)}
    flat = [index.get(value_to_name.get(int(v), ""), 255) for v in raw.ravel()]
    return np.array(flat, dtype=np.uint8).reshape(raw.shape)


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def image(rng, height=6, width=8):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def rows(dataset):
    return {row["name"]: np.asarray(row["label"]) for row in dataset}


@pytest.fixture(scope="module")
def acdc(tmp_path_factory):
    root = tmp_path_factory.mktemp("acdc")
    rng = np.random.default_rng(0)
    raw = {}
    for condition in ("fog", "night"):
        for split in ("train", "val"):
            for index in range(2):
                stem = f"GOPR04{index}{condition[0]}_frame_{index:06d}"
                save(
                    root / "rgb_anon" / condition / split / f"GOPR04{index}" / f"{stem}_rgb_anon.png",
                    image(rng),
                )
                ids = rng.integers(0, 34, (6, 8)).astype(np.uint8)
                ids[0, 0] = 200  # outside the Cityscapes table: counted
                save(root / "gt" / condition / split / f"GOPR04{index}" / f"{stem}_gt_labelIds.png", ids)
                raw[(condition, split, stem)] = ids
        save(
            root / "rgb_anon" / condition / "test" / "GOPR0999" / f"t{condition}_rgb_anon.png",
            image(rng, 5, 7),
        )
    return root, raw


def test_acdc_every_condition_exact_train_ids(acdc, tmp_path):
    root, raw = acdc
    dataset, report = benchmarks.load_acdc(root, "val", return_report=True, cache_dir=tmp_path)
    decoded = rows(dataset)
    expected = {stem: ids for (condition, split, stem), ids in raw.items() if split == "val"}
    assert set(decoded) == set(expected)  # both conditions found
    for stem, ids in expected.items():
        assert (decoded[stem] == expected_from_names(ids, label_id_to_name())).all()
    assert report.out_of_table_pixels == {200: 4} and report.out_of_table_samples == 4
    night = rows(benchmarks.load_acdc(root, "val", conditions=["night"], cache_dir=tmp_path))
    assert set(night) == {stem for (condition, split, stem) in raw if condition == "night" and split == "val"}
    sixteen = rows(benchmarks.load_acdc(root, "train", num_classes=16, cache_dir=tmp_path))
    for (_, split, stem), ids in raw.items():
        if split == "train":
            assert (sixteen[stem] == expected_from_names(ids, label_id_to_name(), NAMES_16)).all()


def test_acdc_test_split_is_unlabelled_and_errors_name_the_layout(acdc, tmp_path):
    root, _ = acdc
    test = rows(benchmarks.load_acdc(root, "test", cache_dir=tmp_path))
    assert set(test) == {"tfog", "tnight"}
    assert all(label.shape == (5, 7) and (label == 255).all() for label in test.values())
    with pytest.raises(ValueError, match="unknown condition"):
        benchmarks.load_acdc(root, "val", conditions=["hail"])
    with pytest.raises(LayoutError, match=r"missing folder\(s\) rgb_anon/rain/val/.*Expected layout: ACDC"):
        benchmarks.load_acdc(root, "val", conditions=["rain"])
    with pytest.raises(LayoutError, match="missing folder rgb_anon/"):
        benchmarks.load_acdc(tmp_path, "val")


def test_acdc_bad_pairs(tmp_path):
    rng = np.random.default_rng(1)
    base = tmp_path / "acdc"
    save(base / "rgb_anon" / "snow" / "val" / "S" / "a_rgb_anon.png", image(rng))
    save(base / "rgb_anon" / "snow" / "val" / "S" / "b_rgb_anon.png", image(rng))
    save(base / "gt" / "snow" / "val" / "S" / "b_gt_labelIds.png", np.zeros((6, 9), np.uint8))
    with pytest.raises(BadSampleError) as caught:
        benchmarks.load_acdc(base, "val", cache_dir=tmp_path / "c")
    reasons = {bad.name: bad.reason for bad in caught.value.bad_samples}
    assert reasons["a"] == "missing mask" and "size mismatch" in reasons["b"]


def test_dark_zurich_splits_and_times(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "dz"
    for time in ("day", "night"):
        save(root / "rgb_anon" / "train" / time / "GOPR0348" / f"{time}1_rgb_anon.png", image(rng))
    ids = rng.integers(0, 34, (6, 8)).astype(np.uint8)
    save(root / "rgb_anon" / "val" / "night" / "GOPR0356" / "v1_rgb_anon.png", image(rng))
    save(root / "gt" / "val" / "night" / "GOPR0356" / "v1_gt_labelIds.png", ids)
    save(root / "rgb_anon" / "test" / "night" / "GOPR0364" / "t1_rgb_anon.png", image(rng))
    cache = tmp_path / "c"
    train = rows(benchmarks.load_dark_zurich(root, "train", cache_dir=cache))
    assert list(train) == ["night1"] and (train["night1"] == 255).all()  # night by default, unlabelled
    both = rows(benchmarks.load_dark_zurich(root, "train", times=("day", "night"), cache_dir=cache))
    assert set(both) == {"day1", "night1"}
    val = rows(benchmarks.load_dark_zurich(root, "val", cache_dir=cache))
    assert (val["v1"] == expected_from_names(ids, label_id_to_name())).all()
    assert (rows(benchmarks.load_dark_zurich(root, "test", cache_dir=cache))["t1"] == 255).all()
    with pytest.raises(LayoutError, match=r"missing folder rgb_anon/train/twilight/.*Dark Zurich"):
        benchmarks.load_dark_zurich(root, "train", times=("twilight",))


def test_bdd100k_train_ids(tmp_path):
    rng = np.random.default_rng(3)
    root = tmp_path / "bdd"
    masks = {}
    for index in range(2):
        save(root / "images" / "10k" / "val" / f"7d06fefd-f7be05a{index}.jpg", image(rng))
        mask = rng.choice(np.array([*range(19), 255], dtype=np.uint8), size=(6, 8))
        save(root / "labels" / "sem_seg" / "masks" / "val" / f"7d06fefd-f7be05a{index}.png", mask)
        masks[f"7d06fefd-f7be05a{index}"] = mask
    by_train_id = dict(enumerate(NAMES_19))
    for num_classes, names in ((19, NAMES_19), (16, NAMES_16)):
        decoded = rows(
            benchmarks.load_bdd100k(root, "val", num_classes=num_classes, cache_dir=tmp_path / "c")
        )
        for stem, mask in masks.items():
            assert (decoded[stem] == expected_from_names(mask, by_train_id, names)).all()
    with pytest.raises(LayoutError, match=r"missing folder labels/sem_seg/masks/train/"):
        save(root / "images" / "10k" / "train" / "x.jpg", image(rng))
        benchmarks.load_bdd100k(root, "train")


# A Mapillary label list in a shuffled order with the mapping the field uses, written out by hand.
MAPILLARY = {
    "nature--sky": "sky", "animal--bird": None, "construction--flat--road": "road",
    "marking--general": "road", "construction--flat--crosswalk-plain": "road",
    "construction--flat--sidewalk": "sidewalk", "construction--barrier--curb": "sidewalk",
    "construction--structure--building": "building", "construction--barrier--wall": "wall",
    "construction--barrier--fence": "fence", "object--support--pole": "pole", "object--street-light": "pole",
    "object--traffic-light": "traffic light", "object--traffic-sign--front": "traffic sign",
    "object--traffic-sign--back": None, "nature--vegetation": "vegetation", "nature--terrain": "terrain",
    "human--person": "person", "human--rider--bicyclist": "rider", "human--rider--motorcyclist": "rider",
    "object--vehicle--car": "car", "object--vehicle--truck": "truck", "object--vehicle--bus": "bus",
    "object--vehicle--on-rails": "train", "object--vehicle--motorcycle": "motorcycle",
    "object--vehicle--bicycle": "bicycle", "void--ego-vehicle": None, "object--vehicle--caravan": None,
}  # fmt: skip


@pytest.mark.parametrize("version", ["v1.2", "v2.0"])
def test_mapillary_labels_mapped_by_name(tmp_path, version):
    rng = np.random.default_rng(4)
    root = tmp_path / "mapillary"
    names = list(MAPILLARY)
    root.mkdir()
    (root / f"config_{version}.json").write_text(json.dumps({"labels": [{"name": n} for n in names]}))
    value_to_name = {index: MAPILLARY[name] for index, name in enumerate(names) if MAPILLARY[name]}
    mask = rng.integers(0, len(names), (6, 8)).astype(np.uint8)
    save(root / "validation" / "images" / "abc.jpg", image(rng))
    save(root / "validation" / version / "labels" / "abc.png", mask)
    decoded = rows(benchmarks.load_mapillary(root, "val", version=version, cache_dir=tmp_path / "c"))
    assert (decoded["abc"] == expected_from_names(mask, value_to_name)).all()
    with pytest.raises(LayoutError, match="missing folder training/images/"):
        benchmarks.load_mapillary(root, "train", version=version)
    other = "v2.0" if version == "v1.2" else "v1.2"
    with pytest.raises(LayoutError, match=f"missing folder validation/{other}/labels/"):
        benchmarks.load_mapillary(root, "val", version=other)
    (root / "validation" / other / "labels").mkdir(parents=True)
    with pytest.raises(LayoutError, match=f"missing config_{other}.json"):
        benchmarks.load_mapillary(root, "val", version=other)


def test_registry_and_trainer_accept_the_benchmarks(acdc, tmp_path):
    from cpsl_hf.training.arguments import parse_args

    root, _ = acdc
    through = rows(load_dataset("acdc", root, "val", label_cache_dir=tmp_path / "a"))
    direct = rows(benchmarks.load_acdc(root, "val", cache_dir=tmp_path / "b"))
    assert through.keys() == direct.keys() and all((through[k] == direct[k]).all() for k in direct)
    args = parse_args(["--source", "synthetic", "--target", "acdc", "--target_dir", str(root)])
    assert args.data.target == "acdc" and args.data.num_classes == 19
    from cpsl_hf.training.building import load_domain_dataset

    argv = ["--target", "acdc", "--target_dir", str(root), "--acdc_conditions", "night"]
    night = rows(load_domain_dataset(parse_args(argv), "target", "val"))
    assert set(night) == {stem for stem in direct if stem.startswith("GOPR04") and stem[7] == "n"}
    assert set(direct) - set(night)  # the fog images are left out
    with pytest.raises(ValueError, match="--acdc_conditions hail: expected some of fog, night, rain, snow"):
        parse_args([*argv[:-1], "hail"])


def test_evaluate_script_on_acdc_conditions(acdc, tmp_path):
    import importlib.util
    from pathlib import Path

    import torch

    from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation

    root, _ = acdc
    torch.manual_seed(0)
    config = CPSLConfig.from_preset(
        "segformer-tiny",
        num_labels=19,
        depths=[1, 1, 1, 1],
        hidden_sizes=[8, 16, 32, 64],
        decoder_hidden_size=32,
    )
    CPSLForSemanticSegmentation(config).save_pretrained(tmp_path / "model")
    script = Path(__file__).resolve().parents[2] / "scripts" / "evaluate.py"
    spec = importlib.util.spec_from_file_location("evaluate_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["--model", str(tmp_path / "model"), "--dataset", "acdc", "--data_dir", str(root), "--no_progress"]
    argv += ["--cache_dir", str(tmp_path / "c"), "--image_size", "64,64"]  # the fixture images are 6 x 8
    assert module.main(argv)["num_images"] == 4  # val of fog and night
    night = module.main([*argv, "--acdc_conditions", "night"])
    assert night["num_images"] == 2 and night["dataset"] == "acdc" and night["class_names"] == NAMES_19
