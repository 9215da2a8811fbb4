"""Data pipeline throughput per worker at the real image sizes (generated images), printed as a table.

For GTA5 (1914x1052), SYNTHIA (1280x760) and Cityscapes (2048x1024) it writes a few generated samples in
the official layout, then measures, in one process with one torch thread (= one DataLoader worker):

- the one-time costs: label conversion by the reader and ``prepare_dataset`` (parquet writing);
- samples/s through the training loader (PNG decode + tensors), then + weak augmentation (random rescale
  0.5-1.5, crop, flip), then + strong augmentation (colour jitter, blur, 2 RandAugment ops, cutout), from the
  local folder (map-style reader) and from the prepared parquet (streaming).

    python bench/bench_data.py [--num_images 6] [--crop 512 512] [--batches 6]
    python bench/bench_data.py --hub [--hub_images 40]     # streaming from a loopback Hub instead (issue 17)

``--hub``: a GTA5-size prepared split (one shard, row groups of 32) is pushed to the loopback Hub of
``tests/hub_server.py`` through the real client, then read back with ``--streaming``'s code path in a fresh
process (``HF_ENDPOINT`` pointing at it, as a user's run): samples/s through the training loader (decode only,
one epoch including the shuffle buffer's fill) from the Hub and from the local parquet folder, and the bytes the
Hub served per sample read, for a whole epoch and for the first 8 samples only (range requests: a partial read
fetches the row groups it needs, not the shard).

Generated images are smooth random fields plus noise (they compress like photos, within a factor ~2);
labels are blocky random ids. Numbers are for this machine and this CPU load; compare rows, not machines.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from cpsl_hf.data import loading, prepare, readers, testing, transforms
from cpsl_hf.data.registry import load_dataset

REPO = Path(__file__).resolve().parents[1]
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


def stream_worker(source: str, phase: str, count: int) -> None:
    """(In a fresh process with HF_ENDPOINT set.) ``epoch``: one epoch of the training loader from ``source``
    (batch 1, decode only); ``first8``: the first 8 raw rows of the stream. Prints ``{"samples", "open", "seconds"}``: the
    time ``load_prepared`` took (listing, checks), then the time reading took."""
    import itertools

    import datasets

    torch.set_num_threads(1)
    if (
        phase == "epoch"
    ):  # a stream left mid-file keeps datasets' guard against an Arrow crash at exit (#45214)
        datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = 0
    datasets.disable_progress_bars()
    start = time.perf_counter()
    dataset = readers.load_prepared(source, "train", streaming=True)
    opened = time.perf_counter()
    if phase == "first8":
        rows = iter(dataset)
        count = sum(1 for _ in itertools.islice(rows, 8))
        rows.close()  # stop the stream mid-shard, as a run that ends does
    else:
        loader = loading.build_train_loader(dataset, batch_size=1, seed=0)
        for _ in range(count):  # one epoch exactly: a step more would refill the shuffle buffer (epoch 2)
            next(loader)
    end = time.perf_counter()
    print(json.dumps({"samples": count, "open": opened - start, "seconds": end - opened}), flush=True)
    # A parquet stream left mid-file can abort the interpreter's exit (apache/arrow#45214, pyarrow 26 too; seen
    # here about once in ten exits): the measurement is printed, so skip the finalisation.
    os._exit(0)


def hub_table(num_images: int) -> None:
    """Push a GTA5-size split to the loopback Hub, stream it back from a fresh process, print the table."""
    sys.path.insert(0, str(REPO / "tests"))
    from hub_server import LocalHub

    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalHub(Path(tmp) / "hub", lfs_patterns=("*.parquet",)) as hub,
    ):
        tmp = Path(tmp)
        root = write_download("gta5", tmp / "gta5", num_images)
        env = {
            **os.environ, "HF_ENDPOINT": hub.endpoint, "HF_TOKEN": hub.token, "HF_HUB_OFFLINE": "0",
            "HF_DATASETS_OFFLINE": "0", "HF_HOME": str(tmp / "hf_home"), "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "prepare_dataset.py"), "gta5", "--data_dir", str(root),
             "--output_dir", str(tmp / "parquet"), "--num_shards", "1", "--push_to_hub", "tester/gta5-bench"],
            env=env, check=True, capture_output=True,
        )  # fmt: skip
        shard = next((tmp / "parquet" / "data").glob("*.parquet"))
        stored = shard.stat().st_size / num_images
        rows = []
        for label, source in (
            ("local parquet folder", str(tmp / "parquet")),
            ("loopback Hub", "tester/gta5-bench"),
        ):
            cells = {}
            for phase in ("epoch", "first8"):
                hub.served.clear()
                hub.requests.clear()
                result = subprocess.run(
                    [sys.executable, __file__, "--_stream_worker", source, phase, str(num_images)],
                    env=env, check=True, capture_output=True, text=True,
                )  # fmt: skip
                measured = json.loads(result.stdout.strip().splitlines()[-1])
                gets = [entry for entry in hub.served if entry[0] == "GET" and entry[1].endswith(".parquet")]
                served = sum(entry[3] for entry in gets)
                cells[phase] = (measured, served, len(gets))
            (epoch, epoch_bytes, epoch_gets), (first, first_bytes, first_gets) = (
                cells["epoch"],
                cells["first8"],
            )
            remote = source == "tester/gta5-bench"
            rows.append(
                (
                    label,
                    f"{epoch['open']:.2f}",
                    f"{epoch['samples'] / epoch['seconds']:.2f}",
                    f"{epoch_bytes / epoch['samples'] / 2**20:.2f} ({epoch_gets} GETs)" if remote else "-",
                    f"{first_bytes / first['samples'] / 2**20:.2f} ({first_gets} GETs)" if remote else "-",
                )
            )
    print(
        f"\nGTA5 1914x1052, {num_images} samples in 1 shard (row groups of 32), stored "
        f"{stored / 2**20:.2f} MiB/sample; 1 process, 1 torch thread, batch 1, decode only\n"
    )
    print(
        "| read from | load_prepared (s) | samples/s, one epoch | MiB served per sample, epoch "
        "| MiB served per sample, first 8 only |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num_images", type=int, default=6)
    parser.add_argument("--batches", type=int, default=6, help="timed samples per measurement")
    parser.add_argument("--crop", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--hub", action="store_true", help="measure streaming from a loopback Hub instead")
    parser.add_argument("--hub_images", type=int, default=40, help="--hub: GTA5-size samples pushed")
    parser.add_argument("--_stream_worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._stream_worker:
        source, phase, count = args._stream_worker
        stream_worker(source, phase, int(count))
        return
    if args.hub:
        hub_table(args.hub_images)
        return
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
