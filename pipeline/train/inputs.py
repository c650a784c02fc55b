"""Ray Data pipelines for training and validation: stream (image, mask) URI pairs, read and decode per row,
check them, transform, and hand uniform batches to Ray Train shards.

A bad row (unreadable file, corrupt image, size mismatch, mask values outside the classes) is dropped and
logged with its URI and reason in a `BadSampleLog` actor; every other row of the same batch and block is
kept. (Ray Data's `max_errored_blocks` would drop whole blocks of good rows.)
"""
from __future__ import annotations

import numpy as np
import ray

from models import VOID_LABEL

from ..decode import DEFAULT_MAX_PIXELS, DecodeError, decode_image, decode_mask
from ..ray_setup import on_driver_node
from ..storage import Location, StorageError
from .transforms import TrainTransform


@ray.remote(num_cpus=0)
class BadSampleLog:
    """Collects (uri, reason) of dropped rows from every decode task; one entry per URI."""

    def __init__(self) -> None:
        self._rows: dict[str, dict] = {}

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self._rows[row["uri"]] = row

    def rows(self) -> list[dict]:
        return sorted(self._rows.values(), key=lambda r: r["uri"])


def start_bad_sample_log() -> ray.actor.ActorHandle:
    """The run's BadSampleLog, on the driver's node: a training worker's spot node that is reclaimed mid-run must
    not take the run's record of dropped samples (and the run's summary) with it."""
    return BadSampleLog.options(**on_driver_node()).remote()


def _read(uri: str, what: str) -> bytes:
    """A sample's bytes, through the filesystem its URI names (a manifest's rows may name any store)."""
    try:
        return Location.of(uri).read_bytes()
    except FileNotFoundError:
        raise DecodeError(f"{what} not found: {uri}") from None
    except IsADirectoryError:
        raise DecodeError(f"{what} is a directory: {uri}") from None
    except StorageError as e:
        raise DecodeError(f"{what} unreadable: {e}") from None


def load_pair(image_uri: str, mask_uri: str, *, num_classes: int, max_pixels: int) -> tuple[np.ndarray, np.ndarray]:
    """Read and decode one sample; DecodeError says what is wrong with it."""
    try:
        image = decode_image(_read(image_uri, "image"), max_pixels=max_pixels)
    except DecodeError as e:
        raise DecodeError(f"image: {e}") from None
    try:
        mask = decode_mask(_read(mask_uri, "mask"), max_pixels=max_pixels)
    except DecodeError as e:
        raise DecodeError(f"mask: {e}") from None
    if image.shape[:2] != mask.shape:
        raise DecodeError(f"size mismatch: image {image.shape[1]}x{image.shape[0]}, mask {mask.shape[1]}x{mask.shape[0]}")
    bad = (mask >= num_classes) & (mask != VOID_LABEL)
    if bad.any():
        values = np.unique(mask[bad])[:5].tolist()
        raise DecodeError(f"mask has values {values} outside classes 0..{num_classes - 1} and {VOID_LABEL}")
    return image, mask


def _load_batch(batch: dict, *, num_classes: int, max_pixels: int, transform: TrainTransform | None,
                bad_log) -> dict:
    rng = np.random.default_rng()  # fresh augmentation every epoch
    images, masks, uris, bad = [], [], [], []
    for image_uri, mask_uri in zip(batch["image"], batch["mask"], strict=True):
        try:
            image, mask = load_pair(str(image_uri), str(mask_uri), num_classes=num_classes, max_pixels=max_pixels)
        except DecodeError as e:
            bad.append({"uri": str(image_uri), "mask_uri": str(mask_uri), "reason": str(e)})
            continue
        if transform is not None:
            image, mask = transform(image, mask, rng)
        images.append(image)
        masks.append(mask)
        uris.append(str(image_uri))
    if bad and bad_log is not None:
        ray.get(bad_log.add.remote(bad))
    if transform is not None:  # fixed-size crops: plain tensor columns, ready for iter_torch_batches
        c = transform.crop_size
        return {
            "image": np.stack(images) if images else np.zeros((0, c, c, 3), np.uint8),
            "mask": np.stack(masks) if masks else np.zeros((0, c, c), np.uint8),
        }
    # Whole images of varying sizes: raw bytes plus explicit shape, portable through any Arrow reader.
    return {
        "uri": np.array(uris, dtype=object),
        "height": np.array([m.shape[0] for m in masks], dtype=np.int32),
        "width": np.array([m.shape[1] for m in masks], dtype=np.int32),
        "image": np.array([i.tobytes() for i in images], dtype=object),
        "mask": np.array([m.tobytes() for m in masks], dtype=object),
    }


def unpack_whole(row: dict) -> tuple[np.ndarray, np.ndarray]:
    """A validation row (raw bytes + height/width) back to (image HWC uint8, mask HW uint8)."""
    h, w = int(row["height"]), int(row["width"])
    image = np.frombuffer(row["image"], dtype=np.uint8).reshape(h, w, 3)
    mask = np.frombuffer(row["mask"], dtype=np.uint8).reshape(h, w)
    return image, mask


def segmentation_dataset(samples: list[dict[str, str]], *, num_classes: int, transform: TrainTransform | None = None,
                         max_pixels: int = DEFAULT_MAX_PIXELS, bad_log=None, rows_per_task: int = 32,
                         num_cpus: float = 1) -> ray.data.Dataset:
    """A streaming Ray Dataset of decoded samples.

    With `transform` (training): columns image (c, c, 3) uint8 and mask (c, c) uint8, freshly augmented each
    epoch. Without (validation, native size): uri, height, width, image and mask as raw bytes; see
    `unpack_whole`.
    """
    blocks = max(1, min(len(samples), -(-len(samples) // rows_per_task), 1000))
    ds = ray.data.from_items(samples, override_num_blocks=blocks)
    return ds.map_batches(
        _load_batch,
        fn_kwargs={"num_classes": num_classes, "max_pixels": max_pixels, "transform": transform, "bad_log": bad_log},
        batch_size=rows_per_task,
        batch_format="numpy",
        num_cpus=num_cpus,
    )
