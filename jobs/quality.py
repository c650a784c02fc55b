"""Recompute the quality/ row of past labeling runs with the code the job runs after each commit.

    python jobs/quality.py --output s3://bucket/labels-out (--run-id R | --run-date YYYY-MM-DD) [--window-nights 7]

Each run's model and class names come from its run record (runs/<run_id>.json); its row replaces the one written
before. The last stdout line is one JSON object with each run's row.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

from pipeline.cli import JobArgumentParser, path_arg, print_summary, run_job  # noqa: E402
from pipeline.errors import JobError, check_number  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = JobArgumentParser(prog="quality.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                          description="Recompute the quality/ row (counts, class mix, confidence, drift) of past "
                                      "labeling runs from their committed tables.")
    p.add_argument("--output", required=True, default=argparse.SUPPRESS, type=path_arg,
                   help="the labeling job's output root, local or s3:// (required)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--run-id", help="one run")
    which.add_argument("--run-date", help="every finished run of that night, YYYY-MM-DD")
    p.add_argument("--window-nights", type=int, default=7, help="earlier nights the drift compares with")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_number("--window-nights", args.window_nights, at_least=1)
    if args.run_date is not None:  # the labeling job's own rule for the partition value
        from pipeline.label.config import LabelConfig

        LabelConfig(images="", checkpoint="", output="", run_date=args.run_date).validate()
    from pipeline.label.quality import compute_quality
    from pipeline.label.run_record import read_run_records
    from pipeline.ray_setup import init_ray
    from pipeline.storage import Location

    output = Location.of(args.output)
    records = read_run_records(output)
    if not records:
        raise JobError(f"{output.uri} holds no labeling run (no runs/*.json): nothing to compute")
    wanted = [r for r in records if (r.get("run_id") == args.run_id if args.run_id else r.get("run_date") == args.run_date)]
    which = f"with id {args.run_id}" if args.run_id else f"on {args.run_date}"
    if not wanted:
        raise JobError(f"no labeling run {which} under {output.uri} (runs/*.json)")
    # One record per run: a retry of a run id writes runs/<run_id>.attempt-<random>.json beside the first; the
    # latest finished attempt's record is the run's (its canary included).
    latest: dict[str, dict] = {}
    for r in sorted(wanted, key=lambda r: r.get("finished_at") or ""):
        if r.get("status") in ("succeeded", "degraded"):
            latest[r["run_id"]] = r
    if not latest:
        states = ", ".join(sorted({f"{r['run_id']} {r.get('status')}" for r in wanted}))
        raise JobError(f"no finished labeling run {which} under {output.uri} ({states}): a run that did not finish "
                       "has no quality row; its retry (same --run-id) writes one")
    chosen = sorted(latest.values(), key=lambda r: r.get("started_at") or "")  # computed in the order they ran
    missing = [r["run_id"] for r in chosen if not r.get("class_names")]
    if missing:
        raise JobError(f"run record(s) {', '.join(missing)} name no class_names (written before quality/ existed): "
                       "their quality rows cannot be computed")
    init_ray(os.environ.get("RAY_ADDRESS") or "local", log_to_driver=False)
    rows = [compute_quality(output, run_id=r["run_id"], run_date=r["run_date"], model_id=r["model_id"],
                            class_names=r["class_names"], canary=r.get("canary"), window_nights=args.window_nights)
            for r in chosen]
    print_summary({"output": output.uri, "runs": rows})
    return 0


if __name__ == "__main__":
    run_job(main)
