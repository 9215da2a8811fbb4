"""Evaluate a segmentation checkpoint: mIoU, per-class IoU and accuracy, as the Cityscapes benchmark defines them.

    python scripts/evaluate.py --model PATH_OR_REPO --dataset cityscapes --data_dir PATH \\
        [--split val] [--num_classes 19] [--output metrics.json] [--batch_size 1] \\
        [--flip] [--sliding_window [CROP_H,CROP_W[,STRIDE_H,STRIDE_W]]] [--mixed_precision {no,fp16,bf16}]
    python scripts/evaluate.py --model PATH_OR_REPO --dataset folder --data_dir DIR --class_table classes.yaml

Defaults: the whole image in one forward pass at its original size, no flip, full precision; logits are
upsampled bilinearly to the label size. Several processes (``accelerate launch --multi_gpu --num_processes N
scripts/evaluate.py ...``, also on CPU) each evaluate a shard and sum their confusion matrices: the numbers
equal a one-process run. The logic lives in :mod:`cpsl_hf.evaluation`.
"""

import argparse
import sys

from cpsl_hf.cli import run
from cpsl_hf.evaluation import DATASETS, DEFAULT_SLIDING_WINDOW, evaluate_checkpoint
from cpsl_hf.inference import parse_sliding_window


def parse_size(text: str) -> tuple[int, int]:
    height, width = (int(part) for part in text.replace("x", ",").split(","))
    return height, width


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub repo id")
    parser.add_argument("--dataset", default="cityscapes", choices=DATASETS, help="default: cityscapes")
    parser.add_argument(
        "--data_dir",
        default=None,
        help="dataset root (cityscapes: holds leftImg8bit/ and gtFine/); prepared: folder or Hub dataset id",
    )
    parser.add_argument("--split", default="val", help="default: val (ignored for gta5/synthia)")
    parser.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="label protocol 19, 16 or 13 (default: 19; with --class_table: the table's)",
    )
    parser.add_argument(
        "--class_table",
        default=None,
        help="class table (YAML/JSON) of the model's classes; needed for folder",
    )
    parser.add_argument(
        "--target_class_table",
        default=None,
        help="the folder dataset's own class table, matched to the model's classes by name",
    )
    parser.add_argument(
        "--acdc_conditions",
        nargs="+",
        default=None,
        help="acdc: the conditions scored (fog night rain snow; default all four)",
    )
    parser.add_argument("--output", default=None, help="write the metrics as JSON here")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass (default: 1)")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument(
        "--sliding_window",
        nargs="?",
        const=",".join(map(str, DEFAULT_SLIDING_WINDOW)),
        default=None,
        metavar="CROP_H,CROP_W[,STRIDE_H,STRIDE_W]",
        help="overlapping windows instead of the whole image; without a value "
        f"{','.join(map(str, DEFAULT_SLIDING_WINDOW))}; two numbers: stride = crop / 2",
    )
    parser.add_argument(
        "--mixed_precision",
        nargs="?",
        const="bf16",
        default="no",
        choices=("no", "fp16", "bf16"),
        help="autocast dtype (default: no; without a value: bf16)",
    )
    parser.add_argument(
        "--image_size", type=parse_size, default=None, help="resize to H,W (default: original size)"
    )
    parser.add_argument("--max_samples", type=int, default=None, help="evaluate only the first N samples")
    parser.add_argument(
        "--cache_dir", default=None, help="cache of converted datasets (default: HF datasets cache)"
    )
    parser.add_argument(
        "--trust_remote_code", action="store_true", help="for non-CPSL checkpoints with remote code"
    )
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    return evaluate_checkpoint(
        args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        split=args.split,
        num_classes=args.num_classes,
        batch_size=args.batch_size,
        flip=args.flip,
        sliding_window=parse_sliding_window(args.sliding_window),
        mixed_precision=args.mixed_precision,
        image_size=args.image_size,
        max_samples=args.max_samples,
        output=args.output,
        cache_dir=args.cache_dir,
        trust_remote_code=args.trust_remote_code,
        progress=not args.no_progress,
        class_table=args.class_table,
        target_class_table=args.target_class_table,
        reader_options={"conditions": args.acdc_conditions} if args.acdc_conditions else None,
    )


if __name__ == "__main__":
    sys.exit(run(main))
