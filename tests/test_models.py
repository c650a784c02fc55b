"""FCN family: shapes, parameter counts, bilinear kernels, alignment, FLOPs of the 'same' variant."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models import ARCHITECTURES, build_model
from models.layers import bilinear_kernel

TINY = 1 / 16  # 4..32 trunk channels, fc 256: fast on CPU, same architecture


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("padding", ["reference", "same"])
def test_output_shape_any_input_size(arch, padding):
    model = build_model(arch, 5, width_mult=TINY, padding=padding).eval()
    with torch.no_grad():
        for h, w in [(1, 1), (1, 7), (13, 2), (31, 33), (64, 64), (97, 130)]:
            out = model(torch.randn(2, 3, h, w))
            assert out.shape == (2, 5, h, w), (arch, padding, h, w)


def test_parameter_counts_full_width():
    counts = {}
    for arch in ARCHITECTURES:
        with torch.device("meta"):
            counts[arch] = sum(p.numel() for p in build_model(arch, 21).parameters())
    assert counts["fcn8s"] == 134_489_759  # the paper's "134M", exactly as the reference port
    assert counts["fcn8s-atonce"] == counts["fcn8s"]
    # 16s lacks score_pool3 and upscore_pool4 but has a larger final upsampler; 32s has a 64x64 one.
    assert counts["fcn16s"] == counts["fcn8s"] - (256 * 21 + 21) - 21 * 21 * 16 - 21 * 21 * 256 + 21 * 21 * 32 * 32
    assert counts["fcn32s"] == counts["fcn16s"] - (512 * 21 + 21) - 21 * 21 * 16 - 21 * 21 * 32 * 32 + 21 * 21 * 64 * 64


def test_reference_layer_names_and_width_mult():
    model = build_model("fcn8s", 21, width_mult=TINY)
    names = {n for n, _ in model.named_children()}
    for required in ["conv1_1", "conv5_3", "fc6", "fc7", "score_fr", "score_pool4", "score_pool3",
                     "upscore2", "upscore_pool4", "upscore8"]:
        assert required in names
    assert model.conv1_1.padding == (100, 100)
    assert model.conv1_1.out_channels == 4 and model.conv5_3.out_channels == 32
    assert model.fc6.out_channels == 256 and model.fc6.kernel_size == (7, 7)
    assert all(getattr(model, f"pool{i}").ceil_mode for i in range(1, 6))
    assert isinstance(model.drop6, nn.Dropout2d) and isinstance(model.drop7, nn.Dropout2d)
    same = build_model("fcn8s", 21, width_mult=TINY, padding="same")
    assert same.conv1_1.padding == (1, 1) and same.fc6.padding == (3, 3)


def test_score_layers_zero_and_upsamplers_bilinear_without_bias():
    model = build_model("fcn8s", 7, width_mult=TINY)
    for name in ["score_fr", "score_pool4", "score_pool3"]:
        layer = getattr(model, name)
        assert not layer.weight.any() and not layer.bias.any()
    for name, k in [("upscore2", 4), ("upscore_pool4", 4), ("upscore8", 16)]:
        layer = getattr(model, name)
        assert layer.bias is None and layer.kernel_size == (k, k) and layer.stride == (k // 2, k // 2)
        assert torch.equal(layer.weight, bilinear_kernel(7, k))
    assert build_model("fcn32s", 3, width_mult=TINY).upscore.kernel_size == (64, 64)
    assert build_model("fcn16s", 3, width_mult=TINY).upscore16.kernel_size == (32, 32)


def _reference_upsampling_weight(channels, k):
    # Independent transcription of the reference port's get_upsampling_weight (numpy, ogrid).
    factor = (k + 1) // 2
    center = factor - 1 if k % 2 == 1 else factor - 0.5
    og = np.ogrid[:k, :k]
    filt = (1 - abs(og[0] - center) / factor) * (1 - abs(og[1] - center) / factor)
    weight = np.zeros((channels, channels, k, k), dtype=np.float64)
    weight[range(channels), range(channels), :, :] = filt
    return torch.from_numpy(weight).float()


@pytest.mark.parametrize("k", [3, 4, 5, 16, 32, 64])
def test_bilinear_kernel_matches_formula(k):
    assert torch.allclose(bilinear_kernel(3, k), _reference_upsampling_weight(3, k))
    # A constant map stays constant away from the borders (partition of unity).
    up = nn.functional.conv_transpose2d(torch.ones(1, 3, 6, 6), bilinear_kernel(3, 2 * (k // 2 or 1)), stride=k // 2 or 1)
    s = k // 2 or 1
    inner = up[:, :, 2 * s:-2 * s, 2 * s:-2 * s]
    assert torch.allclose(inner, torch.ones_like(inner))


def _linearise(model: nn.Module, keep: str) -> nn.Module:
    """Make the net a symmetric linear filter: mean-filter convs, average pools, one score branch."""
    with torch.no_grad():
        for name, m in model.named_children():
            if isinstance(m, nn.MaxPool2d):
                setattr(model, name, nn.AvgPool2d(2, stride=2, ceil_mode=True))
            elif isinstance(m, nn.Conv2d):
                m.bias.zero_()
                if name.startswith("score"):
                    m.weight.fill_(1.0 / m.in_channels if name == keep else 0.0)
                else:
                    m.weight.fill_(1.0 / m.weight[0].numel())
    return model.eval()


def _mean_centroid_error(model, size=640, phases=32):
    """Impulses at `phases` consecutive rows; mean over phases of (response centroid row - impulse row).

    Averaging over a whole stride period cancels the grid's aliasing, so a correctly aligned net gives 0
    and a crop off by d pixels gives d.
    """
    y0 = size // 2 - phases // 2
    x = torch.zeros(phases, 3, size, 96)
    for k in range(phases):
        x[k, :, y0 + k, 48] = 1.0
    with torch.no_grad():
        r = model(x)[:, 0].sum(dim=2).clamp_min(0)  # (phases, H) row profile
    rows = torch.arange(size, dtype=torch.float64)
    centroid = (r.double() * rows).sum(1) / r.double().sum(1)
    return float((centroid - (y0 + torch.arange(phases))).mean())


@pytest.mark.parametrize("padding", ["reference", "same"])
@pytest.mark.parametrize("arch,branch", [
    ("fcn32s", "score_fr"),
    ("fcn16s", "score_fr"), ("fcn16s", "score_pool4"),
    ("fcn8s", "score_fr"), ("fcn8s", "score_pool4"), ("fcn8s", "score_pool3"),
])
def test_crop_offsets_align_output_with_input(arch, branch, padding):
    torch.manual_seed(0)
    model = _linearise(build_model(arch, 1, width_mult=TINY, padding=padding), keep=branch)
    err = _mean_centroid_error(model)
    assert abs(err) < 0.25, f"{arch}/{padding} {branch} branch is misaligned by {err:.2f} px"


def test_misaligned_crop_is_detected():
    # The alignment check itself must fail when a crop offset is wrong.
    import models.fcn8s as fcn8s_module
    model = _linearise(build_model("fcn8s", 1, width_mult=TINY), keep="score_pool3")
    old = fcn8s_module.REFERENCE_CROP
    try:
        fcn8s_module.REFERENCE_CROP = old + 1
        err = _mean_centroid_error(model)
    finally:
        fcn8s_module.REFERENCE_CROP = old
    assert abs(err + 1) < 0.25


def _gflops(padding, size):
    with torch.device("meta"):
        model = build_model("fcn8s", 21, padding=padding).eval()
        x = torch.empty(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops() / 1e9


def test_same_padding_variant_is_lean():
    ref, same = _gflops("reference", 500), _gflops("same", 500)
    assert 340 < ref < 390  # ~363 GFLOP per 500x500 image with the reference padding
    assert same / ref <= 0.62


def test_atonce_scales_skip_inputs():
    torch.manual_seed(0)
    staged = build_model("fcn8s", 3, width_mult=TINY).eval()
    atonce = build_model("fcn8s-atonce", 3, width_mult=TINY).eval()
    atonce.load_state_dict(staged.state_dict())
    with torch.no_grad():
        for m in (staged, atonce):
            m.score_pool3.weight.fill_(1.0)
            m.score_pool4.weight.fill_(1.0)
        x = torch.rand(1, 3, 40, 40)
        a, b = staged(x), atonce(x)
    # Only the skip branches differ, by their fixed scales; score_fr is zero in both.
    assert not torch.allclose(a, b)
    with torch.no_grad():
        staged.score_pool4.weight.mul_(0.01)
        staged.score_pool3.weight.mul_(0.0001)
        assert torch.allclose(staged(x), b, atol=1e-6)


def test_unknown_arch_and_bad_options():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("fcn4s", 21)
    with pytest.raises(ValueError, match="padding"):
        build_model("fcn8s", 21, padding="valid")
    with pytest.raises(ValueError, match="width_mult"):
        build_model("fcn8s", 21, width_mult=0)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("fcn8s", 0)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_head_runs_in_fp32_under_bf16_autocast(arch):
    """The score layers, skips and upsamplers (under 1% of the FLOPs) run in fp32 under autocast; the trunk
    stays in bf16. In bf16 the logits would keep 8 bits and the at-once net's pool3 * 0.0001 skip would
    mostly round away."""
    model = build_model(arch, 5, width_mult=1 / 16).eval()
    seen = {}
    for name, module in model.named_modules():
        if name.startswith(("score", "upscore", "conv1_1")):
            module.register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, (inp[0].dtype, out.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(1, 3, 64, 64))
    assert out.dtype == torch.float32
    assert seen.pop("conv1_1")[1] == torch.bfloat16  # the trunk: autocast still applies
    assert seen and all(v == (torch.float32, torch.float32) for v in seen.values()), seen


def test_atonce_pool3_skip_survives_bf16_autocast():
    """The at-once net's pool3 branch changes the logits under bf16 autocast as much as it does in fp32 (in a
    bf16 head the 0.0001-scaled scores would be added to 8-bit logits and mostly rounded away)."""
    torch.manual_seed(0)
    model = build_model("fcn8s-atonce", 4, width_mult=1 / 16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("score"):
                p.normal_(0, 1.0)
    x = torch.randn(1, 3, 64, 64) * 50
    saved = model.score_pool3.weight.detach().clone()
    effect = {}
    for amp in (True, False):
        outs = []
        for scale in (1.0, 0.0):
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                model.score_pool3.weight.copy_(saved * scale)
                outs.append(model(x))
        effect[amp] = (outs[0] - outs[1]).abs().mean().item()
    assert effect[False] > 0
    assert effect[True] == pytest.approx(effect[False], rel=0.1), effect
