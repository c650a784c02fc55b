"""The FCN paper's evaluation metrics from a confusion matrix (reference `score.py`).

hist[i, j] counts pixels of ground-truth class i predicted as j; labels outside [0, C) are ignored.
"""
from __future__ import annotations

import numpy as np
import torch


class ConfusionMatrix:
    """Accumulates an int64 (C, C) confusion matrix; rows = ground truth, columns = prediction.

    `update` takes numpy arrays or torch tensors (CPU or GPU) of integer labels of the same shape and
    stays on their device, so GPU evaluation does no host round trip per image.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self._hist: torch.Tensor = torch.zeros(num_classes * num_classes, dtype=torch.int64)

    @staticmethod
    def _as_tensor(x) -> torch.Tensor:
        if isinstance(x, torch.Tensor):
            return x
        arr = np.ascontiguousarray(x)
        # torch warns on read-only buffers (e.g. a view of an Arrow cell) and may not write them: copy those.
        return torch.from_numpy(arr if arr.flags.writeable else arr.copy())

    def update(self, pred, target) -> None:
        pred, target = self._as_tensor(pred), self._as_tensor(target)
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if pred.dtype.is_floating_point or target.dtype.is_floating_point:
            raise TypeError("pred and target must hold integer class labels")
        if self._hist.device != target.device:
            if self._hist.any():
                self._hist = self._hist.to(target.device)
            else:
                self._hist = torch.zeros_like(self._hist, device=target.device)
        pred = pred.to(target.device).reshape(-1).long()
        target = target.reshape(-1).long()
        c = self.num_classes
        if pred.device.type == "cpu" and pred.numel() and (pred.min() < 0 or pred.max() >= c):
            raise ValueError(f"predictions must lie in [0, {c}), got range [{int(pred.min())}, {int(pred.max())}]")
        # Without a host synchronisation (bincount and boolean indexing would each make one on a GPU): pixels
        # of ignored targets go to one extra bin, dropped.
        keep = (target >= 0) & (target < c)
        if pred.device.type != "cpu":  # argmax output is in range; never let a bad index assert on the device
            keep &= (pred >= 0) & (pred < c)
        index = torch.where(keep, target * c + pred, c * c)
        hist = torch.zeros(c * c + 1, dtype=torch.int64, device=target.device)
        hist.index_add_(0, index, torch.ones_like(index))
        self._hist += hist[:-1]

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add another matrix (e.g. another worker's) into this one, exactly. Returns self."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class into {self.num_classes}-class matrix")
        self._hist += other._hist.to(self._hist.device)
        return self

    @property
    def matrix(self) -> np.ndarray:
        """The (C, C) int64 matrix on the host."""
        return self._hist.detach().cpu().numpy().reshape(self.num_classes, self.num_classes).copy()

    @classmethod
    def from_matrix(cls, matrix, ignore_index: int = 255) -> "ConfusionMatrix":
        m = np.asarray(matrix, dtype=np.int64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"confusion matrix must be square, got shape {m.shape}")
        cm = cls(m.shape[0], ignore_index)
        cm._hist = torch.from_numpy(m.reshape(-1).copy())
        return cm

    def scores(self) -> dict:
        """pixel_accuracy, mean_accuracy, mean_iou, fw_iou (floats) and per_class_iou (list).

        Reference formulas; classes absent from both ground truth and prediction have no IU (None in
        per_class_iou) and are left out of the means, as numpy's nanmean does.
        """
        hist = self.matrix.astype(np.float64)
        diag = np.diag(hist)
        gt = hist.sum(axis=1)
        pred = hist.sum(axis=0)
        total = hist.sum()
        with np.errstate(divide="ignore", invalid="ignore"):
            pixel_acc = diag.sum() / total if total else float("nan")
            acc_cls = diag / gt
            iu = diag / (gt + pred - diag)
            freq = gt / total if total else np.zeros_like(gt)
        mean_acc = float(np.nanmean(acc_cls)) if np.isfinite(acc_cls).any() else float("nan")
        mean_iu = float(np.nanmean(iu)) if np.isfinite(iu).any() else float("nan")
        fw_iu = float((freq[freq > 0] * iu[freq > 0]).sum()) if total else float("nan")
        return {
            "pixel_accuracy": float(pixel_acc),
            "mean_accuracy": mean_acc,
            "mean_iou": mean_iu,
            "fw_iou": fw_iu,
            "per_class_iou": [None if np.isnan(v) else float(v) for v in iu],
        }
