"""`jobs/evaluate.py --report DIR`: what an evaluation found, as files a person or a notebook reads.

- `confusion.png`: the confusion matrix as a heatmap, each row (a ground-truth class) normalised to 1, with
  class names;
- `per_class.csv` and `per_class.json`: per class IU, accuracy (recall), ground-truth and predicted pixels;
- `confusion.json`: the raw int64 matrix (rows = ground truth) with the class names and overall scores.
"""
from __future__ import annotations

import csv
import io
import json

import numpy as np

from ..storage import Location


def per_class_rows(matrix: np.ndarray, class_names: list[str]) -> list[dict]:
    hist = np.asarray(matrix, dtype=np.int64)
    diag, gt, pred = np.diag(hist), hist.sum(1), hist.sum(0)
    rows = []
    for c, name in enumerate(class_names):
        union = gt[c] + pred[c] - diag[c]
        rows.append({"class_id": c, "class_name": name,
                     "iou": float(diag[c] / union) if union else None,
                     "accuracy": float(diag[c] / gt[c]) if gt[c] else None,
                     "gt_pixels": int(gt[c]), "predicted_pixels": int(pred[c]), "correct_pixels": int(diag[c])})
    return rows


def confusion_png(matrix: np.ndarray, class_names: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = np.asarray(matrix, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.nan_to_num(hist / hist.sum(1, keepdims=True))
    n = len(class_names)
    size = max(5.0, 0.45 * n + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="ground truth", title="confusion matrix (rows normalised)")
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def write_report(folder: str, matrix: np.ndarray, class_names: list[str], scores: dict) -> list[str]:
    """Write the report files under `folder` (local or s3://); returns their URIs."""
    out = Location.of(folder)
    rows = per_class_rows(matrix, class_names)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    files = {
        "confusion.png": confusion_png(matrix, class_names),
        "per_class.csv": text.getvalue().encode(),
        "per_class.json": json.dumps(rows, indent=1).encode(),
        "confusion.json": json.dumps({"class_names": list(class_names), "matrix": np.asarray(matrix).tolist(),
                                      **{k: scores[k] for k in ("pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou")}},
                                     indent=1).encode(),
    }
    for name, data in files.items():
        out.child(name).write_bytes(data)
    return [out.child(name).uri for name in files]
