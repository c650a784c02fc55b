"""Segmentation inference for labeling: preprocessing that depends on the image alone, fixed-shape batches,
and label maps plus per-class statistics computed on the device.

An image's labels are a function of the image, the model and the settings only, never of its batch
neighbours:

- `preprocess` resizes so the long side is at most `max_side` (aspect kept, Pillow bilinear with antialias)
  and edge-pads bottom/right to a *canvas* whose sides are the next multiples of `canvas_multiple`. FCN's
  receptive field spans the whole image, so padding changes border pixels; here it is a function of the
  image alone.
- Equal canvases are batched together, and every forward pass has exactly `batch_size` slots (unused slots
  are zero). Convolution kernels are chosen per shape, and a batch of 2 can round differently from a batch
  of 1 in the last bit, which flips an argmax at a near-tie; with one fixed shape per canvas the arithmetic
  for an image is the same whatever its neighbours (verified bit for bit by the tests).
- Logits are cropped back to the image, bilinearly upsampled to the original resolution when the image was
  shrunk (in row bands, so memory stays bounded for large images), then argmax and softmax statistics are
  computed on the device: only the uint8 label map and a few numbers per class come back to the host.

On CUDA: bf16 autocast, channels-last, pinned host memory and non-blocking copies.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from models import Checkpoint, InputConvention, ModelConfig, build_from_state

from .. import faults
from ..amp import autocast
from .canvas import Prepared, check_canvas_settings, preprocess

# Elements (classes x rows x width) of one band of one image's upsampled logits: bounds memory for large images.
# Per image, never per chunk: the band split orders the float sums, and must not depend on the neighbours.
BAND_ELEMENTS = 4_000_000


@dataclass(frozen=True)
class InferenceSettings:
    """Everything besides the model and the image that decides the labels.

    max_side: the long side is shrunk to this before inference (None: never); labels still come back at the
    original resolution. canvas_multiple: canvas sides are rounded up to it. batch_size: slots per forward.
    device: "cpu", "cuda", "cuda:N" or "auto". amp: "bf16", "fp16" or "off" autocast on CUDA (CPU: fp32).
    """

    max_side: int | None = 1024
    canvas_multiple: int = 32
    batch_size: int = 1
    device: str = "auto"
    amp: str = "bf16"
    channels_last: bool = True

    def __post_init__(self) -> None:
        check_canvas_settings(self.max_side, self.canvas_multiple)
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class Prediction:
    """Labels of one image at its original resolution and statistics of every class present.

    Per-class arrays are aligned with `class_id` (ascending); bounding boxes are inclusive pixel indices.
    """

    label: np.ndarray                  # (height, width) uint8 class ids
    class_id: np.ndarray               # int32
    pixel_count: np.ndarray            # int64
    confidence_sum: np.ndarray         # float64: sum over the class's pixels of the max softmax probability
    x_min: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    y_min: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    x_max: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))
    y_max: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))

    @property
    def mean_confidence(self) -> np.ndarray:
        return self.confidence_sum / np.maximum(self.pixel_count, 1)

    @property
    def pixel_fraction(self) -> np.ndarray:
        return self.pixel_count / float(self.label.size)


def _lerp_index(out_size: int, in_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of bilinear resampling with align_corners=False (PyTorch's convention), made
    on the device (a host-built index would be a blocking copy)."""
    src = (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * (in_size / out_size) - 0.5
    src = src.clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    t = (src - i0).float()
    return i0, i1, t


# Per-class statistics on the device, one float64 each (exact for integers below 2**53), in this order.
STATS = ("pixel_count", "confidence_sum", "x_min", "y_min", "x_max", "y_max")


class DeviceFailure(RuntimeError):
    """The device failed in a way that poisons later work (a sticky CUDA error): the process must end so Ray
    starts a fresh one; retrying image by image would only send every later image to errors/."""


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, (torch.OutOfMemoryError, MemoryError)) or "can't allocate memory" in str(e)


