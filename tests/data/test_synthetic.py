"""The built-in synthetic domain shift: determinism, labels, domain differences, caching, argument checks."""

import numpy as np
import pytest

from cpsl_hf.data import synthetic
from cpsl_hf.data.protocols import CITYSCAPES_CLASSES, IGNORE_INDEX
from cpsl_hf.data.synthetic import generate_synthetic, load_synthetic

SIZE = (64, 128)
NUM_CLASSES = len(CITYSCAPES_CLASSES)
CLASS = {name: index for index, name in enumerate(CITYSCAPES_CLASSES)}


def arrays(dataset):
    images = np.stack([np.asarray(image) for image in dataset["image"]])
    labels = np.stack([np.asarray(label) for label in dataset["label"]])
    return images, labels


@pytest.fixture(scope="module")
def domains():
    """40 source and 40 target training scenes at 64 x 128 (generated once for the module)."""
    return {domain: generate_synthetic(domain, "train", 40, SIZE, seed=0) for domain in ("source", "target")}


def test_dataset_columns_modes_and_sizes(tmp_path):
    dataset = load_synthetic("target", "validation", num_images=3, image_size=(40, 72), cache_dir=tmp_path)
    assert len(dataset) == 3
    assert set(dataset.column_names) == {"image", "label", "name"}
    sample = dataset[0]
    assert sample["image"].mode == "RGB" and sample["image"].size == (72, 40)
    assert sample["label"].mode == "L" and sample["label"].size == (72, 40)
    assert dataset["name"] == [f"synthetic_target_validation_s0_{index:05d}" for index in range(3)]


def test_default_split_sizes(monkeypatch, tmp_path):
    calls = []

    def fake_generate(domain, split, num_images, image_size, seed, variant="default"):
        calls.append(num_images)
        return generate_synthetic(domain, split, 1, image_size, seed, variant)

    monkeypatch.setattr(synthetic, "generate_synthetic", fake_generate)
    load_synthetic("source", "train", cache_dir=tmp_path, image_size=SIZE)
    load_synthetic("source", "validation", cache_dir=tmp_path, image_size=SIZE)
    assert calls == [400, 100]


def test_same_seed_identical_bytes_other_seed_differs(tmp_path):
    first = load_synthetic("source", "train", num_images=3, image_size=SIZE, seed=5, cache_dir=tmp_path / "a")
    again = load_synthetic("source", "train", num_images=3, image_size=SIZE, seed=5, cache_dir=tmp_path / "b")
    other = load_synthetic("source", "train", num_images=3, image_size=SIZE, seed=6, cache_dir=tmp_path / "a")
    images, labels = arrays(first)
    images_again, labels_again = arrays(again)
    images_other, labels_other = arrays(other)
    assert images.tobytes() == images_again.tobytes() and labels.tobytes() == labels_again.tobytes()
    assert all((images[i] != images_other[i]).any() for i in range(3))
    assert all((labels[i] != labels_other[i]).any() for i in range(3))


def test_splits_and_domains_do_not_share_scenes():
    train_images, train_labels, _ = generate_synthetic("source", "train", 6, SIZE, seed=0)
    val_images, val_labels, _ = generate_synthetic("source", "validation", 6, SIZE, seed=0)
    target_images, target_labels, _ = generate_synthetic("target", "train", 6, SIZE, seed=0)
    train_keys = {label.tobytes() for label in train_labels}
    assert not train_keys & {label.tobytes() for label in val_labels}
    assert not train_keys & {label.tobytes() for label in target_labels}
    # Image i of the train split is regenerated alone from its own stream: the first images of a longer
    # split equal a shorter split.
    shorter_images, shorter_labels, _ = generate_synthetic("source", "train", 2, SIZE, seed=0)
    assert np.array_equal(shorter_images, train_images[:2]) and np.array_equal(
        shorter_labels, train_labels[:2]
    )


def test_all_classes_appear_and_labels_are_train_ids(domains):
    for images, labels, _ in domains.values():
        assert images.dtype == np.uint8 and images.shape == (40, *SIZE, 3)
        assert labels.dtype == np.uint8 and labels.shape == (40, *SIZE)
        values = np.unique(labels)
        assert np.all((values < NUM_CLASSES) | (values == IGNORE_INDEX)), values
    source_labels = domains["source"][1]
    histogram = np.bincount(source_labels.ravel(), minlength=256)
    missing = [CITYSCAPES_CLASSES[c] for c in range(NUM_CLASSES) if histogram[c] == 0]
    assert not missing, f"classes never drawn in 40 source scenes: {missing}"


