"""bench/train_step.py: the ``--gpu`` code path run on the CPU (``--dry_run``), and its MFU arithmetic and GPU
peak table against hand-computed values."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]
SCRIPT = REPOSITORY / "bench" / "train_step.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def _table(output: str) -> dict[tuple[str, str], list[str]]:
    """``(model, precision) -> cells`` of the Markdown rows (header and rule skipped)."""
    rows = {}
    for line in output.splitlines():
        if not line.startswith("| ") or line.startswith("| model ") or line.startswith("|---"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[(cells[0], cells[3])] = cells
    return rows


@pytest.mark.slow
def test_dry_run_prints_the_gpu_table_on_the_cpu():
    """The whole ``--gpu`` code path on the CPU (about 30-45 s on 2 cores, 75 s on a machine loaded 3x over)."""
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry_run"],
        env=environment, cwd=REPOSITORY, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-4000:]
    output = completed.stdout
    assert output.startswith("GPU: none (dry run on the CPU")
    assert "torch " in output and "transformers " in output and "cuDNN" in output
    rows = _table(output)
    expected = {
        (model, precision)
        for model in ("segformer-tiny (dry run)", "deeplabv2-tiny (dry run)")
        for precision in ("fp32", "bf16")
    }
    assert set(rows) == expected  # no compile rows without --compile
    for cells in rows.values():
        assert cells[1] == "64x64" and cells[2] == "1+1"
        plain, cpsl = float(cells[4]), float(cells[5])
        assert plain > 0 and cpsl > 0
        # the ratio is of the unrounded times: within what the 3-decimal cells allow, and its own rounding
        low, high = (cpsl - 5e-4) / (plain + 5e-4), (cpsl + 5e-4) / max(plain - 5e-4, 1e-9)
        assert low - 0.005 <= float(cells[6].rstrip("x")) <= high + 0.005
        assert cells[10] == "-"  # peak GPU memory: none on the CPU
        assert float(cells[11]) > 0  # GFLOP per CPSL step, counted by FlopCounterMode
        assert cells[12] == "-"  # MFU: no known peak on the CPU
    # FLOPs are counted once per model and size: the bf16 row repeats the fp32 row's count
    for model in ("segformer-tiny (dry run)", "deeplabv2-tiny (dry run)"):
        assert rows[(model, "fp32")][11] == rows[(model, "bf16")][11]
    reference = [line for line in output.splitlines() if "the reference (CPSL paper's code" in line]
    assert len(reference) == 2 and all(line.startswith("- deeplabv2-tiny (dry run)") for line in reference)


def test_gpu_names_map_to_their_datasheet_peaks():
    cases = {
        "NVIDIA H100 80GB HBM3": "H100 SXM",
        "NVIDIA H100 PCIe": "H100 PCIe",
        "NVIDIA H200": "H200",
        "NVIDIA A100-SXM4-80GB": "A100 80GB",
        "NVIDIA A100 80GB PCIe": "A100 80GB",
        "NVIDIA A100-SXM4-40GB": "A100 40GB",
        "NVIDIA L40S": "L40S",
        "NVIDIA GeForce RTX 4090": "RTX 4090",
        "NVIDIA H200 NVL": None,  # other peaks than the SXM part
        "NVIDIA H100 NVL": None,
        "Tesla V100-SXM2-16GB": None,
        None: None,
    }
    for name, key in cases.items():
        assert bench.known_gpu(name) == key, name
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "bf16+compile") == pytest.approx(989.4e12)
    assert bench.peak_flops("NVIDIA H100 80GB HBM3", "fp32") == pytest.approx(494.7e12)  # TF32 dense
    assert bench.peak_flops("NVIDIA A100-SXM4-40GB", "fp32") == pytest.approx(156e12)
    assert bench.peak_flops("NVIDIA GeForce RTX 4090", "bf16") == pytest.approx(165.2e12)
    assert bench.peak_flops("Tesla V100-SXM2-16GB", "bf16") is None


def test_mfu_and_reference_arithmetic():
    # 2 TFLOP per step in 10 ms on a 989.4 TFLOP/s part: 200 / 989.4 = 20.21 %
    assert bench.model_flops_utilisation(2e12, 0.01, 989.4e12) == pytest.approx(0.2021427, rel=1e-6)
    assert bench.model_flops_utilisation(2e12, 0.01, None) is None
    assert bench.model_flops_utilisation(None, 0.01, 989.4e12) is None
    assert bench.reference_images_per_second_per_gpu() == pytest.approx(8 / 5.15 / 4)
    assert bench.reference_images_per_second_per_gpu() == pytest.approx(0.3883495, rel=1e-6)

    row = bench.Row("deeplabv2-r101", "deeplabv2-r101", (512, 896), (1024, 2048), 4, "fp32", reference=True)
    result = bench.Result(plain_s=0.5, cpsl_s=0.6, core_share=0.1, images=8, peak_gib=10.04, flops=30e12)
    line = bench.format_row(row, result, "NVIDIA H100 80GB HBM3")
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    # 30e12 / 0.6 / 494.7e12 = 10.11 %; 8 / 0.6 = 13.3 images/s; 8 / 0.5 = 16.0
    assert cells[1:] == [
        "896x512", "4+4", "fp32", "0.500", "0.600", "1.20x", "10.0%", "16.0", "13.3", "10.0", "30,000", "10.1%",
    ]  # fmt: skip
    assert bench.format_row(row, result, "Tesla V100-SXM2-16GB").endswith("| - |")
    # 13.33 images/s per GPU against 0.3883: 34.3x
    assert "13.33 images/s per GPU = 34.3x the reference" in bench.reference_line(row, result)


def test_compile_rows_pass_the_trainer_flag():
    row = bench.Row("segformer-b5", "segformer-b5", (512, 512), (512, 1024), 2, "bf16+compile")
    argv = row.argv()
    assert argv[argv.index("--torch_compile") + 1] == "true"
    assert argv[argv.index("--mixed_precision") + 1] == "bf16"
    assert "--torch_compile" not in bench.Row("m", "m", (8, 8), (8, 8), 1, "bf16").argv()
    fp32 = bench.Row("m", "m", (8, 8), (8, 8), 1, "fp32").argv()
    assert fp32[fp32.index("--mixed_precision") + 1] == "no" and "--allow_tf32" in fp32


def test_gpu_rows_are_the_published_recipes_in_three_precisions():
    labels = [(row.label, row.crop, row.batch, row.precision) for row in bench.GPU_ROWS]
    assert labels == [
        (name, crop, batch, precision)
        for name, crop, batch in (("segformer-b5", (512, 512), 2), ("deeplabv2-r101", (512, 896), 4))
        for precision in ("fp32", "bf16", "bf16+compile")
    ]
    assert [row.reference for row in bench.GPU_ROWS] == [False] * 3 + [True] * 3
    later = [(row.label, row.backbone, row.precision, row.extra) for row in bench.LATER_GPU_ROWS]
    decay = ("--layer_decay", "0.9")
    assert later == [
        ("dinov2-large", "dinov2-large", "fp32", decay),
        ("dinov2-large", "dinov2-large", "bf16", decay),
        ("dinov2-large ckpt", "dinov2-large", "bf16", (*decay, "--gradient_checkpointing")),
        ("dinov3-vitl16", "dinov3-vitl16", "bf16", decay),
    ]
    assert all(row.crop == (512, 512) and row.batch == 2 for row in bench.LATER_GPU_ROWS)
