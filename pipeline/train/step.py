"""The training step and the settings around it: what is trained (upsampling) and how fast.

- **Upsampling** is frozen at the bilinear kernel by default, as the reference trains: the Caffe
  `voc-fcn8s/net.py` gives every Deconvolution `lr_mult=0`, and the PyTorch port leaves ConvTranspose2d out of its
  optimizer. Frozen means `requires_grad=False`: out of the optimizer and its weight decay, and autograd computes
  no weight gradient for them. `--learn-upsampling` trains them (the paper found both about equal).
- **The optimizer** runs PyTorch's fused kernels: a few kernels per step for all parameters on CUDA, and faster than
  foreach on a CPU too (bench/RESULTS.md, "Training"); `--no-fused-optimizer` runs foreach. Its saved state
  carries the parameter names, and a resume maps the state by name: a checkpoint written with another set of
  trainable parameters (older runs trained the upsamplers; a run may switch `--learn-upsampling`) still loads.
- **cuDNN autotuning** (`torch.backends.cudnn.benchmark`) is on inside the training step only, where the crop and
  batch are fixed; validation runs at every image's native size and would autotune each new size anew.
- **torch.compile** (`--compile MODE`) compiles the model for the training step only, before DDP wraps it (the
  frame then compiles inside DDP's forward, so DDPOptimizer splits the graph at DDP's bucket boundaries and the
  all-reduce still overlaps the backward). Validation and the checkpoint use the uncompiled module: no
  recompilation per validation image size, and state-dict keys without `_orig_mod.`.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn

from models import is_bilinear, upsamplers

from ..amp import autocast
from ..storage import redact
from .config import TrainConfig

FROZEN, LEARNED = "frozen", "learned"


def set_upsampling(model: nn.Module, learn: bool, loaded_from: str | None = None) -> str:
    """Freeze (or, with `learn`, unfreeze) the model's upsamplers; returns the variant as the run reports it.

    Frozen upsamplers that do not hold the bilinear kernel (weights loaded from a run that learned them) stay
    frozen at the loaded values: "frozen (not bilinear: upscore2, upscore8 as loaded from URI)"."""
    layers = upsamplers(model)
    for layer in layers.values():
        for p in layer.parameters():
            p.requires_grad_(learn)
    if learn:
        return LEARNED
    odd = [name for name, layer in layers.items() if not is_bilinear(layer)]
    if not odd:
        return FROZEN
    where = f" as loaded from {redact(loaded_from)}" if loaded_from else ""
    return f"{FROZEN} (not bilinear: {', '.join(odd)}{where})"


def optimizer_impl(cfg: TrainConfig, device: torch.device) -> dict[str, bool]:
    """The optimizer's implementation flags: PyTorch's fused kernels (CUDA and CPU have them) unless
    --no-fused-optimizer, else foreach."""
    if device.type in ("cuda", "cpu") and cfg.fused_optimizer:
        return {"fused": True, "foreach": False}
    return {"fused": False, "foreach": True}


def make_optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """SGD (momentum) or AdamW over the trainable parameters only: frozen upsamplers get neither updates nor decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    impl = optimizer_impl(cfg, device)
    if cfg.optimizer == "adam":  # decoupled weight decay: L2 inside Adam would be rescaled per parameter
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **impl)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **impl)


def param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[list[str]]:
    """The names (as in `model.named_parameters()`) of each parameter group's parameters, in order: saved with
    the optimizer state so that a resume can map it by name."""
    name_of = {id(p): name for name, p in model.named_parameters()}
    return [[name_of[id(p)] for p in group["params"]] for group in optimizer.param_groups]


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, saved: dict,
                         saved_names: list[list[str]] | None, **group_settings) -> tuple[list[str], list[str]]:
    """Load a saved optimizer state into `optimizer` (built over `model`'s trainable parameters), by name.

    `saved_names`: the saved groups' parameter names (`param_names` at save time); None for a state written before
    they were saved, whose one group held every parameter of the model in order. Parameters the saved state has
    but this optimizer does not train are dropped; those it trains but the state lacks start without state
    (momentum zero, fresh Adam moments). `group_settings` (lr, momentum, weight decay, fused/foreach) override the
    saved hyperparameters. Returns (dropped, fresh) parameter names. Raises ValueError when the saved groups do not
    match their names (a state of another model)."""
    if saved_names is None:
        saved_names = [[name for name, _ in model.named_parameters()]]
    groups = saved["param_groups"]
    if len(saved_names) != len(groups) or any(len(n) != len(g["params"]) for n, g in zip(saved_names, groups, strict=True)):
        raise ValueError(f"the saved optimizer state has groups of {[len(g['params']) for g in groups]} parameters, "
                         f"its names {[len(n) for n in saved_names]}: not a state of this model")
    saved_index = {name: idx for names, group in zip(saved_names, groups, strict=True)
                   for name, idx in zip(names, group["params"], strict=True)}
    names = param_names(optimizer, model)
    state, new_groups, fresh, k = {}, [], [], 0
    for g, group_names in enumerate(names):
        ids = []
        for name in group_names:
            idx = saved_index.get(name)
            if idx is not None and idx in saved["state"]:
                state[k] = saved["state"][idx]
            else:
                fresh.append(name)
            ids.append(k)
            k += 1
        source = groups[min(g, len(groups) - 1)]
        new_groups.append({**source, **group_settings, "params": ids})
    wanted = {name for group_names in names for name in group_names}
    dropped = [name for name in saved_index if name not in wanted]
    optimizer.load_state_dict({"state": state, "param_groups": new_groups})
    return dropped, fresh


