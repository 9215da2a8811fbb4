"""Training memory per process for the foundation-model presets: estimated on the meta device, checked against the
peak measured on the CPU at small sizes.

    python bench/memory.py                 # the estimate table (seconds) + the CPU measurement (about a minute)
    python bench/memory.py --no_measure    # the estimate table only

Estimate (:func:`cpsl_hf.training.memory.estimate_memory`): crops 512 x 512, one student pass over 2 source + 2
target crops, AdamW, EMA teacher + frozen pseudo-label model (the recipes), for fp32 and bf16 activations, with and
without ``--gradient_checkpointing``. "GPU" is the total with fused attention (no attention map kept: SDPA's flash /
memory-efficient kernels), "eager" with the maps kept.

Measurement: in a fresh process per row, the peak resident memory (``ru_maxrss``) of one training-mode forward +
backward at a small size minus the resident memory just before it (model built, weights loaded), against the
estimate of what that pass holds: the activations (the CPU keeps the attention maps) + the gradients.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from cpsl_hf import CPSLConfig
from cpsl_hf.training.memory import GIB, estimate_memory

PRESETS = ["segformer-b5", "dinov2-base", "dinov2-large", "dinov3-vitb16", "dinov3-vitl16", "swin-base"]
MEASURED = [
    ("dinov2-small", 224, 2),
    ("dinov2-small", 336, 2),
    ("dinov3-vits16", 256, 2),
    ("segformer-b0", 256, 2),
]

CHILD = """
import json, resource, sys, torch
from cpsl_hf import CPSLConfig, CPSLForSemanticSegmentation
name, side, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
model = CPSLForSemanticSegmentation(CPSLConfig.from_preset(name)).train()
pixels = torch.randn(batch, 3, side, side)
labels = torch.randint(0, 19, (batch, side, side))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
model(pixels, labels=labels).loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"before_kib": before, "peak_kib": peak}))
"""


def estimate_table() -> None:
    print("| preset | params (M) | fp32 eager | fp32 GPU | bf16 GPU | fp32 GPU + ckpt | bf16 GPU + ckpt |")
    print("|---|---|---|---|---|---|---|")
    for name in PRESETS:
        config = CPSLConfig.from_preset(name)
        cells = []
        for dtype, checkpointed in (
            (torch.float32, False),
            (torch.bfloat16, False),
            (torch.float32, True),
            (torch.bfloat16, True),
        ):
            estimate = estimate_memory(
                config, (512, 512), 4, activation_dtype=dtype, gradient_checkpointing=checkpointed
            )
            if dtype == torch.float32 and not checkpointed:
                cells.append(f"{estimate.total_bytes / GIB:.1f}")
                parameters = estimate.parameters
            cells.append(f"{estimate.fused_attention_total_bytes / GIB:.1f}")
        print(f"| {name} | {parameters / 1e6:.1f} | " + " | ".join(cells) + " |")


def measure_table() -> None:
    print(
        "\n| preset | crop | batch | estimate: activations + grads (GiB) | measured peak - before (GiB) | ratio |"
    )
    print("|---|---|---|---|---|---|")
    for name, side, batch in MEASURED:
        estimate = estimate_memory(CPSLConfig.from_preset(name), (side, side), batch)
        expected = estimate.activation_bytes + estimate.gradient_bytes
        result = subprocess.run(
            [sys.executable, "-c", CHILD, name, str(side), str(batch)],
            capture_output=True,
            text=True,
            check=True,
            env={"OMP_NUM_THREADS": "1", "PATH": "", "HF_HUB_OFFLINE": "1"},
        )
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        grown = (measured["peak_kib"] - measured["before_kib"]) * 1024
        print(
            f"| {name} | {side}x{side} | {batch} | {expected / GIB:.3f} | {grown / GIB:.3f} | "
            f"{grown / expected:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no_measure", action="store_true", help="Only the meta-device estimate table.")
    args = parser.parse_args()
    estimate_table()
    if not args.no_measure:
        measure_table()


if __name__ == "__main__":
    main()