def test_class_frequencies_shift_like_gta5_to_cityscapes(domains):
    share = {
        domain: np.bincount(labels.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES] / labels.size
        for domain, (_, labels, _) in domains.items()
    }
    # The target street is greener and busier, with fewer buildings.
    for name, factor in (("vegetation", 2.0), ("car", 1.3), ("person", 1.2)):
        assert share["target"][CLASS[name]] > factor * share["source"][CLASS[name]], name
    assert share["target"][CLASS["building"]] < 0.7 * share["source"][CLASS["building"]]


def test_target_looks_different_per_class(domains):
    """Mean colour of the stuff classes moves by > 30 grey levels; target images are noisier and softer."""

    def class_means(images, labels):
        flat_labels = labels.ravel()
        counts = np.bincount(flat_labels, minlength=NUM_CLASSES)[:NUM_CLASSES]
        sums = np.stack(
            [np.bincount(flat_labels, images[..., k].ravel(), minlength=NUM_CLASSES) for k in range(3)], 1
        )[:NUM_CLASSES]
        return sums / np.maximum(counts, 1)[:, None]

    source_means = class_means(*domains["source"][:2])
    target_means = class_means(*domains["target"][:2])
    for name in ("road", "sidewalk", "vegetation", "terrain", "sky"):
        distance = np.linalg.norm(source_means[CLASS[name]] - target_means[CLASS[name]])
        assert distance > 30, (name, distance)

    def sky_roughness(images, labels):
        """Mean absolute horizontal difference between neighbouring sky pixels (noise; sky is smooth)."""
        grey = images.astype(np.float64).mean(axis=3)
        both_sky = (labels[:, :, 1:] == CLASS["sky"]) & (labels[:, :, :-1] == CLASS["sky"])
        return np.abs(np.diff(grey, axis=2))[both_sky].mean()

    def edge_sharpness(images, labels):
        """Mean colour jump across class boundaries (blur softens it)."""
        grey = images.astype(np.float64).mean(axis=3)
        boundary = labels[:, :, 1:] != labels[:, :, :-1]
        return np.abs(np.diff(grey, axis=2))[boundary].mean()

    assert sky_roughness(*domains["target"][:2]) > 2 * sky_roughness(*domains["source"][:2])
    assert edge_sharpness(*domains["target"][:2]) < 0.8 * edge_sharpness(*domains["source"][:2])


def test_hard_variant_changes_the_targets_thin_structures_and_two_wheelers(domains):
    """Same source; in the target, poles, signs, lights and fences take colours the source never shows them in,
    poles get thinner and bicycles / motorcycles dark; the rest of the target keeps its look."""
    default_source = generate_synthetic("source", "train", 4, SIZE, seed=0)
    hard_source = generate_synthetic("source", "train", 4, SIZE, seed=0, variant="hard")
    assert hard_source[0].tobytes() == default_source[0].tobytes()
    assert hard_source[1].tobytes() == default_source[1].tobytes()
    images, labels, names = generate_synthetic("target", "train", 40, SIZE, seed=0, variant="hard")
    assert names[0] == "synthetic-hard_target_train_s0_00000"

    def class_means(images, labels):
        flat = labels.ravel()
        counts = np.bincount(flat, minlength=NUM_CLASSES)[:NUM_CLASSES]
        sums = np.stack(
            [np.bincount(flat, images[..., k].ravel(), minlength=NUM_CLASSES) for k in range(3)], 1
        )
        return sums[:NUM_CLASSES] / np.maximum(counts, 1)[:, None], counts / flat.size

    hard, hard_share = class_means(images, labels)
    default, default_share = class_means(*domains["target"][:2])
    source, _ = class_means(*domains["source"][:2])
    for name in ("pole", "traffic sign", "traffic light", "fence", "bicycle", "motorcycle"):
        assert np.linalg.norm(hard[CLASS[name]] - default[CLASS[name]]) > 25, name
    for name in ("pole", "traffic light", "fence"):  # further from the source than the default target is
        index = CLASS[name]
        assert (
            np.linalg.norm(hard[index] - source[index]) > np.linalg.norm(default[index] - source[index]) + 25
        )
    for name in ("road", "sky", "vegetation", "building", "car"):
        assert np.linalg.norm(hard[CLASS[name]] - default[CLASS[name]]) < 12, name
    assert hard_share[CLASS["pole"]] < 0.8 * default_share[CLASS["pole"]]


