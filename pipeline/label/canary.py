"""The canary set: a small dataset with masks (VOC layout or a manifest) that every run labels with its own
checkpoint and settings, on its own inference actors, and scores with the project's metrics (pipeline.metrics).

With the same checkpoint and settings its score is the same every night, so a drop catches what changed the model
side: a broken or wrong checkpoint, a wrong input convention, a lever that labels differently on new hardware.
Its rows never reach `labels/`. Below its minimum mean IU the run is `degraded`: everything it labeled is still
committed, and jobs/label.py exits with DEGRADED_EXIT_STATUS so that a scheduler flags the night.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..dataset_formats import DatasetError, check_checkpoint_classes, list_samples
from ..decode import decode_mask
from ..errors import one_line
from ..storage import Location, storage_error
from .columns import binary_views

if TYPE_CHECKING:  # jobs/label.py imports this module for its flags: no torch or Ray before they are needed
    import ray

    from models import Checkpoint

DEGRADED_EXIT_STATUS = 3   # jobs/label.py's exit status for a run whose canary failed (2: refused, 1: crashed)
MIN_IOU_MARGIN = 0.05      # default minimum: the checkpoint's recorded validation mean IU minus this
MAX_CANARY_IMAGES = 1000   # a canary is labeled beside every night: 20-200 images is its size
VOID = 255                 # mask pixels that count for no class
NAMED_FAILURES = 20        # failed canary images named in the summary (all are counted)


@dataclass(frozen=True)
class CanarySet:
    """The canary's samples and their decoded masks, read and checked in the driver before any labeling."""

    location: Location
    images: tuple[str, ...]
    masks: tuple[np.ndarray | None, ...]   # None: the mask could not be read (named in `failed`)
    failed: tuple[tuple[str, str, str], ...]  # (image uri, stage, reason) of samples that cannot be scored


def load_canary(location: Location, split: str, ck: Checkpoint, checkpoint_uri: str) -> CanarySet:
    """The canary set at `location` (its `split`), checked against the checkpoint: classes.txt beside it must name
    the checkpoint's classes id for id, and no mask may hold a class id the checkpoint does not predict (255 is
    void). Either is refused (DatasetError, one line) before anything is labeled; a mask that cannot be read is
    counted and named, and the run goes on."""
    samples = list_samples(location, split)
    if len(samples) > MAX_CANARY_IMAGES:
        raise DatasetError(f"canary {location.uri} has {len(samples)} images in split {split!r}; a canary is labeled "
                           f"beside every run: keep it to at most {MAX_CANARY_IMAGES} (20-200 is usual)")
    check_checkpoint_classes(location, checkpoint_uri, list(ck.class_names))
    with ThreadPoolExecutor(max_workers=8) as pool:
        read = list(pool.map(_read_mask, [s["mask"] for s in samples]))
    failed = tuple((s["image"], "mask", problem) for s, (_, problem) in zip(samples, read, strict=True) if problem)
    classes = ck.config.num_classes
    for sample, (mask, _) in zip(samples, read, strict=True):
        if mask is not None:
            ids = np.unique(mask)
            extra = ids[(ids >= classes) & (ids != VOID)]
            if extra.size:
                raise DatasetError(f"canary mask {sample['mask']} holds class id {int(extra[0])}, but checkpoint "
                                   f"{checkpoint_uri} predicts {classes} classes (0-{classes - 1}; 255: void): the "
                                   "canary is for another model")
    return CanarySet(location, tuple(s["image"] for s in samples), tuple(m for m, _ in read), failed)


def _read_mask(uri: str) -> tuple[np.ndarray | None, str | None]:
    try:
        return decode_mask(Location.of(uri).read_bytes()), None
    except FileNotFoundError:
        return None, f"mask not found: {uri}"
    except Exception as e:  # noqa: BLE001 - one sample's problem: named, the run goes on
        return None, one_line(storage_error(uri, e)) if "://" in uri else one_line(e)


