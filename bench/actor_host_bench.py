"""Host work of the inference actor per image, measured on the CPU: what caps one actor however fast its GPU is.

    python bench/actor_host_bench.py [--images 192] [--batch-size 4] [--calls-of 16] [--repeat 3]

The inference actor's call (`pipeline.label.actor.BatchLabeler`, what `InferenceActor` runs) on decoded rows
exactly as the decode tasks hand them over: mixed 500x375, 375x500 and 500x333 images (canvases 512x384,
384x512, 512x352), raw label maps postprocessed in the actor. The model is a 1x1 convolution to 21 classes, so
the device work (normalisation, forward pass, upsampling, argmax, statistics) is small; it is timed and
subtracted (on a CPU it runs synchronously; CPU seconds of the process, one torch thread, so a busy machine
changes the figure little), and what is left is the actor's own host work: unpacking Arrow columns, filling the
batch, grouping, copying results back, building the result table and postprocessing it. On a GPU that work
runs on the host while the GPU computes, under one GIL: at 0.3 ms per image one actor feeds ~3,300 images/s.

Prints one JSON line (microseconds of host work per image, and the parts).
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from models import TORCHVISION  # noqa: E402
from pipeline.host_memory import keeps_freed_memory, restart_keeping_freed_memory  # noqa: E402
from pipeline.label import inference  # noqa: E402
from pipeline.label.actor import BatchLabeler  # noqa: E402
from pipeline.label.inference import InferenceSettings, Predictor  # noqa: E402
from pipeline.label.stages import decode_stage  # noqa: E402

SIZES = ((375, 500), (500, 375), (333, 500))  # (height, width) of the mixed photos
_TO_INPUT = inference.to_input


class PixelClassifier(nn.Module):
    """Logits from each pixel's colour alone: several classes per image, almost no device work."""

    num_classes = 21

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.score = nn.Conv2d(3, self.num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score(x)


def decoded_rows(count: int, seed: int = 0) -> pa.Table:
    """What the decode tasks hand the actor for `count` JPEG-sized photos (decode_stage's own output)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    data = []
    for i in range(count):
        h, w = SIZES[i % len(SIZES)]
        small = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)  # smooth regions of colour
        rgb = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=90)
        data.append(buf.getvalue())
    read = pa.table({"image_uri": [f"mem://{i:06d}.jpg" for i in range(count)],
                     "image_version": ["1"] * count, "data": pa.array(data, pa.binary()),
                     "stage": pa.array([None] * count, pa.string()), "error": pa.array([None] * count, pa.string())})
    return decode_stage(read, max_pixels=64_000_000, max_side=1024, canvas_multiple=32)


class DeviceClock:
    """Seconds spent in what runs on the device on a GPU, timed around each call (on a CPU it runs synchronously):
    the input's copy, normalisation and layout (`to_input`), the model, the labels-and-statistics kernels, and
    gathering the results into one buffer before the copy back (`_flatten`)."""

    def __init__(self, predictor: Predictor) -> None:
        self.seconds = 0.0
        for name in ("model", "labels_and_stats", "_flatten"):
            setattr(predictor, name, self._timed(getattr(predictor, name)))
        inference.to_input = self._timed(_TO_INPUT)

    def _timed(self, fn):
        def timed(*args, **kwargs):
            t = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.process_time() - t
        return timed


def measure(rows: pa.Table, *, batch_size: int, rows_per_call: int, repeat: int) -> dict:
    torch.set_num_threads(1)
    predictor = Predictor(PixelClassifier(), TORCHVISION, InferenceSettings(batch_size=batch_size, device="cpu"))
    labeler = BatchLabeler(predictor, {"bench": True}, postprocess_encoding="raw")
    calls = [rows.slice(k, rows_per_call) for k in range(0, rows.num_rows, rows_per_call)]
    labeler(calls[0])  # warm-up (allocator, first-call costs)
    clock = DeviceClock(predictor)
    best = None
    for _ in range(repeat):
        clock.seconds = 0.0
        t = time.process_time()  # CPU seconds of this process (one torch thread): steady on a shared machine
        out = [labeler(c) for c in calls]
        total = time.process_time() - t
        host = total - clock.seconds
        if best is None or host < best["host"]:
            best = {"total": total, "device": clock.seconds, "host": host}
    assert sum(t.num_rows for t in out) == rows.num_rows and all(t["error"].null_count == t.num_rows for t in out)
    n = rows.num_rows
    return {"images": n, "rows_per_call": rows_per_call, "batch_size": batch_size, "keep_freed_memory": keeps_freed_memory(),
            "host_us_per_image": round(1e6 * best["host"] / n, 1),
            "device_us_per_image_on_this_cpu": round(1e6 * best["device"] / n, 1),
            "total_us_per_image": round(1e6 * best["total"] / n, 1),
            "images_per_second_one_actor_host_bound": round(n / best["host"], 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--calls-of", type=int, default=16, help="forward passes' rows per actor call (the GPU default)")
    p.add_argument("--repeat", type=int, default=3, help="timed passes; the fastest counts")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is (the actor keeps freed memory: pipeline/host_memory.py)")
    args = p.parse_args(argv)
    if not args.default_malloc and argv is None:
        restart_keeping_freed_memory()  # this process runs as the inference actors do
    rows = decoded_rows(args.images)
    result = {"bench": "actor_host", **measure(rows, batch_size=args.batch_size,
                                               rows_per_call=args.calls_of * args.batch_size, repeat=args.repeat),
              "target_host_us_per_image": 300, "load_average": [round(x, 2) for x in os.getloadavg()]}
    print(json.dumps(result, sort_keys=True))
    return result


if __name__ == "__main__":
    main()
