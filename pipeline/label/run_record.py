"""One labeling run's record: `runs/<run_id>.json` under the output root, and the job's JSON summary line.

Both come from the same fields: the record (arguments, times, status, counts, ...) is written when the run
starts (`running`) and when it ends (`succeeded` or `failed`; a killed run stays `running`); the summary is
the flat view of the same numbers that the job prints last.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..storage import Location, redact
from .layout import OutputLayout


@dataclass
class RunRecord:
    location: Location                    # runs/<run_id>.json
    run_id: str
    run_date: str
    model_id: str
    output: str
    arguments: dict
    started_at: datetime
    listed: int
    already_labeled: int
    recovered: dict
    status: str = "running"
    labeled: int = 0
    errors: int = 0
    error: str | None = None
    finished_at: datetime | None = None
    wall_seconds: float | None = None
    files: dict | None = None
    previews: int | None = None
    inference_actors: list = field(default_factory=list)
    resources: dict | None = None
    driver_bytes: int | None = None        # bytes the pipeline handed the driver (file-set metadata only)
    timings_seconds: dict = field(default_factory=dict)
    inference: dict | None = None          # the kernel levers and what they did (job._inference_summary)
    canary: dict | None = None             # the canary's scores and verdict (pipeline.label.canary), with --canary
    quality: dict | None = None            # the run's quality/ row's headline figures (pipeline.label.quality)
    class_names: list | None = None        # the checkpoint's, by class id (what jobs/quality.py recomputes with)

    @property
    def images_per_second(self) -> float | None:
        return round(self.labeled / self.wall_seconds, 3) if self.wall_seconds else None

    def finish(self, status: str, *, labeled: int, errors: int, wall_seconds: float, error: str | None = None,
               **details) -> None:
        """Set the outcome and write the record."""
        self.status, self.labeled, self.errors, self.error = status, labeled, errors, error
        self.wall_seconds = round(wall_seconds, 3)
        self.finished_at = datetime.now(timezone.utc)
        for name, value in details.items():
            setattr(self, name, value)
        self.save()

    def save(self) -> None:
        # Arguments may be presigned URLs: their signatures and tokens are never persisted.
        self.location.write_text(redact(json.dumps(self.to_json(), indent=1, sort_keys=True)))

    def to_json(self) -> dict:
        """The content of runs/<run_id>.json."""
        counts = {"listed": self.listed, "already_labelled": self.already_labeled,
                  "to_label": self.listed - self.already_labeled}
        record = {
            "run_id": self.run_id, "run_date": self.run_date, "status": self.status, "model_id": self.model_id,
            "arguments": self.arguments, "started_at": self.started_at.isoformat(), "recovered": self.recovered,
            "counts": counts,
        }
        if self.finished_at is not None:  # succeeded or failed: what was written
            counts.update(labelled=self.labeled, errors=self.errors)
            record["finished_at"] = self.finished_at.isoformat()
        if self.status in ("succeeded", "degraded"):  # degraded: everything committed, the canary failed
            record.update(wall_seconds=self.wall_seconds, images_per_second=self.images_per_second, files=self.files,
                          previews=self.previews, inference_actors=self.inference_actors, resources=self.resources,
                          driver_bytes=self.driver_bytes, timings_seconds=self.timings_seconds,
                          inference=self.inference, canary=self.canary, quality=self.quality,
                          class_names=self.class_names)
        if self.error is not None:
            record["error"] = self.error
        return record

    def summary(self) -> dict:
        """The job's last stdout line."""
        return {
            "run_id": self.run_id, "run_date": self.run_date, "status": self.status, "model_id": self.model_id,
            "output": self.output, "listed": self.listed, "skipped": self.already_labeled, "labelled": self.labeled,
            "errors": self.errors, "wall_seconds": self.wall_seconds, "images_per_second": self.images_per_second,
            "files": self.files, "previews": self.previews, "recovered": self.recovered,
            "inference_actors": self.inference_actors, "resources": self.resources,
            "driver_bytes": self.driver_bytes, "timings_seconds": self.timings_seconds,
            "inference": self.inference, "canary": self.canary, "quality": self.quality,
        }


def read_run_records(output: Location) -> list[dict]:
    """Every run record under `runs/` (a record that cannot be read is skipped: a run still writing it)."""
    runs = OutputLayout(output).runs()
    runs.fs.invalidate_cache(runs.path)  # s3fs keeps listings: a record written since must be seen
    try:
        names = [p for p in runs.fs.ls(runs.path, detail=False) if p.endswith(".json")]
    except FileNotFoundError:
        return []
    records = []
    for path in sorted(names):
        try:
            with runs.fs.open(path, "rb") as f:
                records.append(json.loads(f.read()))
        except (OSError, ValueError):
            continue
    return records