def describe_state_change(dropped: list[str], fresh: list[str]) -> str:
    """One line on what a resume did to the saved optimizer state (see `load_optimizer_state`)."""
    parts = [f"dropped for {', '.join(dropped)} (not trained in this run)" if dropped else "",
             f"none for {', '.join(fresh)} (not trained before: they start without state)" if fresh else ""]
    return "; ".join(p for p in parts if p)


def step_settings(cfg: TrainConfig, device: torch.device, world: int) -> dict:
    """What the training step runs with, as recorded in every epoch's metrics and the job's summary (plain types:
    the history in train_state.pt is read back with weights_only)."""
    cuda = device.type == "cuda"
    return {"compile": cfg.compile, "cudnn_benchmark": cuda and cfg.cudnn_benchmark,
            "optimizer_impl": "fused" if optimizer_impl(cfg, device)["fused"] else "foreach",
            "channels_last": cuda, "amp": cfg.amp if cuda else "off", "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "world_size": world, "torch": str(torch.__version__),
            "device": torch.cuda.get_device_name(device) if cuda else "cpu"}


@contextmanager
def cudnn_benchmark(enabled: bool) -> Iterator[None]:
    """`torch.backends.cudnn.benchmark` set to `enabled` inside, restored after (the flag is process-wide)."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def compile_for_training(model: nn.Module, mode: str) -> nn.Module:
    """The module the training step calls: `model` itself, or with --compile a compiled wrapper sharing its
    parameters (static shapes: the crop and batch are fixed, the epoch's shorter last batch compiles once more)."""
    if mode == "off":
        return model
    return torch.compile(model, mode=mode, dynamic=False)


class TrainStep:
    """One optimizer step over --grad-accum batches: their gradients are summed locally (DDP's no_sync) and
    all-reduced once, with the loss normalised by the valid pixels of the whole window on all workers, so N
    batches of B equal one batch of N x B. Runs with cuDNN autotuning when `benchmark` (restored after)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, device: torch.device, amp: str = "off",
                 world: int = 1, ddp: bool = False, scaler: torch.amp.GradScaler | None = None,
                 benchmark: bool = False) -> None:
        self.model, self.optimizer, self.device, self.amp = model, optimizer, device, amp
        self.world, self.ddp, self.scaler, self.benchmark = world, ddp, scaler, benchmark
        # Sum over pixels divided by the valid pixels of the *global* batch (all workers): DDP's gradient average
        # then equals one process on the whole batch, even when workers hold different numbers of void pixels.
        self.criterion = nn.CrossEntropyLoss(ignore_index=255, reduction="sum")
        # Summed on the device: reading the loss every step (float(loss)) would synchronise every step.
        self.loss_total = torch.zeros((), dtype=torch.float64, device=device)

    def take_loss(self) -> float:
        """This worker's summed share of the losses since the last call (one host synchronisation)."""
        total = float(self.loss_total)
        self.loss_total.zero_()
        return total

    def __call__(self, window: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> None:
        with cudnn_benchmark(self.benchmark):
            valid = torch.stack([(y != 255).sum() for _, y in window]).sum().to(torch.float64)
            if self.world > 1:
                dist.all_reduce(valid)
            scale = (self.world / valid.clamp_min(1.0)).float()
            for i, (x, y) in enumerate(window):
                # DDP decides in the forward pass whether the backward all-reduces: both go inside no_sync.
                with (self.model.no_sync() if self.ddp and i < len(window) - 1 else nullcontext()):
                    with autocast(self.device, self.amp):
                        loss = self.criterion(self.model(x).float(), y) * scale
                    (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                # Logged loss: this worker's share of the window's global mean, summed over workers by the caller.
                self.loss_total += loss.detach().double() / self.world
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
