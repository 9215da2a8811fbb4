"""Predict images with a CPSL (or any Cityscapes-protocol segmentation) checkpoint.

    python scripts/predict.py --model PATH_OR_REPO --images FILE_OR_FOLDER... --output_dir OUT \\
        [--format color overlay labelids trainids] [--labels FILE_OR_FOLDER...] [--flip] [--num_classes 19]
        [--class_table classes.yaml]

Writes ``OUT/<format>/<name>.png`` at each input's own size (``labelids``: official Cityscapes label-id PNGs for
a benchmark submission) and, with ``--labels``, side-by-side strips to ``OUT/strips/``. Unreadable files are
reported at the end (exit status 1); the other images are still written. The logic lives in
:mod:`cpsl_hf.predict`.
"""

import argparse
import sys

from cpsl_hf.cli import run
from cpsl_hf.inference import parse_sliding_window
from cpsl_hf.predict import FORMATS, LABEL_FORMATS, predict


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="checkpoint folder or Hub repo id")
    parser.add_argument("--images", required=True, nargs="+", help="image files and/or folders (recursive)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--format",
        nargs="+",
        default=["color"],
        choices=FORMATS,
        dest="formats",
        help="one or more output formats (default: color)",
    )
    parser.add_argument(
        "--labels",
        nargs="+",
        default=None,
        help="ground-truth files/folders; X_leftImg8bit.png pairs with X_gtFine_labelIds.png or X.png",
    )
    parser.add_argument(
        "--label_format",
        default="labelids",
        choices=LABEL_FORMATS,
        help="pixel values of --labels: Cityscapes label ids (default) or protocol train ids",
    )
    parser.add_argument(
        "--num_classes",
        type=int,
        default=None,
        help="label protocol 19/16/13 (default: the model's number of labels)",
    )
    parser.add_argument(
        "--class_table",
        default=None,
        help="the class table the model was trained with: its palette colours the predictions, its label_ids "
        "go to --format labelids, --labels are decoded through it",
    )
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument(
        "--sliding_window",
        default=None,
        help="CROP_H,CROP_W[,STRIDE_H,STRIDE_W] (default: whole image in one pass)",
    )
    parser.add_argument("--alpha", type=float, default=0.5, help="mask opacity for --format overlay")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no_progress", action="store_true", help="hide the progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = predict(
        args.model,
        args.images,
        args.output_dir,
        formats=args.formats,
        labels=args.labels,
        label_format=args.label_format,
        num_classes=args.num_classes,
        flip=args.flip,
        sliding_window=parse_sliding_window(args.sliding_window),
        alpha=args.alpha,
        device=args.device,
        progress=not args.no_progress,
        class_table=args.class_table,
    )
    print(report.summary())
    for line in report.error_lines():  # one line per unreadable file
        print(line, file=sys.stderr)
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(run(main))
