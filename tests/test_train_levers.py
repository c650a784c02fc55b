"""What the training step trains and how fast: frozen upsampling (the reference's), the optimizer's resume by name,
cuDNN autotuning scoped to the training step, torch.compile equal to eager, channels-last end to end.

Unit tests on reduced-width models (no Ray), then real tiny runs of jobs/train.py on the session's local Ray.
"""
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from models import ARCHITECTURES, build_model, is_bilinear, load_checkpoint, upsamplers
from pipeline import storage
from pipeline.synthetic import synthesize_voc
from pipeline.train.config import TrainConfig
from pipeline.train.evaluation import evaluate_rows, to_input
from pipeline.train.step import (
    TrainStep,
    compile_for_training,
    load_optimizer_state,
    make_optimizer,
    param_names,
    set_upsampling,
)
from tests.jobs_util import run_in_process

CPU = torch.device("cpu")


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(data="", storage="", name="t", **kw)


def _tiny(arch: str = "fcn8s", seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(arch, 4, width_mult=1 / 16, padding="same", dropout=dropout)


def _batch(n: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, 4, (n, size, size), generator=g)
    y[:, :3] = 255  # some void pixels
    return x, y


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_upsamplers_stay_out_of_the_optimizer_unless_learned(arch, optimizer):
    model = _tiny(arch)
    ups = {id(p) for layer in upsamplers(model).values() for p in layer.parameters()}
    assert len(ups) == {"fcn32s": 1, "fcn16s": 2}.get(arch, 3)
    assert set_upsampling(model, learn=False) == "frozen"
    opt = make_optimizer(_cfg(optimizer=optimizer), model, CPU)
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters()} - ups  # every other parameter, and no upsampler
    assert all(not p.requires_grad for layer in upsamplers(model).values() for p in layer.parameters())
    assert all(group["fused"] and not group["foreach"] for group in opt.param_groups)  # fused on the CPU too
    opt = make_optimizer(_cfg(optimizer=optimizer, fused_optimizer=False), model, CPU)
    assert all(group["foreach"] and not group["fused"] for group in opt.param_groups)

    assert set_upsampling(model, learn=True) == "learned"
    opt = make_optimizer(_cfg(optimizer=optimizer), model, CPU)
    assert {id(p) for group in opt.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}


