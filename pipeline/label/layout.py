"""Every name under a labeling output root, in one place (docs/labeling.md "Output").

    labels/run_date=YYYY-MM-DD/part-<set>.parquet        one row per labeled image
    class_stats/run_date=YYYY-MM-DD/part-<set>.parquet   one row per (image, class present)
    errors/run_date=YYYY-MM-DD/part-<set>.parquet        one row per image that could not be labeled
    index/model_id=<model_id>/part-<set>.parquet         (image_uri, image_version) labeled: the skip index
    index/_complete.json                                 every labels file has its index file (skip.ensure_index)
    runs/<run_id>.json                                   arguments, model id, counts, timings, status
    previews/run_date=YYYY-MM-DD/<run_id>/*.png          optional colour overlays
    quality/run_date=YYYY-MM-DD/part-<run_id>.parquet    one row per run: counts, class mix, confidence, drift
    reports/report-YYYY-MM-DD.html                       the night's report (jobs/report.py)
    _staging/<set>/<table>.parquet                       written, not yet committed (never read)
    _commits/<set>.json                                  committed, not yet fully published
    _schema.json                                         the schema version of the tables' files (upgrade)
    _lease.json                                          the running job's lease (pipeline.lease)

Modules take the output root (a `Location`, resolved once by the job) and ask an `OutputLayout` of it for
every path: no other module spells a folder name.
"""
from __future__ import annotations

from ..storage import Location
from .tables import INDEX, TABLES

STAGING = "_staging"
COMMITS = "_commits"
RUNS = "runs"
PREVIEWS = "previews"
QUALITY = "quality"
REPORTS = "reports"
SCHEMA_MARKER = "_schema.json"
INDEX_COMPLETE = "_complete.json"
# Everything the job writes under an output root; images stored anywhere else under it are labeled.
OWN_FOLDERS = (*TABLES, INDEX, RUNS, PREVIEWS, QUALITY, REPORTS, STAGING, COMMITS)


class OutputLayout:
    """The paths of one output root. Relative names (what commit markers record) come from the static methods;
    Locations from the instance."""

    def __init__(self, root: Location):
        self.root = root

    # ------------------------------------------------------------------ names relative to the root

    @staticmethod
    def table_file(table: str, run_date: str, fileset: str, model_id: str) -> str:
        """Where a file set's (or group's) file of `table` is published."""
        if table == INDEX:  # partitioned by model: a run reads only its own model's index
            return f"{INDEX}/model_id={model_id}/part-{fileset}.parquet"
        return f"{table}/run_date={run_date}/part-{fileset}.parquet"

    @staticmethod
    def staged_file(fileset: str, table: str) -> str:
        return f"{STAGING}/{fileset}/{table}.parquet"

    @staticmethod
    def scratch(name: str) -> str:
        """A scratch folder under staging (removed by the next recovery if left behind)."""
        return f"{STAGING}/{name}"

    # ------------------------------------------------------------------------------ locations

    def child(self, relative: str) -> Location:
        """A name recorded relative to the root (a commit marker's src/dst)."""
        return self.root.child(relative)

    def table(self, table: str, partition: str | None = None) -> Location:
        return self.root.child(table, partition) if partition else self.root.child(table)

    def index(self, model_id: str) -> Location:
        return self.root.child(INDEX, f"model_id={model_id}")

    def index_complete(self) -> Location:
        return self.root.child(INDEX, INDEX_COMPLETE)

    def staging(self, fileset: str | None = None) -> Location:
        return self.root.child(STAGING, fileset) if fileset else self.root.child(STAGING)

    def commits(self) -> Location:
        return self.root.child(COMMITS)

    def commit_marker(self, fileset: str) -> Location:
        return self.root.child(COMMITS, f"{fileset}.json")

    def runs(self) -> Location:
        return self.root.child(RUNS)

    def run_record(self, name: str) -> Location:
        return self.root.child(RUNS, f"{name}.json")

    def previews(self, run_date: str, attempt: str) -> Location:
        return self.root.child(PREVIEWS, f"run_date={run_date}", attempt)

    def schema_marker(self) -> Location:
        return self.root.child(SCHEMA_MARKER)

    def own_prefixes(self) -> tuple[str, ...]:
        """URI prefixes of everything the job writes: a listing of the root never labels them."""
        return tuple(self.root.child(folder).uri + "/" for folder in OWN_FOLDERS)