def minimum_iou(flag: float | None, ck: Checkpoint) -> tuple[float | None, str]:
    """(the canary's minimum mean IU, where it comes from): --canary-min-iou, else the checkpoint's recorded
    validation mean IU minus MIN_IOU_MARGIN, else none (the scores are reported, the run cannot be degraded)."""
    if flag is not None:
        return flag, "--canary-min-iou"
    recorded = (ck.metadata.get("metrics") or {}).get("mean_iou")
    if isinstance(recorded, (int, float)) and math.isfinite(recorded):
        return round(recorded - MIN_IOU_MARGIN, 6), f"the checkpoint's validation mean IU {recorded:.4f} minus {MIN_IOU_MARGIN}"
    return None, "none: the checkpoint records no validation mean IU (set --canary-min-iou)"


def score_canary(canary: CanarySet, labeled: ray.data.Dataset, *, num_classes: int, min_iou: float | None,
                 source: str) -> dict:
    """Score the canary's labeled rows (tables.RESULT_SCHEMA, raw label maps, in any order) against its masks.
    Returns the summary's `canary` entry; `passed` is None without a minimum."""
    from ..metrics import ConfusionMatrix

    mask_of = dict(zip(canary.images, canary.masks, strict=True))
    failed = list(canary.failed)
    cm = ConfusionMatrix(num_classes, ignore_index=VOID)
    scored = 0
    for block in labeled.iter_batches(batch_size=None, batch_format="pyarrow"):
        uris, errors, stages = (block[c].to_pylist() for c in ("image_uri", "error", "stage"))
        widths, heights = block["width"].to_pylist(), block["height"].to_pylist()
        for uri, error, stage, w, h, label in zip(uris, errors, stages, widths, heights, binary_views(block["label_map"]),
                                                  strict=True):
            mask = mask_of.get(uri)
            if error is not None:
                failed.append((uri, stage or "unknown", error))
            elif mask is None:
                continue  # already named: its mask could not be read
            elif mask.shape != (h, w):
                failed.append((uri, "mask", f"mask is {mask.shape[1]}x{mask.shape[0]}, the image {w}x{h}"))
            else:
                cm.update(label.reshape(h, w), mask)
                scored += 1
    scores = cm.scores() if scored else {}
    mean_iou = scores.get("mean_iou")
    mean_iou = None if mean_iou is None or not math.isfinite(mean_iou) else mean_iou
    passed = None if min_iou is None else mean_iou is not None and mean_iou >= min_iou
    return {"uri": canary.location.uri, "images": len(canary.images), "scored": scored, "failed": len(failed),
            "failed_images": [{"image": u, "stage": s, "error": e} for u, s, e in failed[:NAMED_FAILURES]],
            "mean_iou": mean_iou, "pixel_accuracy": scores.get("pixel_accuracy"),
            "per_class_iou": scores.get("per_class_iou"), "min_iou": min_iou, "min_iou_source": source,
            "passed": passed}


def verdict(canary: dict) -> str | None:
    """Why the run is degraded, in one line; None when the canary passed or has no minimum."""
    if canary["passed"] is not False:
        return None
    if canary["mean_iou"] is None:
        return (f"canary {canary['uri']}: none of its {canary['images']} images could be scored "
                f"({canary['failed']} failed): the night's labels are unchecked")
    return (f"canary {canary['uri']}: mean IU {canary['mean_iou']:.4f} is below its minimum {canary['min_iou']:.4f} "
            f"({canary['min_iou_source']}): the checkpoint, its input convention or a lever labels differently")


def canary_rows(canary: CanarySet) -> ray.data.Dataset:
    """The canary's images as listing rows (read through the filesystem each URI names)."""
    import ray

    return ray.data.from_items([{"image_uri": uri, "image_version": "canary", "image_size": None}
                                for uri in canary.images])
