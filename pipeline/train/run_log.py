"""Run metrics where ML engineers look, written by rank 0 after every epoch under STORAGE/NAME/:

- `metrics.jsonl`: one JSON line per epoch with every reported metric, the learning rate, wall time and images/s.
  A resumed run appends (an epoch trained again replaces its line).
- `tensorboard/`: TensorBoard event files (scalars by epoch, per-class IU). For storage TensorBoard cannot write
  (s3:// through fsspec), they are written locally and uploaded after every epoch.
- `curves.png`: loss, mean IU and pixel accuracy by epoch, and the best epoch's per-class IU as bars with class
  names (matplotlib, non-interactive Agg backend).
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from datetime import datetime, timezone

from ..storage import Location

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
VAL_SCALARS = ("mean_iou", "pixel_accuracy", "mean_accuracy", "fw_iou", "val_seconds")
SCALARS = ("loss", "lr", "images_per_second", "train_seconds", *VAL_SCALARS)


def read_metrics(run: Location) -> list[dict]:
    """The lines of `metrics.jsonl`, by epoch (empty before the first epoch)."""
    try:
        text = run.child(METRICS_FILE).read_bytes().decode()
    except FileNotFoundError:
        return []
    return sorted((json.loads(line) for line in text.splitlines() if line.strip()), key=lambda r: r["epoch"])


class RunLog:
    """Rank 0's writer of the run's metrics file, TensorBoard events and curves."""

    def __init__(self, run: Location, class_names: list[str]):
        self.run = run
        self.class_names = list(class_names)
        self._tb_dir = run.child(TENSORBOARD_DIR).path if run.is_local else tempfile.mkdtemp(prefix="tensorboard-")
        self._upload = not run.is_local
        self._writer = None
        self._rows: list[dict] | None = None  # metrics.jsonl, read once (a resumed run's earlier epochs)

    def record(self, metrics: dict, *, epoch_seconds: float) -> None:
        line = {**metrics, "epoch_seconds": round(epoch_seconds, 3),
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        if self._rows is None:
            self._rows = read_metrics(self.run)
        self._rows = [r for r in self._rows if r["epoch"] < metrics["epoch"]] + [line]
        self.run.child(METRICS_FILE).write_bytes(
            "".join(json.dumps(r, sort_keys=True) + "\n" for r in self._rows).encode())
        self._tensorboard(line)
        self.run.child(CURVES_FILE).write_bytes(curves_png(self._rows, self.class_names))

    def _tensorboard(self, line: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self._writer is None:
            os.makedirs(self._tb_dir, exist_ok=True)
            self._writer = SummaryWriter(self._tb_dir)
        epoch = line["epoch"]
        for key in SCALARS:
            if isinstance(line.get(key), (int, float)):
                group = "val" if key in VAL_SCALARS else "train"
                self._writer.add_scalar(f"{group}/{key}", line[key], epoch, walltime=time.time())
        for name, iou in zip(self.class_names, line.get("per_class_iou") or [], strict=False):
            if iou is not None:
                self._writer.add_scalar(f"val_per_class_iou/{name}", iou, epoch)
        self._writer.flush()
        if self._upload:
            for name in os.listdir(self._tb_dir):
                with open(os.path.join(self._tb_dir, name), "rb") as f:
                    self.run.child(TENSORBOARD_DIR, name).write_bytes(f.read())

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def curves_png(rows: list[dict], class_names: list[str]) -> bytes:
    """The curves figure of a run's metrics lines, as PNG bytes."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    best = max(rows, key=lambda r: (r.get("mean_iou") if r.get("mean_iou") is not None else -1.0, r["epoch"]))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [1, 1, 1.4]})
    axes[0].plot(epochs, [r.get("loss") for r in rows], marker="o", color="tab:red")
    axes[0].set(title="training loss", xlabel="epoch")
    for key, label in (("mean_iou", "mean IU"), ("pixel_accuracy", "pixel accuracy")):
        axes[1].plot(epochs, [r.get(key) for r in rows], marker="o", label=label)
    axes[1].axvline(best["epoch"], color="grey", linestyle=":", label=f"best (epoch {best['epoch']})")
    axes[1].set(title="validation", xlabel="epoch", ylim=(0, 1))
    axes[1].legend(loc="lower right")
    ious = [v if v is not None else 0.0 for v in (best.get("per_class_iou") or [])]
    names = class_names[:len(ious)]
    axes[2].barh(range(len(ious)), ious, color="tab:blue")
    axes[2].set_yticks(range(len(ious)), names, fontsize=8)
    axes[2].invert_yaxis()
    axes[2].set(title=f"per-class IU, epoch {best['epoch']}", xlim=(0, 1))
    for ax in axes[:2]:
        ax.grid(alpha=0.3)
        if len(epochs) < 15:
            ax.set_xticks(epochs)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()
