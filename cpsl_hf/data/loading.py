"""Training and evaluation loaders over ``datasets`` datasets (map-style or streaming).

Batches are dicts ``{"pixel_values": uint8 N x 3 x H x W, "labels": int64 N x H x W, "name": list[str]}``
(RGB, Cityscapes protocol train ids, 255 = ignore).

How the work is split:

- The *order* of samples is decided in the main process, cheaply, without decoding: for a map-style
  ``Dataset`` a permutation of indices per epoch (a global shuffle, seeded by ``(seed, epoch)``), dealt to
  processes round-robin; for an ``IterableDataset`` (streaming from parquet / the Hub) the undecoded rows of
  ``split_dataset_by_node(dataset.shuffle(seed, buffer_size), rank, world_size)`` with ``set_epoch(epoch)``.
- Each batch of indices (or raw rows) is handed to a ``torch.utils.data.DataLoader`` worker, which decodes
  the PNG/JPEG bytes, resizes (bilinear image, nearest label) and builds the tensors. The DataLoader returns
  batches in order, so the sample sequence does not depend on ``num_workers``.
- :class:`EndlessLoader` iterates forever (epoch after epoch), so no process ever waits for another at an
  epoch's end. Its ``state_dict()`` is ``(epoch, batches consumed in the epoch)``; after
  ``load_state_dict()`` it rebuilds the epoch's order and skips the consumed part *before decoding*, so a
  resumed run continues at exactly the next sample.
"""

from __future__ import annotations

import io
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

_RAW_COLUMNS = ("image", "label")


def _undecoded(dataset):
    """The dataset with image/label columns left as ``{"bytes", "path"}`` dicts (decoding happens in workers)."""
    import datasets

    missing = {"image", "label", "name"} - set(dataset.features or {})
    if missing:
        raise ValueError(
            f"dataset lacks column(s) {sorted(missing)}; expected columns image, label, name "
            "(as returned by cpsl_hf.data.load_gta5 / load_synthia / load_cityscapes / load_prepared / load_synthetic)"
        )
    for column in _RAW_COLUMNS:
        if not isinstance(dataset.features[column], datasets.Image):
            raise ValueError(
                f"column {column!r} must be a datasets.Image() feature, got {dataset.features[column]}"
            )
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset.select_columns(["image", "label", "name"])


def _open(raw: Any) -> Image.Image:
    if isinstance(raw, Image.Image):
        return raw
    if raw.get("bytes") is not None:
        return Image.open(io.BytesIO(raw["bytes"]))
    if raw.get("path"):
        return Image.open(raw["path"])
    raise ValueError("image entry has neither bytes nor path")


def decode_sample(raw_image, raw_label, name: str, image_size: tuple[int, int] | None):
    """Decode one sample -> (image H x W x 3 uint8, label H x W uint8), resized to ``image_size`` (H, W)."""
    with _open(raw_image) as image_file, _open(raw_label) as label_file:
        image = image_file.convert("RGB") if image_file.mode != "RGB" else image_file
        if label_file.mode not in ("L", "P"):
            raise ValueError(
                f"sample {name}: label has mode {label_file.mode}; expected a single-channel L image"
            )
        label = label_file
        if image.size != label.size:
            raise ValueError(f"sample {name}: image is {image.size} but label is {label.size} (W x H)")
        if image_size is not None and (image.size[1], image.size[0]) != tuple(image_size):
            target = (int(image_size[1]), int(image_size[0]))
            image = image.resize(target, Image.Resampling.BILINEAR)
            label = label.resize(target, Image.Resampling.NEAREST)
        return np.asarray(image, dtype=np.uint8), np.asarray(label, dtype=np.uint8)


def collate_decoded(images: list[np.ndarray], labels: list[np.ndarray], names: list[str]) -> dict:
    """Stack decoded samples -> ``{"pixel_values": N x 3 x H x W uint8, "labels": N x H x W int64, "name"}``."""
    shapes = {image.shape for image in images}
    if len(shapes) > 1:
        listing = ", ".join(
            f"{name}: {image.shape[1]}x{image.shape[0]}" for name, image in zip(names, images)
        )
        raise ValueError(
            f"images of one batch differ in size ({listing}); pass image_size=(H, W) to resize, or batch_size=1"
        )
    pixel_values = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    label_tensor = torch.from_numpy(np.stack(labels)).long()
    return {"pixel_values": pixel_values, "labels": label_tensor, "name": list(names)}


