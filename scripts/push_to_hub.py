"""Push a finished checkpoint folder to the Hugging Face Hub with its model card.

    python scripts/push_to_hub.py --checkpoint DIR --repo_id USER/NAME [--private] \\
        [--metrics DIR/metrics.json] [--training_info DIR/training_info.json] [--token TOKEN]

The card (README.md) is rendered from ``DIR/metrics.json`` (or ``--metrics``): the one a training run writes
(its ``final`` evaluation) or the output of ``scripts/evaluate.py --output``; without metrics an existing
README.md is pushed as it is. Fails at once, saying why, with
``HF_HUB_OFFLINE=1``, without a token, or without network. The logic lives in :mod:`cpsl_hf.hub`.
"""

import argparse
import sys

from cpsl_hf.cli import run
from cpsl_hf.hub import publish_checkpoint


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="folder written by save_pretrained / the trainer")
    parser.add_argument(
        "--repo_id",
        required=True,
        help="USER/NAME, or NAME for the token's own account (the card then names USER/NAME)",
    )
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--metrics", default=None, help="metrics JSON (default: CHECKPOINT/metrics.json)")
    parser.add_argument(
        "--training_info", default=None, help="run facts JSON (default: CHECKPOINT/training_info.json)"
    )
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    parser.add_argument("--commit_message", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    url = publish_checkpoint(
        args.checkpoint,
        args.repo_id,
        metrics_file=args.metrics,
        training_info_file=args.training_info,
        private=args.private,
        token=args.token,
        commit_message=args.commit_message,
    )
    print(url)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
