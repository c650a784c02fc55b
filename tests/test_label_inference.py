"""pipeline.label.inference and device_stats without Ray: preprocessing is a function of the image alone, batches
never change an image's labels, upsampling and statistics are right."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import TORCHVISION, load_checkpoint
from pipeline.label import device_stats, inference
from pipeline.label.canvas import canvas_size, preprocess, target_size
from pipeline.label.inference import InferenceSettings, Predictor, predict_image
from tests.images import gradient_rgb


@pytest.fixture(scope="module")
def ck(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint[0])


def test_sizes_and_canvas_depend_on_the_image_alone():
    assert target_size(400, 600, 48) == (32, 48)
    assert target_size(30, 20, 48) == (30, 20)
    assert target_size(5000, 3, 100) == (100, 1)
    assert target_size(400, 600, None) == (400, 600)
    assert canvas_size(33, 64, 32) == (64, 64) and canvas_size(1, 1, 32) == (32, 32)
    rgb = gradient_rgb(45, 40, 1)
    p = preprocess(rgb, None, 32)
    assert p.canvas.shape == (64, 64, 3) and (p.resized_h, p.resized_w, p.height, p.width) == (45, 40, 45, 40)
    np.testing.assert_array_equal(p.canvas[:45, :40], rgb)
    np.testing.assert_array_equal(p.canvas[45:, :40], np.broadcast_to(rgb[-1], (19, 40, 3)))  # edge padding
    small = preprocess(gradient_rgb(400, 600, 2), 48, 32)
    assert small.canvas.shape == (32, 64, 3) and (small.resized_h, small.resized_w, small.height, small.width) == (32, 48, 400, 600)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_batch_neighbours_never_change_labels(ck, batch_size):
    """Images of several sizes, some sharing a canvas, predicted together == each predicted alone."""
    images = [gradient_rgb(h, w, seed) for seed, (h, w) in enumerate([(40, 50), (33, 47), (45, 40), (20, 70),
                                                                      (64, 64), (41, 33), (17, 19)])]
    settings = InferenceSettings(max_side=None, batch_size=batch_size, device="cpu")
    predictor = Predictor(ck.model, ck.convention, settings)
    together = predictor.predict([preprocess(im, None, 32) for im in images])
    for im, pred in zip(images, together, strict=True):
        alone = predict_image(ck, None, im, batch_size=batch_size)
        np.testing.assert_array_equal(pred.label, alone.label)
        np.testing.assert_array_equal(pred.confidence_sum, alone.confidence_sum)
    assert any(len(p.class_id) > 1 for p in together)  # the model is not constant


def test_padding_is_part_of_the_prediction(ck):
    """Padding changes FCN's border pixels: the canvas must be a fixed function of the image (else labels
    would depend on who shares the batch). Here: the same image on a bigger canvas labels differently."""
    im = gradient_rgb(40, 50, 3)
    a = predict_image(ck, None, im, canvas_multiple=32).label
    b = predict_image(ck, None, im, canvas_multiple=96).label
    assert a.shape == b.shape == (40, 50)
    assert (a != b).any()


def test_upsampling_matches_torch_bilinear_and_labels_come_back_full_size(ck):
    predictor = Predictor(ck.model, ck.convention, InferenceSettings(device="cpu"))
    torch.manual_seed(0)
    scores = torch.randn(6, 13, 17) * 3
    label, _ = predictor.labels_and_stats(scores[None], 40, 51)
    ref = F.interpolate(scores[None], size=(40, 51), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(label[0].long(), ref.argmax(0))
    pred = predict_image(ck, None, gradient_rgb(400, 600, 4), max_side=48)
    assert pred.label.shape == (400, 600) and pred.pixel_count.sum() == 400 * 600


def test_statistics_match_numpy_and_bands_change_nothing(ck, monkeypatch):
    predictor = Predictor(ck.model, ck.convention, InferenceSettings(device="cpu"))
    torch.manual_seed(1)
    scores = torch.randn(6, 23, 31) * 2
    whole, = predictor.to_host([predictor.labels_and_stats(scores[None], 23, 31)])
    monkeypatch.setattr(device_stats, "BAND_ELEMENTS", 6 * 31 * 4)  # bands of 4 rows
    banded, = predictor.to_host([predictor.labels_and_stats(scores[None], 23, 31)])
    prob = torch.softmax(scores.double(), 0).numpy()
    label = prob.argmax(0)
    np.testing.assert_array_equal(whole.label, label)
    ids, counts = np.unique(label, return_counts=True)
    np.testing.assert_array_equal(whole.class_id, ids)
    np.testing.assert_array_equal(whole.pixel_count, counts)
    for k, c in enumerate(ids):
        ys, xs = np.nonzero(label == c)
        assert (whole.x_min[k], whole.y_min[k], whole.x_max[k], whole.y_max[k]) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert whole.mean_confidence[k] == pytest.approx(prob.max(0)[label == c].mean(), rel=1e-5)
    for field in ("label", "class_id", "pixel_count", "x_min", "y_min", "x_max", "y_max"):
        np.testing.assert_array_equal(getattr(whole, field), getattr(banded, field))
    np.testing.assert_allclose(whole.confidence_sum, banded.confidence_sum, rtol=1e-6)
    np.testing.assert_allclose(whole.pixel_fraction.sum(), 1.0)


def test_a_failing_image_costs_only_itself(ck, monkeypatch):
    """One image whose post-processing always fails shares a forward pass with three good ones."""
    predictor = Predictor(ck.model, ck.convention, InferenceSettings(max_side=None, batch_size=4, device="cpu"))
    images = [gradient_rgb(h, w, i) for i, (h, w) in enumerate([(30, 30), (31, 30), (30, 30), (30, 29)])]
    real = predictor.labels_and_stats

    def flaky(scores, height, width):
        if height == 31:
            raise ValueError("boom")
        return real(scores, height, width)

    monkeypatch.setattr(predictor, "labels_and_stats", flaky)
    preds = predictor.predict([preprocess(im, None, 32) for im in images])
    assert isinstance(preds[1], ValueError)
    for i in (0, 2, 3):
        np.testing.assert_array_equal(preds[i].label, predict_image(ck, None, images[i], batch_size=4).label)


def test_predict_image_takes_a_bare_model(ck):
    im = gradient_rgb(25, 35, 5)
    a = predict_image(ck, None, im)
    b = predict_image(ck.model, TORCHVISION, im)
    np.testing.assert_array_equal(a.label, b.label)
    with pytest.raises(ValueError):
        predict_image(ck.model, None, im)


def test_checkpoint_from_bytes_equals_models_loader(tiny_checkpoint, tmp_path):
    from models import CheckpointError, load_checkpoint_bytes

    path, model_id = tiny_checkpoint
    data = open(path, "rb").read()
    fast, ref = load_checkpoint_bytes(data, "s3://b/m.pt"), load_checkpoint(path)
    assert fast.model_id == ref.model_id == model_id and fast.class_names == ref.class_names
    assert fast.convention == ref.convention and fast.config == ref.config and not fast.model.training
    for (k, a), (_, b) in zip(fast.model.state_dict().items(), ref.model.state_dict().items(), strict=True):
        assert a.device.type == "cpu" and torch.equal(a, b), k
    for bad, message in [(data[:4000], "s3://b/m.pt is truncated or corrupt"), (b"", "s3://b/m.pt is empty")]:
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint_bytes(bad, "s3://b/m.pt")


@pytest.mark.parametrize("size", [(23, 31), (40, 51)])  # as the logits, and upsampled from them
def test_statistics_of_several_images_at_once_match_numpy(ck, size, monkeypatch):
    """Labels and statistics of 3 images in one call (the sync-free, dense reductions) equal numpy's on each
    image's own upsampled logits, whatever the bands."""
    predictor = Predictor(ck.model, ck.convention, InferenceSettings(device="cpu"))
    torch.manual_seed(2)
    scores = torch.randn(3, 6, 23, 31) * 2
    scores[1, 4] += 3  # one image dominated by a class, another with a class absent
    scores[2, 0] -= 10
    height, width = size
    for band_elements in (device_stats.BAND_ELEMENTS, 3 * 6 * width * 3):
        monkeypatch.setattr(device_stats, "BAND_ELEMENTS", band_elements)
        preds = predictor.to_host([predictor.labels_and_stats(scores, height, width)])
        assert len(preds) == 3
        for i, pred in enumerate(preds):
            up = F.interpolate(scores[i:i + 1], size=size, mode="bilinear", align_corners=False)[0]
            prob = torch.softmax(up.double(), 0).numpy()
            label = up.argmax(0).numpy()
            np.testing.assert_array_equal(pred.label, label)
            ids, counts = np.unique(label, return_counts=True)
            np.testing.assert_array_equal(pred.class_id, ids)
            np.testing.assert_array_equal(pred.pixel_count, counts)
            for k, c in enumerate(ids):
                ys, xs = np.nonzero(label == c)
                assert (pred.x_min[k], pred.y_min[k], pred.x_max[k], pred.y_max[k]) == (xs.min(), ys.min(), xs.max(), ys.max())
                assert pred.confidence_sum[k] == pytest.approx(prob.max(0)[label == c].sum(), rel=1e-5)


