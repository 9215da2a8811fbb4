"""The generic folder dataset: layouts, mask formats, unknown values per file, bad pairs, mappings, registry."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from cpsl_hf.data.class_table import ClassTable, map_class_tables
from cpsl_hf.data.folder import load_folder, scan_folder
from cpsl_hf.data.readers import BadSampleError, LayoutError
from cpsl_hf.data.registry import load_dataset

# flat <- 10, 11; vehicle <- 70; sky <- 300 (16-bit only); void 0
TABLE = ClassTable(
    names=("flat", "vehicle", "sky"),
    values=((10, 11), (70,), (23,)),
    void_values=(0,),
    colors=((128, 64, 128), (0, 0, 142), (70, 130, 180)),
    void_colors=((0, 0, 0),),
)
VALUE_TO_ID = {10: 0, 11: 0, 70: 1, 23: 2}  # written out by hand, independent of the table's lookup


def expected_train_ids(values: np.ndarray, value_to_id=VALUE_TO_ID) -> np.ndarray:
    flat = [value_to_id.get(int(v), 255) for v in values.ravel()]
    return np.array(flat, dtype=np.uint8).reshape(values.shape)


def random_values(rng, shape, choices=(0, 10, 11, 70, 23)) -> np.ndarray:
    return rng.choice(np.array(choices, dtype=np.uint8), size=shape)


def write_pair(root, stem, values, image_ext=".png", rng=None, mask_mode="L"):
    rng = rng or np.random.default_rng(0)
    image_path = root / "images" / f"{stem}{image_ext}"
    mask_path = root / "masks" / f"{stem}.png"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    height, width = values.shape[:2]
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(image_path)
    if mask_mode == "P":
        mask = Image.fromarray(values.astype(np.uint8), mode="P")
        mask.putpalette((np.arange(768) * 53 % 256).astype(np.uint8).tobytes())  # colours are not the values
        mask.save(mask_path)
    else:
        Image.fromarray(values).save(mask_path)
    return image_path, mask_path


def rows(dataset):
    return {row["name"]: np.asarray(row["label"]) for row in dataset}


def test_default_layout_nested_any_extension_exact_train_ids(tmp_path):
    rng = np.random.default_rng(1)
    maps = {"a": random_values(rng, (6, 8)), "city/b": random_values(rng, (5, 7)), "city/deep/c": None}
    maps["city/deep/c"] = random_values(rng, (4, 4))
    maps["city/deep/c"][0, :3] = [5, 5, 200]  # unknown values: 5 twice, 200 once
    for index, (stem, values) in enumerate(maps.items()):
        write_pair(tmp_path, stem, values, image_ext=(".png", ".jpg", ".bmp")[index], rng=rng)
    dataset, report = load_folder(tmp_path, TABLE, return_report=True, cache_dir=tmp_path / "cache")
    decoded = rows(dataset)
    assert set(decoded) == {"a", "city__b", "city__deep__c"}
    for stem, values in maps.items():
        assert (decoded[stem.replace("/", "__")] == expected_train_ids(values)).all()
    assert report.num_found == report.num_kept == 3
    mask_c = str(tmp_path / "masks" / "city" / "deep" / "c.png")
    assert report.unknown_by_file == {mask_c: {"5": 2, "200": 1}}  # void value 0 is not reported
    assert report.out_of_table_pixels == {5: 2, 200: 1}
    all_ids = np.concatenate([expected_train_ids(v).ravel() for v in maps.values()])
    assert report.class_pixels == [int((all_ids == k).sum()) for k in range(3)]
    assert report.ignored_pixels == int((all_ids == 255).sum())
    assert "c.png: 5: 2 px, 200: 1 px" in report.summary()


def test_split_layout_and_folder_without_splits(tmp_path):
    rng = np.random.default_rng(2)
    train, val = random_values(rng, (4, 6)), random_values(rng, (4, 6))
    write_pair(tmp_path / "train", "x", train, rng=rng)
    write_pair(tmp_path / "val", "y", val, rng=rng)
    decoded = rows(load_folder(tmp_path, TABLE, split="val", cache_dir=tmp_path / "cache"))
    assert list(decoded) == ["y"] and (decoded["y"] == expected_train_ids(val)).all()
    with pytest.raises(LayoutError, match=r"no folder test/images/ \(or images/\); splits found: train, val"):
        load_folder(tmp_path, TABLE, split="test")
    flat = tmp_path / "flat"
    write_pair(flat, "z", train, rng=rng)
    for split in (None, "train", "val"):  # no splits: the whole folder, whatever split
        assert list(rows(load_folder(flat, TABLE, split=split, cache_dir=tmp_path / "cache"))) == ["z"]


def test_a_missing_evaluation_split_warns(tmp_path, caplog):
    write_pair(tmp_path, "z", random_values(np.random.default_rng(2), (4, 6)))
    with caplog.at_level("WARNING", logger="cpsl_hf.data.folder"):
        load_folder(tmp_path, TABLE, split="val", cache_dir=tmp_path / "cache")
    assert "has no val/ split folder: split 'val' reads the whole folder" in caplog.text


def test_16_bit_and_palette_masks(tmp_path):
    table = ClassTable(names=("low", "high"), values=((3,), (40000,)), void_values=(0,))
    values16 = np.array([[3, 40000, 0, 5000]], dtype=np.uint16).repeat(3, axis=0)
    write_pair(tmp_path, "sixteen", values16)
    assert Image.open(tmp_path / "masks" / "sixteen.png").mode.startswith("I;16")
    palette_values = random_values(np.random.default_rng(3), (5, 5))
    write_pair(tmp_path / "p", "pal", palette_values, mask_mode="P")
    decoded16, report = load_folder(tmp_path, table, return_report=True, cache_dir=tmp_path / "cache")
    assert np.asarray(decoded16[0]["label"]).tolist() == [[0, 1, 255, 255]] * 3
    assert report.unknown_by_file == {str(tmp_path / "masks" / "sixteen.png"): {"5000": 3}}
    decoded_p = rows(load_folder(tmp_path / "p", TABLE, cache_dir=tmp_path / "cache"))
    assert (decoded_p["pal"] == expected_train_ids(palette_values)).all()  # indices, never the colours


def test_colour_coded_masks_round_trip(tmp_path):
    rng = np.random.default_rng(4)
    train_ids = rng.integers(0, 3, (6, 9)).astype(np.uint8)
    colours = TABLE.palette[train_ids]
    colours[0, 0] = (0, 0, 0)  # void colour
    colours[1, :2] = (1, 2, 3)  # unknown colour
    write_pair(tmp_path, "rgb", colours, rng=rng)
    dataset, report = load_folder(tmp_path, TABLE, return_report=True, cache_dir=tmp_path / "cache")
    expected = train_ids.copy()
    expected[0, 0] = 255
    expected[1, :2] = 255
    assert (np.asarray(dataset[0]["label"]) == expected).all()
    assert report.unknown_by_file == {str(tmp_path / "masks" / "rgb.png"): {"#010203": 2}}
    with pytest.raises(BadSampleError, match="mask has mode RGB; expected a label-value PNG"):
        load_folder(tmp_path, TABLE, label_format="values", cache_dir=tmp_path / "cache")


def test_bad_pairs_are_all_listed_or_skipped(tmp_path):
    rng = np.random.default_rng(5)
    good = random_values(rng, (4, 4))
    write_pair(tmp_path, "good", good, rng=rng)
    image, mask = write_pair(tmp_path, "missing", good, rng=rng)
    mask.unlink()
    _, truncated = write_pair(tmp_path, "truncated", good, rng=rng)
    truncated.write_bytes(truncated.read_bytes()[:-20])
    image, mask = write_pair(tmp_path, "mismatch", good, rng=rng)
    Image.fromarray(np.zeros((4, 5), dtype=np.uint8)).save(mask)
    Image.fromarray(good).save(tmp_path / "masks" / "orphan.png")
    with pytest.raises(BadSampleError) as caught:
        load_folder(tmp_path, TABLE, cache_dir=tmp_path / "cache")
    reasons = {bad.name: bad.reason for bad in caught.value.bad_samples}
    assert set(reasons) == {"missing", "truncated", "mismatch", "orphan"}
    assert reasons["missing"] == "missing mask"
    assert "truncated PNG" in reasons["truncated"]
    assert "size mismatch" in reasons["mismatch"] and "is 4x4 but the mask is 5x4" in reasons["mismatch"]
    assert reasons["orphan"] == "mask without an image"
    assert str(tmp_path / "masks" / "missing.png") in str(caught.value)
    dataset, report = load_folder(
        tmp_path, TABLE, on_bad_sample="skip", return_report=True, cache_dir=tmp_path / "cache"
    )
    assert list(rows(dataset)) == ["good"] and report.num_found == 4 and report.num_skipped == 4


def test_pattern_and_list_file_layouts(tmp_path):
    rng = np.random.default_rng(6)
    values = {"n1": random_values(rng, (3, 5)), "n2": random_values(rng, (3, 5))}
    for name, array in values.items():
        (tmp_path / "rgb" / "train").mkdir(parents=True, exist_ok=True)
        (tmp_path / "gt" / "train").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (3, 5, 3), dtype=np.uint8)).save(
            tmp_path / "rgb" / "train" / f"{name}.jpg"
        )
        Image.fromarray(array).save(tmp_path / "gt" / "train" / f"{name}_label.png")
    dataset = load_folder(
        tmp_path,
        TABLE,
        split="train",
        image_pattern="rgb/{split}/{name}.jpg",
        mask_pattern="gt/{split}/{name}_label.png",
        cache_dir=tmp_path / "cache",
    )
    decoded = rows(dataset)
    assert set(decoded) == {"n1", "n2"}
    for name, array in values.items():
        assert (decoded[name] == expected_train_ids(array)).all()
    listing = tmp_path / "pairs.txt"
    listing.write_text("# image mask\nrgb/train/n2.jpg gt/train/n2_label.png\n\n")
    decoded = rows(load_folder(tmp_path, TABLE, list_file=listing, cache_dir=tmp_path / "cache"))
    assert (
        list(decoded) == ["rgb__train__n2"]
        and (decoded["rgb__train__n2"] == expected_train_ids(values["n2"])).all()
    )
    listing.write_text("rgb/train/n2.jpg\n")
    with pytest.raises(LayoutError, match=r"pairs\.txt:1: expected 'IMAGE MASK'"):
        scan_folder(tmp_path, list_file=listing)


def test_target_table_read_in_source_classes(tmp_path):
    source = ClassTable(names=("vehicle", "flat", "tree"), values=((1,), (2,), (3,)))
    # the target's own table: its values differ, 'snow' exists only there, 'tree' only in the source
    target = ClassTable(names=("flat", "snow", "vehicle"), values=((5, 6), (7,), (8,)), void_values=(0,))
    values = np.array([[5, 6, 7, 8, 0, 9]], dtype=np.uint8)
    write_pair(tmp_path, "t", values)
    mapping = map_class_tables(source, target)
    dataset, report = load_folder(
        tmp_path, target, mapping=mapping, return_report=True, cache_dir=tmp_path / "c"
    )
    # flat -> source id 1, snow -> ignored, vehicle -> source id 0
    assert np.asarray(dataset[0]["label"]).tolist() == [[1, 1, 255, 0, 255, 255]]
    assert report.num_classes == 3 and report.class_pixels == [1, 2, 0]
    assert report.unknown_by_file == {str(tmp_path / "masks" / "t.png"): {"9": 1}}
    target.save(tmp_path / "target.yaml")  # the table by its file: the same table, matched by content
    again = load_folder(tmp_path, tmp_path / "target.yaml", mapping=mapping, cache_dir=tmp_path / "c")
    assert np.asarray(again[0]["label"]).tolist() == [[1, 1, 255, 0, 255, 255]]
    with pytest.raises(ValueError, match="mapping.target must be the class_table"):
        load_folder(tmp_path, TABLE, mapping=mapping)


def test_streaming_yields_the_same_labels(tmp_path):
    rng = np.random.default_rng(7)
    values = random_values(rng, (4, 4))
    write_pair(tmp_path, "s", values, rng=rng)
    streamed = list(load_folder(tmp_path, TABLE, streaming=True))
    assert len(streamed) == 1 and (np.asarray(streamed[0]["label"]) == expected_train_ids(values)).all()


def test_registry_folder_needs_a_table_and_checks_num_classes(tmp_path):
    write_pair(tmp_path, "r", random_values(np.random.default_rng(8), (4, 4)))
    table_file = tmp_path / "table.yaml"
    TABLE.save(table_file)
    dataset = load_dataset(
        "folder", tmp_path, "train", class_table=table_file, label_cache_dir=tmp_path / "c"
    )
    assert len(dataset) == 1
    with pytest.raises(ValueError, match="needs a class table"):
        load_dataset("folder", tmp_path, "train")
    with pytest.raises(
        ValueError, match=r"num_classes=19 disagrees with the class table .*table\.yaml, which has 3"
    ):
        load_dataset("folder", tmp_path, "train", num_classes=19, class_table=table_file)
    with pytest.raises(ValueError, match="use dataset 'folder' for a dataset of your own classes"):
        load_dataset("synthetic", None, "train", class_table=table_file)


def test_prepare_folder_writes_shards_with_the_table_classes(tmp_path):
    import importlib.util
    from pathlib import Path

    from cpsl_hf.data.readers import load_prepared

    rng = np.random.default_rng(9)
    maps = {f"p{i}": random_values(rng, (4, 6)) for i in range(3)}
    for stem, values in maps.items():
        write_pair(tmp_path / "data" / "train", stem, values, rng=rng)
    TABLE.save(tmp_path / "table.yaml")
    script = Path(__file__).resolve().parents[2] / "scripts" / "prepare_dataset.py"
    spec = importlib.util.spec_from_file_location("prepare_script", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    argv = ["folder", "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")]
    assert module.main([*argv, "--class_table", str(tmp_path / "table.yaml"), "--num_shards", "2"]) == 0
    assert len(list((tmp_path / "out" / "data").glob("train-*-of-00002.parquet"))) == 2
    prepared = {row["name"]: np.asarray(row["label"]) for row in load_prepared(tmp_path / "out", "train")}
    assert set(prepared) == set(maps)
    for stem, values in maps.items():
        assert (prepared[stem] == expected_train_ids(values)).all()
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| 0 | flat |" in card and "| 1 | vehicle |" in card and "| 2 | sky |" in card
    assert "Converted from your own folder of images and masks" in card and "official" not in card
    with pytest.raises(ValueError, match="folder needs --class_table FILE"):
        module.main(argv)
