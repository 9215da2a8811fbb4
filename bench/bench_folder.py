"""Your own folder against the built-in reader: one-time mask decoding per image at Cityscapes size, printed.

Writes a few generated Cityscapes-size samples (2048 x 1024) in the Cityscapes layout and the same masks as
``images/`` + ``masks/`` folders in three encodings (8-bit label ids, 16-bit label ids, colour-coded RGB), then
times the first (uncached) load of each in one process and checks that every reader yields the same train ids:

- ``load_cityscapes`` (the built-in reader, ``label_id_lut``);
- ``load_folder`` with ``protocol_table(19)`` (the same classes as a class table) on 8-bit and 16-bit masks;
- ``load_folder`` on colour-coded masks (Cityscapes colours) decoded through the table's palette.

    python bench/bench_folder.py [--num_images 6]
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from cpsl_hf.data import protocols, readers, testing
from cpsl_hf.data.class_table import protocol_table
from cpsl_hf.data.folder import load_folder

HEIGHT, WIDTH = 1024, 2048


def blocky_label_ids(rng: np.random.Generator) -> np.ndarray:
    coarse = rng.integers(0, 34, size=(HEIGHT // 32, WIDTH // 32), dtype=np.uint8)
    return np.kron(coarse, np.ones((32, 32), dtype=np.uint8))


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_images", type=int, default=6)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    table = protocol_table(19)
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        maps = {testing.cityscapes_stem("aachen", i): blocky_label_ids(rng) for i in range(args.num_images)}
        testing.write_cityscapes(root / "cityscapes", maps, split="val")
        lut = protocols.label_id_lut(19)
        for encoding in ("8-bit", "16-bit", "colour"):
            folder = root / encoding
            (folder / "images").mkdir(parents=True)
            (folder / "masks").mkdir()
            for stem, ids in maps.items():
                image = root / "cityscapes" / "leftImg8bit" / "val" / "aachen" / f"{stem}_leftImg8bit.png"
                (folder / "images" / f"{stem}.png").symlink_to(image)
                mask = {"8-bit": ids, "16-bit": ids.astype(np.uint16), "colour": None}[encoding]
                if encoding == "colour":  # evaluated classes in their colour, the rest black (void)
                    train_ids = lut[ids]
                    mask = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
                    mask[train_ids != 255] = protocols.CITYSCAPES_PALETTE[train_ids[train_ids != 255]]
                Image.fromarray(mask).save(folder / "masks" / f"{stem}.png")
        colour_table = type(table)(
            names=table.names, values=table.values, void_values=table.void_values, colors=table.colors,
            void_colors=((0, 0, 0),), source="cityscapes colours",
        )  # fmt: skip

        def runs(cache: Path):
            return [
                ("load_cityscapes (built-in)", lambda: readers.load_cityscapes(
                    root / "cityscapes", "val", cache_dir=cache / "1", progress=False)),
                ("load_folder, 8-bit label ids", lambda: load_folder(
                    root / "8-bit", table, cache_dir=cache / "2", progress=False)),
                ("load_folder, 16-bit label ids", lambda: load_folder(
                    root / "16-bit", table, cache_dir=cache / "3", progress=False)),
                ("load_folder, colour-coded", lambda: load_folder(
                    root / "colour", colour_table, cache_dir=cache / "4", progress=False)),
            ]  # fmt: skip

        for _, load in runs(root / "warm-up"):  # a process's first load also pays imports and warm-up
            load()
        reference = None
        print(f"{args.num_images} masks of {WIDTH} x {HEIGHT}, first load (decode + cache), one process")
        print("| reader | s / image | same train ids as the built-in |")
        print("|---|---:|---|")
        for title, load in runs(root / "timed"):
            dataset, seconds = timed(load)
            labels = {row["name"]: np.asarray(row["label"]) for row in dataset}
            if reference is None:
                reference = labels
            same = labels.keys() == reference.keys() and all(
                (labels[k] == reference[k]).all() for k in labels
            )
            print(f"| {title} | {seconds / args.num_images:.3f} | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
