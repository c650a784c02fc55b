"""InferenceSettings: everything besides the model and the image that decides an image's labels, with the kernel
levers and their checks, here alone. No torch here: the driver checks the flags with them before anything heavy
loads (LabelConfig.validate), then builds the run's one InferenceSettings once the resource plan gives the batch
size and the device."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError, check_number
from .tiling import DEFAULT_BLEND, DEFAULT_OVERLAP, Tiling, check_tiling

CUDNN_MODES = ("heuristic", "heuristic-b", "benchmark", "benchmark-b")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune-no-cudagraphs")
# Canvas shapes one compiled model may hold: at max_side 1024 and canvas sides in multiples of 128, 8 x 8 = 64.
COMPILE_SHAPE_LIMIT = 64


@dataclass(frozen=True)
class InferenceSettings:
    """Everything besides the model and the image that decides the labels.

    max_side: the long side is shrunk to this before inference (None: never); labels still come back at the
    original resolution. canvas_multiple: canvas sides are rounded up to it. batch_size: slots per forward.
    device: "cpu", "cuda", "cuda:N" or "auto". amp: "bf16", "fp16" or "off" autocast on CUDA (CPU: fp32).

    The levers (docs/labeling.md "Inference settings"), each recorded in the run record:
    cast_weights: the trunk's weights stored in the autocast dtype once (bit-identical logits; CUDA with amp).
    grouped_upsampling: upsamplers holding the exact bilinear kernel run as grouped (per-class) transposed convs.
    cudnn: how cuDNN picks kernels: its instant heuristic, heuristic mode B, or timing candidates (benchmark).
    compile: torch.compile mode of the model ("off": eager), one static graph per canvas shape.
    reproducible: only levers whose kernel choice is fixed (no benchmark, no compile), so two processes give
    bit-identical labels; every mode keeps an image's labels independent of its batch neighbours.

    low_confidence: a pixel whose max softmax probability is below it counts in its image's
    low_confidence_fraction (it changes no label).

    tile, tile_overlap, tile_blend: an image whose long side exceeds `tile` is labeled at its own resolution in
    overlapping tiles (pipeline.label.tiling; None: never); max_side applies to the others only.
    """

    max_side: int | None = 1024
    canvas_multiple: int = 32
    batch_size: int = 1
    device: str = "auto"
    amp: str = "bf16"
    channels_last: bool = True
    cast_weights: bool = True
    grouped_upsampling: bool = True
    cudnn: str = "heuristic"
    compile: str = "off"
    reproducible: bool = False
    low_confidence: float = 0.5
    tile: int | None = None
    tile_overlap: float = DEFAULT_OVERLAP
    tile_blend: str = DEFAULT_BLEND

    def __post_init__(self) -> None:
        check_settings(max_side=self.max_side, canvas_multiple=self.canvas_multiple, batch_size=self.batch_size,
                       cudnn=self.cudnn, compile=self.compile, reproducible=self.reproducible,
                       low_confidence=self.low_confidence, tile=self.tile, tile_overlap=self.tile_overlap,
                       tile_blend=self.tile_blend)

    @property
    def tiling(self) -> Tiling | None:
        return None if self.tile is None else Tiling(self.tile, self.tile_overlap, self.tile_blend)

    def levers(self) -> dict:
        """The settings that choose kernels, as the run record and the summary state them."""
        return {"reproducible": self.reproducible, "cast_weights": self.cast_weights,
                "grouped_upsampling": self.grouped_upsampling, "cudnn": self.cudnn, "compile": self.compile,
                "batch_size": self.batch_size, "amp": self.amp, "canvas_multiple": self.canvas_multiple}


# Upper bounds where a larger value only allocates memory: every canvas is padded up to a multiple of the first
# (100,000 would make each 30 GB), the second is the fixed slots of every forward pass.
MAX_CANVAS_MULTIPLE = 1024
MAX_BATCH_SIZE = 1024


def check_settings(*, max_side: int | None, canvas_multiple: int, batch_size: int, cudnn: str, compile: str,
                   reproducible: bool, low_confidence: float = 0.5, tile: int | None = None,
                   tile_overlap: float = DEFAULT_OVERLAP, tile_blend: str = DEFAULT_BLEND) -> None:
    """The rules of InferenceSettings' values; raises UsageError naming the flag. InferenceSettings checks itself
    with them, and LabelConfig.validate checks the flags with them before Ray starts (the resource plan, which
    gives the run's batch size and device, comes later)."""
    if max_side is not None and max_side < 1:
        raise UsageError(f"--max-side must be >= 1 (or None), got {max_side}")
    if not 1 <= canvas_multiple <= MAX_CANVAS_MULTIPLE:
        raise UsageError(f"--canvas-multiple must be in [1, {MAX_CANVAS_MULTIPLE}], got {canvas_multiple}")
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise UsageError(f"--batch-size must be in [1, {MAX_BATCH_SIZE}], got {batch_size}")
    check_number("--low-confidence", low_confidence, above=0.0, at_most=1.0)
    check_tiling(tile, tile_overlap, tile_blend, canvas_multiple)
    for name, value, choices in (("cudnn", cudnn, CUDNN_MODES), ("compile", compile, COMPILE_MODES)):
        if value not in choices:
            raise UsageError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
    if reproducible:
        unfixed = [f"--cudnn {cudnn}"] if cudnn.startswith("benchmark") else []
        unfixed += [f"--compile {compile}"] if compile != "off" else []
        if unfixed:
            raise UsageError(f"--reproducible needs a fixed kernel choice: drop {' and '.join(unfixed)} (cuDNN's "
                             "benchmark and compiled kernels may differ between processes)")