def test_a_failed_batch_falls_back_per_image_unless_the_device_is_gone(ck, monkeypatch):
    """Out of memory, or an error of one image (an unsupported shape): the batch is retried image by image, so
    only that image fails and nothing is retried forever. When the device no longer works after the error (a
    sticky CUDA error: every later call would fail too): DeviceFailure, for the actor to end its process."""
    predictor = Predictor(ck.model, ck.convention, InferenceSettings(max_side=None, batch_size=4, device="cpu"))
    images = [preprocess(gradient_rgb(h, w, i), None, 32) for i, (h, w) in enumerate([(30, 30), (31, 30), (30, 29)])]
    real = predictor.labels_and_stats
    for error in (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                  RuntimeError("CUDA error: an illegal memory access was encountered")):
        def failing(scores, height, width, error=error):
            if height == 31:
                raise error
            return real(scores, height, width)

        monkeypatch.setattr(predictor, "labels_and_stats", failing)
        preds = predictor.predict(images)
        assert preds[1] is error and preds[0].label.shape == (30, 30) and preds[2].label.shape == (30, 29)

    assert inference.device_works(torch.device("cpu"))
    monkeypatch.setattr(inference, "device_works", lambda device: False)
    with pytest.raises(inference.DeviceFailure, match="illegal memory access"):
        predictor.predict(images)