class _BatchDecoder(torch.utils.data.Dataset):
    """``decoder[work_item]`` -> a collated batch. A work item is ``("indices", [i, ...])`` (rows of the
    map-style dataset, fetched in the worker) or ``("rows", {"image": [...], "label": [...], "name": [...]})``.
    """

    def __init__(self, dataset, image_size: tuple[int, int] | None):
        self.dataset = dataset  # map-style, undecoded; None for streaming
        self.image_size = tuple(image_size) if image_size is not None else None

    def __len__(self) -> int:  # unused (the sampler drives the DataLoader), defined for completeness
        return len(self.dataset) if self.dataset is not None else 0

    def __getitem__(self, work_item) -> dict:
        kind, payload = work_item
        rows = self.dataset[payload] if kind == "indices" else payload
        images, labels = [], []
        for raw_image, raw_label, name in zip(rows["image"], rows["label"], rows["name"]):
            image, label = decode_sample(raw_image, raw_label, name, self.image_size)
            images.append(image)
            labels.append(label)
        return collate_decoded(images, labels, rows["name"])


def _identity(batch):
    return batch


def _rows_to_batch(rows: list[dict]) -> dict:
    return {column: [row[column] for row in rows] for column in ("image", "label", "name")}


class _WorkItems:
    """The per-epoch sequence of work items of one process (iterated in the main process by the DataLoader)."""

    def __init__(self, loader: EndlessLoader):
        self.loader = loader

    def __iter__(self) -> Iterator:
        return self.loader._work_items()


def _check_process(process_index: int, num_processes: int) -> None:
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} must be in [0, num_processes={num_processes})")