def test_frozen_upsamplers_get_no_gradient_and_no_decay():
    model = _tiny()
    set_upsampling(model, learn=False)
    opt = make_optimizer(_cfg(weight_decay=0.1, lr=0.1), model, CPU)
    step = TrainStep(model, opt, device=CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch()
    for _ in range(2):
        # The gradients as the step leaves them before its optimizer step: none for the upsamplers.
        loss = nn.CrossEntropyLoss(ignore_index=255)(model(x), y)
        loss.backward()
        assert all(layer.weight.grad is None for layer in upsamplers(model).values())
        assert model.score_fr.weight.grad is not None and model.conv1_1.weight.grad is not None
        opt.zero_grad(set_to_none=True)
        step([(x, y)], lr=0.1)
    after = model.state_dict()
    for name, layer in upsamplers(model).items():
        assert torch.equal(after[f"{name}.weight"], before[f"{name}.weight"]) and is_bilinear(layer), name
    assert not torch.equal(after["conv1_1.weight"], before["conv1_1.weight"])  # the rest did train


def test_frozen_loaded_upsamplers_that_are_not_bilinear_are_named_with_their_source():
    model = _tiny()
    with torch.no_grad():
        model.upscore8.weight.mul_(1.01)
    variant = set_upsampling(model, learn=False, loaded_from="https://h/stage1.pt?X-Amz-Signature=5ec7e75191a7b0a7")
    assert variant == "frozen (not bilinear: upscore8 as loaded from https://h/stage1.pt?X-Amz-Signature=***)"
    assert not model.upscore8.weight.requires_grad


def _old_optimizer(kind: str, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer as the code before frozen upsampling built it: every parameter, default implementation."""
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adam":
        return torch.optim.AdamW(params, lr=0.01, weight_decay=5e-4)
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def _train_a_little(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    x, y = _batch()
    for _ in range(2):
        nn.CrossEntropyLoss(ignore_index=255)(model(x), y).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_an_old_optimizer_state_with_the_upsamplers_resumes_by_name(kind):
    old_model = _tiny()
    old = _old_optimizer(kind, old_model)
    _train_a_little(old_model, old)
    saved = old.state_dict()
    old_state = {name: old.state[p] for name, p in old_model.named_parameters()}

    model = _tiny()
    model.load_state_dict(old_model.state_dict())
    set_upsampling(model, learn=False)
    opt = make_optimizer(_cfg(optimizer=kind, weight_decay=0.002, momentum=0.8), model, CPU)
    with pytest.raises(ValueError):  # why this is needed: the groups no longer have the same size
        opt.load_state_dict(saved)
    own = {"weight_decay": 0.002, "foreach": False, "fused": True, **({"momentum": 0.8} if kind == "sgd" else {})}
    dropped, fresh = load_optimizer_state(opt, model, saved, None, **own)
    assert sorted(dropped) == sorted(f"{n}.weight" for n in upsamplers(model)) and fresh == []
    names = dict(model.named_parameters())
    for name in param_names(opt, model)[0]:
        for key, value in old_state[name].items():
            assert torch.equal(opt.state[names[name]][key], value), (name, key)
    group = opt.param_groups[0]
    assert group["weight_decay"] == 0.002 and group["fused"] and group.get("momentum", 0.8) == 0.8
    kept = {name: layer.weight.clone() for name, layer in upsamplers(model).items()}  # trained by the old run
    _train_a_little(model, opt)  # and it steps, leaving the upsamplers as they were
    assert all(torch.equal(layer.weight, kept[name]) for name, layer in upsamplers(model).items())

    # The other way: a frozen run's state (saved with its names) into a run that learns upsampling.
    saved, names_then = opt.state_dict(), param_names(opt, model)
    set_upsampling(model, learn=True)
    learning = make_optimizer(_cfg(optimizer=kind), model, CPU)
    dropped, fresh = load_optimizer_state(learning, model, saved, names_then, foreach=True, fused=False)
    assert dropped == [] and sorted(fresh) == sorted(f"{n}.weight" for n in upsamplers(model))
    _train_a_little(model, learning)
    assert not any(torch.equal(layer.weight, kept[name]) for name, layer in upsamplers(model).items())

    with pytest.raises(ValueError, match="not a state of this model"):
        load_optimizer_state(learning, model, saved, [names_then[0][:-1]])


class FlagProbe(nn.Module):
    """A real model that notes the process-wide cuDNN benchmark flag at every forward pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(torch.backends.cudnn.benchmark)
        return self.model(x)


def _val_row(h: int, w: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {"height": h, "width": w, "image": rng.integers(0, 255, (h, w, 3), dtype=np.uint8).tobytes(),
            "mask": rng.integers(0, 4, (h, w), dtype=np.uint8).tobytes()}


def test_cudnn_benchmark_is_on_in_the_training_step_and_off_in_validation():
    from models import TORCHVISION

    before = torch.backends.cudnn.benchmark
    probe = FlagProbe(_tiny())
    set_upsampling(probe.model, learn=False)
    step = TrainStep(probe, make_optimizer(_cfg(), probe, CPU), device=CPU, benchmark=True)
    try:
        torch.backends.cudnn.benchmark = False
        step([_batch(), _batch(seed=1)], lr=0.01)
        assert probe.seen == [True, True] and torch.backends.cudnn.benchmark is False  # restored after the step
        probe.seen.clear()
        torch.backends.cudnn.benchmark = True  # as a caller might leave it: validation turns it off anyway
        rows = [_val_row(40, 48, 0), _val_row(33, 50, 1), _val_row(40, 48, 2)]
        _, n = evaluate_rows(probe, TORCHVISION, rows, 4, CPU)
        assert n == 3 and probe.seen and not any(probe.seen) and torch.backends.cudnn.benchmark is True
        probe.seen.clear()
        step([_batch()], lr=0.01)
        assert probe.seen == [True] and torch.backends.cudnn.benchmark is True
        no_bench = TrainStep(probe, step.optimizer, device=CPU, benchmark=False)
        probe.seen.clear()
        no_bench([_batch()], lr=0.01)
        assert probe.seen == [False] and torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = before


def _formats(model: nn.Module, x: torch.Tensor) -> dict[str, bool]:
    """Whether each conv, pool and upsampler of a forward pass gets and gives channels-last tensors (a layer that
    gets NCHW still gives channels-last with channels-last weights: it pays a conversion on the way in)."""
    seen = {}

    def note(module, inputs, output, name):
        cl = torch.channels_last
        seen[name] = inputs[0].is_contiguous(memory_format=cl) and output.is_contiguous(memory_format=cl)

    hooks = [m.register_forward_hook(lambda m, i, o, name=name: note(m, i, o, name))
             for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.MaxPool2d))]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("padding", ["same", "reference"])
def test_channels_last_holds_through_every_layer_in_fp32_and_under_bf16_autocast(padding):
    from models import TORCHVISION

    torch.manual_seed(0)
    model = build_model("fcn8s", 4, width_mult=1 / 16, padding=padding).to(memory_format=torch.channels_last)
    images = torch.randint(0, 255, (2, 40, 48, 3), dtype=torch.uint8)
    x = to_input(images, TORCHVISION.normalizer(CPU), CPU, channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert model.conv1_1.weight.is_contiguous(memory_format=torch.channels_last)
    fp32 = _formats(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the GPU path's autocast, with the fp32 head inside
        bf16 = _formats(model, x)
    assert len(fp32) == 13 + 5 + 2 + 3 + 3  # convs, pools, fc6/fc7, score layers, upsamplers
    for seen in (fp32, bf16):
        assert [name for name, ok in seen.items() if not ok] == []


def test_compiled_step_under_ddp_equals_eager_and_saves_plain_keys(tmp_path):
    """torch.compile before DDP (as the job does), one rank on gloo: the frame compiles inside DDP's forward
    (DDPOptimizer), and two SGD steps give the eager weights within rounding. About 40 s on 2 cores (compilation)."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from models import TORCHVISION, checkpoint_bytes, load_checkpoint_bytes

    eager, core = _tiny(seed=3), _tiny(seed=3)
    for m in (eager, core):
        set_upsampling(m, learn=False)
    cfg = _cfg(lr=0.05)
    windows = [[_batch(4, 32, seed=s)] for s in range(2)]
    eager_step = TrainStep(eager, make_optimizer(cfg, eager, CPU), device=CPU)
    for w in windows:
        eager_step(w, lr=0.05)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        compiled = compile_for_training(core, "default")
        assert compiled is not core
        ddp = DistributedDataParallel(compiled)
        step = TrainStep(ddp, make_optimizer(cfg, core, CPU), device=CPU, ddp=True)
        for w in windows:
            step(w, lr=0.05)
    finally:
        dist.destroy_process_group()
    assert step.take_loss() == pytest.approx(eager_step.take_loss(), rel=1e-5)
    w_eager, w_comp = eager.state_dict(), core.state_dict()
    assert list(w_comp) == list(w_eager)  # the core module's keys: no "_orig_mod." or "module." prefix
    for k in w_eager:
        scale = w_eager[k].abs().max().item() + 1e-12
        assert (w_comp[k] - w_eager[k]).abs().max().item() <= 1e-4 * scale, k
    assert not torch.equal(w_comp["score_fr.weight"], _tiny(seed=3).state_dict()["score_fr.weight"])  # it trained
    assert all(is_bilinear(layer) for layer in upsamplers(core).values())
    data = checkpoint_bytes(core, class_names=["a", "b", "c", "d"], convention=TORCHVISION)
    assert load_checkpoint_bytes(data, "mem").model.state_dict().keys() == w_eager.keys()


# ------------------------------------------------------------------------------------ through jobs/train.py

TINY = ["--num-classes", "6", "--width-mult", "0.0625", "--padding", "same", "--optimizer", "adam", "--lr", "0.005",
        "--batch-size", "4", "--crop-size", "32", "--min-scale", "0.75", "--max-scale", "1.5"]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "small")
    synthesize_voc(root, 24, size=(48, 40), seed=4, val_fraction=0.25)
    return root


def _as_written_before_names(epoch_dir: str) -> None:
    """Rewrite train_state.pt as the code before frozen upsampling wrote it (no parameter names: its one group
    held every parameter) and record the new hash in state.json."""
    path = os.path.join(epoch_dir, "train_state.pt")
    state = torch.load(path, weights_only=True)
    del state["param_names"]
    torch.save(state, path)
    data = open(path, "rb").read()
    meta = json.load(open(os.path.join(epoch_dir, "state.json")))
    meta.update(state_bytes=len(data), state_sha256=hashlib.sha256(data).hexdigest())
    json.dump(meta, open(os.path.join(epoch_dir, "state.json"), "w"))


def test_learned_upsampling_moves_the_kernel_and_an_older_run_resumes_frozen(ray_session, small_set, tmp_path, capsys):
    runs = str(tmp_path / "runs")

    def train(name, *extra):
        return run_in_process("train", ["--data", small_set, "--storage", runs, "--name", name, *TINY, *extra], capsys)

    # A default (frozen) run keeps the bilinear kernel bit for bit: checked on test_train.py's two-worker run.
    # Learned, compiled (one worker: compilation takes ~40 s per process on 2 cores).
    learned = train("learned", "--epochs", "1", "--num-workers", "1", "--cpus-per-worker", "1", "--learn-upsampling",
                    "--compile")
    assert learned["upsampling"] == "learned" and learned["train_settings"]["compile"] == "default"
    ck = load_checkpoint(learned["latest_checkpoint"])  # as labeling loads it: plain keys from the uncompiled module
    moved = {name: not is_bilinear(layer) for name, layer in upsamplers(ck.model).items()}
    assert moved == {"upscore2": True, "upscore_pool4": True, "upscore8": True}
    epoch_1 = storage.join(runs, "learned", "epoch_0001")
    saved = torch.load(os.path.join(epoch_1, "train_state.pt"), weights_only=True)
    assert "upscore8.weight" in saved["param_names"][0]

    # Resumed without --learn-upsampling from a state written the old way (every parameter, no names): the
    # loaded upsamplers stay frozen as they are, the summary says so, the others keep their Adam moments.
    _as_written_before_names(epoch_1)
    resumed = train("learned", "--epochs", "2", "--num-workers", "1", "--cpus-per-worker", "1")
    assert resumed["epochs_trained_now"] == [2]
    assert resumed["upsampling"].startswith("frozen (not bilinear: upscore2, upscore_pool4, upscore8 as loaded from ")
    assert resumed["upsampling"].endswith("learned/epoch_0001/model.pt)")
    e1 = load_checkpoint(os.path.join(epoch_1, "model.pt")).model.state_dict()
    e2 = load_checkpoint(resumed["latest_checkpoint"]).model.state_dict()
    for name in ("upscore2", "upscore_pool4", "upscore8"):
        assert torch.equal(e1[f"{name}.weight"], e2[f"{name}.weight"]), name
    assert not torch.equal(e1["score_fr.weight"], e2["score_fr.weight"])
    state2 = torch.load(storage.join(runs, "learned", "epoch_0002", "train_state.pt"), weights_only=True)
    names2 = state2["param_names"][0]
    assert not any(n.startswith("upscore") for n in names2) and len(state2["optimizer"]["state"]) == len(names2)
