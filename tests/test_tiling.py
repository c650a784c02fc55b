"""Tiled labeling of large images (issue 34), below the job: the tile grid and weights, the exact score cells,
whole-image agreement and seams with a checkpoint fitted to the synthetic set, neighbour independence bit for
bit, a tile that fails, and the bounded blending state. The job's own scenario is tests/test_label_tiled.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models import build_model, load_checkpoint, output_knots
from models.convention import TORCHVISION
from pipeline.errors import UsageError
from pipeline.label.blend import TileBlender, score_cells
from pipeline.label.canvas import preprocess
from pipeline.label.device_stats import labels_and_stats
from pipeline.label.inference import Predictor, predict_image
from pipeline.label.inference_settings import InferenceSettings
from pipeline.label.tiling import BLENDS, MIN_TILE, SCORE_STRIDE, Tiling, check_tiling
from pipeline.synthetic import render_mosaic
from pipeline.testbed import fitted_checkpoint
from tests.images import gradient_rgb

SEAM_PX = 16  # "within 16 px of tile borders"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A narrow FCN-8s fitted to the synthetic set in-process (~15 s): sure of its labels, unlike a random head."""
    path = str(tmp_path_factory.mktemp("fitted") / "fcn8s-fitted.pt")
    fitted_checkpoint(path)
    return load_checkpoint(path)


