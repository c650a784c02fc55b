"""ConfusionMatrix against an independent per-pixel computation of the reference formulas."""
import math

import numpy as np
import pytest
import torch

from pipeline.metrics import ConfusionMatrix


def _naive(pred, gt, n):
    """Reference score.py semantics, computed with plain loops over pixels and classes."""
    hist = [[0] * n for _ in range(n)]
    for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist(), strict=True):
        if 0 <= g < n:
            hist[g][p] += 1
    total = sum(map(sum, hist))
    diag = [hist[i][i] for i in range(n)]
    rows = [sum(hist[i]) for i in range(n)]
    cols = [sum(hist[i][j] for i in range(n)) for j in range(n)]
    accs = [diag[i] / rows[i] for i in range(n) if rows[i]]
    ius = [diag[i] / (rows[i] + cols[i] - diag[i]) if rows[i] + cols[i] - diag[i] else None for i in range(n)]
    present = [v for v in ius if v is not None]
    fw = sum(rows[i] / total * ius[i] for i in range(n) if rows[i])
    return hist, {"pixel_accuracy": sum(diag) / total, "mean_accuracy": sum(accs) / len(accs),
                  "mean_iou": sum(present) / len(present), "fw_iou": fw, "per_class_iou": ius}


def _check(scores, expected):
    for k in ["pixel_accuracy", "mean_accuracy", "mean_iou", "fw_iou"]:
        assert math.isclose(scores[k], expected[k], rel_tol=1e-12), k
    for a, b in zip(scores["per_class_iou"], expected["per_class_iou"], strict=True):
        assert (a is None and b is None) or math.isclose(a, b, rel_tol=1e-12)


def _data(rng, n=6, shape=(4, 37, 53)):
    gt = rng.integers(0, n, size=shape)
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, n, size=shape))
    gt[rng.random(shape) < 0.1] = 255  # void pixels
    # Class n-1 absent from ground truth and prediction; class n-2 only ever predicted.
    gt[gt == n - 1] = 0
    pred[pred == n - 1] = 1
    gt[gt == n - 2] = 1
    return pred, gt


def test_matches_independent_computation():
    rng = np.random.default_rng(0)
    pred, gt = _data(rng)
    cm = ConfusionMatrix(6)
    cm.update(pred, gt)
    hist, expected = _naive(pred, gt, 6)
    assert cm.matrix.dtype == np.int64
    assert cm.matrix.tolist() == hist
    scores = cm.scores()
    _check(scores, expected)
    assert scores["per_class_iou"][5] is None  # absent everywhere: left out of the means
    assert scores["per_class_iou"][4] == 0.0   # predicted but never true: counts as 0 IU


def test_merge_of_parts_equals_whole_and_torch_equals_numpy():
    rng = np.random.default_rng(1)
    pred, gt = _data(rng)
    whole = ConfusionMatrix(6)
    whole.update(pred, gt)
    parts = [ConfusionMatrix(6) for _ in range(3)]
    for i, part in enumerate(parts):
        part.update(torch.from_numpy(pred[i::3]), torch.from_numpy(gt[i::3]))
    merged = parts[0].merge(parts[1]).merge(parts[2])
    assert np.array_equal(merged.matrix, whole.matrix)
    assert merged.scores() == whole.scores()
    rebuilt = ConfusionMatrix.from_matrix(whole.matrix)
    assert rebuilt.scores() == whole.scores()


def test_uint8_labels_and_ignore_index():
    gt = np.array([[0, 1, 255], [2, 2, 1]], dtype=np.uint8)
    pred = np.array([[0, 1, 2], [2, 1, 1]], dtype=np.uint8)
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    assert cm.matrix.sum() == 5
    assert cm.matrix.tolist() == [[1, 0, 0], [0, 2, 0], [0, 1, 1]]


def test_bad_inputs():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(np.zeros((2, 2), int), np.zeros((2, 3), int))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        cm.update(np.full((2, 2), 3), np.zeros((2, 2), int))
    with pytest.raises(TypeError):
        cm.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    with pytest.raises(ValueError):
        cm.merge(ConfusionMatrix(4))


def test_large_label_maps_are_fast_enough_to_use_bincount():
    rng = np.random.default_rng(2)
    gt = rng.integers(0, 21, size=(8, 500, 500), dtype=np.int64)
    cm = ConfusionMatrix(21)
    cm.update(torch.from_numpy(gt), torch.from_numpy(gt))
    assert cm.matrix.trace() == gt.size
    assert cm.scores()["mean_iou"] == 1.0


def test_validation_batches_of_equal_size_give_the_matrix_of_one_image_at_a_time(tiny_checkpoint):
    """evaluate_rows groups images by size into fixed-slot batches (8 on a GPU): the confusion matrix equals the
    one of one image per forward pass, with images of several sizes, partial batches and void pixels."""
    from models import load_checkpoint
    from pipeline.train import evaluation
    from tests.images import gradient_rgb

    ck = load_checkpoint(tiny_checkpoint[0])
    rng = np.random.default_rng(3)
    rows = []
    for i, (h, w) in enumerate([(40, 48)] * 5 + [(33, 47)] * 2 + [(48, 40)]):
        image = gradient_rgb(h, w, i)
        mask = rng.integers(0, len(ck.class_names), size=(h, w)).astype(np.uint8)
        mask[:3] = 255
        rows.append({"height": h, "width": w, "image": image.tobytes(), "mask": mask.tobytes()})
    device = torch.device("cpu")
    one, n1 = evaluation.evaluate_rows(ck.model, ck.convention, rows, len(ck.class_names), device)
    evaluation_slots = evaluation.eval_slots
    try:
        evaluation.eval_slots = lambda device: 3
        batched, n3 = evaluation.evaluate_rows(ck.model, ck.convention, rows, len(ck.class_names), device)
    finally:
        evaluation.eval_slots = evaluation_slots
    assert n1 == n3 == 8
    assert one.matrix.sum() == sum(r["height"] * (r["width"]) - 3 * r["width"] for r in rows)
    np.testing.assert_array_equal(batched.matrix, one.matrix)


def test_read_only_arrays_are_taken_without_a_warning():
    import warnings

    pred = np.frombuffer(bytes([0, 1, 1, 0]), np.uint8)  # read-only, as a view of an Arrow cell is
    cm = ConfusionMatrix(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cm.update(pred, pred.copy())
    assert cm.matrix.tolist() == [[2, 0], [0, 2]]
