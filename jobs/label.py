"""Nightly batch labeling: segment every new image under a prefix with an FCN checkpoint, write Parquet.

    python jobs/label.py --images s3://bucket/photos --checkpoint s3://bucket/models/fcn8s.pt \\
        --output s3://bucket/labels-out [--num-gpus 8] [--label-encoding png] [--previews 20]

Output (hive-partitioned by run_date=YYYY-MM-DD): labels/, class_stats/, errors/, runs/<run_id>.json,
previews/, and index/ (what is labeled: the next run's skip list). Images already labeled by the same
checkpoint (same URI and version) are skipped; a rerun after a crash finishes the interrupted commits and
labels what is left, each image exactly once. One run at a time per output (a lease); a second exits with
status 2. With --canary, a run whose canary set scores below its minimum is `degraded`: everything is committed,
one `error: degraded run: ...` line says why, and the job exits 3. The last stdout line is one JSON summary
(run_id, status, listed, skipped, labelled, errors, ...).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

from pipeline.amp import AMP_CHOICES  # noqa: E402
from pipeline.cli import JobArgumentParser, optional_int, path_arg, print_summary, run_job  # noqa: E402
from pipeline.label.canary import DEGRADED_EXIT_STATUS, MIN_IOU_MARGIN, verdict  # noqa: E402
from pipeline.label.codec import ENCODINGS  # noqa: E402
from pipeline.label.config import COMPILED_CANVAS_MULTIPLE, DEFAULT_CANVAS_MULTIPLE, DEVICES, LabelConfig  # noqa: E402
from pipeline.label.inference_settings import COMPILE_MODES, CUDNN_MODES  # noqa: E402
from pipeline.label.tiling import BLENDS, MAX_OVERLAP, MAX_TILE, MIN_TILE  # noqa: E402

DEFAULTS = LabelConfig(images="", checkpoint="", output="")


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = JobArgumentParser(
        prog="label.py",
        description="Label every image under --images with an FCN checkpoint on Ray Data and write label maps, "
                    "per-class statistics and errors as zstd Parquet under --output, partitioned by "
                    "run_date=YYYY-MM-DD. Images already labeled by the same checkpoint are skipped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("data")
    g.add_argument("--images", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="directory, s3:// prefix or single image to label (jpg, jpeg, png, bmp, tif, tiff, webp; "
                        "recursive), or a listing manifest: a .csv/.csv.gz/.parquet file or an S3 Inventory "
                        "manifest.json (required)")
    g.add_argument("--manifest", action="store_true",
                   help="--images is a prefix of listing manifests (CSV or Parquet with uri, or bucket and key, "
                        "a version column (version, e_tag or etag) and, optionally, size), not of images")
    g.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="checkpoint written by models.save_checkpoint, local or s3:// (required)")
    g.add_argument("--output", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="output root, local or s3:// (labels/, class_stats/, errors/, runs/, previews/) (required)")
    g.add_argument("--label-encoding", choices=ENCODINGS, default=d.label_encoding,
                   help="label_map bytes: raw uint8 row-major (zstd-compressed by Parquet) or palette PNG")
    g.add_argument("--force", action="store_true", help="relabel images already labeled by this checkpoint")
    g.add_argument("--previews", type=int, default=d.previews,
                   help="also write this many colour overlays with a legend as PNG under previews/")
    g.add_argument("--run-date", default=d.run_date, help="partition value YYYY-MM-DD (default: today, UTC)")
    g.add_argument("--run-id", default=d.run_id, help="run id (default: UTC timestamp plus random suffix)")
    g.add_argument("--rows-per-file", type=int, default=d.rows_per_file,
                   help="images per labels Parquet file at most (fewer once their label maps reach 256 MiB); "
                        "results are committed in groups of about 10,000 images, the most work a crash can lose")

    g = p.add_argument_group("inference")
    g.add_argument("--max-side", type=int, default=d.max_side,
                   help="shrink images so the long side is at most this before inference (0: never); label "
                        "maps are returned at the original resolution")
    g.add_argument("--canvas-multiple", type=optional_int, default=d.canvas_multiple,
                   help="images are edge-padded to a canvas whose sides are multiples of this; equal canvases "
                        f"are batched together (default: {DEFAULT_CANVAS_MULTIPLE}; {COMPILED_CANVAS_MULTIPLE} with "
                        "--compile, so few shapes are compiled)")
    g.add_argument("--batch-size", type=optional_int, default=d.batch_size,
                   help="images per forward pass (default: 4); every pass has exactly this many "
                        "slots (unused ones are zero), so an image's labels never depend on its neighbours")
    g.add_argument("--max-pixels", type=int, default=d.max_pixels,
                   help="images over this many pixels are rejected from their header (an errors/ row)")
    g.add_argument("--max-bytes", type=optional_int, default=d.max_bytes,
                   help="files over this many bytes are not read (an errors/ row); at most this plus one byte is "
                        "ever read of a file (default: max(256 MiB, 8 x --max-pixels))")
    g.add_argument("--amp", choices=AMP_CHOICES, default=d.amp, help="mixed precision on GPUs (CPU: always fp32)")
    g.add_argument("--no-amp", dest="amp", action="store_const", const="off", help=argparse.SUPPRESS)  # = --amp off
    g.add_argument("--reproducible", action="store_true",
                   help="only kernel levers with a fixed kernel choice (no --cudnn benchmark, no --compile): two "
                        "processes give bit-identical labels; an image's labels never depend on its batch "
                        "neighbours in any mode")
    g.add_argument("--cudnn", choices=CUDNN_MODES, default=d.cudnn,
                   help="how cuDNN picks convolution kernels on GPUs: its instant heuristic, heuristic mode B, or by "
                        "timing candidates once per shape and process (benchmark; not with --reproducible)")
    g.add_argument("--compile", nargs="?", const="default", choices=COMPILE_MODES, default=d.compile,
                   help="torch.compile the model, one static graph per canvas shape (compile seconds in the "
                        "summary; reduce-overhead adds CUDA graphs); not with --reproducible")
    g.add_argument("--no-grouped-upsampling", dest="grouped_upsampling", action="store_false",
                   help="run bilinear upsamplers as dense transposed convs (by default a checkpoint whose upsamplers "
                        "hold the exact bilinear kernel runs them per class, 1/C of the work)")
    g.add_argument("--low-confidence", type=float, default=d.low_confidence,
                   help="a pixel whose max softmax probability is below this counts in its image's "
                        "low_confidence_fraction (labels/); it changes no label")
    g.add_argument("--no-cast-weights", dest="cast_weights", action="store_false",
                   help="keep the trunk's weights in fp32 and let autocast cast them every forward pass (by default "
                        "they are stored in the --amp dtype once: the same logits, less traffic)")

    g = p.add_argument_group("large images (docs/labeling.md \"Large images\")")
    g.add_argument("--tile", type=int, default=d.tile, metavar="SIZE",
                   help="label an image whose long side exceeds SIZE at its own resolution (up to --max-pixels) in "
                        "overlapping SIZE x SIZE tiles, batched like whole images (a multiple of 8 and of the canvas "
                        f"multiple, {MIN_TILE}-{MAX_TILE}; default: off, every image whole, shrunk to --max-side); "
                        "smaller images take the whole-image path unchanged")
    g.add_argument("--tile-overlap", type=float, default=d.tile_overlap, metavar="F",
                   help=f"share of a tile its neighbour overlaps, in [0, {MAX_OVERLAP})")
    g.add_argument("--tile-blend", choices=BLENDS, default=d.tile_blend,
                   help="weights the overlapping tiles' logits are blended with (gaussian: MONAI's, sigma 1/8 of the "
                        "tile; cosine: a Hann window; mean: equal)")

    g = p.add_argument_group("quality")
    g.add_argument("--canary", default=d.canary, metavar="URI", type=path_arg,
                   help="a small dataset with masks (VOC layout or manifest; 20-200 images) that the run also labels, "
                        "with the same checkpoint and settings, and scores; its rows never go into labels/. Below "
                        f"--canary-min-iou the run is degraded: everything is committed and the job exits {DEGRADED_EXIT_STATUS}")
    g.add_argument("--canary-split", default=d.canary_split, help="the canary's split (VOC: ImageSets/Segmentation/"
                   "SPLIT.txt; a manifest: its rows of that split, or every row without a split column)")
    g.add_argument("--canary-min-iou", type=float, default=d.canary_min_iou,
                   help=f"the canary's minimum mean IU (default: the checkpoint's validation mean IU minus {MIN_IOU_MARGIN}, "
                        "where it records one; without either the scores are reported and the run is never degraded)")

    g = p.add_argument_group("resources")
    g.add_argument("--num-gpus", type=optional_int, default=d.num_gpus,
                   help="inference actors, one per GPU (default: every GPU of the Ray cluster; 0: CPU inference)")
    g.add_argument("--device", choices=DEVICES, default=d.device,
                   help="device of the inference actors (cpu with --num-gpus > 0 tests GPU scheduling on CPU)")
    g.add_argument("--actors", type=optional_int, default=d.actors,
                   help="CPU inference: number of actors (default: cores // threads-per-actor)")
    g.add_argument("--threads-per-actor", type=optional_int, default=d.threads_per_actor,
                   help="torch threads per actor (default: min(8, cores) on CPU, 2 with GPUs)")
    g.add_argument("--cpus-per-actor", type=float, default=d.cpus_per_actor,
                   help="Ray CPU request per actor (default: threads - 0.5 on CPU; with GPUs min(1, CPUs / "
                        "(2 x GPUs)))")
    g.add_argument("--wait-for-resources", type=float, default=d.wait_for_resources, metavar="SECONDS",
                   help="when the cluster is too small for the flags, ask the autoscaler for the resources and wait "
                        "this long before giving up (default: 600 on a cluster the job joins, 0 on a local Ray)")
    g.add_argument("--ray-address", default=d.ray_address,
                   help="Ray cluster to join (default: $RAY_ADDRESS, else a new local Ray on this machine)")
    g.add_argument("--progress", dest="progress", action="store_true", default=d.progress,
                   help="show Ray Data's progress bars (default: when stderr is a terminal)")
    g.add_argument("--no-progress", dest="progress", action="store_false", default=argparse.SUPPRESS,
                   help="hide the progress bars, even on a terminal")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config = LabelConfig(**{**args, "max_side": args["max_side"] or None})  # --max-side 0: never shrink
    from pipeline.label.job import label_images

    summary = label_images(config)
    degraded = verdict(summary["canary"]) if summary.get("canary") else None
    if degraded:  # the one line a person reads before the summary; the exit status tells the scheduler
        print(f"error: degraded run: {degraded}", file=sys.stderr, flush=True)
    print_summary(summary)
    return DEGRADED_EXIT_STATUS if degraded else 0


if __name__ == "__main__":
    run_job(main)
