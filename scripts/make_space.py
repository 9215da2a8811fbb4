"""Write (and push) a Gradio demo Space for a CPSL model.

    python scripts/make_space.py --model USER/NAME_OR_FOLDER --space_id USER/NAME-demo [--output_dir DIR] \\
        [--examples IMAGE_OR_FOLDER ...] [--push] [--private] [--token TOKEN]

Writes ``app.py``, ``space_config.json``, ``requirements.txt``, a README with the Space's metadata and
``examples/`` to ``DIR`` (default ``./space``); ``cd DIR && python app.py`` runs the demo locally on CPU. With
``--push`` the folder becomes the Space ``USER/NAME-demo`` (the model must then be a Hub repo id). Examples default
to the model folder's ``examples/`` (the trainer writes them with ``--save_predictions``). Needs the demo extra:
``pip install 'cpsl-hf[demo]'``. The logic lives in :mod:`cpsl_hf.space`.
"""

import argparse
import sys

from cpsl_hf.cli import run
from cpsl_hf.space import push_space, write_space


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="Hub repo id USER/NAME, or a local model folder")
    parser.add_argument("--space_id", required=True, help="USER/NAME of the Space")
    parser.add_argument(
        "--output_dir", default="space", help="where to write the Space folder (default: ./space)"
    )
    parser.add_argument(
        "--examples", nargs="+", default=None, help="image files or folders offered as examples"
    )
    parser.add_argument(
        "--class_table",
        default=None,
        help="the class table the model was trained with (its palette colours masks)",
    )
    parser.add_argument("--title", default=None, help="page title (default: from the model's name)")
    parser.add_argument(
        "--push", action="store_true", help="create the Space on the Hub and upload the folder"
    )
    parser.add_argument("--private", action="store_true", help="create the Space as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or `hf auth login`)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    folder = write_space(
        args.model, args.space_id, args.output_dir, examples=args.examples, title=args.title,
        class_table=args.class_table,
    )  # fmt: skip
    print(f"Space folder: {folder.resolve()} (run it locally: cd {folder} && python app.py)")
    if args.push:
        print(push_space(folder, args.space_id, private=args.private, token=args.token))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
