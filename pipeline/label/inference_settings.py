"""InferenceSettings: everything besides the model and the image that decides an image's labels, with the kernel
levers and their checks. No torch here: the driver validates flags with it before anything heavy loads."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .canvas import check_canvas_settings

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

    The levers (README "Inference settings"), each recorded in the run record:
    cast_weights: the trunk's weights stored in the autocast dtype once (bit-identical logits; CUDA with amp).
    grouped_upsampling: upsamplers holding the exact bilinear kernel run as grouped (per-class) transposed convs.
    cudnn: how cuDNN picks kernels: its instant heuristic, heuristic mode B, or timing candidates (benchmark).
    compile: torch.compile mode of the model ("off": eager), one static graph per canvas shape.
    reproducible: only levers whose kernel choice is fixed (no benchmark, no compile), so two processes give
    bit-identical labels; every mode keeps an image's labels independent of its batch neighbours.
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

    def __post_init__(self) -> None:
        check_canvas_settings(self.max_side, self.canvas_multiple)
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        for name, value, choices in (("cudnn", self.cudnn, CUDNN_MODES), ("compile", self.compile, COMPILE_MODES)):
            if value not in choices:
                raise UsageError(f"--{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.reproducible:
            unfixed = [f"--cudnn {self.cudnn}"] if self.cudnn.startswith("benchmark") else []
            unfixed += [f"--compile {self.compile}"] if self.compile != "off" else []
            if unfixed:
                raise UsageError(f"--reproducible needs a fixed kernel choice: drop {' and '.join(unfixed)} (cuDNN's "
                                 "benchmark and compiled kernels may differ between processes)")

    def levers(self) -> dict:
        """The settings that choose kernels, as the run record and the summary state them."""
        return {"reproducible": self.reproducible, "cast_weights": self.cast_weights,
                "grouped_upsampling": self.grouped_upsampling, "cudnn": self.cudnn, "compile": self.compile,
                "batch_size": self.batch_size, "amp": self.amp, "canvas_multiple": self.canvas_multiple}
