"""Prometheus metrics of both jobs, published through `ray.util.metrics`.

Ray's metrics agent on each node exports them on the node's metrics port (`ray start --metrics-export-port`,
8080 on KubeRay pods) beside Ray's own metrics, so the Prometheus and Grafana set-up that scrapes a Ray cluster
carries them with no extra endpoint. Ray prefixes every name with `ray_` and adds the labels `SessionName`,
`NodeAddress`, `WorkerId` and `Component`; the dashboard and alert rules (k8s/monitoring/) sum over them.

- Labeling (`LabelMetrics`, in the job's driver): images listed, skipped and to label, images labeled, image
  errors by stage, file sets committed, the time of the last commit, images/s, and whether the run is running;
  once its labels are committed, the canary's score and minimum and the quality row's confidence and drift.
- Training (`TrainMetrics`, a Ray Train callback in the run's controller): the last completed epoch, its loss,
  mean IU, images/s and validation seconds, the time it finished, and worker-group failures (restarts).

A process that exits takes its series with it (Ray drops them about 20 s later): alerts that must fire on a run
that is stuck, not gone, use the timestamps (`time() - ..._timestamp_seconds`).
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from typing import Any

from ray.util.metrics import Counter, Gauge

# The names as Prometheus stores them (Ray adds the prefix); the dashboard and rules use these.
PREFIX = "ray_"
LABEL_METRICS = {
    "fcn_label_running": "1 while the labeling run is going, 0 once it ended (the series goes ~20 s after the job)",
    "fcn_label_run_started_timestamp_seconds": "when the labeling run started (Unix time)",
    "fcn_label_images_listed": "images listed under --images (or in the manifest) by this run",
    "fcn_label_images_skipped": "listed images this checkpoint had already labeled (same URI and version)",
    "fcn_label_images_to_label": "listed images this run labels",
    "fcn_label_images_labeled_total": "images labeled and committed (labels/ and class_stats/ rows)",
    "fcn_label_image_errors_total": "images committed to errors/, by the stage that failed",
    "fcn_label_images_committed": "images committed so far (labeled + errors): the error rate's denominator, 0 from the start",
    "fcn_label_commits_total": "commits the driver made (each publishes staged file sets)",
    "fcn_label_last_commit_timestamp_seconds": "the last commit of a file set, or the start of the run before the first",
    "fcn_label_seconds_since_last_commit": "seconds since the last commit (or the start of the run), refreshed every second",
    "fcn_label_images_per_second": "images labeled per second of the run so far (at the end: the summary's images_per_second)",
    # Whether the night's labels can be trusted (docs/labeling.md), set once the run's labels are committed.
    "fcn_label_canary_mean_iou": "the canary set's mean IU (--canary), scored after the run's own images",
    "fcn_label_canary_min_iou": "the canary's minimum mean IU (--canary-min-iou, or the checkpoint's validation mean IU - 0.05)",
    "fcn_label_mean_confidence": "mean over the run's labeled images of their mean max softmax probability (quality/)",
    "fcn_label_low_confidence_image_share": "share of the run's labeled images whose low_confidence_fraction is over its threshold",
    "fcn_label_low_confidence_share_ratio": "low_confidence_image_share over the trailing window's (quality/; 2: doubled)",
    "fcn_label_drift_js_distance": "Jensen-Shannon distance (base 2) of the run's class pixel shares from the trailing window's",
}
# quality/ row key -> gauge, published when the run's quality row is computed.
QUALITY_GAUGES = {"mean_confidence": "fcn_label_mean_confidence",
                  "low_confidence_image_share": "fcn_label_low_confidence_image_share",
                  "low_confidence_share_ratio": "fcn_label_low_confidence_share_ratio",
                  "js_distance": "fcn_label_drift_js_distance"}
TRAIN_METRICS = {
    "fcn_train_epoch": "the last completed epoch",
    "fcn_train_loss": "training loss of the last completed epoch",
    "fcn_train_mean_iou": "validation mean IU of the last completed epoch",
    "fcn_train_images_per_second": "training images/s of the last completed epoch (all workers)",
    "fcn_train_validation_seconds": "seconds the last epoch's validation took (the slowest worker)",
    "fcn_train_last_epoch_timestamp_seconds": "when the last epoch was reported (Unix time)",
    "fcn_train_restarts": "worker-group failures so far, each followed by a restart from the latest checkpoint while "
                          "--max-failures allows (preempted=\"true\": a drained spot node; Ray Train does not count "
                          "those against --max-failures); a gauge from 0, so the first restart is an increase",
}
STAGES = ("read", "decode", "inference", "postprocess")


def _gauge(name: str, tags: tuple[str, ...]) -> Gauge:
    return Gauge(name, description=LABEL_METRICS.get(name) or TRAIN_METRICS[name], tag_keys=tags)


def _counter(name: str, tags: tuple[str, ...]) -> Counter:
    return Counter(name, description=LABEL_METRICS.get(name) or TRAIN_METRICS[name], tag_keys=tags)


class _Gauges:
    """Gauges whose last values are set again every `interval_s` by a thread.

    Ray's metrics agent drops a gauge value that its process has not set for two report intervals (20 s by
    default), so a value set once (images listed, an epoch's loss) would vanish from Prometheus while the run
    goes on. The thread keeps them until `stop_after(linger_s)`, or until the process exits."""

    def __init__(self, names: dict[str, tuple[str, ...]], interval_s: float, tick=None):
        self._gauges = {name: _gauge(name, keys) for name, keys in names.items()}
        self._values: dict[tuple[str, tuple], float] = {}
        self._lock = threading.Lock()
        self.interval_s, self._tick = interval_s, tick
        self._until: float | None = None
        self._thread = threading.Thread(target=self._run, name="fcn-metrics", daemon=True)
        self._thread.start()

    def set(self, name: str, value: float, tags: dict) -> None:
        with self._lock:
            self._values[(name, tuple(sorted(tags.items())))] = float(value)
            self._gauges[name].set(float(value), tags=tags)

    def stop_after(self, linger_s: float) -> None:
        self._until = time.monotonic() + linger_s

    def _run(self) -> None:
        while self._until is None or time.monotonic() < self._until:
            time.sleep(self.interval_s)
            try:
                if self._tick is not None:
                    self._tick()
                with self._lock:
                    for (name, tags), value in self._values.items():
                        self._gauges[name].set(value, tags=dict(tags))
            except Exception:  # noqa: BLE001 - metrics never stop a run
                pass


class LabelMetrics:
    """The labeling run's metrics, tagged with its run id. Made at the start of the run (the driver).

        metrics = LabelMetrics(run_id, t0)
        metrics.listed(listed, skipped)
        with metrics.watch(committer):   # publishes the committer's counts every second, and at the end
            ...                          # the pipeline
        metrics.finished(summary)        # the summary's final numbers; running = 0
    """

    def __init__(self, run_id: str, t0: float, *, interval_s: float = 1.0, linger_s: float = 60.0):
        self.tags = {"run_id": run_id}
        self.t0, self.linger_s = t0, linger_s  # t0: time.monotonic() at the start of the run
        keys = ("run_id",)
        self._labeled = _counter("fcn_label_images_labeled_total", keys)
        self._errors = _counter("fcn_label_image_errors_total", ("run_id", "stage"))
        self._commits = _counter("fcn_label_commits_total", keys)
        self._published = {"labeled": 0, "commits": 0, "stages": {}}
        self._committer = None
        self._lock = threading.Lock()
        self._last_commit = time.time()
        self._g = _Gauges({name: keys for name in LABEL_METRICS if not name.endswith("_total")}, interval_s,
                          tick=self._tick)
        self._set("fcn_label_running", 1)
        self._set("fcn_label_run_started_timestamp_seconds", self._last_commit)
        self._set("fcn_label_last_commit_timestamp_seconds", self._last_commit)
        self._set("fcn_label_seconds_since_last_commit", 0)
        self._set("fcn_label_images_committed", 0)

    def _set(self, name: str, value: float) -> None:
        self._g.set(name, value, self.tags)

    def listed(self, listed: int, skipped: int) -> None:
        self._set("fcn_label_images_listed", listed)
        self._set("fcn_label_images_skipped", skipped)
        self._set("fcn_label_images_to_label", listed - skipped)

    def _tick(self) -> None:
        if self._committer is not None:
            self.sync(self._committer)
        elif self._published["commits"] == 0 and self._g._until is None:  # before the pipeline: the wait grows
            self._set("fcn_label_seconds_since_last_commit", time.time() - self._last_commit)

    def sync(self, committer: Any) -> None:
        """Publish what `committer` (pipeline.label.writer.Committer) committed since the last call."""
        with self._lock:
            now = time.time()
            labeled, commits = committer.labeled, committer.commits
            stages = dict(committer.error_stages)
            done = self._published
            if labeled > done["labeled"]:
                self._labeled.inc(labeled - done["labeled"], tags=self.tags)
            for stage, n in stages.items():
                if n > done["stages"].get(stage, 0):
                    self._errors.inc(n - done["stages"].get(stage, 0), tags={**self.tags, "stage": stage})
            if commits > done["commits"]:
                self._commits.inc(commits - done["commits"], tags=self.tags)
                self._last_commit = now
                self._set("fcn_label_last_commit_timestamp_seconds", now)
            self._published = {"labeled": labeled, "commits": commits, "stages": stages}
            self._set("fcn_label_images_committed", labeled + committer.errors)
            self._set("fcn_label_seconds_since_last_commit", now - self._last_commit)
            seconds = time.monotonic() - self.t0
            self._set("fcn_label_images_per_second", labeled / seconds if seconds > 0 else 0.0)

    @contextmanager
    def watch(self, committer: Any):
        """While the block runs, the committer's counts are published every interval; once more at the end."""
        self._committer = committer
        try:
            yield self
        finally:
            self._committer = None
            self.sync(committer)

    def judged(self, canary: dict | None, quality: dict | None) -> None:
        """The figures that say whether the night's labels can be trusted: the canary's score and minimum, and the
        quality row's (None where the run has none, or a figure is null: no series rather than a made-up 0)."""
        figures = {}
        if canary:
            figures.update(fcn_label_canary_mean_iou=canary.get("mean_iou"), fcn_label_canary_min_iou=canary.get("min_iou"))
        if quality:
            figures.update({gauge: quality.get(key) for key, gauge in QUALITY_GAUGES.items()})
        for name, value in figures.items():
            if value is not None:
                self._set(name, float(value))

    def finished(self, summary: dict | None = None) -> None:
        """The run ended (succeeded or failed): running = 0, and the summary's images/s when given. The values
        stay published for `linger_s` more seconds (or until the job's process exits)."""
        with self._lock:
            if summary and summary.get("images_per_second") is not None:
                self._set("fcn_label_images_per_second", summary["images_per_second"])
            self._set("fcn_label_running", 0)
            self._g.stop_after(self.linger_s)


try:  # Ray Train V2's callback interface (ray.train.UserCallback); the class runs in the run's controller
    from ray.train import UserCallback
except ImportError:  # pragma: no cover - Ray without Train
    UserCallback = object


class TrainMetrics(UserCallback):
    """Ray Train callback (RunConfig(callbacks=[TrainMetrics(name)])): runs in the controller, which outlives
    worker-group restarts, so it counts them. Rank 0's reported metrics set the epoch gauges."""

    def __init__(self, run: str, interval_s: float = 1.0):
        self.run, self.interval_s = run, interval_s
        self._g: _Gauges | None = None
        self._restarts = {"true": 0, "false": 0}

    def _ready(self) -> _Gauges:
        if self._g is None:  # made in the controller's process, not where the trainer was configured
            keys = {name: ("run",) for name in TRAIN_METRICS}
            keys["fcn_train_restarts"] = ("run", "preempted")
            self._g = _Gauges(keys, self.interval_s)
            for preempted, n in self._restarts.items():
                self._g.set("fcn_train_restarts", n, {"run": self.run, "preempted": preempted})
        return self._g

    def __getstate__(self) -> dict:
        return {"run": self.run, "interval_s": self.interval_s, "_g": None, "_restarts": dict(self._restarts)}

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        gauges, tags = self._ready(), {"run": self.run}
        rank0 = metrics[0] if metrics else {}
        for name, key in (("fcn_train_epoch", "epoch"), ("fcn_train_loss", "loss"), ("fcn_train_mean_iou", "mean_iou"),
                          ("fcn_train_images_per_second", "images_per_second"),
                          ("fcn_train_validation_seconds", "val_seconds")):
            value = rank0.get(key)
            if isinstance(value, (int, float)):
                gauges.set(name, value, tags)
        gauges.set("fcn_train_last_epoch_timestamp_seconds", time.time(), tags)

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        gauges = self._ready()
        preempted = "true" if any(_preempted(e) for e in worker_exceptions.values()) else "false"
        self._restarts[preempted] += 1
        gauges.set("fcn_train_restarts", self._restarts[preempted], {"run": self.run, "preempted": preempted})


def _preempted(error: Exception) -> bool:
    """Whether a worker died with its node preempted (a drained spot node): Ray Train does not count those
    against --max-failures (FailureConfig.max_preemption_failures)."""
    error = getattr(error, "health_check_failure", error)
    return bool(getattr(error, "preempted", False))
