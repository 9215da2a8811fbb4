"""Class tables: loading the file form, decoding, the built-in protocols as tables, mappings, every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpsl_hf.data import protocols
from cpsl_hf.data.class_table import (
    ClassTable,
    ClassTableError,
    distinct_palette,
    load_class_table,
    map_class_tables,
    protocol_table,
)
from cpsl_hf.data.readers import CITYSCAPES_TABLE_IDS, SYNTHIA_TABLE_IDS

ISSUE_EXAMPLE = """\
void_values: [0]
classes:
  - {name: flat, values: [10, 11], color: [128, 64, 128]}
  - {name: vehicle, values: [70]}
"""


def write(tmp_path, text, name="table.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_issue_example_loads_and_decodes(tmp_path):
    path = write(tmp_path, ISSUE_EXAMPLE.replace("[70]}", "[70], color: [0, 0, 142]}"))
    table = load_class_table(path)
    assert table.names == ("flat", "vehicle")
    assert table.num_classes == 2
    assert table.value_to_train_id == {10: 0, 11: 0, 70: 1}
    assert table.palette.tolist() == [[128, 64, 128], [0, 0, 142]]
    labels = np.array([[0, 10, 11], [70, 3, 255]], dtype=np.uint8)
    train_ids, counts = table.decode(labels)
    assert train_ids.tolist() == [[255, 0, 0], [1, 255, 255]]
    known = table.known_values(256)
    unknown = {int(v): int(counts[v]) for v in np.flatnonzero(counts * ~known)}
    assert unknown == {3: 1, 255: 1}  # 0 is void: known, ignored, not reported


def test_json_form_and_save_round_trip(tmp_path):
    content = {
        "name": "mine",
        "void_values": [0, 1],
        "classes": [
            {"name": "a", "values": [2, 300], "label_id": 7},
            {"name": "b", "values": 5, "label_id": 9},
        ],
    }
    table = load_class_table(write(tmp_path, json.dumps(content), "t.json"))
    assert table.lookup_table().shape == (65536,)  # a value above 255 -> 16-bit table
    assert table.lookup_table()[[2, 300, 5, 0, 1, 4]].tolist() == [0, 0, 1, 255, 255, 255]
    assert table.train_id_to_label_id()[:3].tolist() == [7, 9, 0]
    for suffix in ("yaml", "json"):
        again = load_class_table(table.save(tmp_path / f"saved.{suffix}"))
        assert again.names == table.names and again.values == table.values
        assert again.void_values == table.void_values and again.label_ids == table.label_ids
        assert again.colors == table.colors and again.name == "mine"


def test_default_palette_is_distinct_and_never_black():
    for count in (1, 7, 19, 65, 255):
        palette = distinct_palette(count)
        assert palette.shape == (count, 3) and palette.dtype == np.uint8
        rows = {tuple(row) for row in palette.tolist()}
        assert len(rows) == count and (0, 0, 0) not in rows


def test_decode_16_bit_labels():
    table = ClassTable(names=("x", "y"), values=((1000,), (2, 65535)), void_values=(0,))
    labels = np.array([[1000, 2, 65535, 0, 7]], dtype=np.uint16)
    train_ids, counts = table.decode(labels)
    assert train_ids.tolist() == [[0, 1, 1, 255, 255]]
    assert counts.shape == (65536,) and counts[7] == 1 and counts[1000] == 1


@pytest.mark.parametrize("num_classes", [19, 16, 13])
def test_cityscapes_protocols_as_tables_decode_identically(num_classes):
    table = protocol_table(num_classes)
    assert list(table.names) == protocols.class_names(num_classes)
    assert (table.lookup_table(256) == protocols.label_id_lut(num_classes)).all()
    every_value = np.arange(256, dtype=np.uint8)
    assert (table.decode(every_value)[0] == protocols.label_id_lut(num_classes)[every_value]).all()
    # "known" = the Cityscapes label table, exactly what the readers count unknown ids against
    assert set(np.flatnonzero(table.known_values(256)).tolist()) == set(CITYSCAPES_TABLE_IDS)
    assert (table.palette == protocols.palette(num_classes)).all()
    assert (table.train_id_to_label_id() == protocols.train_id_to_label_id(num_classes)).all()


@pytest.mark.parametrize("num_classes", [16, 13])
def test_synthia_protocols_as_tables_decode_identically(num_classes):
    table = protocol_table(num_classes, dataset="synthia")
    every_value = np.arange(65536, dtype=np.uint16)
    assert (table.decode(every_value)[0] == protocols.synthia_lut(num_classes)).all()
    assert set(np.flatnonzero(table.known_values(65536)).tolist()) == set(SYNTHIA_TABLE_IDS)


def test_colour_coded_labels_round_trip():
    table = ClassTable(
        names=("a", "b", "c"),
        values=((1,), (2,), (3,)),
        colors=((255, 0, 0), (0, 255, 0), (0, 0, 255)),
        void_colors=((0, 0, 0),),
    )
    rng = np.random.default_rng(0)
    train_ids = rng.integers(0, 3, size=(9, 11)).astype(np.uint8)
    rgb = table.palette[train_ids]
    rgb[0, 0] = (0, 0, 0)  # void colour
    rgb[1, 1] = rgb[2, 2] = (10, 20, 30)  # unknown colour, twice
    decoded, unknown = table.decode_colors(rgb)
    expected = train_ids.copy()
    expected[0, 0] = expected[1, 1] = expected[2, 2] = 255
    assert (decoded == expected).all()
    assert unknown == {(10, 20, 30): 2}


def test_mapping_by_name_reports_one_sided_classes():
    source = ClassTable(names=("road", "car", "sky", "tree"), values=((1,), (2,), (3,), (4,)))
    target = ClassTable(names=("sky", "snow", "road", "car"), values=((9,), (8,), (7,), (6,)))
    mapping = map_class_tables(source, target)
    assert mapping.common == ("road", "car", "sky")
    assert mapping.source_only == ("tree",)
    assert mapping.target_only == ("snow",)
    # target ids: sky 0, snow 1, road 2, car 3 -> source ids: sky 2, (ignored), road 0, car 1
    assert mapping.to_source(np.array([0, 1, 2, 3, 255], dtype=np.uint8)).tolist() == [2, 255, 0, 1, 255]
    summary = mapping.summary()
    assert "source only" in summary and "tree" in summary and "target only" in summary and "snow" in summary
    assert not mapping.is_identity
    assert map_class_tables(source, source).is_identity


def test_mapping_without_common_class_fails_naming_both_files(tmp_path):
    a = load_class_table(write(tmp_path, "classes: [{name: x, values: [1]}]", "a.yaml"))
    b = load_class_table(write(tmp_path, "classes: [{name: y, values: [1]}]", "b.yaml"))
    with pytest.raises(ClassTableError, match=r"a\.yaml and .*b\.yaml: classes: .*share no class name"):
        map_class_tables(a, b)


BAD_TABLES = [
    (
        "classes: [{name: car, values: [1]}, {name: car, values: [2]}]",
        r"classes\[1\]\.name: duplicate class name 'car' \(also classes\[0\]\)",
    ),
    ("classes: [{name: car, values: [1, 1]}]", r"classes\[0\]\.values: value 1 is listed twice"),
    (
        "classes: [{name: car, values: [1]}, {name: bus, values: [3, 1]}]",
        r"classes\[1\]\.values: value 1 is mapped to two classes: 'car' \(classes\[0\]\) and 'bus'",
    ),
    (
        "void_values: [1]\nclasses: [{name: car, values: [1]}]",
        r"void_values: value 1 is also mapped to class 'car'",
    ),
    ("void_values: [0, 0]\nclasses: [{name: car, values: [1]}]", r"void_values: value 0 is listed twice"),
    (
        "palette: [[1, 2, 3]]\nclasses: [{name: a, values: [1]}, {name: b, values: [2]}]",
        r"palette: 1 colours for 2 classes",
    ),
    (
        "classes: [{name: a, values: [1], color: [1, 2, 3]}, {name: b, values: [2]}]",
        r"classes\[1\]\.color: give a colour for every class or for none",
    ),
    ("classes: [{name: a, values: [1], color: [1, 2, 300]}]", r"classes\[0\]\.color: expected \[R, G, B\]"),
    ("classes: [{name: a, values: [70000]}]", r"classes\[0\]\.values: value 70000 is outside 0\.\.65535"),
    ("classes: [{name: a, values: []}]", r"classes\[0\]\.values: class 'a' has no label values"),
    ("classes: [{name: a, values: [x]}]", r"classes\[0\]\.values: expected a list of integers"),
    ("classes: [{name: a}]", r"classes\[0\]\.values: missing"),
    ("classes: [{name: a, values: [1], colour: [1, 2, 3]}]", r"classes\[0\]\.colour: unknown key"),
    ("void: [0]\nclasses: [{name: a, values: [1]}]", r"void: unknown key"),
    ("classes: []", r"classes: expected a non-empty list"),
    ("- just a list", r"expected a mapping with a 'classes' list"),
    ("classes: [{name: a, values: [1]", r"cannot parse the file"),
    (
        "classes: [{name: a, values: [1], label_id: 3}, {name: b, values: [2]}]",
        r"classes\[1\]\.label_id: give a label_id for every class or for none",
    ),
]


@pytest.mark.parametrize("text, message", BAD_TABLES)
def test_bad_tables_fail_naming_file_key_and_reason(tmp_path, text, message):
    path = write(tmp_path, text, "bad.yaml")
    with pytest.raises(ClassTableError, match=r"bad\.yaml: " + message):
        load_class_table(path)


def test_missing_file(tmp_path):
    with pytest.raises(ClassTableError, match=r"nope\.yaml: no such class table file"):
        load_class_table(tmp_path / "nope.yaml")


def test_colour_decoding_needs_distinct_colours():
    table = ClassTable(names=("a", "b"), values=((1,), (2,)), colors=((5, 5, 5), (5, 5, 5)))
    with pytest.raises(ClassTableError, match="palette: colour-coded labels need one distinct colour"):
        table.decode_colors(np.zeros((2, 2, 3), dtype=np.uint8))