def _uncertainty_reference(logits: torch.Tensor, height: int, width: int, low_confidence: float) -> tuple:
    """(mean max probability, mean top-1 minus top-2, share below `low_confidence`) in float64 numpy from one
    image's logits (C, h, w), upsampled to its size as torch's bilinear does."""
    up = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0].double().numpy()
    prob = np.exp(up - up.max(0))
    prob /= prob.sum(0)
    top2 = np.sort(prob, axis=0)[-2:]
    return float(top2[1].mean()), float((top2[1] - top2[0]).mean()), float((top2[1] < low_confidence).mean())


@pytest.mark.parametrize("mode", [
    {"batch_size": 1}, {"batch_size": 3}, {"batch_size": 3, "grouped_upsampling": False},
    {"batch_size": 2, "channels_last": False}, {"batch_size": 2, "low_confidence": 0.9}, {"max_side": 24}])
@pytest.mark.parametrize("dense", [False, True], ids=["bincount", "dense"])  # the CPU's and the GPU's forms
def test_per_image_uncertainty_matches_numpy_in_every_mode(ck, mode, dense, monkeypatch):
    """mean_confidence, mean_margin and low_confidence_fraction per image equal numpy's on the model's own logits
    in that mode (within float tolerance; a pixel exactly at the threshold may fall either side), in row bands."""
    monkeypatch.setattr(device_stats, "BAND_ELEMENTS", 6 * 70 * 5)  # bands of a few rows: sums across bands
    settings = InferenceSettings(device="cpu", **{"max_side": None, **mode})
    predictor = Predictor(ck.model, ck.convention, settings)
    # The form CUDA runs (dense reductions), here on the CPU.
    monkeypatch.setattr(predictor, "labels_and_stats", lambda scores, h, w: device_stats.labels_and_stats(
        scores, h, w, dense=dense, low_confidence=settings.low_confidence))
    images = [gradient_rgb(h, w, seed) for seed, (h, w) in enumerate([(40, 50), (33, 47), (20, 70)])]
    items = [preprocess(im, settings.max_side, settings.canvas_multiple) for im in images]
    for item, pred in zip(items, predictor.predict(items), strict=True):
        logits = predictor.forward([item.canvas])[0, :, :item.resized_h, :item.resized_w]
        conf, margin, low = _uncertainty_reference(logits, item.height, item.width, settings.low_confidence)
        got = pred.uncertainty
        assert got.mean_confidence == pytest.approx(conf, rel=1e-5)
        assert got.mean_margin == pytest.approx(margin, rel=1e-4, abs=1e-6)
        assert got.low_confidence_fraction == pytest.approx(low, abs=2 / pred.label.size)
        assert 0 < got.low_confidence_fraction < 1 or mode.get("low_confidence") != 0.9  # the threshold matters


def test_one_class_models_are_certain_ties_have_no_margin_and_predict_image_returns_the_figures(ck):
    """With one class there is no second probability: every pixel's margin is its confidence, 1."""
    _, stats = device_stats.labels_and_stats(torch.randn(2, 1, 5, 6), 9, 11, dense=False)
    assert stats[..., [1, 6]].tolist() == [[[99.0, 99.0]], [[99.0, 99.0]]] and stats[..., 7].sum() == 0
    tied = torch.zeros(1, 3, 4, 4)
    tied[:, 1:] = 2.0  # two classes tie for the top everywhere: no margin, every pixel below 0.5
    _, stats = device_stats.labels_and_stats(tied, 4, 4, dense=False)
    assert stats[0, :, 6].sum() == 0 and stats[0, :, 7].sum() == 16
    figures = predict_image(ck, None, gradient_rgb(30, 40, 5)).uncertainty
    assert 0 < figures.mean_margin <= figures.mean_confidence <= 1 and 0 <= figures.low_confidence_fraction <= 1
