"""Bring reviewed labels back: an annotation tool's export -> a dataset jobs/train.py reads (docs/review.md).

    python jobs/import_review.py --from cvat-export.zip --format cvat|label-studio|coco \\
        --classes CHECKPOINT_OR_CLASSES_TXT --images-from s3://bucket/review/2026-12-07 --to s3://bucket/reviewed/1

Classes are matched by name. Each problem is one line on stderr (`refused: ...`); every other image is imported.
The last stdout line is one JSON object: the manifest to train on and the counts.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

from pipeline.cli import JobArgumentParser, path_arg, print_summary, run_job  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = JobArgumentParser(prog="import_review.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          description="Import reviewed labels from CVAT, Label Studio or a COCO file as a training "
                                      "dataset (docs/review.md).")
    p.add_argument("--from", dest="source", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="the tool's export: CVAT's Segmentation mask 1.1 zip, Label Studio's JSON export, or a COCO "
                        "instances JSON (required)")
    p.add_argument("--format", required=True, default=argparse.SUPPRESS, choices=("cvat", "label-studio", "coco"),
                   help="the export's format (required)")
    p.add_argument("--classes", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="the checkpoint to fine-tune, or a classes.txt: the class ids, matched by name (required)")
    p.add_argument("--to", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="the dataset folder to write, local or s3:// (required)")
    p.add_argument("--images-from", type=path_arg,
                   help="the export package the review started from (its export.json names each image), or a folder "
                        "of the images; needed where the export names images rather than giving their URIs (CVAT)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the images in the val split")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --to")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from pipeline.review.importer import ImportConfig, import_review

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    print_summary(import_review(ImportConfig(source=args.source, format=args.format, classes=args.classes, to=args.to,
                                             images_from=args.images_from, val_fraction=args.val_fraction,
                                             seed=args.seed, overwrite=args.overwrite), say))
    return 0


if __name__ == "__main__":
    run_job(main)
