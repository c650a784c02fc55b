"""The labeling job's kernel levers on the CPU (models.fast_paths, InferenceSettings): each keeps the model's
function within rounding, every mode keeps an image's labels independent of its batch neighbours, and the
host side (Arrow columns, postprocess) is exact."""
from __future__ import annotations

import copy

import numpy as np
import pyarrow as pa
import pytest
import torch

from models import TORCHVISION, build_model, is_bilinear, load_checkpoint, upsamplers
from models.fast_paths import cast_trunk, group_upsamplers
from pipeline.label import device_stats, inference
from pipeline.label.canvas import preprocess
from pipeline.label.columns import binary_column, binary_views
from pipeline.label.inference import InferenceSettings, Predictor, predict_image
from pipeline.label.stages import postprocess_stage
from tests.images import gradient_rgb
from tests.jobs_util import run_subprocess

ARCHS = ("fcn32s", "fcn16s", "fcn8s", "fcn8s-atonce")


def _model(arch: str, classes: int = 7, seed: int = 0) -> torch.nn.Module:
    """A narrow model whose score layers are not zero, so the head and the upsamplers shape the output."""
    torch.manual_seed(seed)
    model = build_model(arch, classes, width_mult=1 / 16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def ck(tiny_checkpoint):
    return load_checkpoint(tiny_checkpoint[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_grouped_upsamplers_equal_the_dense_ones(arch):
    model = _model(arch)
    x = torch.randn(2, 3, 70, 90)
    grouped = copy.deepcopy(model)
    assert group_upsamplers(grouped) == {name: True for name in upsamplers(model)}
    assert all(m.groups == m.out_channels for m in upsamplers(grouped).values())
    with torch.inference_mode():
        dense_out, grouped_out = model(x), grouped(x)
    assert dense_out.shape == grouped_out.shape
    torch.testing.assert_close(grouped_out, dense_out, rtol=0, atol=1e-5 * float(dense_out.abs().max()))


def test_learned_upsamplers_stay_dense():
    model = _model("fcn8s")
    with torch.no_grad():
        model.upscore_pool4.weight[1, 0, 0, 0] += 1e-3  # an off-diagonal weight: the layer mixes classes
    assert not is_bilinear(model.upscore_pool4) and is_bilinear(model.upscore8)
    predictor = Predictor(model, TORCHVISION, InferenceSettings(device="cpu"))
    assert predictor.applied["grouped_upsampling"] == {"upscore2": True, "upscore_pool4": False, "upscore8": True}
    x = np.random.default_rng(0).integers(0, 255, (1, 64, 64, 3), dtype=np.uint8)
    dense = Predictor(model, TORCHVISION, InferenceSettings(device="cpu", grouped_upsampling=False))
    torch.testing.assert_close(predictor.forward(x), dense.forward(x), rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_trunk_cast_once_gives_the_same_logits_under_autocast(arch):
    """What autocast does to fp32 weights on every forward, done once: bit-identical logits (CPU bf16 autocast
    stands in for CUDA's)."""
    model = _model(arch)
    cast = copy.deepcopy(model)
    names = cast_trunk(cast, torch.bfloat16)
    assert "conv1_1" in names and "fc7" in names and not any(n.startswith("score") for n in names)
    assert cast.conv3_2.weight.dtype == torch.bfloat16 and cast.score_fr.weight.dtype == torch.float32
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = model(x), cast(x)
    assert torch.equal(ref, out)


def test_predictor_leaves_the_given_model_alone(ck):
    before = {k: v.clone() for k, v in ck.model.state_dict().items()}
    Predictor(ck.model, ck.convention, InferenceSettings(device="cpu"))
    after = ck.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.groups == 1 for m in upsamplers(ck.model).values())


def _neighbours_change_nothing(predictor: Predictor, images: list[np.ndarray]) -> list:
    items = [preprocess(im, None, 32) for im in images]
    together = predictor.predict(items)
    for item, pred in zip(items, together, strict=True):
        alone = predictor.predict_chunk([item])[0]
        np.testing.assert_array_equal(pred.label, alone.label)
        np.testing.assert_array_equal(pred.confidence_sum, alone.confidence_sum)
    return together


@pytest.mark.parametrize("grouped", [True, False])
def test_every_eager_mode_keeps_labels_independent_of_batch_neighbours(ck, grouped):
    images = [gradient_rgb(h, w, seed) for seed, (h, w) in enumerate([(40, 50), (33, 47), (45, 40), (20, 70), (41, 33)])]
    predictor = Predictor(ck.model, ck.convention, InferenceSettings(max_side=None, batch_size=3, device="cpu",
                                                                    grouped_upsampling=grouped))
    preds = _neighbours_change_nothing(predictor, images)
    assert any(len(p.class_id) > 1 for p in preds)  # the model is not constant


def test_compiled_model_equals_eager_and_keeps_neighbour_independence():
    """torch.compile (inductor, C++ on the CPU): one graph for the one canvas shape; labels equal eager's."""
    model = _model("fcn8s", classes=5)
    images = [gradient_rgb(h, w, seed) for seed, (h, w) in enumerate([(40, 50), (33, 47), (50, 60)])]  # canvas 64x64
    eager = Predictor(model, TORCHVISION, InferenceSettings(max_side=None, batch_size=2, device="cpu"))
    compiled = Predictor(model, TORCHVISION, InferenceSettings(max_side=None, batch_size=2, device="cpu",
                                                              compile="default"))
    preds = _neighbours_change_nothing(compiled, images)
    assert compiled.compile_seconds > 0 and len(compiled._compiled_shapes) == 1
    canvases = [preprocess(im, None, 32).canvas for im in images[:2]]
    ref = eager.forward(canvases)
    torch.testing.assert_close(compiled.forward(canvases), ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    for im, pred in zip(images, preds, strict=True):
        assert (pred.label != eager.predict_chunk([preprocess(im, None, 32)])[0].label).mean() < 1e-3


def test_cpu_and_gpu_statistics_forms_agree():
    """The dense reductions the GPU runs and the CPU's bincounts give the same statistics, band by band."""
    torch.manual_seed(3)
    n, c, h, w = 3, 9, 37, 41
    idx = torch.randint(0, c, (n, h, w))
    idx[1] = torch.where(idx[1] == 4, 5, idx[1])  # a class absent from one image
    conf = torch.rand(n, h, w)
    margin = conf * torch.rand(n, h, w)
    low = conf < 0.5
    dense = device_stats.DenseStats(n, c, h, w, idx.device)
    counted = device_stats.BincountStats(n, c, h, w, idx.device)
    for r0 in range(0, h, 10):
        band = slice(r0, r0 + 10)
        dense.add(idx[:, band], conf[:, band], margin[:, band], low[:, band], r0)
        counted.add(idx[:, band], conf[:, band], margin[:, band], low[:, band], r0)
    a, b = dense.result(), counted.result()
    exact = [0, 2, 3, 4, 5, 7]  # counts, boxes and low-confidence counts are integers
    assert torch.equal(a[..., exact], b[..., exact])
    torch.testing.assert_close(a[..., [1, 6]], b[..., [1, 6]], rtol=1e-12, atol=0)
    assert b[0, 2, 7] == int((low[0] & (idx[0] == 2)).sum()) > 0
    assert b[1, 4, 0] == 0 and b[1, 4, 2] == w and b[1, 4, 4] == -1  # absent: empty box markers
    ys, xs = np.nonzero(idx[0].numpy() == 2)
    assert b[0, 2, 2:6].tolist() == [xs.min(), ys.min(), xs.max(), ys.max()]


def test_upsampled_bands_change_no_label(ck, monkeypatch):
    """Bands (a function of the image's size alone) change no label, count or box; the confidence sums only in
    their rounding (summed band by band)."""
    predictor = Predictor(ck.model, ck.convention, InferenceSettings(device="cpu"))
    torch.manual_seed(2)
    scores = torch.randn(2, 6, 13, 17) * 3
    whole = predictor.to_host([predictor.labels_and_stats(scores, 71, 90)])
    monkeypatch.setattr(device_stats, "BAND_ELEMENTS", 6 * 90 * 7)  # bands of 7 rows
    banded = predictor.to_host([predictor.labels_and_stats(scores, 71, 90)])
    for a, b in zip(whole, banded, strict=True):
        for field in ("label", "class_id", "pixel_count", "x_min", "y_min", "x_max", "y_max"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        np.testing.assert_allclose(a.confidence_sum, b.confidence_sum, rtol=1e-6)


def test_settings_refuse_unreproducible_levers_with_reproducible():
    InferenceSettings(reproducible=True, cudnn="heuristic-b")
    with pytest.raises(ValueError, match="--reproducible needs a fixed kernel choice: drop --cudnn benchmark"):
        InferenceSettings(reproducible=True, cudnn="benchmark")
    with pytest.raises(ValueError, match="--compile default"):
        InferenceSettings(reproducible=True, compile="default")
    with pytest.raises(ValueError, match="--cudnn must be one of"):
        InferenceSettings(cudnn="fastest")


def test_cli_refuses_reproducible_with_compile_in_one_line(tiny_checkpoint, tmp_path):
    (tmp_path / "images").mkdir()
    proc = run_subprocess("label", ["--images", str(tmp_path / "images"), "--checkpoint", tiny_checkpoint[0],
                                    "--output", str(tmp_path / "out"), "--reproducible", "--compile"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --reproducible needs a fixed kernel choice: drop --compile default (cuDNN's benchmark and compiled "
        "kernels may differ between processes)"]
    assert not (tmp_path / "out").exists()


def test_cudnn_flags_are_scoped_to_forward_passes():
    cudnn = torch.backends.cudnn
    saved = (cudnn.allow_tf32, cudnn.benchmark)
    try:
        cudnn.allow_tf32, cudnn.benchmark = True, False
        flags = inference._CudaFlags()
        with flags.scope(benchmark=True):
            with flags.scope(benchmark=True):  # a second thread's pass
                assert (cudnn.allow_tf32, cudnn.benchmark) == (False, True)
            assert (cudnn.allow_tf32, cudnn.benchmark) == (False, True)  # the first pass still runs
        assert (cudnn.allow_tf32, cudnn.benchmark) == (True, False)  # a training step after it gets its own
    finally:
        cudnn.allow_tf32, cudnn.benchmark = saved


def test_binary_columns_round_trip_without_python_bytes():
    cells = [np.arange(12, dtype=np.uint8).reshape(3, 4), None, np.zeros(0, np.uint8), np.full((2, 2, 3), 7, np.uint8)]
    col = binary_column(cells)
    assert col.to_pylist() == [cells[0].tobytes(), None, b"", cells[3].tobytes()]
    chunked = pa.chunked_array([col.chunk(0).slice(1), pa.array([b"xyz"], pa.binary())])
    views = binary_views(chunked)
    assert views[0] is None and views[1].tobytes() == b"" and views[2].tobytes() == cells[3].tobytes()
    assert views[3].tobytes() == b"xyz"


def test_postprocess_checks_raw_label_sizes_column_wise():
    ok, short = np.arange(6, dtype=np.uint8), np.arange(5, dtype=np.uint8)
    i32, f64 = pa.list_(pa.int32()), pa.list_(pa.float64())
    batch = pa.table({
        "image_uri": ["a", "b", "c"], "image_version": ["1", "1", "1"],
        "width": pa.array([3, 3, 3], pa.int32()), "height": pa.array([2, 2, 2], pa.int32()),
        "label_raw": binary_column([ok, short, None]),
        "stat_class_id": pa.array([[0, 5], [1], []], i32), "stat_pixel_count": pa.array([[2, 4], [6], []], pa.list_(pa.int64())),
        "stat_confidence_sum": pa.array([[1.0, 3.0], [4.5], []], f64),
        **{k: pa.array([[0, 1], [0], []], i32) for k in ("stat_x_min", "stat_y_min", "stat_x_max", "stat_y_max")},
        "mean_confidence": pa.array([0.7, 0.75, None]), "mean_margin": pa.array([0.4, 0.5, None]),
        "low_confidence_fraction": pa.array([0.25, 0.0, None]), "tiles": pa.array([0, 6, None], pa.int32()),
        "stage": pa.array([None, None, "decode"], pa.string()), "error": pa.array([None, None, "bad"], pa.string()),
        "actor": pa.array(["x"] * 3, pa.string()),
    })
    out = postprocess_stage(batch, encoding="raw").to_pylist()
    assert [(r["mean_confidence"], r["mean_margin"], r["low_confidence_fraction"]) for r in out] == [
        (0.7, 0.4, 0.25), (0.75, 0.5, 0.0), (None, None, None)]  # passed through as the actor computed them
    assert [r["tiles"] for r in out] == [0, 6, None]
    assert out[0]["label_map"] == ok.tobytes() and out[0]["error"] is None
    assert out[0]["stat_pixel_fraction"] == [2 / 6, 4 / 6] and out[0]["stat_mean_confidence"] == [0.5, 0.75]
    assert (out[1]["stage"], out[1]["error"], out[1]["label_map"]) == ("postprocess", "label map has 5 bytes, expected 6", None)
    assert (out[2]["stage"], out[2]["error"], out[2]["stat_pixel_fraction"]) == ("decode", "bad", [])


def test_predict_image_takes_settings(ck):
    im = gradient_rgb(30, 41, 9)
    settings = InferenceSettings(max_side=None, batch_size=2, device="cpu", grouped_upsampling=False)
    a = predict_image(ck, None, im, settings=settings)
    b = Predictor(ck.model, ck.convention, settings).predict_chunk([preprocess(im, None, 32)])[0]
    np.testing.assert_array_equal(a.label, b.label)


def test_actor_host_bench_reports_microseconds_per_image():
    """bench/actor_host_bench.py runs the actor's real call on decoded rows (tiny here) and prints its figures."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "bench/actor_host_bench.py", "--images", "12", "--repeat", "1",
                           "--calls-of", "2"], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["images"] == 12 and result["rows_per_call"] == 8
    assert 0 < result["host_us_per_image"] < result["total_us_per_image"]
