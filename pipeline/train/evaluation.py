"""Whole-image evaluation: the paper's metrics from native-size predictions, in training and in evaluate.py.

Both paths run the same `evaluate_rows`: images of equal size are batched into forward passes of a fixed
number of slots (unused slots are zero), so an image's arithmetic never depends on its neighbours, and
training's per-epoch validation and `jobs/evaluate.py` give identical confusion matrices for the same model.
On a GPU a batch has 8 slots and the confusion histogram is updated without a host synchronisation; on a CPU,
where batching gains little, it has one.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn

from models import InputConvention
from models.convention import Normalizer

from ..amp import autocast
from ..batching import fixed_slot_batch, to_input
from ..metrics import ConfusionMatrix
from ..storage import Location
from .inputs import unpack_whole
from .step import cudnn_benchmark

GPU_EVAL_SLOTS = 8


def eval_slots(device: torch.device) -> int:
    return GPU_EVAL_SLOTS if device.type == "cuda" else 1


@torch.no_grad()
def predict_label_maps(model: nn.Module, normalize: Normalizer, images: list[np.ndarray], slots: int,
                       device: torch.device, amp: str = "off") -> torch.Tensor:
    """Equal-size RGB uint8 (H, W, 3) images (at most `slots`) -> (n, H, W) int64 class ids on `device`, from
    one forward pass of `slots` images (the unused ones zero)."""
    x = fixed_slot_batch(images, slots, pin=device.type == "cuda")
    x = to_input(x, normalize, device, channels_last=device.type == "cuda")
    with autocast(device, amp):
        logits = model(x)
    return logits[:len(images)].argmax(1)


@torch.no_grad()
def evaluate_rows(model: nn.Module, convention: InputConvention, rows: Iterable[dict], num_classes: int,
                  device: torch.device, amp: str = "off") -> tuple[ConfusionMatrix, int]:
    """Confusion matrix over validation rows (see pipeline.train.inputs.unpack_whole) and the number of images.

    cuDNN autotuning is off inside, whatever the caller set: every new image size would be autotuned anew."""
    with cudnn_benchmark(False):
        return _evaluate_rows(model, convention, rows, num_classes, device, amp)


def _evaluate_rows(model: nn.Module, convention: InputConvention, rows: Iterable[dict], num_classes: int,
                   device: torch.device, amp: str) -> tuple[ConfusionMatrix, int]:
    was_training = model.training
    model.eval()
    slots = eval_slots(device)
    normalize = convention.normalizer(device)
    cm = ConfusionMatrix(num_classes)
    pending: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
    n = 0

    def flush(size: tuple[int, int]) -> None:
        images, masks = zip(*pending.pop(size), strict=True)
        pred = predict_label_maps(model, normalize, list(images), slots, device, amp)
        target = torch.from_numpy(np.stack(masks))
        cm.update(pred, (target.pin_memory() if device.type == "cuda" else target).to(device, non_blocking=True))

    for row in rows:
        image, mask = unpack_whole(row)
        group = pending.setdefault(mask.shape, [])
        group.append((image, mask))
        n += 1
        if len(group) == slots:
            flush(mask.shape)
    for size in list(pending):
        flush(size)
    model.train(was_training)
    return cm, n


class ConfusionPredictor:
    """Ray Data actor for evaluate.py: loads the checkpoint once, returns one flattened matrix per batch."""

    def __init__(self, checkpoint_uri: str, num_classes: int, device: str = "cpu", amp: str = "off",
                 threads: int | None = None):
        from models import load_checkpoint

        if threads:
            torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.ck = load_checkpoint(checkpoint_uri, map_location=self.device, num_classes=num_classes)
        self.num_classes = num_classes
        self.amp = amp

    def __call__(self, batch: dict) -> dict:
        rows = [{k: batch[k][i] for k in ("height", "width", "image", "mask")} for i in range(len(batch["height"]))]
        cm, n = evaluate_rows(self.ck.model, self.ck.convention, rows, self.num_classes, self.device, self.amp)
        return {"matrix": [cm.matrix.reshape(-1)], "images": np.array([n], dtype=np.int64)}


def evaluate_checkpoint(data: Location, checkpoint_uri: str, *, split: str = "val", actors: int = 1,
                        cpus_per_actor: float = 1.0, use_gpu: bool = False, amp: str = "off",
                        max_pixels: int | None = None) -> dict:
    """Evaluate a checkpoint on a dataset split, distributed over a Ray Data actor pool.

    Returns the scores of `ConfusionMatrix.scores()` plus images, bad samples, checkpoint, model_id and the
    confusion matrix (rows = ground truth).
    """
    import ray

    from models import load_checkpoint

    from ..dataset_formats import check_checkpoint_classes, list_samples
    from ..decode import DEFAULT_MAX_PIXELS
    from ..ray_setup import configure_progress, init_ray
    from .inputs import segmentation_dataset, start_bad_sample_log

    ck = load_checkpoint(checkpoint_uri)  # fails fast, before any cluster work, on a bad file
    check_checkpoint_classes(data, checkpoint_uri, ck.class_names)  # as training checks --num-classes
    num_classes = ck.config.num_classes
    samples = list_samples(data, split)
    init_ray()
    configure_progress(None)
    bad_log = start_bad_sample_log()
    ds = segmentation_dataset(samples, num_classes=num_classes, max_pixels=max_pixels or DEFAULT_MAX_PIXELS,
                              bad_log=bad_log)
    matrices = ds.map_batches(
        ConfusionPredictor,
        fn_constructor_kwargs={"checkpoint_uri": checkpoint_uri, "num_classes": num_classes,
                               "device": "cuda" if use_gpu else "cpu", "amp": amp,
                               "threads": None if use_gpu else max(1, int(cpus_per_actor))},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=16 * GPU_EVAL_SLOTS if use_gpu else 4,  # room to fill equal-size batches
        num_cpus=cpus_per_actor,
        num_gpus=1 if use_gpu else 0,
    )
    total = ConfusionMatrix(num_classes)
    images = 0
    for batch in matrices.iter_batches(batch_size=None, batch_format="numpy"):
        for flat, n in zip(batch["matrix"], batch["images"], strict=True):
            total.merge(ConfusionMatrix.from_matrix(np.asarray(flat, dtype=np.int64).reshape(num_classes, num_classes)))
            images += int(n)
    bad = ray.get(bad_log.rows.remote())
    return {**total.scores(), "images": images, "split": split, "checkpoint": checkpoint_uri,
            "model_id": ck.model_id, "class_names": ck.class_names, "bad_samples": bad,
            "confusion_matrix": total.matrix.tolist()}