def mosaic(side: int, distinct: int = 256, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """A side x side image of synthetic samples at the scale the fitted model knows, and its ground truth."""
    return render_mosaic(side, distinct=distinct, seed=seed)


def near_tile_borders(tiling: Tiling, height: int, width: int) -> np.ndarray:
    return tiling.near_borders(height, width, SEAM_PX)


def tiled(tile: int, **kw) -> InferenceSettings:
    return InferenceSettings(max_side=None, batch_size=kw.pop("batch_size", 4), tile=tile, **kw)


# ------------------------------------------------------------------------------------------ grid and weights


@pytest.mark.parametrize("length", [65, 100, 511, 512, 513, 2048, 5000, 100_000])
def test_tile_origins_cover_the_side_on_the_score_grid(length):
    t = Tiling(512 if length > 200 else 64)
    origins = t.origins(length)
    assert origins[0] == 0 and origins == sorted(set(origins))
    assert all(o % SCORE_STRIDE == 0 for o in origins)
    assert all(b - a <= t.step for a, b in zip(origins, origins[1:], strict=False))  # no gap: neighbours overlap
    assert length <= origins[-1] + t.size < length + SCORE_STRIDE  # the last tile overhangs by < 8 px
    assert t.count(length, 10) == len(origins)


def test_a_side_no_longer_than_a_tile_is_one_tile():
    t = Tiling(256)
    assert t.origins(1) == t.origins(256) == [0] and not t.applies(256, 200) and t.applies(257, 10)
    assert t.grid(1, 1000) == [(0, x) for x in t.origins(1000)]


def test_the_step_keeps_at_least_the_overlap_on_the_score_grid():
    assert Tiling(512, 0.25).step == 384 and Tiling(512, 0.0).step == 512 and Tiling(64, 0.89).step == 8
    assert Tiling(64, 0.05).step == 56  # a small overlap is rounded up to a cell, never down to none


def test_tiles_are_spread_evenly_with_no_near_duplicate_at_the_end():
    assert Tiling(512).origins(900) == [0, 192, 392]  # not [0, 384, 392]: two tiles 98 % the same


@pytest.mark.parametrize("blend", BLENDS)
def test_blend_windows_are_positive_symmetric_and_peak_at_one(blend):
    w = Tiling(256, blend=blend).window()
    assert w.shape == (256 // SCORE_STRIDE,) and w.dtype == np.float32
    assert (w > 0).all() and np.allclose(w, w[::-1]) and w.max() == 1.0
    if blend != "mean":
        assert w[0] < 0.01 and w[len(w) // 2] == 1.0


@pytest.mark.parametrize("tile,overlap,blend,multiple,message", [
    (32, 0.25, "gaussian", 32, f"smaller than the model can take: at least {MIN_TILE}"),
    (96, 0.25, "gaussian", 64, "not a multiple of the canvas multiple 64"),
    (100, 0.25, "gaussian", 1, "not a multiple of 8"),
    (256, 0.9, "gaussian", 32, "--tile-overlap must be a finite number in [0, 0.9)"),
    (256, float("nan"), "gaussian", 32, "--tile-overlap must be a finite number"),
    (256, 0.25, "hann", 32, "--tile-blend must be one of gaussian, cosine, mean"),
])
def test_bad_tiling_settings_are_refused_naming_the_flag(tile, overlap, blend, multiple, message):
    with pytest.raises(UsageError, match=None) as e:
        check_tiling(tile, overlap, blend, multiple)
    assert message in str(e.value)
    with pytest.raises(UsageError):
        InferenceSettings(tile=tile, tile_overlap=overlap, tile_blend=blend, canvas_multiple=multiple)


# ----------------------------------------------------------------------------------------- exact score cells


@pytest.mark.parametrize("arch", ["fcn8s", "fcn16s", "fcn32s"])
@pytest.mark.parametrize("padding", ["same", "reference"])
def test_score_cells_at_the_knots_give_back_the_models_output(arch, padding):
    """The output is a bilinear interpolation of a coarse map; sampled at its knots and upsampled there again,
    it comes back to float rounding away from the image's border (where the upsampler's kernel is cut)."""
    torch.manual_seed(0)
    model = build_model(arch, 5, width_mult=1 / 16, padding=padding).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.5)
        logits = model(torch.randn(1, 3, 256, 256))
    factor, phase = output_knots(model)
    assert factor == {"fcn8s": 8, "fcn16s": 16, "fcn32s": 32}[arch]
    cells = score_cells(logits, phase % SCORE_STRIDE)
    from pipeline.label.device_stats import BandUpsampler

    back = BandUpsampler(cells, 256, 256, SCORE_STRIDE, phase % SCORE_STRIDE)(0, 256)
    inner = slice(factor, 256 - factor)
    err = (back - logits)[..., inner, inner].abs().max() / logits.abs().max()
    assert err < 1e-5, err
    # Sampled at the cells' centres instead (no knots known), the same logits come back only approximately.
    plain = BandUpsampler(score_cells(logits, None), 256, 256, SCORE_STRIDE, 3.5)(0, 256)
    if (arch, padding) != ("fcn8s", "same"):  # ... except where the centres are not knots but on one piece
        assert (plain - logits)[..., inner, inner].abs().max() / logits.abs().max() > 10 * err


def test_a_learned_last_upsampler_has_no_knots():
    model = build_model("fcn8s", 3, width_mult=1 / 16, padding="same")
    with torch.no_grad():
        model.upscore8.weight.add_(0.01)
    assert output_knots(model) is None
    assert Predictor(model, TORCHVISION, tiled(64)).score_phase is None  # sampled at cell centres


# ------------------------------------------------------------------------------- agreement with whole images


@pytest.mark.parametrize("size", [(64, 64), (40, 64), (64, 17), (33, 20)])
def test_an_image_that_fits_one_tile_gets_exactly_todays_labels(fitted, size):
    image = gradient_rgb(*size, 3)
    today = predict_image(fitted, None, image, max_side=None, batch_size=4)
    with_tiles = predict_image(fitted, None, image, settings=tiled(64))
    assert with_tiles.tiles == 0 and np.array_equal(with_tiles.label, today.label)
    for name in ("class_id", "pixel_count", "confidence_sum", "margin_sum", "low_count", "x_min", "y_max"):
        assert np.array_equal(getattr(with_tiles, name), getattr(today, name)), name


def test_max_side_still_shrinks_images_that_fit_a_tile(fitted):
    image = gradient_rgb(200, 120, 1)
    settings = InferenceSettings(max_side=64, batch_size=4, tile=256)
    pred = predict_image(fitted, None, image, settings=settings)
    assert pred.tiles == 0 and pred.label.shape == (200, 120)
    assert np.array_equal(pred.label, predict_image(fitted, None, image, max_side=64, batch_size=4).label)


@pytest.fixture(scope="module")
def big(fitted):
    """A 2048x2048 mosaic labeled whole (--max-side 0) and in tiles of 512 at the default overlap and blend."""
    image, truth = mosaic(2048)
    whole = Predictor(fitted.model, fitted.convention, InferenceSettings(max_side=None, batch_size=1)).predict(
        [preprocess(image, None, 32)])[0]
    settings = tiled(512)
    parts = Predictor(fitted.model, fitted.convention, settings).predict([preprocess(image, None, 32, settings.tiling)])[0]
    return {"image": image, "truth": truth, "whole": whole, "tiled": parts, "tiling": settings.tiling}


def test_tiled_labels_agree_with_one_whole_image_pass(big):
    agree = (big["tiled"].label == big["whole"].label).mean()
    assert agree >= 0.99, agree  # measured 99.995-100.000 % over two fits (bench/tiling_bench.py)
    assert big["tiled"].tiles == 25 and big["tiled"].label.shape == (2048, 2048)


def test_no_seams_near_tile_borders(big):
    agree = big["tiled"].label == big["whole"].label
    near = near_tile_borders(big["tiling"], 2048, 2048)
    assert 0.2 < near.mean() < 0.5  # the band is a real share of the image
    assert agree[near].mean() >= agree[~near].mean() - 0.01, (agree[near].mean(), agree[~near].mean())
    # The fitted model is right where it is sure: tiles lose nothing against the ground truth either.
    valid = big["truth"] != 255
    right = lambda p: (p.label == big["truth"])[valid].mean()  # noqa: E731
    assert right(big["whole"]) > 0.9 and right(big["tiled"]) >= right(big["whole"]) - 0.002


def test_tiled_statistics_describe_the_label_map(big):
    pred, label = big["tiled"], big["tiled"].label
    assert pred.pixel_count.sum() == label.size
    for k, c in enumerate(pred.class_id):
        ys, xs = np.nonzero(label == c)
        assert pred.pixel_count[k] == len(ys)
        assert (pred.x_min[k], pred.y_min[k], pred.x_max[k], pred.y_max[k]) == (xs.min(), ys.min(), xs.max(), ys.max())
    u, whole = pred.uncertainty, big["whole"].uncertainty
    assert 0 < u.mean_confidence <= 1 and abs(u.mean_confidence - whole.mean_confidence) < 0.002


def test_seams_show_without_overlap_or_weights(fitted):
    """The check above can fail: with no overlap the border band agrees visibly less (measured 0.95-0.96 against
    0.997-0.999) and a plain mean blend sits between (0.98-0.99)."""
    image, _ = mosaic(1024)
    whole = predict_image(fitted, None, image, max_side=None, batch_size=1)
    for overlap, blend, worse in ((0.0, "gaussian", 0.01), (0.25, "mean", 0.002)):
        settings = tiled(256, tile_overlap=overlap, tile_blend=blend)
        agree = predict_image(fitted, None, image, settings=settings).label == whole.label
        near = near_tile_borders(settings.tiling, 1024, 1024)
        assert agree[near].mean() < agree[~near].mean() - worse, (overlap, blend, agree[near].mean(), agree[~near].mean())


# ----------------------------------------------------------------------------------- batches and failures


def test_a_tiles_labels_do_not_depend_on_its_batch_neighbours(fitted):
    """Bit for bit: a tiled image alone, and in one call with another tiled image and whole images whose canvas
    is a tile's (they share the tiles' batches), at slot positions that differ."""
    a, b = mosaic(320, distinct=16, seed=3)[0][:300, :200], mosaic(256, distinct=16, seed=5)[0][:130, :250]
    small = [gradient_rgb(64, 64, i) for i in range(3)]
    settings = tiled(64, batch_size=3)
    predictor = Predictor(fitted.model, fitted.convention, settings)
    prep = lambda im: preprocess(im, None, 32, settings.tiling)  # noqa: E731
    alone = [predictor.predict([prep(im)])[0] for im in (a, b, *small)]
    together = predictor.predict([prep(small[0]), prep(b), prep(small[1]), prep(a), prep(small[2])])
    for mine, theirs in zip(alone, [together[3], together[1], together[0], together[2], together[4]], strict=True):
        assert np.array_equal(mine.label, theirs.label) and mine.tiles == theirs.tiles
        assert np.array_equal(mine.confidence_sum, theirs.confidence_sum)
        assert np.array_equal(mine.margin_sum, theirs.margin_sum)
    assert alone[0].tiles == Tiling(64).count(300, 200) == 24 and alone[2].tiles == 0


class _FailsOnWhite(torch.nn.Module):
    """The fitted model, failing any batch that holds a slot of pure white (one tile of one image)."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.num_classes = model, model.num_classes
        self.white = float(((1.0 - np.array(TORCHVISION.mean)) / np.array(TORCHVISION.std)).min())

    def final_upsampling(self):  # the inner model's: tiles are sampled at its knots, the default path
        name, crop = self.inner.final_upsampling()
        return f"inner.{name}", crop

    def forward(self, x):
        if (x.amin(dim=(1, 2, 3)) >= self.white - 1e-4).any():
            raise RuntimeError("this batch cannot be labeled")
        return self.inner(x)


def test_a_failed_tile_fails_its_image_only(fitted):
    bad = mosaic(256, distinct=16, seed=2)[0][:200, :300].copy()
    bad[:64, 144:208] = 255  # the tile at (0, 144) is pure white
    good = mosaic(256, distinct=16, seed=4)[0][:180, :150]
    settings = tiled(64, batch_size=3)
    prep = lambda im: preprocess(im, None, 32, settings.tiling)  # noqa: E731
    failing = Predictor(_FailsOnWhite(fitted.model), fitted.convention, settings)
    assert failing.score_phase == 3.5
    out = failing.predict([prep(bad), prep(good), prep(gradient_rgb(64, 64, 0))])
    assert isinstance(out[0], RuntimeError) and "cannot be labeled" in str(out[0])
    # The good tiled image's tiles were retried one by one where they shared a batch with the bad one's: each
    # was blended once, and its labels are exactly those of a run without the bad image.
    reference = failing.predict([prep(good)])[0]
    assert np.array_equal(out[1].label, reference.label) and np.array_equal(out[1].confidence_sum, reference.confidence_sum)
    assert out[2].tiles == 0 and out[2].label.shape == (64, 64)


def test_a_tiled_images_full_size_pass_out_of_memory_once_is_retried(fitted, monkeypatch):
    """The blended image's full-size labels and statistics (the likeliest pass to run out of memory) get a second try,
    as a whole image gets a pass of its own after its batch; a second failure is its error."""
    import pipeline.label.inference as inference

    image = mosaic(256, distinct=16, seed=6)[0][:150, :210]
    settings = tiled(64)
    reference = predict_image(fitted, None, image, settings=settings)
    real, calls = inference.labels_and_stats, []

    def flaky(scores, height, width, *, fail: int, **kw):
        if kw.get("stride"):
            calls.append(1)
            if len(calls) <= fail:
                raise torch.OutOfMemoryError("no memory for the full-size pass")
        return real(scores, height, width, **kw)

    monkeypatch.setattr(inference, "labels_and_stats", lambda *a, **kw: flaky(*a, fail=1, **kw))
    again = predict_image(fitted, None, image, settings=settings)
    assert len(calls) == 2 and np.array_equal(again.label, reference.label)
    assert np.array_equal(again.confidence_sum, reference.confidence_sum)  # the scores were divided once
    calls.clear()
    monkeypatch.setattr(inference, "labels_and_stats", lambda *a, **kw: flaky(*a, fail=2, **kw))
    with pytest.raises(torch.OutOfMemoryError):
        predict_image(fitted, None, image, settings=settings)
    assert len(calls) == 2


def test_wide_images_upsample_in_bands_of_at_least_a_score_cell(monkeypatch):
    """A band shorter than a score cell would upsample the same source rows across again for every row."""
    import pipeline.label.device_stats as ds

    seen = []
    real = ds.BandUpsampler.__call__
    monkeypatch.setattr(ds.BandUpsampler, "__call__", lambda self, r0, r1: seen.append(r1 - r0) or real(self, r0, r1))
    labels_and_stats(torch.randn(1, 21, 4, 12_500), 32, 100_000, dense=False, stride=SCORE_STRIDE, phase=3.5)
    assert min(seen[:-1] or seen) >= SCORE_STRIDE and sum(seen) == 32


def test_a_strip_of_1_by_100000_is_labeled(fitted):
    strip = np.ascontiguousarray(np.broadcast_to(gradient_rgb(1, 4000, 0), (1, 4000, 3)))
    strip = np.tile(strip, (1, 25, 1))
    pred = predict_image(fitted, None, strip, settings=tiled(64, batch_size=8))
    assert pred.label.shape == (1, 100_000) and pred.pixel_count.sum() == 100_000
    assert pred.tiles == Tiling(64).count(1, 100_000)


# --------------------------------------------------------------------------------------------- memory


def test_the_blending_state_is_at_score_resolution():
    blender = TileBlender(Tiling(512), 10_000, 10_000, 21, torch.device("cpu"))
    assert blender.sums.shape == (1, 21, 1250, 1250) and blender.weights.shape == (1250, 1250)
    assert blender.sums.numel() * 4 < 21 * 10_000 * 10_000 * 4 / 60  # C x H x W / 64 floats, not C x H x W


def test_blended_upsampling_works_in_row_bands():
    """A tiled image's labels come from the blended score cells in bands (BAND_ELEMENTS), not one full-size
    buffer: the band split changes no label (the float sums only in their last bits: the split is a function of
    the image's size, so an image's sums never depend on its neighbours)."""
    import pipeline.label.device_stats as ds

    torch.manual_seed(1)
    scores = torch.randn(1, 5, 40, 30)
    full = labels_and_stats(scores, 317, 233, dense=False, stride=SCORE_STRIDE, phase=3.5)
    saved = ds.BAND_ELEMENTS
    try:
        ds.BAND_ELEMENTS = 5 * 233 * 7  # 7 rows a band
        banded = labels_and_stats(scores, 317, 233, dense=False, stride=SCORE_STRIDE, phase=3.5)
    finally:
        ds.BAND_ELEMENTS = saved
    assert torch.equal(full[0], banded[0])
    assert torch.allclose(full[1], banded[1], rtol=1e-9, atol=0)
    counts_and_boxes = [0, 2, 3, 4, 5, 7]  # STATS: pixel_count, the box, low_count: integers, exact
    assert torch.equal(full[1][..., counts_and_boxes], banded[1][..., counts_and_boxes])


def test_decode_tasks_hand_on_large_images_one_block_at_a_time():
    """A decode task's rows kept at their own size for tiling leave it in blocks of about DECODE_BLOCK_BYTES, not
    all at once; the rows, failed ones included, are decode_stage's."""
    import io

    import pyarrow as pa
    from PIL import Image

    from pipeline.label.stages import decode_blocks, decode_stage

    def png(h, w, seed):
        buf = io.BytesIO()
        Image.fromarray(gradient_rgb(h, w, seed)).save(buf, format="PNG")
        return buf.getvalue()

    data = [png(300, 200, 0), b"not an image", png(40, 30, 1), png(250, 260, 2)]
    batch = pa.table({"image_uri": [f"u{i}" for i in range(4)], "image_version": ["1"] * 4, "data": data,
                      "stage": pa.array([None] * 4, pa.string()), "error": pa.array([None] * 4, pa.string())})
    kw = dict(max_pixels=10**6, max_side=48, canvas_multiple=32, tiling=Tiling(64))
    blocks = list(decode_blocks(batch, block_bytes=100_000, **kw))
    assert [b.num_rows for b in blocks] == [1, 3]  # 180 KB canvas: a block of its own; then 195 KB at the last
    whole = decode_stage(batch, **kw)
    assert pa.concat_tables(blocks).to_pylist() == whole.to_pylist()
    assert whole["canvas_h"].to_pylist() == [300, 0, 64, 250] and whole["error"][1].as_py() is not None
