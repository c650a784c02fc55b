"""Checkpoint format: round trips (local and S3), the input convention, and every bad-file error."""
import json
import os

import pytest
import torch

from models import CAFFE, TORCHVISION, CheckpointError, InputConvention, build_model, load_checkpoint, save_checkpoint
from models.checkpoint import model_id_of

TINY = 1 / 16
NAMES = ["bg", "a", "b"]


def _trained_like(arch="fcn8s", num_classes=3, padding="reference", seed=0):
    torch.manual_seed(seed)
    model = build_model(arch, num_classes, width_mult=TINY, padding=padding)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return model.eval()


def test_round_trip_local(tmp_path):
    model = _trained_like(padding="same")
    path = str(tmp_path / "ckpt" / "model.pt")
    model_id = save_checkpoint(path, model, class_names=NAMES, convention=CAFFE, metadata={"epoch": 3, "mean_iou": 0.5})
    ck = load_checkpoint(path)
    assert ck.config.arch == "fcn8s" and ck.config.padding == "same" and ck.config.width_mult == TINY
    assert ck.class_names == NAMES and ck.convention == CAFFE
    assert ck.metadata == {"epoch": 3, "mean_iou": 0.5}
    assert ck.model_id == model_id == model_id_of(open(path, "rb").read())
    assert not ck.model.training
    x = torch.rand(1, 3, 37, 45)
    with torch.no_grad():
        assert torch.equal(ck.model(x), model(x))
    # Readable with plain weights_only torch.load: nothing but tensors and plain types inside.
    payload = torch.load(path, weights_only=True)
    assert payload["config"]["arch"] == "fcn8s"
    assert not [f for f in os.listdir(tmp_path / "ckpt") if f.startswith(".tmp")]


def test_round_trip_s3(bucket):
    model = _trained_like("fcn16s")
    uri = f"{bucket}/runs/r1/model.pt"
    model_id = save_checkpoint(uri, model, class_names=NAMES, convention=TORCHVISION)
    ck = load_checkpoint(uri)
    assert ck.model_id == model_id and ck.config.arch == "fcn16s"
    for k, v in model.state_dict().items():
        assert torch.equal(ck.model.state_dict()[k], v)


def test_ddp_prefix_is_stripped(tmp_path):
    model = _trained_like()
    wrapper = torch.nn.Module()
    wrapper.module = model  # state_dict keys get a "module." prefix, as under DDP
    wrapper.arch, wrapper.num_classes, wrapper.width_mult, wrapper.padding = "fcn8s", 3, TINY, "reference"
    path = str(tmp_path / "m.pt")
    save_checkpoint(path, wrapper, class_names=NAMES, convention=TORCHVISION)
    assert load_checkpoint(path).config.arch == "fcn8s"


def test_convention_normalize():
    rgb = torch.tensor([[[10.0]], [[20.0]], [[30.0]]])
    out = CAFFE.normalize(rgb)  # BGR order, mean subtracted, 0..255
    assert torch.allclose(out[:, 0, 0], torch.tensor([30 - 104.00699, 20 - 116.66877, 10 - 122.67891]))
    out = TORCHVISION.normalize(rgb.to(torch.uint8))
    assert torch.allclose(out[0, 0, 0], torch.tensor((10 / 255 - 0.485) / 0.229))
    assert InputConvention.from_dict(CAFFE.to_dict()) == CAFFE
    with pytest.raises(ValueError):
        InputConvention("GBR")


@pytest.fixture
def good_file(tmp_path):
    path = str(tmp_path / "good.pt")
    save_checkpoint(path, _trained_like(), class_names=NAMES, convention=TORCHVISION)
    return path


def _raises(path, match, **kw):
    with pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path, **kw)
    assert str(path) in str(e.value)  # every error names the file
    assert "\n" not in str(e.value)


def test_missing_file(tmp_path):
    _raises(str(tmp_path / "nope.pt"), "not found")


def test_missing_s3_object(bucket):
    _raises(f"{bucket}/nope.pt", "not found")


def test_empty_file(tmp_path):
    p = tmp_path / "empty.pt"
    p.write_bytes(b"")
    _raises(str(p), "empty")


def test_truncated_file(tmp_path, good_file):
    data = open(good_file, "rb").read()
    p = tmp_path / "trunc.pt"
    p.write_bytes(data[: len(data) // 2])
    _raises(str(p), "truncated or corrupt")


def test_not_a_torch_file(tmp_path):
    p = tmp_path / "notes.pt"
    p.write_text(json.dumps({"hello": "world"}))
    _raises(str(p), "not a torch file")


def test_foreign_state_dict(tmp_path):
    p = str(tmp_path / "foreign.pt")
    torch.save(build_model("fcn8s", 3, width_mult=TINY).state_dict(), p)
    _raises(p, "not an FCN checkpoint")


class Arbitrary:
    pass


def test_arbitrary_pickled_object_is_refused(tmp_path):
    p = str(tmp_path / "evil.pt")
    torch.save({"format": "fcn-segmentation-checkpoint", "obj": Arbitrary()}, p)
    _raises(p, "refusing to unpickle")


def test_weights_do_not_match_declared_architecture(tmp_path, good_file):
    payload = torch.load(good_file, weights_only=True)
    payload["config"]["arch"] = "fcn32s"
    p = str(tmp_path / "mismatch.pt")
    torch.save(payload, p)
    _raises(p, "do not match fcn32s")
    payload["config"]["arch"] = "fcn8s"
    payload["state_dict"]["score_fr.weight"] = torch.zeros(5, 256, 1, 1)
    torch.save(payload, p)
    _raises(p, "shape mismatch in score_fr.weight")


def test_num_classes_mismatch(good_file):
    _raises(good_file, "predicts 3 classes, but 21", num_classes=21)
    assert load_checkpoint(good_file, num_classes=3).config.num_classes == 3


def test_class_names_must_match_num_classes(tmp_path):
    with pytest.raises(ValueError, match="class names"):
        save_checkpoint(str(tmp_path / "x.pt"), _trained_like(), class_names=["a"], convention=TORCHVISION)
