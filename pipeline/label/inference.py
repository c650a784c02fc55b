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
  computed on the device (`device_stats`): only the uint8 label map and a few numbers per class come back to
  the host.

On CUDA: bf16 autocast, channels-last, pinned host memory and non-blocking copies. The kernel levers
(`InferenceSettings`: weights cast once, grouped bilinear upsamplers, cuDNN's kernel choice, torch.compile) keep
the neighbour independence; only `reproducible` settings also keep labels bit-identical between processes.
"""
from __future__ import annotations

import copy
import itertools
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from models import MAX_CLASSES, Checkpoint, InputConvention, output_knots
from models.fast_paths import cast_trunk, group_upsamplers

from .. import faults
from ..amp import autocast
from ..batching import fixed_slot_batch, to_input
from .blend import CELL_CENTRE, TileBlender, score_cells, tile_window
from .canvas import Prepared, preprocess
from .device_stats import labels_and_stats
from .inference_settings import COMPILE_SHAPE_LIMIT, InferenceSettings
from .tiling import SCORE_STRIDE


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class Uncertainty:
    """How sure the model was of one image's labels, over all its pixels: the mean max softmax probability, the
    mean top-1 minus top-2 probability, and the share of pixels whose max probability is below the run's
    --low-confidence threshold."""

    mean_confidence: float
    mean_margin: float
    low_confidence_fraction: float


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
    margin_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))  # float64: sum of top-1 minus top-2
    low_count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # pixels below --low-confidence
    tiles: int = 0                     # tiles it was labeled in (0: whole, as one canvas)

    @property
    def uncertainty(self) -> Uncertainty:
        pixels = max(1, int(self.pixel_count.sum()))
        return Uncertainty(float(self.confidence_sum.sum()) / pixels, float(self.margin_sum.sum()) / pixels,
                           float(self.low_count.sum()) / pixels)

    @property
    def mean_confidence(self) -> np.ndarray:
        return self.confidence_sum / np.maximum(self.pixel_count, 1)

    @property
    def pixel_fraction(self) -> np.ndarray:
        return self.pixel_count / float(self.label.size)


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


class _CudaFlags:
    """cuDNN's process-wide flags, set while at least one forward pass runs and restored after the last one
    (two actor threads share them): TF32 off for the fp32 head, the benchmark flag as the settings say. A
    training step later in the same process (the GPU check's probes) sees its own flags again."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._saved: tuple[bool, bool] | None = None

    @contextmanager
    def scope(self, benchmark: bool):
        cudnn = torch.backends.cudnn
        with self._lock:
            if self._users == 0:
                self._saved = (cudnn.allow_tf32, cudnn.benchmark)
                # The fp32 head (models.layers.fp32_head) in full fp32, not TF32's 10-bit mantissa; under bf16
                # autocast no other convolution runs in fp32.
                cudnn.allow_tf32, cudnn.benchmark = False, benchmark
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._saved is not None:
                    cudnn.allow_tf32, cudnn.benchmark = self._saved


_CUDA_FLAGS = _CudaFlags()


class Predictor:
    """Runs a segmentation model on prepared images; see the module docstring for the guarantees.

    Safe to call from two threads at once (the actor overlaps one call's host work with another's GPU work).
    The model given is never changed: the levers rewrite a copy.
    """

    def __init__(self, model: nn.Module, convention: InputConvention, settings: InferenceSettings | None = None):
        self.settings = settings = settings or InferenceSettings()
        self.device = resolve_device(settings.device)
        self.cuda = self.device.type == "cuda"
        self.convention = convention
        self.normalize = convention.normalizer(self.device)
        self.memory_format = torch.channels_last if settings.channels_last else torch.contiguous_format
        self.num_classes = int(getattr(model, "num_classes", 0)) or None
        if self.num_classes is not None and self.num_classes > MAX_CLASSES:
            raise ValueError(f"label maps are uint8: at most {MAX_CLASSES} classes, the model has {self.num_classes}")
        if self.cuda and settings.cudnn.endswith("-b"):
            # The one place that sets cuDNN's heuristic mode, for the inference actors and every other caller alike.
            # cuDNN reads it once per process, at its first convolution (a static in ATen): a Predictor is made
            # before any (an actor makes its own first); a process that already ran one keeps the mode it started with.
            os.environ["TORCH_CUDNN_USE_HEURISTIC_MODE_B"] = "1"
        # Where the output's bilinear pieces meet, on the blending's score grid (pipeline.label.blend); from the
        # model as given, before the levers rewrite its upsamplers. None: sampled at the cells' centres.
        knots = output_knots(model)
        self.score_phase = None if knots is None else knots[1] % SCORE_STRIDE
        self.model, self.applied = self._prepare_model(model)
        self._compiled = None
        self._window: torch.Tensor | None = None  # a tile's blending weights on the device (pipeline.label.blend)
        self.compile_seconds = 0.0
        self._compiled_shapes: set[tuple[int, ...]] = set()
        self._compile_lock = threading.Lock()
        if settings.compile != "off":
            import torch._dynamo as dynamo

            # One static graph per canvas shape; the canvas buckets bound them (LabelConfig.effective_canvas_multiple).
            # The tile's canvas (--tile) is one shape more.
            limit = COMPILE_SHAPE_LIMIT + (settings.tiling is not None)
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, limit)
            self._compiled = torch.compile(self.model, mode=settings.compile, dynamic=False)

    def _prepare_model(self, model: nn.Module) -> tuple[nn.Module, dict]:
        """A copy of the model on the device, with the settings' levers applied; and what was applied."""
        s = self.settings
        model = copy.deepcopy(model).eval().to(self.device, memory_format=self.memory_format)
        applied: dict = {"grouped_upsampling": {}, "cast_weights": None}
        if s.grouped_upsampling:
            applied["grouped_upsampling"] = group_upsamplers(model)
        if s.cast_weights and self.cuda and s.amp != "off":
            dtype = torch.bfloat16 if s.amp == "bf16" else torch.float16
            applied["cast_weights"] = str(dtype).replace("torch.", "") if cast_trunk(model, dtype) else None
        return model, applied

    # ------------------------------------------------------------------------------------------- model

    def forward(self, canvases) -> torch.Tensor:
        """(n <= batch_size, Hc, Wc, 3) uint8 (an array or a sequence of equal-shape arrays) -> float logits
        (batch_size, C, Hc, Wc) on the device.

        Slots n..batch_size-1 are zero, so every call for a canvas size has the same shape.
        """
        batch = fixed_slot_batch(canvases, self.settings.batch_size, pin=self.cuda)
        x = to_input(batch, self.normalize, self.device, channels_last=self.settings.channels_last)
        flags = _CUDA_FLAGS.scope(self.settings.cudnn.startswith("benchmark")) if self.cuda else nullcontext()
        with flags, torch.inference_mode(), autocast(self.device, self.settings.amp):
            if self._compiled is None:
                logits = self.model(x)
            elif tuple(x.shape) in self._compiled_shapes:
                logits = self._compiled(x)
            else:
                logits = self._compile_for(x)
        return logits.float()

    def _compile_for(self, x: torch.Tensor) -> torch.Tensor:
        """The first pass at a new canvas shape compiles it: one thread at a time, timed (compile_seconds)."""
        with self._compile_lock:
            t = time.perf_counter()
            logits = self._compiled(x)
            if tuple(x.shape) not in self._compiled_shapes:
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                self.compile_seconds += time.perf_counter() - t
                self._compiled_shapes.add(tuple(x.shape))
        return logits

    # --------------------------------------------------------------------------------- labels and stats

    def labels_and_stats(self, scores: torch.Tensor, height: int, width: int, stride: int | None = None,
                         phase: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (n, C, h, w) of n images of one size -> label maps (n, height, width) uint8 and per-class
        statistics (n, C, len(device_stats.STATS)) float64, on the device (`device_stats.labels_and_stats`):
        dense reductions on CUDA, bincounts on the CPU."""
        return labels_and_stats(scores, height, width, dense=self.cuda, low_confidence=self.settings.low_confidence,
                                stride=stride, phase=phase)

    def to_host(self, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Prediction]:
        """Results of `labels_and_stats` -> Predictions (in order): one copy into pinned host memory and one
        synchronisation for all of them. Label maps are views of that one host buffer (no copy per image)."""
        if not self.cuda:  # already host memory: views of the results themselves, no copy into one buffer
            return [self._prediction(lab[i].numpy(), st[i].numpy()) for lab, st in parts for i in range(lab.shape[0])]
        flat = self._flatten(parts)
        host = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
        host.copy_(flat, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))  # the stream the copy went to (cuda:N too)
        done.synchronize()  # waits for this call's work only: another thread's later kernels may still run
        buf = host.numpy()
        out: list[Prediction] = []
        offset = 0
        stats = []
        for _, s in parts:
            size = s.numel() * 8
            stats.append(buf[offset:offset + size].view(np.float64).reshape(s.shape))
            offset += size
        for (lab, _), st in zip(parts, stats, strict=True):
            n, height, width = lab.shape
            labels = buf[offset:offset + n * height * width].reshape(n, height, width)
            offset += n * height * width
            out.extend(self._prediction(labels[i], st[i]) for i in range(n))
        return out

    @staticmethod
    def _flatten(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Every part's statistics then every part's labels as one uint8 tensor on the device: one copy back."""
        return torch.cat([s.reshape(-1).view(torch.uint8) for _, s in parts] + [lab.reshape(-1) for lab, _ in parts])

    @staticmethod
    def _prediction(label: np.ndarray, stats: np.ndarray) -> Prediction:
        present = np.flatnonzero(stats[:, 0] > 0)
        s = stats[present]
        box = s[:, 2:6].astype(np.int32).T  # x_min, y_min, x_max, y_max: one conversion
        return Prediction(label=label, class_id=present.astype(np.int32), pixel_count=s[:, 0].astype(np.int64),
                          confidence_sum=s[:, 1].copy(), x_min=box[0], y_min=box[1], x_max=box[2], y_max=box[3],
                          margin_sum=s[:, 6].copy(), low_count=s[:, 7].astype(np.int64))

    # ------------------------------------------------------------------------------------------ batches

    def predict_chunk(self, items: list[Prepared]) -> list[Prediction]:
        """Whole images sharing one canvas size (at most batch_size of them): one forward pass, one copy back."""
        faults.fire("label.forward")
        order = sorted(range(len(items)), key=lambda i: _size_key(items[i]))
        preds = self._whole(self.forward([items[i].canvas for i in order]), [items[i] for i in order])
        out: list[Prediction | None] = [None] * len(items)
        for i, pred in zip(order, preds, strict=True):
            out[i] = pred
        return out  # type: ignore[return-value]

    def _whole(self, logits: torch.Tensor, items: list[Prepared]) -> list[Prediction]:
        """Predictions of whole images from their slots' logits (items sorted by _size_key: images of one
        (resized, original) size sit next to each other, and their logits are one slice)."""
        if not items:
            return []
        parts, start = [], 0
        for (rh, rw, height, width), group in itertools.groupby(items, key=_size_key):
            stop = start + len(list(group))
            parts.append(self.labels_and_stats(logits[start:stop, :, :rh, :rw], height, width))
            start = stop
        return self.to_host(parts)

    def predict(self, items: list[Prepared]) -> list[Prediction | Exception]:
        """Predictions in input order. Whole images are grouped by canvas size into fixed-shape batches; the tiles
        of tiled images (settings.tiling) join the batches of the tile's canvas, after the whole images of that
        size, image by image in grid order.

        A batch that fails is retried slot by slot, so one image that cannot be labeled costs only itself (its
        slot holds the exception; a tiled image fails with any of its tiles). When the device itself no longer
        works after the error (a sticky CUDA error: every later image would fail too) DeviceFailure is raised
        instead (see InferenceActor)."""
        out: list[Prediction | Exception | None] = [None] * len(items)
        tiling = self.settings.tiling
        groups: dict[tuple[int, int], list[_Slot]] = {}
        tiled = []
        for i, p in enumerate(items):
            if tiling is not None and tiling.applies(p.height, p.width):
                tiled.append(i)
            else:
                groups.setdefault(p.canvas.shape[:2], []).append(_Slot(i))
        for i in tiled:
            grid = tiling.grid(items[i].height, items[i].width)
            groups.setdefault((tiling.size, tiling.size), []).extend(_Slot(i, k, y, x) for k, (y, x) in enumerate(grid))
        blenders: dict[int, TileBlender] = {}
        b = self.settings.batch_size
        for slots in groups.values():
            for k in range(0, len(slots), b):
                chunk = [s for s in slots[k:k + b] if out[s.item] is None]  # not the tiles of a failed image
                if not chunk:
                    continue
                try:
                    self._run(chunk, items, out, blenders)
                    continue
                except Exception as e:  # noqa: BLE001 - retried slot by slot below, unless the device failed
                    self._check_recoverable(e)
                    if len(chunk) == 1:
                        self._fail(chunk[0], e, out, blenders)
                        continue
                for slot in chunk:
                    if out[slot.item] is not None:  # a tile of an image that failed just now
                        continue
                    try:
                        self._run([slot], items, out, blenders)
                    except Exception as e:  # noqa: BLE001 - reported per image
                        self._check_recoverable(e)
                        self._fail(slot, e, out, blenders)
        return out  # type: ignore[return-value]

    def _run(self, chunk: list[_Slot], items: list[Prepared], out: list, blenders: dict[int, TileBlender]) -> None:
        """One forward pass over the chunk's slots. Everything that can fail for this chunk (the pass, whole
        images' labels, the tiles' cells, a new image's blending state) comes before anything is kept, so a
        retry never adds a tile twice; a tiled image's last tile then finishes it (a failure there is its own)."""
        faults.fire("label.forward")
        whole = sorted((s for s in chunk if s.tile < 0), key=lambda s: _size_key(items[s.item]))
        tiles = [s for s in chunk if s.tile >= 0]
        tiling = self.settings.tiling
        canvases = [items[s.item].canvas for s in whole]
        canvases += [tiling.tile_canvas(items[s.item].canvas, s.y0, s.x0) for s in tiles]
        logits = self.forward(canvases)
        preds = self._whole(logits[:len(whole)], [items[s.item] for s in whole])
        cells = score_cells(logits[len(whole):len(canvases)], self.score_phase) if tiles else None
        if tiles and self._window is None:
            self._window = tile_window(tiling, logits.device)  # once: a host-to-device copy waits on the stream
        for s in tiles:
            if s.item not in blenders:
                p = items[s.item]
                blenders[s.item] = TileBlender(tiling, p.height, p.width, logits.shape[1], logits.device, self._window)
        for s, pred in zip(whole, preds, strict=True):
            out[s.item] = pred
        for j, s in enumerate(tiles):
            blender = blenders[s.item]
            blender.add(cells[j], s.y0, s.x0)
            if blender.complete:
                del blenders[s.item]
                out[s.item] = self._finish(blender)

    def _finish(self, blender: TileBlender) -> Prediction | Exception:
        """A tiled image's prediction; its full-size pass (the likeliest to run out of memory, beside another
        thread's work) is tried twice, as a whole image gets a pass of its own after its batch; then its error."""
        for attempt in (1, 2):
            try:
                return self._blended(blender)
            except Exception as e:  # noqa: BLE001 - this image only
                self._check_recoverable(e)
                if attempt == 2 or not is_out_of_memory(e):
                    return e
        raise AssertionError("unreachable")

    def _blended(self, blender: TileBlender) -> Prediction:
        """A tiled image's prediction from its blended scores, upsampled in row bands like a shrunk image's."""
        scores = blender.scores()
        phase = CELL_CENTRE if self.score_phase is None else self.score_phase
        pred = self.to_host([self.labels_and_stats(scores, blender.height, blender.width, SCORE_STRIDE, phase)])[0]
        pred.tiles = blender.tiles
        return pred

    def _fail(self, slot: _Slot, e: Exception, out: list, blenders: dict[int, TileBlender]) -> None:
        out[slot.item] = e
        blenders.pop(slot.item, None)  # the failed image's blending state, freed

    def _check_recoverable(self, e: Exception) -> None:
        """Raise DeviceFailure when the device no longer works after `e`; otherwise the caller retries the
        batch image by image (an error that follows a batch or an image lands in errors/, never loops)."""
        if not is_out_of_memory(e) and not device_works(self.device):
            raise DeviceFailure(f"{self.device}: {type(e).__name__}: {e}") from e
        if self.cuda:
            torch.cuda.empty_cache()


@dataclass(frozen=True)
class _Slot:
    """One slot's worth of work: image `item` whole (tile -1), or tile `tile` of its grid, at (y0, x0)."""

    item: int
    tile: int = -1
    y0: int = 0
    x0: int = 0


def _size_key(p: Prepared) -> tuple[int, int, int, int]:
    return p.resized_h, p.resized_w, p.height, p.width


def predict_image(checkpoint_or_model: Checkpoint | nn.Module, convention: InputConvention | None, rgb: np.ndarray, *,
                  max_side: int | None = None, device: str = "cpu", canvas_multiple: int = 32, batch_size: int = 1,
                  amp: str = "bf16", channels_last: bool = True, settings: InferenceSettings | None = None) -> Prediction:
    """The single-image prediction function: labels of one RGB uint8 image at its original resolution.

    With the same settings it gives exactly what the labeling job writes for that image (on the same device,
    and, for cuDNN's benchmark or a compiled model, in the same process). `settings`, when given, replaces the
    keyword arguments. `convention` may be None when a Checkpoint is given (its own convention is used).
    """
    if isinstance(checkpoint_or_model, Checkpoint):
        model, convention = checkpoint_or_model.model, convention or checkpoint_or_model.convention
    else:
        model = checkpoint_or_model
    if convention is None:
        raise ValueError("predict_image needs the input convention when given a bare model")
    if settings is None:
        settings = InferenceSettings(max_side=max_side, canvas_multiple=canvas_multiple, batch_size=batch_size,
                                     device=device, amp=amp, channels_last=channels_last)
    pred = Predictor(model, convention, settings).predict([preprocess(rgb, settings.max_side, settings.canvas_multiple,
                                                                      settings.tiling)])[0]
    if isinstance(pred, Exception):
        raise pred
    return pred
