"""Your own datasets end to end: two folders of images and masks and a class table of 7 coarse classes go through
warm-up -> CPSL -> evaluation -> export; the exported model, its metrics, its strips and its card use the table."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from training_helpers import run, tiny_argv

from cpsl_hf.data import protocols
from cpsl_hf.data.synthetic import COARSE_CATEGORIES, generate_synthetic, write_synthetic_folders
from cpsl_hf.training.arguments import ConfigurationError, parse_args

REPOSITORY = Path(__file__).resolve().parents[2]
COARSE = [name for name, _ in COARSE_CATEGORIES]
# Cityscapes' own category of each of the 19 classes, written out (independent of the class table's values)
CATEGORY_OF = {
    "road": "flat", "sidewalk": "flat", "building": "construction", "wall": "construction",
    "fence": "construction", "pole": "object", "traffic light": "object", "traffic sign": "object",
    "vegetation": "nature", "terrain": "nature", "sky": "sky", "person": "human", "rider": "human",
    "car": "vehicle", "truck": "vehicle", "bus": "vehicle", "train": "vehicle", "motorcycle": "vehicle",
    "bicycle": "vehicle",
}  # fmt: skip


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_synthetic_folders(tmp_path_factory.mktemp("coarse"), 8, 4, (32, 64), seed=0)


def folder_argv(folders, output_dir, cache, *extra):
    return tiny_argv(
        output_dir,
        cache,
        "--source", "folder", "--source_dir", str(folders / "source"),
        "--target", "folder", "--target_dir", str(folders / "target"),
        "--class_table", str(folders / "classes.yaml"),
        "--save_predictions", "2",
        *extra,
    )  # fmt: skip


def test_written_folders_hold_the_synthetic_scenes_as_label_ids(folders):
    images, labels, names = generate_synthetic("target", "validation", 4, (32, 64), 0)
    to_label_id = protocols.train_id_to_label_id(19)
    for image, label, name in zip(images, labels, names):
        saved = np.asarray(Image.open(folders / "target" / "val" / "images" / f"{name}.png"))
        mask = np.asarray(Image.open(folders / "target" / "val" / "masks" / f"{name}.png"))
        assert (saved == image).all() and (mask == to_label_id[label]).all()


def test_seven_coarse_classes_train_evaluate_and_export(folders, tmp_path):
    from transformers import AutoConfig

    from cpsl_hf.data.registry import load_dataset

    output = tmp_path / "run"
    trainer = run(folder_argv(folders, output, tmp_path / "cache"))
    assert trainer.num_classes == 7 and trainer.class_names == COARSE

    # the target's masks decode to the categories of the scenes' classes
    target_val = load_dataset("folder", folders / "target", "val", class_table=folders / "classes.yaml")
    _, labels, names = generate_synthetic("target", "validation", 4, (32, 64), 0)
    category_id = np.array([COARSE.index(CATEGORY_OF[name]) for name in protocols.class_names(19)], np.uint8)
    by_name = {row["name"]: np.asarray(row["label"]) for row in target_val}
    for label, name in zip(labels, names):
        assert (by_name[name] == category_id[label]).all()

    config = AutoConfig.from_pretrained(output)
    assert config.num_labels == 7
    assert [config.id2label[index] for index in range(7)] == COARSE
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["final"]["class_names"] == COARSE
    assert len(metrics["final"]["per_category_iou"]) == 7
    assert metrics["history"]["cpsl"]["4"]["student"]["class_names"] == COARSE
    card = (output / "README.md").read_text()
    for name in COARSE:
        assert f"| {name} |" in card
    assert "source (folder) to target (folder)" in card  # the folders by name
    # the strips are drawn in the table's palette: the ground-truth and prediction panels (below the caption
    # bar, after the 64-pixel image panel and 4-pixel gaps) hold only table colours (black: ignored)
    strip = np.asarray(Image.open(sorted((output / "predictions").glob("*.png"))[0]).convert("RGB"))
    table_colours = {tuple(color) for _, color in COARSE_CATEGORIES} | {(0, 0, 0)}
    for left in (68, 136):
        panel = {tuple(pixel) for pixel in strip[-32:, left : left + 64].reshape(-1, 3).tolist()}
        assert panel <= table_colours
    ground_truth = {tuple(pixel) for pixel in strip[-32:, 68:132].reshape(-1, 3).tolist()}
    assert len(ground_truth - {(0, 0, 0)}) >= 3


def test_class_table_errors_before_training(folders, tmp_path):
    base = folder_argv(folders, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(
        ConfigurationError, match=r"--num_classes 19 disagrees with --class_table .*7 classes"
    ):
        parse_args([*base, "--num_classes", "19"])
    assert parse_args([*base, "--num_classes", "7"]).data.num_classes == 7
    without = [word for word in base if word not in ("--class_table", str(folders / "classes.yaml"))]
    with pytest.raises(ConfigurationError, match="--source folder needs --class_table FILE"):
        parse_args(without)
    bad = tmp_path / "bad.yaml"
    bad.write_text("classes: [{name: a, values: [1]}, {name: a, values: [2]}]")
    with pytest.raises(ConfigurationError, match=r"--class_table .*bad\.yaml: classes\[1\]\.name: duplicate"):
        parse_args([*base, "--class_table", str(bad)])
    other = tmp_path / "other.yaml"
    other.write_text("classes: [{name: lake, values: [1]}]")
    with pytest.raises(ConfigurationError, match=r"--target_class_table .*share no class name"):
        parse_args([*base, "--target_class_table", str(other)])
    with pytest.raises(
        ConfigurationError, match="--source synthetic is read as a built-in Cityscapes protocol"
    ):
        parse_args([*base, "--source", "synthetic"])


def test_target_with_its_own_table_is_mapped_by_name(folders, tmp_path, caplog):
    # the target's table: 'human' and 'vehicle' merged into 'agent' (target only); 'human' and 'vehicle'
    # are then source only. Its other classes keep their names and values.
    from cpsl_hf.data.class_table import load_class_table

    coarse = load_class_table(folders / "classes.yaml").to_dict()
    classes = [entry for entry in coarse["classes"] if entry["name"] not in ("human", "vehicle")]
    merged = [
        value
        for entry in coarse["classes"]
        if entry["name"] in ("human", "vehicle")
        for value in entry["values"]
    ]
    classes.append({"name": "agent", "values": merged, "color": [250, 170, 30]})
    target_table = tmp_path / "target.json"
    target_table.write_text(json.dumps({"void_values": coarse["void_values"], "classes": classes}))
    argv = folder_argv(
        folders, tmp_path / "run", tmp_path / "cache", "--target_class_table", str(target_table)
    )
    with caplog.at_level("WARNING"):
        args = parse_args(argv)
    assert "source only" in caplog.text and "human, vehicle" in caplog.text and "agent" in caplog.text
    from cpsl_hf.training.building import load_domain_dataset

    decoded = load_domain_dataset(args, "target", "val")
    _, labels, names = generate_synthetic("target", "validation", 4, (32, 64), 0)
    expected_name = [CATEGORY_OF[name] for name in protocols.class_names(19)]
    expected = np.array(
        [255 if n in ("human", "vehicle") else COARSE.index(n) for n in expected_name], np.uint8
    )
    by_name = {row["name"]: np.asarray(row["label"]) for row in decoded}
    for label, name in zip(labels, names):
        assert (by_name[name] == expected[label]).all()


def test_readme_class_table_and_command(folders, tmp_path):
    """The README's "Your own datasets" table loads as it is, and its training command parses with it."""
    import re
    import shlex

    from cpsl_hf.data.class_table import load_class_table

    readme = (REPOSITORY / "README.md").read_text()
    section = readme.split("### Your own datasets", 1)[1].split("\n### ", 1)[0]
    (yaml_block,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    assert len(yaml_block.strip().splitlines()) <= 10
    table_file = tmp_path / "classes.yaml"
    table_file.write_text(yaml_block)
    table = load_class_table(table_file)
    assert table.names == ("impervious", "building", "low vegetation", "tree", "car", "clutter")
    assert table.lookup_table()[[0, 1, 6, 7, 8]].tolist() == [255, 0, 5, 5, 255]
    (bash_block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    command = shlex.split(re.sub(r"\[[^\]]*\]", " ", bash_block.replace("\\\n", " ")))
    assert command[:3] == ["accelerate", "launch", "scripts/train.py"]
    places = {"/data/potsdam": str(folders / "source"), "/data/vaihingen": str(folders / "target")}
    places["classes.yaml"] = str(table_file)
    args = parse_args([places.get(word, word) for word in command[3:]] + ["--crop_size", "32", "32"])
    assert args.data.num_classes == 6 and args.data.source == args.data.target == "folder"
    assert args.training.output_dir == str(
        Path("outputs") / "source_to_target_segformer-tiny"
    )  # folder names


def test_prepared_folder_trains_with_its_class_table(folders, tmp_path):
    """A folder prepared once as parquet (scripts/prepare_dataset.py folder) is a target like any prepared one."""
    from cpsl_hf.data.prepare import prepare_dataset
    from cpsl_hf.training.building import load_domain_dataset

    table = str(folders / "classes.yaml")
    for split in ("train", "val"):
        prepare_dataset("folder", folders / "target", tmp_path / "prepared", split=split, class_table=table)
    argv = folder_argv(folders, tmp_path / "run", tmp_path / "cache", "--target", str(tmp_path / "prepared"))
    args = parse_args(argv)
    assert args.data.num_classes == 7
    prepared = {row["name"]: np.asarray(row["label"]) for row in load_domain_dataset(args, "target", "val")}
    _, labels, names = generate_synthetic("target", "validation", 4, (32, 64), 0)
    category_id = np.array([COARSE.index(CATEGORY_OF[name]) for name in protocols.class_names(19)], np.uint8)
    assert set(prepared) == set(names)
    for label, name in zip(labels, names):
        assert (prepared[name] == category_id[label]).all()


def test_unlabelled_target_train_split_adapts(tmp_path):
    """Dark Zurich's target train split has no ground truth (labels all ignored): the run adapts on it and
    scores its labelled val split."""
    root = tmp_path / "dark_zurich"
    images, labels, names = generate_synthetic("target", "validation", 6, (32, 64), 1)
    to_label_id = protocols.train_id_to_label_id(19)
    for index, (image, label, name) in enumerate(zip(images, labels, names)):
        split = "train" if index < 4 else "val"
        folder = root / "rgb_anon" / split / "night" / "GOPR0001"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{name}_rgb_anon.png")
        if split == "val":
            gt = root / "gt" / "val" / "night" / "GOPR0001"
            gt.mkdir(parents=True, exist_ok=True)
            Image.fromarray(to_label_id[label]).save(gt / f"{name}_gt_labelIds.png")
    argv = tiny_argv(
        tmp_path / "run", tmp_path / "cache", "--target", "dark_zurich", "--target_dir", str(root)
    )
    trainer = run(argv)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["final"]["num_images"] == 2 and trainer.step == 4
    assert 0.0 <= metrics["final"]["mean_iou"] <= 1.0
