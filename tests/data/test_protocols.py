"""Label protocols against independent sources: cityscapesscripts' table and the SPEC's SYNTHIA ids."""

import numpy as np
import pytest
from cityscapesscripts.helpers.labels import labels as cityscapes_labels

from cpsl_hf.data import protocols

# SPEC.md: the 19 classes come from these Cityscapes label ids, in train-id order.
SPEC_LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
SPEC_SYNTHIA = {
    "sky": 1, "building": 2, "road": 3, "sidewalk": 4, "fence": 5, "vegetation": 6, "pole": 7, "car": 8,
    "traffic sign": 9, "person": 10, "bicycle": 11, "motorcycle": 12, "traffic light": 15, "terrain": 16,
    "rider": 17, "truck": 18, "bus": 19, "train": 20, "wall": 21,
}  # fmt: skip
DROPPED = {
    19: [],
    16: ["terrain", "truck", "train"],
    13: ["terrain", "truck", "train", "wall", "fence", "pole"],
}


def test_nineteen_classes_follow_cityscapesscripts():
    by_id = {label.id: label for label in cityscapes_labels}
    assert list(protocols.CITYSCAPES_CLASSES) == [by_id[i].name for i in SPEC_LABEL_IDS]
    assert [by_id[i].trainId for i in SPEC_LABEL_IDS] == list(range(19))
    np.testing.assert_array_equal(protocols.CITYSCAPES_PALETTE, [by_id[i].color for i in SPEC_LABEL_IDS])
    assert protocols.CITYSCAPES_PALETTE.dtype == np.uint8


@pytest.mark.parametrize("num_classes", [19, 16, 13])
def test_label_id_lut_maps_every_id(num_classes):
    names = [name for name in protocols.CITYSCAPES_CLASSES if name not in DROPPED[num_classes]]
    assert protocols.class_names(num_classes) == names
    name_of_id = {label.id: label.name for label in cityscapes_labels}
    expected = np.full(256, 255)
    for label_id in SPEC_LABEL_IDS:
        if name_of_id[label_id] in names:
            expected[label_id] = names.index(name_of_id[label_id])
    lut = protocols.label_id_lut(num_classes)
    assert lut.dtype == np.uint8 and lut.shape == (256,)
    np.testing.assert_array_equal(lut, expected)
    back = protocols.train_id_to_label_id(num_classes)
    np.testing.assert_array_equal(lut[back[:num_classes]], np.arange(num_classes))


@pytest.mark.parametrize("num_classes", [16, 13])
def test_synthia_lut_maps_every_id(num_classes):
    names = protocols.class_names(num_classes)
    expected = np.full(65536, 255)
    for name, synthia_id in SPEC_SYNTHIA.items():
        if name in names:
            expected[synthia_id] = names.index(name)
    np.testing.assert_array_equal(protocols.synthia_lut(num_classes), expected)


def test_thirteen_of_sixteen_and_colorize():
    sixteen = protocols.class_names(16)
    assert [sixteen[i] for i in protocols.THIRTEEN_OF_SIXTEEN] == protocols.class_names(13)
    train_ids = np.array([[0, 18], [255, 7]], dtype=np.uint8)
    colours = protocols.colorize(train_ids, 19)
    np.testing.assert_array_equal(colours[0, 0], protocols.CITYSCAPES_PALETTE[0])
    np.testing.assert_array_equal(colours[0, 1], protocols.CITYSCAPES_PALETTE[18])
    np.testing.assert_array_equal(colours[1, 0], [0, 0, 0])
    with pytest.raises(ValueError, match="num_classes=12"):
        protocols.class_names(12)
