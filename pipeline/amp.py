"""Mixed precision, one choice for every job: `--amp bf16|fp16|off` (GPU only; CPU work always runs fp32)."""
from __future__ import annotations

from contextlib import nullcontext

from .errors import UsageError

AMP_CHOICES = ("bf16", "fp16", "off")


def autocast(device, amp: str):
    """The autocast context for a torch device and an --amp choice; a no-op off CUDA or with 'off'."""
    import torch

    if amp not in AMP_CHOICES:
        raise UsageError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    if device.type != "cuda" or amp == "off":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
