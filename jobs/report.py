"""The morning report of a labeling output: one self-contained HTML file (plots and images inline, no network).

    python jobs/report.py --output s3://bucket/labels-out [--run-date 2026-12-06] [--nights 28] [--gallery 24]

Writes OUTPUT/reports/report-<run_date>.html: the night's runs, errors and canary, the class mix, confidence and
drift over the last --nights nights (from quality/), and the --gallery least confident images with their overlays.
The last stdout line is one JSON object whose `report` is the file's URI.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

from pipeline.cli import JobArgumentParser, path_arg, print_summary, run_job  # noqa: E402
from pipeline.errors import check_number  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = JobArgumentParser(prog="report.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          description="Write the HTML report of a labeling output's night: can its labels be trusted?")
    p.add_argument("--output", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="the labeling job's output root, local or s3:// (required)")
    p.add_argument("--run-date", default=None, help="the night, YYYY-MM-DD (default: the latest night with a run)")
    p.add_argument("--nights", type=int, default=28, help="nights shown in the plots, up to --run-date")
    p.add_argument("--gallery", type=int, default=24, help="least confident images shown with their overlays")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_number("--nights", args.nights, at_least=1)
    check_number("--gallery", args.gallery, at_least=0)
    if args.run_date is not None:  # the labeling job's own rule for the partition value
        from pipeline.label.config import LabelConfig

        LabelConfig(images="", checkpoint="", output="", run_date=args.run_date).validate()
    from pipeline.label.report import write_report
    from pipeline.storage import Location

    print_summary(write_report(Location.of(args.output), run_date=args.run_date, nights=args.nights,
                               gallery=args.gallery))
    return 0


if __name__ == "__main__":
    run_job(main)