class EndlessLoader:
    """Endless iterator of training batches (see the module docstring); ``next(loader)`` never ends.

    Attributes ``epoch`` and ``batches_in_epoch`` give the position; ``samples_per_epoch`` is this process's
    number of samples per epoch for a map-style dataset (None when streaming). Incomplete final batches of an
    epoch are dropped.
    """

    def __init__(
        self,
        dataset,
        batch_size: int,
        image_size: tuple[int, int] | None = None,
        seed: int = 0,
        num_workers: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
        shuffle_buffer_size: int = 256,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ):
        import datasets
        from datasets.distributed import split_dataset_by_node

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_process(process_index, num_processes)
        self.batch_size = batch_size
        self.seed = seed
        self.process_index = process_index
        self.num_processes = num_processes
        self.epoch = 0
        self.batches_in_epoch = 0
        self._streaming = isinstance(dataset, datasets.IterableDataset)
        raw = _undecoded(dataset)
        if self._streaming:
            shuffled = raw.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
            self._stream = split_dataset_by_node(shuffled, process_index, num_processes)
            self._dataset_size = None
            decoder = _BatchDecoder(None, image_size)
        else:
            self._stream = None
            self._dataset_size = len(raw)
            if self.samples_per_epoch < batch_size:
                raise ValueError(
                    f"process {process_index} of {num_processes} gets {self.samples_per_epoch} samples per epoch "
                    f"from a dataset of {self._dataset_size}, fewer than batch_size={batch_size}"
                )
            decoder = _BatchDecoder(raw, image_size)
        self._dataloader = torch.utils.data.DataLoader(
            decoder,
            batch_size=None,
            sampler=_WorkItems(self),
            num_workers=num_workers,
            collate_fn=_identity,
            persistent_workers=num_workers > 0,
            prefetch_factor=prefetch_factor if num_workers > 0 else None,
            pin_memory=pin_memory,
        )
        self._iterator = None

    @property
    def samples_per_epoch(self) -> int | None:
        if self._dataset_size is None:
            return None
        return len(range(self.process_index, self._dataset_size, self.num_processes))

    def epoch_permutation(self, epoch: int) -> np.ndarray:
        """Indices of the map-style dataset this process visits in ``epoch``, in order."""
        generator = np.random.Generator(np.random.PCG64([self.seed, epoch]))
        return generator.permutation(self._dataset_size)[self.process_index :: self.num_processes]

    def _work_items(self) -> Iterator:
        skip = self.batches_in_epoch * self.batch_size
        if self._streaming:
            self._stream.set_epoch(self.epoch)
            rows = itertools.islice(iter(self._stream), skip, None)
            while True:
                chunk = list(itertools.islice(rows, self.batch_size))
                if len(chunk) < self.batch_size:
                    return
                yield ("rows", _rows_to_batch(chunk))
        order = self.epoch_permutation(self.epoch)
        for start in range(skip, len(order) - self.batch_size + 1, self.batch_size):
            yield ("indices", order[start : start + self.batch_size].tolist())

    def __iter__(self) -> EndlessLoader:
        return self

    def __next__(self) -> dict:
        while True:
            if self._iterator is None:
                self._iterator = iter(self._dataloader)
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                if self.batches_in_epoch == 0:
                    raise ValueError(
                        f"process {self.process_index} of {self.num_processes} got no full batch of "
                        f"{self.batch_size} samples in epoch {self.epoch}: the dataset is empty or too small"
                    ) from None
                self.epoch += 1
                self.batches_in_epoch = 0
                continue
            self.batches_in_epoch += 1
            return batch

    def state_dict(self) -> dict:
        """Position: epoch, batches (and samples) consumed in it, plus the settings that define the order."""
        return {
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "samples_in_epoch": self.batches_in_epoch * self.batch_size,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "process_index": self.process_index,
            "num_processes": self.num_processes,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state`` (from :meth:`state_dict`); the next batch is the one after the saved one."""
        for key in ("seed", "batch_size", "num_processes", "process_index"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the saved loader had {key}={state[key]} but this one has {getattr(self, key)}; "
                    "the sample order depends on it"
                )
        self.epoch = int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self._iterator = None  # the next __next__ rebuilds the epoch and skips the consumed batches


def build_train_loader(
    dataset,
    batch_size: int,
    image_size: tuple[int, int] | None = None,
    seed: int = 0,
    num_workers: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    shuffle_buffer_size: int = 256,
    prefetch_factor: int = 2,
    pin_memory: bool = False,
) -> EndlessLoader:
    """An :class:`EndlessLoader` of training batches for process ``process_index`` of ``num_processes``.

    Args:
        dataset: ``datasets.Dataset`` or ``IterableDataset`` with image / label / name columns.
        batch_size: samples per batch (per process).
        image_size: ``(H, W)`` to resize every sample to (bilinear image, nearest label); None keeps the
            original size, and then all images of a batch must have the same size.
        seed: shuffle seed; epoch ``e`` uses the order seeded by ``(seed, e)`` (streaming: ``seed + e``).
        num_workers: DataLoader worker processes that decode and resize.
        process_index, num_processes: data-parallel rank and world size; processes see disjoint samples.
        shuffle_buffer_size: streaming only, the ``IterableDataset.shuffle`` buffer (undecoded rows).
        pin_memory: ``DataLoader(pin_memory=...)``: batches in page-locked memory, so that the trainer's
            ``.to(device, non_blocking=True)`` copies them to a CUDA device asynchronously (the trainer passes
            True on CUDA; pinning needs an accelerator).
    """
    return EndlessLoader(
        dataset,
        batch_size,
        image_size=image_size,
        seed=seed,
        num_workers=num_workers,
        process_index=process_index,
        num_processes=num_processes,
        shuffle_buffer_size=shuffle_buffer_size,
        prefetch_factor=prefetch_factor,
        pin_memory=pin_memory,
    )


class _EvalWorkItems:
    def __init__(self, dataset, batch_size: int, process_index: int, num_processes: int):
        import datasets
        from datasets.distributed import split_dataset_by_node

        self.batch_size = batch_size
        if isinstance(dataset, datasets.IterableDataset):
            self.stream = split_dataset_by_node(dataset, process_index, num_processes)
            self.indices = None
        else:
            self.stream = None
            self.indices = range(process_index, len(dataset), num_processes)

    def __len__(self) -> int:
        if self.indices is None:
            raise TypeError("a streaming evaluation loader has no length")
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator:
        if self.indices is not None:
            for start in range(0, len(self.indices), self.batch_size):
                yield ("indices", list(self.indices[start : start + self.batch_size]))
            return
        rows = iter(self.stream)
        while chunk := list(itertools.islice(rows, self.batch_size)):
            yield ("rows", _rows_to_batch(chunk))


def build_eval_loader(
    dataset,
    batch_size: int = 1,
    process_index: int = 0,
    num_processes: int = 1,
    image_size: tuple[int, int] | None = None,
    num_workers: int = 0,
) -> torch.utils.data.DataLoader:
    """One pass over the dataset in its stored order; each sample is visited exactly once across processes.

    Process ``r`` gets samples ``r, r + P, r + 2P, ...`` (map-style) or its ``split_dataset_by_node`` part
    (streaming). There is no padding and no duplicate, so processes may get a different number of batches
    (one more at most for map-style): accumulate per process and reduce once at the end (as
    ``ConfusionMatrix.reduce`` does), never call a collective per batch. The last batch may be smaller.
    Images keep their original size unless ``image_size=(H, W)`` is given; with ``batch_size > 1`` all
    images of a batch must then have the same size.
    """
    _check_process(process_index, num_processes)
    raw = _undecoded(dataset)
    import datasets

    streaming = isinstance(raw, datasets.IterableDataset)
    return torch.utils.data.DataLoader(
        _BatchDecoder(None if streaming else raw, image_size),
        batch_size=None,
        sampler=_EvalWorkItems(raw, batch_size, process_index, num_processes),
        num_workers=num_workers,
        collate_fn=_identity,
    )
