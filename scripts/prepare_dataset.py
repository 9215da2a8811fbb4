"""Prepare GTA5 / SYNTHIA / Cityscapes once as parquet shards (+ dataset card), optionally pushed to the Hub.

    python scripts/prepare_dataset.py gta5 --data_dir /data/gta5 --output_dir /data/gta5-prepared
    python scripts/prepare_dataset.py cityscapes --data_dir /data/cityscapes --output_dir out --split val
    python scripts/prepare_dataset.py synthia --data_dir /data/RAND_CITYSCAPES --output_dir out \\
        --push_to_hub me/synthia-cpsl      # a private dataset repo (--public only if the licence allows)
    python scripts/prepare_dataset.py folder --data_dir /data/potsdam --class_table classes.yaml --output_dir out
"""

import argparse
import sys

from cpsl_hf.cli import run
from cpsl_hf.data.prepare import prepare_dataset
from cpsl_hf.data.readers import LAYOUTS


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "dataset", choices=[*sorted(LAYOUTS), "folder"], help="which official download, or folder (your own)"
    )
    parser.add_argument("--data_dir", required=True, help="root folder of the download")
    parser.add_argument("--output_dir", required=True, help="folder for README.md and data/*.parquet")
    parser.add_argument("--num_classes", type=int, default=None, help="19, 16 or 13 (default 19; SYNTHIA 16)")
    parser.add_argument(
        "--class_table",
        default=None,
        help="folder: the class table (YAML/JSON) its masks are decoded through",
    )
    parser.add_argument(
        "--num_shards", type=int, default=None, help="a power of two (default: from the size)"
    )
    parser.add_argument("--split", default=None, help="output split name; Cityscapes: train, val or test")
    parser.add_argument("--on_bad_sample", choices=("raise", "skip"), default="raise")
    parser.add_argument("--num_proc", type=int, default=None, help="processes for checking and converting")
    parser.add_argument("--push_to_hub", metavar="REPO_ID", default=None, help="upload to this dataset repo")
    visibility = parser.add_mutually_exclusive_group()
    visibility.add_argument(
        "--private", dest="private", action="store_true", default=True,
        help="create the Hub repo private (the default: the datasets' licences forbid public redistribution)",
    )  # fmt: skip
    visibility.add_argument(
        "--public", dest="private", action="store_false",
        help="create the Hub repo public (only if the dataset's licence allows redistribution)",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    result = prepare_dataset(
        args.dataset,
        args.data_dir,
        args.output_dir,
        num_classes=args.num_classes,
        num_shards=args.num_shards,
        split=args.split,
        on_bad_sample=args.on_bad_sample,
        push_to_hub=args.push_to_hub,
        private=args.private,
        num_proc=args.num_proc,
        class_table=args.class_table,
    )
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
