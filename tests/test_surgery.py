"""VGG16 -> FCN surgery and staged 32s -> 16s -> 8s initialisation."""
import pytest
import torch
from torch.nn import functional as F

from models import TORCHVISION, BackboneError, CheckpointError, build_model, init_backbone, init_from_checkpoint, save_checkpoint
from models.surgery import TORCHVISION_FEATURE_INDEX, TRUNK_CONVS

TINY = 1 / 16


@pytest.fixture(scope="module")
def vgg16_file(tmp_path_factory):
    from torchvision.models import vgg16

    torch.manual_seed(0)
    vgg = vgg16(weights=None)
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(vgg.state_dict(), path)
    return vgg, str(path)


def test_surgery_fc6_at_one_position_equals_linear(vgg16_file):
    vgg, path = vgg16_file
    with torch.device("cpu"):
        model = build_model("fcn8s", 21)
    assert init_backbone(model, path) == TORCHVISION
    for name, idx in zip(TRUNK_CONVS, TORCHVISION_FEATURE_INDEX, strict=True):
        assert torch.equal(getattr(model, name).weight, vgg.features[idx].weight)
        assert torch.equal(getattr(model, name).bias, vgg.features[idx].bias)
    pool5 = torch.randn(2, 512, 7, 7)
    with torch.no_grad():
        conv = F.conv2d(pool5, model.fc6.weight, model.fc6.bias)
        linear = vgg.classifier[0](pool5.flatten(1))
        assert conv.shape == (2, 4096, 1, 1)
        assert torch.allclose(conv.flatten(1), linear, atol=1e-4)
        h = torch.randn(2, 4096)
        assert torch.allclose(F.conv2d(h[:, :, None, None], model.fc7.weight, model.fc7.bias).flatten(1),
                              vgg.classifier[3](h), atol=1e-5)
    # Score layers stay zero: the new head starts from nothing.
    assert not model.score_fr.weight.any()


def test_surgery_errors(tmp_path, vgg16_file):
    _, path = vgg16_file
    with pytest.raises(BackboneError, match="width_mult=1.0"):
        init_backbone(build_model("fcn8s", 21, width_mult=TINY), path)
    full = build_model("fcn32s", 21)
    with pytest.raises(BackboneError, match="not found"):
        init_backbone(full, str(tmp_path / "missing.pth"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"garbage")
    with pytest.raises(BackboneError, match="not a readable torch state dict"):
        init_backbone(full, str(bad))
    other = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(BackboneError, match="missing tensor"):
        init_backbone(full, str(other))


def test_imagenet_download_failure_is_clear(monkeypatch, tmp_path):
    # No network here: torchvision's download fails, and the error tells the user to pass a file.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(BackboneError, match="--backbone-weights PATH"):
        init_backbone(build_model("fcn32s", 21), "imagenet")


def _perturbed(arch, seed):
    torch.manual_seed(seed)
    model = build_model(arch, 3, width_mult=TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_staged_initialisation(tmp_path):
    names = ["bg", "a", "b"]
    m32 = _perturbed("fcn32s", 1)
    p32 = str(tmp_path / "32s.pt")
    save_checkpoint(p32, m32, class_names=names, convention=TORCHVISION)

    m16 = build_model("fcn16s", 3, width_mult=TINY)
    copied = init_from_checkpoint(m16, p32)
    assert "conv1_1.weight" in copied and "fc7.weight" in copied and "score_fr.weight" in copied
    assert not any(n.startswith(("score_pool4", "upscore")) for n in copied)
    for name in ["conv1_1", "conv5_3", "fc6", "fc7", "score_fr"]:
        assert torch.equal(getattr(m16, name).weight, getattr(m32, name).weight)
    assert not m16.score_pool4.weight.any() and not m16.score_pool4.bias.any()

    with torch.no_grad():
        m16.score_pool4.weight.normal_()
    p16 = str(tmp_path / "16s.pt")
    save_checkpoint(p16, m16, class_names=names, convention=TORCHVISION)
    m8 = build_model("fcn8s", 3, width_mult=TINY)
    copied = init_from_checkpoint(m8, p16)
    assert torch.equal(m8.score_pool4.weight, m16.score_pool4.weight)
    assert torch.equal(m8.upscore2.weight, m16.upscore2.weight)
    assert not m8.score_pool3.weight.any()
    assert "score_pool3.weight" not in copied

    with pytest.raises(CheckpointError, match="num_classes"):
        init_from_checkpoint(build_model("fcn16s", 5, width_mult=TINY), p32)
    with pytest.raises(CheckpointError, match="width_mult"):
        init_from_checkpoint(build_model("fcn16s", 3, width_mult=1 / 8), p32)
