"""Mixed precision: which dtype the encoders run in, and the backward step that goes with it.

Only the encoders run under autocast. The BNNeck, the ID/ArcFace heads, every loss and every
logit are computed in fp32 (:meth:`Precision.fp32`): under bf16 the ArcFace margin term
cos(t + m) is off by up to 1.2 logits at s = 35 for target cosines near 1. fp16 has too little
range for gradients, so it comes with a ``GradScaler`` that also covers the stateful losses'
optimizer (the centres').
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch

from ..names import AMP_MODES


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The encoders' autocast dtype: none on CPU or with ``amp: off``; ``auto`` picks bf16 only
    where the card computes it natively (compute capability >= 8.0), else fp16."""
    if amp not in AMP_MODES:
        raise ValueError(f"amp: {amp!r} is not valid (valid: {', '.join(AMP_MODES)})")
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "auto":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.bfloat16 if amp == "bf16" else torch.float16


class Precision:
    """Autocast for the encoders, fp32 for everything after them, and the scaled step."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        self.device = device
        self.dtype = dtype
        self.scaler = (torch.amp.GradScaler(device.type) if dtype == torch.float16 else None)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def fp32(self):
        """Autocast off: heads, losses and logits in full precision."""
        return torch.autocast(device_type=self.device.type, enabled=False)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """True gradients before clipping or rescaling them (a no-op without a scaler)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizers: Iterable[torch.optim.Optimizer]) -> None:
        """Step every optimizer (skipped by the scaler on inf/NaN gradients), then update."""
        for optimizer in optimizers:
            if self.scaler is not None:
                self.scaler.step(optimizer)
            else:
                optimizer.step()
        if self.scaler is not None:
            self.scaler.update()

    def state_dict(self) -> dict | None:
        return None if self.scaler is None else self.scaler.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if self.scaler is not None and state is not None:
            self.scaler.load_state_dict(state)
