"""cpsl_hf.utils: JSON-ready values, percentages, the autocast dtype, progress bars, atomic folders."""

import json
import math

import numpy as np
import pytest
import torch

from cpsl_hf.utils import atomic_directory, autocast_dtype, format_percent, json_ready, progress


def test_json_ready_turns_nan_into_none_everywhere_and_arrays_into_lists():
    nan = float("nan")
    value = {
        "mean_iou": 0.5,
        "per_category_iou": [0.25, nan, 1.0],
        "nested": {"pair": (nan, 2), "tensor": torch.tensor([0.5, nan]), "array": np.array([[nan, 1.0]])},
        "scalar": np.float32(nan),
        "count": np.int64(7),
        "name": "road",
        "none": None,
    }
    expected = {
        "mean_iou": 0.5,
        "per_category_iou": [0.25, None, 1.0],
        "nested": {"pair": [None, 2], "tensor": [0.5, None], "array": [[None, 1.0]]},
        "scalar": None,
        "count": 7,
        "name": "road",
        "none": None,
    }
    ready = json_ready(value)
    assert ready == expected
    assert json.loads(json.dumps(ready, allow_nan=False)) == expected  # strict JSON
    assert isinstance(ready["count"], int)
    assert math.isnan(value["per_category_iou"][1])  # the input is left as it was


@pytest.mark.parametrize(
    "value, text",
    [
        (0.4567, "45.67"),
        (1, "100.00"),
        (0.0, "0.00"),
        (0.123456, "12.35"),
        (None, "n/a"),
        (float("nan"), "n/a"),
        (np.float32("nan"), "n/a"),
        (np.float64(0.5), "50.00"),
        (torch.tensor(0.25), "25.00"),
    ],
)
def test_format_percent(value, text):
    assert format_percent(value) == text


def test_format_percent_digits():
    assert format_percent(0.4567, digits=1) == "45.7"


def test_autocast_dtype_maps_the_mixed_precision_names():
    assert autocast_dtype("no") is None
    assert autocast_dtype("fp16") is torch.float16
    assert autocast_dtype("bf16") is torch.bfloat16
    with pytest.raises(ValueError, match="--mixed_precision 'fp8': expected one of no, fp16, bf16"):
        autocast_dtype("fp8")


def test_progress_disabled_is_the_iterable_itself():
    items = [1, 2, 3]
    assert progress(items, False, "nothing") is items
    assert progress(None, False, "a bar by hand") is None


def test_progress_enabled_yields_every_item_and_knows_the_total(capsys):
    bar = progress([4, 5, 6], True, "counting", unit="sample")
    assert bar.total == 3 and bar.desc == "counting" and bar.unit == "sample"
    assert list(bar) == [4, 5, 6]
    by_hand = progress(None, True, "train", total=10, initial=4, leave=False)
    assert by_hand.total == 10 and by_hand.n == 4
    by_hand.update(2)
    assert by_hand.n == 6
    by_hand.close()
    assert "counting" in capsys.readouterr().err


def test_atomic_directory_appears_only_when_the_body_completes(tmp_path):
    final = tmp_path / "cache" / "split"  # the parent does not exist yet
    with atomic_directory(final) as scratch:
        assert scratch.parent == final.parent and scratch.name.startswith(".split-")
        (scratch / "data.bin").write_bytes(b"abc")
        (scratch / "sub").mkdir()
        (scratch / "sub" / "x.txt").write_text("x")
        assert not final.exists()  # nothing visible half-way
    assert (final / "data.bin").read_bytes() == b"abc" and (final / "sub" / "x.txt").read_text() == "x"
    assert [path.name for path in final.parent.iterdir()] == ["split"]  # no temporary leftover


def test_atomic_directory_leaves_nothing_when_the_body_raises(tmp_path):
    final = tmp_path / "split"
    with pytest.raises(RuntimeError, match="half-way"):
        with atomic_directory(final) as scratch:
            (scratch / "data.bin").write_bytes(b"abc")
            raise RuntimeError("killed half-way")
    assert list(tmp_path.iterdir()) == []  # no final folder, no temporary folder


def test_atomic_directory_failure_keeps_an_existing_folder(tmp_path):
    final = tmp_path / "split"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(final) as scratch:
            (scratch / "new.txt").write_text("new")
            raise KeyboardInterrupt
    assert [path.name for path in tmp_path.iterdir()] == ["split"]
    assert [path.name for path in final.iterdir()] == ["old.txt"]


def test_atomic_directory_replaces_an_existing_folder_by_default(tmp_path):
    final = tmp_path / "split"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_directory(final) as scratch:
        (scratch / "new.txt").write_text("new")
    assert [path.name for path in final.iterdir()] == ["new.txt"]
    assert [path.name for path in tmp_path.iterdir()] == ["split"]


def test_atomic_directory_keeps_a_complete_folder_another_writer_finished_first(tmp_path):
    final = tmp_path / "split"

    def complete(path):
        return (path / "done").is_file()

    with atomic_directory(final, keep_existing=complete) as scratch:
        (scratch / "mine.txt").write_text("mine")
        final.mkdir()  # a concurrent writer renames its complete copy into place meanwhile
        (final / "done").write_text("")
    assert sorted(path.name for path in final.iterdir()) == ["done"]  # theirs is kept, ours discarded
    assert [path.name for path in tmp_path.iterdir()] == ["split"]

    incomplete = tmp_path / "other"
    with pytest.raises(OSError):
        with atomic_directory(incomplete, keep_existing=complete) as scratch:
            (scratch / "mine.txt").write_text("mine")
            incomplete.mkdir()
            (incomplete / "junk.txt").write_text("")  # not complete: not silently taken for ours
    assert [path.name for path in incomplete.iterdir()] == ["junk.txt"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["other", "split"]
