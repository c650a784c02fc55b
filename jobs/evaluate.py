"""Evaluate a checkpoint on a dataset split with the paper's metrics, distributed over Ray Data.

    python jobs/evaluate.py --data URI --checkpoint URI [--split val]

The last stdout line is one JSON object: pixel_accuracy, mean_accuracy, mean_iou, fw_iou, per_class_iou, ...
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

from pipeline.amp import AMP_CHOICES  # noqa: E402
from pipeline.cli import JobArgumentParser, path_arg, print_summary, run_job  # noqa: E402
from pipeline.errors import CPU_QUANTUM, JobError, check_name, check_number  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = JobArgumentParser(prog="evaluate.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Evaluate an FCN checkpoint (pixel accuracy, mean accuracy, mean IU, frequency-weighted "
                            "IU, per-class IU) on whole images at native size, as training's validation does.")
    p.add_argument("--data", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="dataset: VOC-layout directory/prefix or .csv/.parquet manifest, local or s3:// (required)")
    p.add_argument("--checkpoint", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="checkpoint file (model.pt), local or s3:// (required)")
    p.add_argument("--split", default="val", help="split to evaluate")
    p.add_argument("--actors", type=int, default=1, help="inference actors (one per GPU with --use-gpu)")
    p.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per inference actor")
    p.add_argument("--use-gpu", action="store_true", help="run inference on GPUs")
    p.add_argument("--amp", default="bf16", choices=AMP_CHOICES, help="mixed precision on GPU (CPU: always fp32)")
    p.add_argument("--report", metavar="DIR", default=None, type=path_arg,
                   help="also write confusion.png (rows normalised, class names), per_class.csv/.json (IU, accuracy, "
                        "pixel counts) and confusion.json here, local or s3://")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Flag values alone, before any I/O or cluster work (UsageError, one line)."""
    check_number("--actors", args.actors, at_least=1)
    check_number("--cpus-per-actor", args.cpus_per_actor, at_least=CPU_QUANTUM)
    check_name("--split", args.split, "split name")  # ImageSets/Segmentation/<split>.txt under --data


# More than this share of a split dropped as bad samples: no score is printed (it would describe another set).
MAX_DROPPED_SHARE = 0.5


def check_dropped(bad: list[dict], evaluated: int, split: str) -> None:
    """Say loudly that samples were dropped: a warning line with the counts; more than half of the split dropped is
    an error, since a mean IU over the rest is not the split's (often a dataset whose masks use other class ids)."""
    if not bad:
        return
    total = evaluated + len(bad)
    examples = "; ".join(f"{row['uri']}: {row['reason']}" for row in bad[:3]) + ("; ..." if len(bad) > 3 else "")
    if len(bad) > MAX_DROPPED_SHARE * total:
        raise JobError(f"{len(bad)} of {total} images of split {split!r} were dropped as bad samples, more than "
                       f"{MAX_DROPPED_SHARE:.0%}: no score is reported for the rest ({examples})")
    print(f"warning: {len(bad)} of {total} images of split {split!r} dropped as bad samples; the scores cover the "
          f"other {evaluated} ({examples})", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_args(args)
    from pipeline.storage import Location
    from pipeline.train.evaluation import evaluate_checkpoint

    if args.report:
        Location.writable(args.report)  # before any cluster work
    summary = evaluate_checkpoint(Location.of(args.data), args.checkpoint, split=args.split, actors=args.actors,
                                  cpus_per_actor=args.cpus_per_actor, use_gpu=args.use_gpu,
                                  amp=args.amp if args.use_gpu else "off")
    check_dropped(summary["bad_samples"], summary["images"], args.split)
    matrix = summary.pop("confusion_matrix")
    if args.report:
        from pipeline.train.report import write_report

        summary["report"] = write_report(args.report, matrix, summary["class_names"], summary)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    run_job(main)
