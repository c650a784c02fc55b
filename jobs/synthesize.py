"""Write a deterministic synthetic segmentation dataset in PASCAL VOC layout (local directory or s3:// prefix).

    python jobs/synthesize.py --output s3://bucket/data/synthetic --count 200 --size 160x120 --seed 0

The last stdout line is one JSON summary (counts, classes, per-class pixel counts).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

from pipeline.cli import JobArgumentParser, parse_size, path_arg, print_summary, run_job  # noqa: E402
from pipeline.errors import check_number  # noqa: E402
from pipeline.storage import Location  # noqa: E402
from pipeline.synthetic import SYNTHETIC_CLASSES, synthesize_voc  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = JobArgumentParser(
        prog="synthesize.py",
        description="Write a deterministic synthetic segmentation dataset in PASCAL VOC layout: "
                    "JPEGImages/, SegmentationClass/ (palette PNGs, 255 = void), ImageSets/Segmentation/"
                    f"{{train,val}}.txt and classes.txt. Classes: {', '.join(SYNTHETIC_CLASSES)}.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="destination directory or s3:// prefix (required)")
    p.add_argument("--count", required=True, type=int, default=argparse.SUPPRESS,
                   help="number of images to write (required)")
    p.add_argument("--size", type=parse_size, default="160x120", help="image size as WIDTHxHEIGHT")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives byte-identical files")
    p.add_argument("--val-fraction", type=float, default=0.2, help="fraction of images listed in val.txt")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_number("--count", args.count, at_least=1)
    check_number("--val-fraction", args.val_fraction, at_least=0.0, below=1.0)
    check_number("--seed", args.seed, at_least=0)
    output = Location.writable(args.output)
    summary = synthesize_voc(output, args.count, size=args.size, seed=args.seed, val_fraction=args.val_fraction)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    run_job(main)
