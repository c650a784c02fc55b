"""LabelConfig: every option of a labeling run, with the defaults `jobs/label.py --help` shows."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from datetime import datetime

from ..amp import AMP_CHOICES
from ..decode import DEFAULT_MAX_PIXELS
from ..errors import CPU_QUANTUM, UsageError, check_number
from .codec import ENCODINGS
from .inference_settings import InferenceSettings, check_settings
from .tiling import DEFAULT_BLEND, DEFAULT_OVERLAP

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CANVAS_MULTIPLE = 32
# With --compile every canvas shape is a compiled graph: multiples of 128 bound them to 8 x 8 = 64 at the default
# --max-side 1024 (a 500x375 photo's canvas is 512x384 either way).
COMPILED_CANVAS_MULTIPLE = 128
# A run id names files and a folder: no path separators, no leading '.' or '-' ('..' would climb out).
RUN_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}"
# A tiled image's canvas (3 bytes a pixel) is one binary cell: Arrow's int32 offsets and Parquet cap it at 2 GiB.
MAX_TILED_PIXELS = (2**31 - 1) // 3


@dataclass
class LabelConfig:
    """Arguments of the labeling job; see `jobs/label.py --help` for each."""

    images: str
    checkpoint: str
    output: str
    num_gpus: int | None = None          # None: every GPU of the cluster (0 on a CPU cluster)
    device: str = "auto"                  # one of DEVICES
    actors: int | None = None            # CPU inference only; None: cores // threads_per_actor
    threads_per_actor: int | None = None  # None: min(8, cores) on CPU, 2 with GPUs
    cpus_per_actor: float | None = None   # Ray CPU request of an inference actor; None: see plan_resources
    batch_size: int | None = None        # images per forward pass; None: 4 (see plan_resources)
    max_side: int | None = 1024          # None: never shrink
    canvas_multiple: int | None = None   # None: 32, or COMPILED_CANVAS_MULTIPLE with --compile (few canvas shapes)
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int | None = None          # larger files become errors/ rows, unread; None: see read_limit
    label_encoding: str = "raw"          # one of ENCODINGS
    force: bool = False
    previews: int = 0
    rows_per_file: int = 1000
    run_date: str | None = None          # YYYY-MM-DD; None: today (UTC)
    run_id: str | None = None
    ray_address: str | None = None
    manifest: bool = False                # --images is a listing manifest (CSV/Parquet file or prefix of them)
    wait_for_resources: float | None = None  # seconds; None: 600 on a joined cluster, 0 on a local Ray
    progress: bool | None = None          # None: when stderr is a terminal
    amp: str = "bf16"                     # one of AMP_CHOICES; GPU only
    # Kernel levers (InferenceSettings; docs/labeling.md "Inference settings").
    reproducible: bool = False            # only levers with a fixed kernel choice: bit-identical labels across processes
    cudnn: str = "heuristic"              # one of CUDNN_MODES
    compile: str = "off"                  # one of COMPILE_MODES
    grouped_upsampling: bool = True
    cast_weights: bool = True
    low_confidence: float = 0.5           # max softmax probability below which a pixel counts as low-confidence
    # Large images (pipeline.label.tiling): a long side over --tile is labeled at native resolution in tiles.
    tile: int | None = None               # None: every image whole (shrunk to --max-side)
    tile_overlap: float = DEFAULT_OVERLAP
    tile_blend: str = DEFAULT_BLEND
    # The canary set (pipeline.label.canary): labeled and scored beside every run.
    canary: str | None = None             # VOC layout or manifest with masks
    canary_split: str = "val"
    canary_min_iou: float | None = None   # None: the checkpoint's validation mean IU minus 0.05, where it has one
    # Tuning without a flag: file-set size in bytes, rows per read task / per inference actor call, progress lines.
    bytes_per_file: int = 256 * 1024**2
    images_per_small_file: int = 10_000   # images whose class_stats/errors/index rows share one file (filesets.py)
    rows_per_read_task: int = 8
    progress_interval_s: float = 30.0     # seconds between progress lines on stderr
    rows_per_actor_call: int | None = None  # None: 16 (GPU) or 4 (CPU) x batch_size, to fill equal-canvas batches

    def validate(self) -> None:
        """Option values alone (no I/O); raises UsageError (a ValueError) naming the flag. Every number is checked
        here, NaN and inf included (argparse's float reads them), so a bad value fails before Ray starts."""
        for name, value, choices in (("label-encoding", self.label_encoding, ENCODINGS),
                                     ("device", self.device, DEVICES), ("amp", self.amp, AMP_CHOICES)):
            if value not in choices:
                raise UsageError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
        for name in ("actors", "threads_per_actor", "batch_size", "rows_per_file", "max_pixels", "max_bytes"):
            check_number(f"--{name.replace('_', '-')}", getattr(self, name), at_least=1)
        check_number("--num-gpus", self.num_gpus, at_least=0)
        check_number("--previews", self.previews, at_least=0)
        check_number("--cpus-per-actor", self.cpus_per_actor, at_least=CPU_QUANTUM)
        check_number("--wait-for-resources", self.wait_for_resources, at_least=0.0, unit="seconds")
        check_number("rows_per_read_task", self.rows_per_read_task, at_least=1)  # no flag: library callers
        check_number("--canary-min-iou", self.canary_min_iou, at_least=0.0, at_most=1.0)
        if self.run_date is not None:
            try:  # zero-padded ASCII digits only: one partition per day, whatever the spelling
                if not re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", self.run_date):
                    raise UsageError
                datetime.strptime(self.run_date, "%Y-%m-%d")
            except ValueError:
                raise UsageError(f"--run-date must be a date YYYY-MM-DD (zero-padded), got {self.run_date!r}") from None
        if self.run_id is not None and not re.fullmatch(RUN_ID_PATTERN, self.run_id):
            raise UsageError("--run-id must start with a letter or digit and hold letters, digits, '_', '.' and '-' "
                             f"only (at most 128), got {self.run_id!r}")
        if self.tile is not None and self.max_pixels > MAX_TILED_PIXELS:
            raise UsageError(f"--max-pixels {self.max_pixels} is too many with --tile: at most {MAX_TILED_PIXELS:,} (a "
                             "tiled image travels at its own size as one Arrow and Parquet cell, 3 bytes a pixel, "
                             "under 2 GiB)")
        # The inference settings' own rules (canvas, levers, --reproducible with --compile), before Ray plans the
        # batch size and the device that complete them (inference_settings below).
        check_settings(max_side=self.max_side, canvas_multiple=self.effective_canvas_multiple, batch_size=self.batch_size or 1,
                       cudnn=self.cudnn, compile=self.compile, reproducible=self.reproducible,
                       low_confidence=self.low_confidence, tile=self.tile, tile_overlap=self.tile_overlap,
                       tile_blend=self.tile_blend)

    @property
    def effective_canvas_multiple(self) -> int:
        if self.canvas_multiple is not None:
            return self.canvas_multiple
        return COMPILED_CANVAS_MULTIPLE if self.compile != "off" else DEFAULT_CANVAS_MULTIPLE

    def inference_settings(self, *, batch_size: int, device: str) -> InferenceSettings:
        """The InferenceSettings of this run's actors (batch size and device come from the resource plan): built
        once per run, by the driver once the plan is made."""
        return InferenceSettings(max_side=self.max_side, canvas_multiple=self.effective_canvas_multiple,
                                 batch_size=batch_size, device=device, amp=self.amp, cast_weights=self.cast_weights,
                                 grouped_upsampling=self.grouped_upsampling, cudnn=self.cudnn, compile=self.compile,
                                 reproducible=self.reproducible, low_confidence=self.low_confidence,
                                 tile=self.tile, tile_overlap=self.tile_overlap, tile_blend=self.tile_blend)

    @property
    def read_limit(self) -> int:
        """Bytes read of a file at most: --max-bytes, by default max(256 MiB, 8 bytes per allowed pixel)."""
        return self.max_bytes or max(256 * 1024**2, 8 * self.max_pixels)

    def to_dict(self) -> dict:
        return asdict(self)
