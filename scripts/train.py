#!/usr/bin/env python
"""Adapt a segmentation model from a labelled source domain to an unlabelled target domain with CPSL.

    accelerate launch scripts/train.py                                   # built-in synthetic demo (CPU, ~5 min)
    accelerate launch scripts/train.py --config configs/gta5_cityscapes_segformer_b5.yaml \
        --source_dir /data/gta5 --target_dir /data/cityscapes
    accelerate launch --multi_gpu --num_processes 2 scripts/train.py     # data parallel (GPUs, or gloo on CPU)
    python scripts/train.py --help                                       # every argument

Any YAML value can be overridden on the command line; ``--resume_from_checkpoint latest`` continues a run.
All logic lives in :mod:`cpsl_hf.training`.
"""

import sys

from cpsl_hf.cli import run
from cpsl_hf.training.arguments import ConfigurationError, parse_args
from cpsl_hf.training.loop import train


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":  # a ConfigurationError (raised before any step, names the argument) exits 2
    sys.exit(run(main, usage_errors=(ConfigurationError,)))
