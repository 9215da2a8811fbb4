"""Data pipeline throughput per worker at the real image sizes (generated images), printed as a table.

For GTA5 (1914x1052), SYNTHIA (1280x760) and Cityscapes (2048x1024) it writes a few generated samples in
the official layout, then measures, in one process with one torch thread (= one DataLoader worker):

- the one-time costs: label conversion by the reader and ``prepare_dataset`` (parquet writing);
- samples/s through the training loader (PNG decode + tensors), then + weak augmentation (random rescale
  0.5-1.5, crop, flip), then + strong augmentation (colour jitter, blur, 2 RandAugment ops, cutout), from the
  local folder (map-style reader) and from the prepared parquet (streaming).

    python bench/bench_data.py [--num_images 6] [--crop 512 512] [--batches 6]

Generated images are smooth random fields plus noise (they compress like photos, within a factor ~2);
labels are blocky random ids. Numbers are for this machine and this CPU load; compare rows, not machines.
"""

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cpsl_hf.data import loading, prepare, readers, testing, transforms
from cpsl_hf.data.registry import load_dataset

SIZES = {"gta5": (1052, 1914), "synthia": (760, 1280), "cityscapes": (1024, 2048)}


def photo_like(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    coarse = rng.integers(0, 256, size=(height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    smooth = np.asarray(
        Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16
    )
    return np.clip(smooth + rng.normal(0, 6, size=smooth.shape), 0, 255).astype(np.uint8)


def blocky_ids(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    coarse = testing.random_label_ids(kind, height // 16 + 1, width // 16 + 1, rng)
    return np.repeat(np.repeat(coarse, 16, axis=0), 16, axis=1)[:height, :width]


def write_download(kind: str, root: Path, num_images: int) -> Path:
    rng = np.random.default_rng(0)
    height, width = SIZES[kind]
    maps = {f"{i:05d}": blocky_ids(kind, height, width, rng) for i in range(num_images)}
    if kind == "cityscapes":
        maps = {testing.cityscapes_stem("bench", i): label for i, label in enumerate(maps.values())}
        testing.write_cityscapes(root, maps)
        folder = root / "leftImg8bit" / "train" / "bench"
        paths = {stem: folder / f"{stem}_leftImg8bit.png" for stem in maps}
    elif kind == "gta5":
        testing.write_gta5(root, maps)
        paths = {name: root / "images" / f"{name}.png" for name in maps}
    else:
        testing.write_synthia(root, maps, row_filters=(4,))
        paths = {name: root / "RGB" / f"{name}.png" for name in maps}
    for path in paths.values():  # replace the noise images by photo-like ones
        Image.fromarray(photo_like(height, width, rng)).save(path)
    return root


def loader_rate(dataset, batches: int, augment: str, crop: tuple[int, int]) -> float:
    """Samples per second through decode (+ weak, + strong), batch size 1, first batch excluded."""
    loader = loading.build_train_loader(dataset, batch_size=1, seed=0)
    generator = torch.Generator().manual_seed(0)

    def step():
        batch = next(loader)
        if augment in ("weak", "strong"):
            view = transforms.weak_augment(
                batch["pixel_values"], batch["labels"], crop_size=crop, generator=generator
            )
            if augment == "strong":
                transforms.strong_augment(view.images, generator=generator)

    step()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    return batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_images", type=int, default=6)
    parser.add_argument("--batches", type=int, default=6, help="timed samples per measurement")
    parser.add_argument("--crop", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    import datasets

    datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0  # see tests/test_data_loading.py
    datasets.disable_progress_bars()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind, (height, width) in SIZES.items():
            root = write_download(kind, tmp / kind, args.num_images)
            start = time.perf_counter()
            local = load_dataset(kind, root, label_cache_dir=tmp / "cache", progress=False)
            convert = args.num_images / (time.perf_counter() - start)
            start = time.perf_counter()
            prepare.prepare_dataset(kind, root, tmp / f"{kind}-parquet", progress=False)
            prepared = args.num_images / (time.perf_counter() - start)
            parquet = readers.load_prepared(tmp / f"{kind}-parquet", "train", streaming=True)
            rates = {
                (source, augment): loader_rate(dataset, args.batches, augment, tuple(args.crop))
                for source, dataset in (("folder", local), ("parquet", parquet))
                for augment in ("decode", "weak", "strong")
            }
            rows.append((kind, f"{width}x{height}", convert, prepared, rates))
    crop = f"{args.crop[0]}x{args.crop[1]}"
    print(f"\nsamples/s per worker (1 process, 1 torch thread); weak/strong crop {crop} (HxW); batch 1\n")
    header = (
        "| dataset | size | reader label conversion (once) | prepare to parquet (once) "
        "| folder: decode | + weak | + weak + strong | parquet: decode | + weak | + weak + strong |"
    )
    print(header)
    print("| --- | --- |" + " ---: |" * 8)
    for kind, size, convert, prepared, rates in rows:
        cells = [f"{convert:.1f}", f"{prepared:.1f}"] + [
            f"{rates[(source, augment)]:.1f}"
            for source in ("folder", "parquet")
            for augment in ("decode", "weak", "strong")
        ]
        print(f"| {kind} | {size} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