def device_works(device: torch.device) -> bool:
    """Whether the device still runs a kernel and synchronises: after a sticky CUDA error (illegal address, Xid)
    nothing does, while an error of one batch (an unsupported shape, a transient allocation failure) leaves
    the device usable."""
    try:
        faults.fire("label.device_check")
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            return bool((torch.ones(4, device=device).sum() == 4).item())
        return True
    except Exception:  # noqa: BLE001 - any failure here means the device is gone
        return False


class Predictor:
    """Runs a segmentation model on prepared images; see the module docstring for the guarantees.

    Safe to call from two threads at once (the actor overlaps one call's host work with another's GPU work).
    """

    def __init__(self, model: nn.Module, convention: InputConvention, settings: InferenceSettings = InferenceSettings()):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.cuda = self.device.type == "cuda"
        self.convention = convention
        self.normalize = convention.normalizer(self.device)
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.num_classes = int(getattr(model, "num_classes", 0)) or None
        if self.num_classes is not None and self.num_classes > 256:
            raise ValueError(f"label maps are uint8: at most 256 classes, the model has {self.num_classes}")
        if self.cuda:
            # The fp32 head (models.layers.fp32_head) in full fp32, not TF32's 10-bit mantissa; under bf16
            # autocast no other convolution runs in fp32.
            torch.backends.cudnn.allow_tf32 = False

    # ------------------------------------------------------------------------------------------- model

    def forward(self, canvases: np.ndarray) -> torch.Tensor:
        """(n <= batch_size, Hc, Wc, 3) uint8 -> float logits (batch_size, C, Hc, Wc) on the device.

        Slots n..batch_size-1 are zero, so every call for a canvas size has the same shape.
        """
        n, ch, cw, _ = canvases.shape
        b = self.settings.batch_size
        if n > b:
            raise ValueError(f"{n} canvases for a batch of {b}")
        if n < b:
            full = np.zeros((b, ch, cw, 3), np.uint8)
            full[:n] = canvases
            canvases = full
        x = torch.from_numpy(np.ascontiguousarray(canvases))
        if self.cuda:
            x = x.pin_memory().to(self.device, non_blocking=True)
        # NHWC memory seen as NCHW: already channels-last; normalise on the device (uint8 is 4x less to copy).
        x = self.normalize(x.permute(0, 3, 1, 2)).contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), autocast(self.device, self.settings.amp):
            logits = self.model(x)
        return logits.float()

    # --------------------------------------------------------------------------------- labels and stats

    @torch.inference_mode()
    def labels_and_stats(self, scores: torch.Tensor, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (n, C, h, w) of n images of one size -> label maps (n, height, width) uint8 and per-class
        statistics (n, C, len(STATS)) float64, on the device, without a host synchronisation.

        When (h, w) != (height, width) the logits are bilinearly upsampled first. Work goes in row bands, so
        memory stays bounded for large images. Dense per-class reductions (no atomics, no boolean indexing)
        make the statistics deterministic.
        """
        n, c, h, w = scores.shape
        dev = scores.device
        resize = (h, w) != (height, width)
        if resize:
            yi0, yi1, yt = _lerp_index(height, h, dev)
            xi0, xi1, xt = _lerp_index(width, w, dev)
        band_rows = max(1, min(height, BAND_ELEMENTS // max(1, c * width)))
        classes = torch.arange(c, device=dev).view(1, c, 1, 1)
        xs = torch.arange(width, device=dev)
        label = torch.empty((n, height, width), dtype=torch.uint8, device=dev)
        counts = torch.zeros((n, c), dtype=torch.int64, device=dev)
        conf_sum = torch.zeros((n, c), dtype=torch.float64, device=dev)
        y_min = torch.full((n, c), height, dtype=torch.int64, device=dev)
        x_min = torch.full((n, c), width, dtype=torch.int64, device=dev)
        y_max = torch.full((n, c), -1, dtype=torch.int64, device=dev)
        x_max = torch.full((n, c), -1, dtype=torch.int64, device=dev)
        for r0 in range(0, height, band_rows):
            r1 = min(height, r0 + band_rows)
            if resize:
                a = scores.index_select(2, yi0[r0:r1])
                b = scores.index_select(2, yi1[r0:r1])
                rows = a + (b - a) * yt[r0:r1].view(1, 1, -1, 1)  # (n, C, band, w)
                a = rows.index_select(3, xi0)
                b = rows.index_select(3, xi1)
                band = a + (b - a) * xt.view(1, 1, 1, -1)  # (n, C, band, width)
            else:
                band = scores[:, :, r0:r1, :]
            top, idx = band.max(1)
            conf = torch.exp(band - top.unsqueeze(1)).sum(1).reciprocal()  # max softmax probability
            label[:, r0:r1] = idx.to(torch.uint8)
            onehot = idx.unsqueeze(1) == classes  # (n, C, band, width)
            counts += onehot.sum((2, 3))
            conf_sum += torch.where(onehot, conf.unsqueeze(1).double(), 0.0).sum((2, 3))
            rows_hit, cols_hit = onehot.any(3), onehot.any(2)  # (n, C, band), (n, C, width)
            ys = torch.arange(r0, r1, device=dev)
            y_min = torch.minimum(y_min, torch.where(rows_hit, ys, height).amin(2))
            y_max = torch.maximum(y_max, torch.where(rows_hit, ys, -1).amax(2))
            x_min = torch.minimum(x_min, torch.where(cols_hit, xs, width).amin(2))
            x_max = torch.maximum(x_max, torch.where(cols_hit, xs, -1).amax(2))
        stats = torch.stack([counts.double(), conf_sum, x_min.double(), y_min.double(), x_max.double(),
                             y_max.double()], dim=-1)
        return label, stats

    def to_host(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Prediction]:
        """Results of `labels_and_stats` -> Predictions (in order): one copy into pinned host memory and one
        synchronisation for all of them."""
        flat = torch.cat([s.reshape(-1).view(torch.uint8) for _, s in parts] + [lab.reshape(-1) for lab, _ in parts])
        if self.cuda:
            host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))  # the stream the copy went to (cuda:N too)
            done.synchronize()  # waits for this call's work only: another thread's later kernels may still run
        else:
            host = flat
        buf = host.numpy()
        out: list[Prediction] = []
        offset = 0
        stats = []
        for _, s in parts:
            size = s.numel() * 8
            stats.append(np.frombuffer(buf[offset:offset + size].copy(), np.float64).reshape(s.shape))
            offset += size
        for (lab, _), st in zip(parts, stats):
            n, height, width = lab.shape
            for i in range(n):
                label = buf[offset:offset + height * width].reshape(height, width).copy()  # off the pinned buffer
                offset += height * width
                out.append(self._prediction(label, st[i]))
        return out

    @staticmethod
    def _prediction(label: np.ndarray, stats: np.ndarray) -> Prediction:
        present = np.nonzero(stats[:, 0] > 0)[0]
        s = stats[present]
        return Prediction(label=label, class_id=present.astype(np.int32), pixel_count=s[:, 0].astype(np.int64),
                          confidence_sum=s[:, 1].copy(), x_min=s[:, 2].astype(np.int32), y_min=s[:, 3].astype(np.int32),
                          x_max=s[:, 4].astype(np.int32), y_max=s[:, 5].astype(np.int32))

    # ------------------------------------------------------------------------------------------ batches

    def predict_chunk(self, items: list[Prepared]) -> list[Prediction]:
        """Images sharing one canvas size (at most batch_size of them): one forward pass, one copy back."""
        faults.fire("label.forward")
        # Images of one (resized, original) size sit next to each other: their logits are one slice.
        key = lambda i: _size_key(items[i])  # noqa: E731
        order = sorted(range(len(items)), key=key)
        logits = self.forward(np.stack([items[i].canvas for i in order]))
        parts, start = [], 0
        for (rh, rw, height, width), group in itertools.groupby(order, key=key):
            stop = start + len(list(group))
            parts.append(self.labels_and_stats(logits[start:stop, :, :rh, :rw], height, width))
            start = stop
        preds = self.to_host(parts)
        out: list[Prediction | None] = [None] * len(items)
        for i, pred in zip(order, preds):
            out[i] = pred
        return out  # type: ignore[return-value]

    def predict(self, items: list[Prepared]) -> list[Prediction | Exception]:
        """Predictions in input order. Images are grouped by canvas size into fixed-shape batches.

        A batch that fails is retried image by image, so one image that cannot be labeled costs only itself
        (its slot holds the exception). When the device itself no longer works after the error (a sticky CUDA
        error: every later image would fail too) DeviceFailure is raised instead (see InferenceActor)."""
        out: list[Prediction | Exception | None] = [None] * len(items)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, p in enumerate(items):
            groups.setdefault(p.canvas.shape[:2], []).append(i)
        b = self.settings.batch_size
        for idxs in groups.values():
            for k in range(0, len(idxs), b):
                chunk = idxs[k:k + b]
                try:
                    for i, pred in zip(chunk, self.predict_chunk([items[i] for i in chunk])):
                        out[i] = pred
                    continue
                except Exception as e:  # noqa: BLE001 - retried image by image below, unless the device failed
                    self._check_recoverable(e)
                    if len(chunk) == 1:
                        out[chunk[0]] = e
                        continue
                for i in chunk:
                    try:
                        out[i] = self.predict_chunk([items[i]])[0]
                    except Exception as e:  # noqa: BLE001 - reported per image
                        self._check_recoverable(e)
                        out[i] = e
        return out  # type: ignore[return-value]

    def _check_recoverable(self, e: Exception) -> None:
        """Raise DeviceFailure when the device no longer works after `e`; otherwise the caller retries the
        batch image by image (an error that follows a batch or an image lands in errors/, never loops)."""
        if not is_out_of_memory(e) and not device_works(self.device):
            raise DeviceFailure(f"{self.device}: {type(e).__name__}: {e}") from e
        if self.cuda:
            torch.cuda.empty_cache()


def _size_key(p: Prepared) -> tuple[int, int, int, int]:
    return p.resized_h, p.resized_w, p.height, p.width


def predict_image(checkpoint_or_model: Checkpoint | nn.Module, convention: InputConvention | None, rgb: np.ndarray, *,
                  max_side: int | None = None, device: str = "cpu", canvas_multiple: int = 32, batch_size: int = 1,
                  amp: str = "bf16", channels_last: bool = True) -> Prediction:
    """The single-image prediction function: labels of one RGB uint8 image at its original resolution.

    With the same settings it gives exactly what the labeling job writes for that image.
    `convention` may be None when a Checkpoint is given (its own convention is used).
    """
    if isinstance(checkpoint_or_model, Checkpoint):
        model, convention = checkpoint_or_model.model, convention or checkpoint_or_model.convention
    else:
        model = checkpoint_or_model
    if convention is None:
        raise ValueError("predict_image needs the input convention when given a bare model")
    settings = InferenceSettings(max_side=max_side, canvas_multiple=canvas_multiple, batch_size=batch_size,
                                 device=device, amp=amp, channels_last=channels_last)
    predictor = Predictor(model, convention, settings)
    return predictor.predict_chunk([preprocess(rgb, max_side, canvas_multiple)])[0]


def shippable(ck: Checkpoint) -> dict:
    """A loaded checkpoint as plain types and numpy arrays: Ray's object store holds the arrays zero-copy,
    so inference actors get the weights without re-reading, re-hashing or unpickling the file."""
    return {"config": ck.config.to_dict(), "class_names": list(ck.class_names), "input": ck.convention.to_dict(),
            "model_id": ck.model_id, "uri": ck.uri,
            "state": {k: v.detach().cpu().numpy() for k, v in ck.model.state_dict().items()}}


def from_shippable(d: dict, map_location: str = "cpu") -> Checkpoint:
    """The inverse of `shippable` (weights copied out of the read-only shared memory)."""
    config = ModelConfig(**d["config"])
    state = {k: torch.from_numpy(np.array(v)) for k, v in d["state"].items()}
    model = build_from_state(config, state, d["uri"]).to(map_location).eval()
    return Checkpoint(model, config, list(d["class_names"]), InputConvention.from_dict(d["input"]), {},
                      d["model_id"], d["uri"])
