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

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from models import Checkpoint, InputConvention, ModelConfig, build_from_state

from ..amp import autocast
from .canvas import Prepared, check_canvas_settings, preprocess

# Elements (classes x rows x width) of one band of upsampled logits: bounds memory for large images.
BAND_ELEMENTS = 8_000_000


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
    """Source indices and weights of bilinear resampling with align_corners=False (PyTorch's convention)."""
    src = (torch.arange(out_size, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5
    src = src.clamp(min=0)
    i0 = src.floor().long().clamp(max=in_size - 1)
    i1 = (i0 + 1).clamp(max=in_size - 1)
    t = (src - i0).float()
    return i0.to(device), i1.to(device), t.to(device)


class Predictor:
    """Runs a segmentation model on prepared images; see the module docstring for the guarantees."""

    def __init__(self, model: nn.Module, convention: InputConvention, settings: InferenceSettings = InferenceSettings()):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.cuda = self.device.type == "cuda"
        self.convention = convention
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.model = model.eval().to(self.device, memory_format=self.memory_format)
        self.num_classes = int(getattr(model, "num_classes", 0)) or None
        if self.num_classes is not None and self.num_classes > 256:
            raise ValueError(f"label maps are uint8: at most 256 classes, the model has {self.num_classes}")

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
        x = self.convention.normalize(x.permute(0, 3, 1, 2)).contiguous(memory_format=self.memory_format)
        with torch.inference_mode(), autocast(self.device, self.settings.amp):
            logits = self.model(x)
        return logits.float()

    # --------------------------------------------------------------------------------- labels and stats

    @torch.inference_mode()
    def labels_and_stats(self, scores: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        """Logits (C, h, w) of one image -> label map (height, width) and per-class stats, on the device.

        When (h, w) != (height, width) the logits are bilinearly upsampled first (in row bands).
        """
        c, h, w = scores.shape
        dev = scores.device
        resize = (h, w) != (height, width)
        if resize:
            yi0, yi1, yt = _lerp_index(height, h, dev)
            xi0, xi1, xt = _lerp_index(width, w, dev)
        band_rows = max(1, min(height, BAND_ELEMENTS // max(1, c * width)))
        label = torch.empty((height, width), dtype=torch.uint8, device=dev)
        counts = torch.zeros(c, dtype=torch.int64, device=dev)
        conf_sum = torch.zeros(c, dtype=torch.float64, device=dev)
        y_min = torch.full((c,), height, dtype=torch.int64, device=dev)
        x_min = torch.full((c,), width, dtype=torch.int64, device=dev)
        y_max = torch.full((c,), -1, dtype=torch.int64, device=dev)
        x_max = torch.full((c,), -1, dtype=torch.int64, device=dev)
        xs = torch.arange(width, device=dev)
        for r0 in range(0, height, band_rows):
            r1 = min(height, r0 + band_rows)
            if resize:
                # Work column-major, (C, W, rows): every gather copies whole contiguous rows, and the reductions
                # over classes below run on contiguous memory; results are transposed back (views).
                a = scores.index_select(1, yi0[r0:r1])
                b = scores.index_select(1, yi1[r0:r1])
                rows = (a + (b - a) * yt[r0:r1].view(1, -1, 1)).transpose(1, 2).contiguous()  # (C, w, rows)
                a = rows.index_select(1, xi0)
                b = rows.index_select(1, xi1)
                band = a + (b - a) * xt.view(1, -1, 1)  # (C, W, rows)
                top, idx = band.max(0)
                conf = torch.exp(band - top.unsqueeze(0)).sum(0).reciprocal().t()  # max softmax probability
                idx = idx.t()
            else:
                band = scores[:, r0:r1, :]
                top, idx = band.max(0)
                conf = torch.exp(band - top.unsqueeze(0)).sum(0).reciprocal()
            label[r0:r1] = idx.to(torch.uint8)
            flat = idx.reshape(-1)
            counts += torch.bincount(flat, minlength=c)
            conf_sum.scatter_add_(0, flat, conf.reshape(-1).double())
            ys = torch.arange(r0, r1, device=dev).view(-1, 1).expand(r1 - r0, width).reshape(-1)
            xb = xs.view(1, -1).expand(r1 - r0, width).reshape(-1)
            y_min.scatter_reduce_(0, flat, ys, "amin")
            y_max.scatter_reduce_(0, flat, ys, "amax")
            x_min.scatter_reduce_(0, flat, xb, "amin")
            x_max.scatter_reduce_(0, flat, xb, "amax")
        present = counts > 0
        return {"label": label, "class_id": present.nonzero().reshape(-1), "pixel_count": counts[present],
                "confidence_sum": conf_sum[present], "x_min": x_min[present], "y_min": y_min[present],
                "x_max": x_max[present], "y_max": y_max[present]}

    @staticmethod
    def _to_host(d: dict[str, torch.Tensor]) -> Prediction:
        return Prediction(
            label=d["label"].cpu().numpy(), class_id=d["class_id"].cpu().numpy().astype(np.int32),
            pixel_count=d["pixel_count"].cpu().numpy().astype(np.int64),
            confidence_sum=d["confidence_sum"].cpu().numpy().astype(np.float64),
            x_min=d["x_min"].cpu().numpy().astype(np.int32), y_min=d["y_min"].cpu().numpy().astype(np.int32),
            x_max=d["x_max"].cpu().numpy().astype(np.int32), y_max=d["y_max"].cpu().numpy().astype(np.int32))

    # ------------------------------------------------------------------------------------------ batches

    def predict_chunk(self, items: list[Prepared]) -> list[Prediction]:
        """Images sharing one canvas size (at most batch_size of them): one forward pass."""
        logits = self.forward(np.stack([p.canvas for p in items]))
        on_device = [self.labels_and_stats(logits[i, :, :p.resized_h, :p.resized_w], p.height, p.width)
                     for i, p in enumerate(items)]
        return [self._to_host(d) for d in on_device]

    def predict(self, items: list[Prepared]) -> list[Prediction | Exception]:
        """Predictions in input order. Images are grouped by canvas size into fixed-shape batches; a batch
        that fails is retried image by image, so one failing image costs only itself (its slot holds the
        exception)."""
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
                except Exception as e:  # noqa: BLE001 - retried image by image below
                    self._recover()
                    if len(chunk) == 1:
                        out[chunk[0]] = e
                        continue
                for i in chunk:
                    try:
                        out[i] = self.predict_chunk([items[i]])[0]
                    except Exception as e:  # noqa: BLE001 - reported per image
                        self._recover()
                        out[i] = e
        return out  # type: ignore[return-value]

    def _recover(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


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
