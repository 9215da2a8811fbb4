"""``bench/bench_eval.py``: the quick run prints the agreement check and the table; the check itself."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "bench_eval.py"
REFERENCES = ("cityscapesscripts", "evaluate mean_iou", "evaluate cpsl_mean_iou")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_eval", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_eval"] = module  # dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop("bench_eval", None)


def test_check_agreement_accepts_equal_values(bench):
    assert bench.check_agreement({"ours": 0.5, "official": 0.5}) == 0.0
    assert bench.check_agreement({"ours": 0.5, "official": 0.5 + 5e-7}) == pytest.approx(5e-7)
    assert bench.check_agreement({"alone": 0.25}) == 0.0


@pytest.mark.parametrize(
    "values",
    [
        {"ours": 0.5, "official": 0.5 + 2e-6},
        {"ours": 0.5, "official": 0.5, "evaluate": 0.49},
        {"ours": 0.5, "official": math.nan},
        {"ours": math.inf, "official": math.inf},
    ],
)
def test_check_agreement_raises_on_disagreement(bench, values):
    with pytest.raises(bench.DisagreementError) as error:
        bench.check_agreement(values)
    assert "official" in str(error.value) or "ours" in str(error.value)  # says who


def test_check_agreement_needs_values(bench):
    with pytest.raises(ValueError):
        bench.check_agreement({})


def test_disagreement_prints_no_speeds(bench, monkeypatch, capsys):
    """A reference that disagrees: exit status 1, the values printed, no table."""

    def wrong_cityscapes(pairs, workdir):
        return bench.Result("cityscapesscripts (wrong on purpose)", 0.1, 0.123), 0.0

    def skipped(*args, **kwargs):
        raise bench.Skipped("not in this test")

    monkeypatch.setattr(bench, "run_cityscapes", wrong_cityscapes)
    monkeypatch.setattr(bench, "run_hub_mean_iou", skipped)
    monkeypatch.setattr(bench, "run_cpsl_mean_iou", skipped)
    assert bench.main(["--quick", "--images", "2"]) == 1
    captured = capsys.readouterr()
    assert "0.1230000000  cityscapesscripts (wrong on purpose)" in captured.out
    assert "agreement check FAILED" in captured.err
    assert "| evaluator |" not in captured.out
    assert "skipped: evaluate mean_iou: not in this test" in captured.out


@pytest.mark.slow
def test_quick_run_prints_agreement_and_table():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(BENCH), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    out = completed.stdout
    assert "mIoU agreement check passed" in out
    assert "| evaluator | images/s | seconds total | ratio to ours (class ids) | mIoU |" in out
    rows = [
        line
        for line in out.splitlines()
        if line.startswith("| ") and "evaluator" not in line and "---" not in line
    ]
    assert any(row.startswith("| ours: ConfusionMatrix, class-id maps |") for row in rows)
    assert any(row.startswith("| ours: ConfusionMatrix, logits") for row in rows)
    for reference in REFERENCES:  # each reference either ran (a row) or says why it was skipped
        ran = any(row.startswith(f"| {reference}") for row in rows)
        assert ran or f"skipped: {reference}:" in out, out
    mious = {row.split("|")[-2].strip() for row in rows}
    assert len(mious) == 1, rows  # every evaluator printed the same mIoU
