"""Send labels to review: the chosen images' label maps as pre-annotations in an annotation tool's format.

    python jobs/export_review.py --output s3://bucket/labels-out --to s3://bucket/review/2026-12-07 \\
        --format cvat|label-studio|coco (--run-date D --least-confident K | --where SQL | --images FILE)

The package (docs/review.md) is the tool's file(s) and export.json (which output, runs and model it came from, and
each image's name and URI). The last stdout line is one JSON object: where, how many, and how to import it back.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

from pipeline.cli import JobArgumentParser, path_arg, print_summary, run_job  # noqa: E402
from pipeline.errors import JobError, check_number  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = JobArgumentParser(prog="export_review.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          description="Export labels as pre-annotations for review in CVAT, Label Studio or COCO "
                                      "tools (docs/review.md).")
    p.add_argument("--output", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="the labeling job's output root, local or s3:// (required)")
    p.add_argument("--to", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="the package folder to write, local or s3:// (required)")
    p.add_argument("--format", required=True, default=argparse.SUPPRESS, choices=("cvat", "label-studio", "coco"),
                   help="cvat: a Segmentation mask 1.1 zip; label-studio: tasks JSON with brush predictions; coco: "
                        "instances JSON with RLE masks (required)")
    which = p.add_argument_group("which images (at least one; each narrows the others)")
    which.add_argument("--run-date", help="the night's labels (YYYY-MM-DD)")
    which.add_argument("--where", metavar="SQL", help="a DuckDB condition over the labels columns (all but label_map) "
                                                       "and run_date, e.g. \"low_confidence_fraction > 0.3\"")
    which.add_argument("--images", type=path_arg, metavar="FILE", help="a text file of image URIs, one per line")
    which.add_argument("--least-confident", type=int, metavar="K",
                       help="of those, the K with the lowest mean_confidence (an image labeled on several nights "
                            "counts with its newest row)")
    p.add_argument("--overwrite", action="store_true", help="replace a package already at --to")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.review.exporter import ExportConfig, export_review
    from pipeline.review.select import Selection
    from pipeline.storage import Location

    if args.least_confident is None and args.where is None and args.images is None and args.run_date is None:
        raise JobError("say which images to export: --run-date D (and --least-confident K), --where SQL, or --images FILE")
    if args.least_confident is not None:
        check_number("--least-confident", args.least_confident, at_least=1)
    if args.run_date:  # the labeling job's own rule for the partition value
        from pipeline.label.config import LabelConfig

        LabelConfig(images="", checkpoint="", output="", run_date=args.run_date).validate()
    images = None
    if args.images:
        listed = Location.of(args.images)
        listed.check_exists("image list")
        try:
            text = listed.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise JobError(f"{listed.uri} is not UTF-8 text (byte {e.start}): list one image URI per line") from None
        images = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
        if not images:
            raise JobError(f"{listed.uri} names no image")
    selection = Selection(run_date=args.run_date, least_confident=args.least_confident, where=args.where, images=images)
    print_summary(export_review(ExportConfig(output=args.output, to=args.to, format=args.format, selection=selection,
                                             overwrite=args.overwrite)))
    return 0


if __name__ == "__main__":
    run_job(main)
