"""jobs/import_weights.py: published reference-named FCN weights become a checkpoint that labels as the source
model does on its own preprocessing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models import CAFFE, VOC_CLASSES, build_model, load_checkpoint
from tests.jobs_util import one_error, run_failing_cli, run_subprocess

# The reference port's Caffe preprocessing: BGR channel order, 0..255, per-channel mean subtracted.
MEAN_BGR = np.array([104.00698793, 116.66876762, 122.67891434])


def _reference_state(arch: str, num_classes: int, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, width_mult=1 / 16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 0.5)
    return model.eval().state_dict()


@pytest.mark.parametrize("arch", ["fcn8s", "fcn8s-atonce"])
def test_imported_weights_give_the_source_models_logits(tmp_path, arch):
    state = _reference_state(arch, 21, seed=3)
    src = tmp_path / "fcn8s_from_caffe.pth"
    torch.save({f"module.{k}" if arch == "fcn8s-atonce" else k: v for k, v in state.items()}, src)  # DDP-saved too
    out = tmp_path / "fcn8s-voc.pt"
    proc = run_subprocess("import_weights", ["--from", str(src), "--model", arch, "--classes", "voc",
                                             "--convention", "caffe", "--output", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["classes"] == 21 and summary["width_mult"] == 1 / 16 and len(summary["source_md5"]) == 32

    ck = load_checkpoint(str(out))
    assert ck.convention == CAFFE and list(ck.class_names) == list(VOC_CLASSES) and ck.config.arch == arch
    source = build_model(arch, 21, width_mult=1 / 16).eval()
    source.load_state_dict(state)
    rgb = np.random.default_rng(0).integers(0, 256, size=(45, 61, 3), dtype=np.uint8)
    bgr_minus_mean = torch.from_numpy((rgb[:, :, ::-1] - MEAN_BGR).astype(np.float32)).permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = source(bgr_minus_mean)
        got = ck.model(ck.convention.normalize(torch.from_numpy(rgb).permute(2, 0, 1)[None]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_wrong_weights_are_named_in_one_line(tmp_path, capsys):
    """In this process, as jobs/import_weights.py runs it (run_job): each subprocess imported torch again (~2 s)."""
    state = _reference_state("fcn8s", 21, seed=1)
    bad = dict(state)
    bad.pop("score_pool3.weight")
    bad["extra.weight"] = torch.zeros(1)
    src = tmp_path / "bad.pth"
    torch.save(bad, src)
    args = ["--from", str(src), "--model", "fcn8s", "--classes", "voc", "--convention", "caffe",
            "--output", str(tmp_path / "x.pt")]
    line = one_error(*run_failing_cli("import_weights", args, capsys))
    assert "missing score_pool3.weight" in line and "unexpected extra.weight" in line
    # Weights of another architecture: FCN-32s has no skip layers.
    torch.save(_reference_state("fcn32s", 21, seed=1), src)
    assert "missing score_pool3.bias, score_pool3.weight" in one_error(*run_failing_cli("import_weights", args, capsys))
    # Class count from --classes FILE that does not match the weights.
    classes = tmp_path / "classes.txt"
    classes.write_text("background\nperson\n")
    torch.save(state, src)
    line = one_error(*run_failing_cli("import_weights", [*args[:4], "--classes", str(classes), *args[6:]], capsys))
    assert "predicts 21 classes, but --classes gives 2" in line
    assert not (tmp_path / "x.pt").exists()