def test_cache_hit_returns_same_data_and_parameter_change_regenerates(monkeypatch, tmp_path):
    first = load_synthetic("source", "train", num_images=2, image_size=SIZE, cache_dir=tmp_path)
    folders = sorted(path.name for path in tmp_path.iterdir())
    assert len(folders) == 1

    def must_not_generate(*args, **kwargs):
        raise AssertionError("cache miss: generate_synthetic was called")

    monkeypatch.setattr(synthetic, "generate_synthetic", must_not_generate)
    hit = load_synthetic("source", "train", num_images=2, image_size=SIZE, cache_dir=tmp_path)
    assert [np.asarray(image).tobytes() for image in hit["image"]] == [
        np.asarray(image).tobytes() for image in first["image"]
    ]
    assert hit["name"] == first["name"]
    monkeypatch.undo()

    # Every parameter is part of the key: each change writes a new folder.
    load_synthetic("source", "train", num_images=3, image_size=SIZE, cache_dir=tmp_path)
    load_synthetic("source", "train", num_images=2, image_size=(SIZE[0], SIZE[1] + 8), cache_dir=tmp_path)
    load_synthetic("source", "train", num_images=2, image_size=SIZE, seed=1, cache_dir=tmp_path)
    load_synthetic("source", "train", num_images=2, image_size=SIZE, cache_dir=tmp_path, variant="hard")
    monkeypatch.setattr(synthetic, "GENERATOR_VERSION", synthetic.GENERATOR_VERSION + "-changed")
    calls = []
    real_generate = synthetic.generate_synthetic

    def counting_generate(*args, **kwargs):
        calls.append(args)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(synthetic, "generate_synthetic", counting_generate)
    regenerated = load_synthetic("source", "train", num_images=2, image_size=SIZE, cache_dir=tmp_path)
    assert len(calls) == 1
    assert regenerated["name"] == first["name"]
    assert len({path.name for path in tmp_path.iterdir() if not path.name.startswith(".")}) == 6


def test_cache_dir_default_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CPSL_HF_CACHE", str(tmp_path))
    load_synthetic("target", "train", num_images=1, image_size=SIZE)
    assert len(list((tmp_path / "synthetic").iterdir())) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"domain": "gta5"}, "unknown domain"),
        ({"split": "test"}, "unknown split"),
        ({"image_size": (16, 256)}, "too small"),
        ({"image_size": (128, 32)}, "too small"),
        ({"image_size": (128,)}, "pair of integers"),
        ({"image_size": (64.0, 128.0)}, "pair of integers"),
        ({"num_images": 0}, "positive integer"),
        ({"seed": -1}, "non-negative"),
        ({"variant": "harder"}, "unknown variant"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        load_synthetic(cache_dir=tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_images_are_stored_uncompressed_and_labels_compressed_losslessly(tmp_path):
    """Images are stored PNG without compression (zlib's stored blocks: fast to decode), labels compressed;
    both decode to exactly the generated arrays."""
    import datasets

    images, labels, _ = generate_synthetic("target", "train", 2, SIZE, seed=0)
    dataset = load_synthetic("target", "train", num_images=2, image_size=SIZE, cache_dir=tmp_path)
    decoded_images, decoded_labels = arrays(dataset)
    np.testing.assert_array_equal(decoded_images, images)
    np.testing.assert_array_equal(decoded_labels, labels)
    raw = dataset.cast_column("image", datasets.Image(decode=False)).cast_column(
        "label", datasets.Image(decode=False)
    )
    image_bytes = [row["image"]["bytes"] for row in raw]
    label_bytes = [row["label"]["bytes"] for row in raw]
    pixels = SIZE[0] * SIZE[1]
    assert all(len(data) >= 3 * pixels for data in image_bytes)  # not compressed
    assert all(len(data) < pixels / 4 for data in label_bytes)  # compressed
