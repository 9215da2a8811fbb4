"""GTA5 / SYNTHIA / Cityscapes readers: label conversion pixel by pixel, bad input, layouts, streaming."""

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as cityscapes_labels
from PIL import Image

from cpsl_hf.data import protocols, readers, testing

# Independent expectations, typed from the SPEC (not from the code under test).
SYNTHIA_TO_NAME = {
    1: "sky", 2: "building", 3: "road", 4: "sidewalk", 5: "fence", 6: "vegetation", 7: "pole", 8: "car",
    9: "traffic sign", 10: "person", 11: "bicycle", 12: "motorcycle", 15: "traffic light", 16: "terrain",
    17: "rider", 18: "truck", 19: "bus", 20: "train", 21: "wall",
}  # fmt: skip
DROPPED = {
    19: set(),
    16: {"terrain", "truck", "train"},
    13: {"terrain", "truck", "train", "wall", "fence", "pole"},
}


def expected_cityscapes_train_ids(label_ids: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel by pixel, from cityscapesscripts' label table: label id -> trainId -> protocol index."""
    kept = [
        label.name
        for label in sorted(cityscapes_labels, key=lambda label: label.trainId)
        if 0 <= label.trainId < 255 and label.name not in DROPPED[num_classes]
    ]
    by_id = {label.id: label for label in cityscapes_labels}
    out = np.full(label_ids.shape, 255, dtype=np.uint8)
    for (row, col), value in np.ndenumerate(label_ids):
        label = by_id.get(int(value))
        if label is not None and label.name in kept and not label.ignoreInEval:
            out[row, col] = kept.index(label.name)
    return out


def expected_synthia_train_ids(class_ids: np.ndarray, num_classes: int) -> np.ndarray:
    kept = [name for name in protocols.CITYSCAPES_CLASSES if name not in DROPPED[num_classes]]
    out = np.full(class_ids.shape, 255, dtype=np.uint8)
    for (row, col), value in np.ndenumerate(class_ids):
        name = SYNTHIA_TO_NAME.get(int(value))
        if name in kept:
            out[row, col] = kept.index(name)
    return out


def labels_by_name(dataset) -> dict:
    return {example["name"]: np.asarray(example["label"]) for example in dataset}


@pytest.fixture()
def cache(tmp_path):
    return tmp_path / "cache"


def test_gta5_palette_indices_convert_pixel_by_pixel(tmp_path, cache):
    rng = np.random.default_rng(0)
    maps = {f"{i:05d}": rng.integers(0, 34, size=(7, 9)).astype(np.uint8) for i in range(3)}
    maps["00000"][0, :3] = [34, 200, 255]  # ids outside the Cityscapes table
    testing.write_gta5(tmp_path / "gta5", maps)
    dataset, report = readers.load_gta5(
        tmp_path / "gta5", return_report=True, cache_dir=cache, progress=False
    )
    assert dataset.column_names == ["image", "label", "name"]
    assert len(dataset) == 3 and report.num_kept == 3 and report.skipped == []
    for name, label in labels_by_name(dataset).items():
        assert label.dtype == np.uint8 and label.shape == (7, 9)
        np.testing.assert_array_equal(label, expected_cityscapes_train_ids(maps[name], 19))
    assert report.out_of_table_pixels == {34: 1, 200: 1, 255: 1}
    assert report.out_of_table_samples == 1
    all_expected = np.concatenate([expected_cityscapes_train_ids(m, 19).ravel() for m in maps.values()])
    assert report.class_pixels == np.bincount(all_expected, minlength=256)[:19].tolist()
    assert report.ignored_pixels == int((all_expected == 255).sum())
    assert dataset[0]["image"].mode == "RGB" and dataset[0]["label"].mode == "L"


@pytest.mark.parametrize("num_classes", [16, 13])
def test_synthia_16bit_labels_convert_pixel_by_pixel(tmp_path, cache, num_classes):
    rng = np.random.default_rng(1)
    table_ids = np.array(sorted(SYNTHIA_TO_NAME) + [0, 13, 14, 22])
    maps = {f"{i:07d}": rng.choice(table_ids, size=(6, 10)).astype(np.uint16) for i in range(5)}
    maps["0000001"][2, :2] = [300, 4099]  # beyond 8 bits: must not be mistaken for a class
    testing.write_synthia(tmp_path / "synthia", maps)  # one PNG row filter per file: 0..4
    dataset, report = readers.load_synthia(
        tmp_path / "synthia", num_classes=num_classes, return_report=True, cache_dir=cache, progress=False
    )
    for name, label in labels_by_name(dataset).items():
        np.testing.assert_array_equal(label, expected_synthia_train_ids(maps[name], num_classes))
    assert report.out_of_table_pixels == {300: 1, 4099: 1}


def test_synthia_reader_reads_all_16_bits_of_every_png_filter(tmp_path):
    rng = np.random.default_rng(2)
    for row_filter in range(5):
        array = rng.integers(0, 65536, size=(5, 7, 3), dtype=np.uint16)
        path = tmp_path / f"f{row_filter}.png"
        testing.write_png16(path, array, row_filter)
        np.testing.assert_array_equal(readers.read_label_ids("synthia", str(path)), array[..., 0])


def test_cityscapes_reader_and_streaming_give_the_same_samples(tmp_path, cache):
    rng = np.random.default_rng(3)
    maps = {
        testing.cityscapes_stem(city, index): rng.integers(0, 34, size=(4, 8)).astype(np.uint8)
        for city, index in [("aachen", 0), ("aachen", 1), ("bremen", 7)]
    }
    testing.write_cityscapes(tmp_path / "cs", maps, split="val")
    dataset = readers.load_cityscapes(tmp_path / "cs", split="val", cache_dir=cache, progress=False)
    streamed = readers.load_cityscapes(tmp_path / "cs", split="val", streaming=True, progress=False)
    assert streamed.features == dataset.features
    mapped, streamed_labels = labels_by_name(dataset), labels_by_name(streamed)
    assert sorted(mapped) == sorted(maps) == sorted(streamed_labels)
    for name in maps:
        np.testing.assert_array_equal(mapped[name], expected_cityscapes_train_ids(maps[name], 19))
        np.testing.assert_array_equal(streamed_labels[name], mapped[name])
    original = np.asarray(
        Image.open(tmp_path / "cs/leftImg8bit/val/bremen/bremen_000000_000007_leftImg8bit.png")
    )
    by_name = {example["name"]: example for example in dataset}
    np.testing.assert_array_equal(np.asarray(by_name["bremen_000000_000007"]["image"]), original)


def make_bad_gta5(root):
    """Five pairs: two good, then missing label, truncated image, size mismatch, and an RGB (colour) label."""
    rng = np.random.default_rng(4)
    maps = {
        name: rng.integers(0, 34, size=(6, 8)).astype(np.uint8) for name in ["a", "b", "c", "d", "e", "f"]
    }
    testing.write_gta5(root, maps, image_sizes={"e": (6, 9)})
    (root / "labels" / "c.png").unlink()
    data = (root / "images" / "d.png").read_bytes()
    (root / "images" / "d.png").write_bytes(data[: len(data) // 2])
    Image.new("RGB", (8, 6)).save(root / "labels" / "f.png")
    return root


EXPECTED_BAD = {
    "c": ("labels/c.png", "missing label"),
    "d": ("images/d.png", "unreadable image"),
    "e": ("labels/e.png", "size mismatch: image"),
    "f": ("labels/f.png", "label has mode RGB"),
}


def test_bad_samples_raise_with_the_full_list(tmp_path, cache):
    root = make_bad_gta5(tmp_path / "gta5")
    with pytest.raises(readers.BadSampleError) as raised:
        readers.load_gta5(root, cache_dir=cache, progress=False)
    found = {bad.name: bad for bad in raised.value.bad_samples}
    assert set(found) == set(EXPECTED_BAD)
    message = str(raised.value)
    for name, (file, reason) in EXPECTED_BAD.items():
        assert found[name].file.endswith(file) and reason in found[name].reason
        assert f"{found[name].file}: {found[name].reason}" in message
    assert "9x6 but the label is 8x6 (never resized)" in message
    with pytest.raises(readers.BadSampleError) as raised_streaming:
        readers.load_gta5(root, streaming=True, progress=False)
    assert {bad.name for bad in raised_streaming.value.bad_samples} == set(EXPECTED_BAD)


def test_skip_mode_keeps_good_samples_and_reports_the_rest(tmp_path, cache):
    root = make_bad_gta5(tmp_path / "gta5")
    dataset, report = readers.load_gta5(
        root, on_bad_sample="skip", return_report=True, cache_dir=cache, progress=False
    )
    assert sorted(dataset["name"]) == ["a", "b"]
    assert report.num_found == 6 and report.num_kept == 2 and report.num_skipped == 4
    for bad in report.skipped:
        file, reason = EXPECTED_BAD[bad.name]
        assert bad.file.endswith(file) and reason in bad.reason
    assert "skipped" in report.summary() and "missing label" in report.summary()
    streamed = readers.load_gta5(root, streaming=True, on_bad_sample="skip", progress=False)
    assert sorted(example["name"] for example in streamed) == ["a", "b"]


def test_label_without_image_is_reported(tmp_path, cache):
    root = testing.write_gta5(tmp_path / "gta5", {"a": np.zeros((4, 4), np.uint8)})
    testing.write_gta5_label(root / "labels" / "zz.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(readers.BadSampleError, match="zz.png: label without an image"):
        readers.load_gta5(root, cache_dir=cache, progress=False)


@pytest.mark.parametrize(
    ("loader", "kwargs", "make", "expected"),
    [
        (readers.load_gta5, {}, lambda root: None, "data_dir does not exist"),
        (readers.load_gta5, {}, lambda root: (root / "images").mkdir(parents=True), "missing folder labels/"),
        (
            readers.load_synthia,
            {},
            lambda root: [(root / sub).mkdir(parents=True) for sub in ("RGB", "GT/LABELS")],
            "no .png images in RGB/",
        ),
        (
            readers.load_cityscapes,
            {"split": "val"},
            lambda root: (root / "leftImg8bit" / "train").mkdir(parents=True),
            "missing folder leftImg8bit/val/",
        ),
    ],
)
def test_empty_or_wrong_folder_names_the_expected_layout(tmp_path, loader, kwargs, make, expected):
    root = tmp_path / "data"
    make(root)
    with pytest.raises(readers.LayoutError) as raised:
        loader(root, cache_dir=tmp_path / "cache", progress=False, **kwargs)
    assert expected in str(raised.value) and "Expected layout:" in str(raised.value)


def test_cache_is_reused_and_invalidated_when_a_file_changes(tmp_path, cache):
    rng = np.random.default_rng(5)
    root = testing.write_gta5(tmp_path / "gta5", {"a": rng.integers(7, 9, size=(4, 4)).astype(np.uint8)})
    first = readers.load_gta5(root, cache_dir=cache, progress=False)
    assert readers.load_gta5(root, cache_dir=cache, progress=False).cache_files == first.cache_files
    testing.write_gta5_label(root / "labels" / "a.png", np.full((4, 4), 26, np.uint8))  # car
    changed = readers.load_gta5(root, cache_dir=cache, progress=False)
    assert changed.cache_files != first.cache_files
    np.testing.assert_array_equal(np.asarray(changed[0]["label"]), np.full((4, 4), 13))


def test_invalid_arguments(tmp_path):
    root = testing.write_gta5(tmp_path / "gta5", {"a": np.zeros((4, 4), np.uint8)})
    with pytest.raises(ValueError, match="num_classes=17"):
        readers.load_gta5(root, num_classes=17, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="on_bad_sample='ignore'"):
        readers.load_gta5(root, on_bad_sample="ignore", cache_dir=tmp_path, progress=False)
