"""Optimizers, parameter groups and learning-rate schedules.

Every schedule is one multiplicative factor per parameter group applied to that group's own base
rate, so OneCycle peaks, cosine floors and warm-ups are per group (upstream bug B8 shared one
``max_lr`` across groups). A schedule's horizon is counted in the unit it is stepped in: epochs,
or epochs x batches when stepped per batch (upstream stepped a 30-"epoch" cosine per batch).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "step", "constant")


@dataclass
class ParamGroup:
    name: str
    params: list[nn.Parameter]
    lr: float
    weight_decay: float


def build_optimizer(kind: str, groups: Iterable[ParamGroup],
                    only_trainable: bool = True) -> torch.optim.Optimizer:
    """One optimizer over named groups; groups without parameters are dropped.

    ``only_trainable=False`` keeps frozen parameters too (upstream built one optimizer over
    every parameter before freezing; frozen ones simply never get a gradient).
    """
    torch_groups = [
        {"params": [p for p in g.params if p.requires_grad or not only_trainable], "lr": g.lr,
         "weight_decay": g.weight_decay, "name": g.name}
        for g in groups
    ]
    torch_groups = [g for g in torch_groups if g["params"]]
    if not torch_groups:
        raise ValueError("no trainable parameters for the optimizer")
    if kind == "adam":
        return torch.optim.Adam(torch_groups)
    if kind == "adamw":
        return torch.optim.AdamW(torch_groups)
    if kind == "sgd":
        return torch.optim.SGD(torch_groups, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer {kind!r} is not valid (valid: {', '.join(OPTIMIZERS)})")


@dataclass
class ScheduleSpec:
    kind: str = "cosine"
    per_batch: bool = False
    eta_min: float = 0.0
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.1
    onecycle_pct_start: float = 0.1
    onecycle_div_factor: float = 25.0
    step_milestones: tuple[int, ...] = ()
    step_gamma: float = 0.1


def lr_factor(spec: ScheduleSpec, step: int, total: int, per_epoch_steps: int,
              base_lr: float) -> float:
    """Multiplier of ``base_lr`` after ``step`` scheduler steps out of ``total``."""
    unit = per_epoch_steps if spec.per_batch else 1
    if spec.kind == "onecycle":
        # Per-group OneCycle (cos anneal, no momentum cycling): base / div -> base -> ~0.
        rise = max(1, round(spec.onecycle_pct_start * total))
        start, end = 1.0 / spec.onecycle_div_factor, 1.0 / (spec.onecycle_div_factor * 1e4)
        if step <= rise:
            return _cos_interp(start, 1.0, step / rise)
        return _cos_interp(1.0, end, min(1.0, (step - rise) / max(1, total - rise)))
    warmup = round(spec.warmup_epochs * unit)
    if step < warmup:
        return spec.warmup_start_factor + (1 - spec.warmup_start_factor) * step / warmup
    if spec.kind == "constant":
        return 1.0
    if spec.kind == "step":
        epoch = step / unit
        return spec.step_gamma ** sum(epoch >= m for m in spec.step_milestones)
    if spec.kind == "cosine":
        floor = min(1.0, spec.eta_min / base_lr) if base_lr > 0 else 0.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"scheduler {spec.kind!r} is not valid (valid: {', '.join(SCHEDULES)})")


def _cos_interp(start: float, end: float, fraction: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * fraction))


class StageSchedule:
    """A LambdaLR that knows whether it steps per batch or per epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, spec: ScheduleSpec, epochs: int,
                 batches_per_epoch: int):
        self.spec = spec
        total = epochs * batches_per_epoch if spec.per_batch else epochs
        factors: list[Callable[[int], float]] = [
            _bind(spec, total, batches_per_epoch, group["lr"]) for group in optimizer.param_groups
        ]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factors)

    def after_batch(self) -> None:
        if self.spec.per_batch:
            self.scheduler.step()

    def after_epoch(self) -> None:
        if not self.spec.per_batch:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {"last_epoch": self.scheduler.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        # Recompute each group's rate at the saved position (the factors are pure functions).
        self.scheduler.last_epoch = state["last_epoch"]
        for group, base, factor in zip(self.scheduler.optimizer.param_groups,
                                       self.scheduler.base_lrs, self.scheduler.lr_lambdas,
                                       strict=True):
            group["lr"] = base * factor(state["last_epoch"])


def _bind(spec: ScheduleSpec, total: int, per_epoch: int, base: float) -> Callable[[int], float]:
    return lambda step: lr_factor(spec, step, total, per_epoch, base)


def group_learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Current rate of every named group, for logs and reports (B8f logged group 0 only)."""
    return {f"lr_{g.get('name', i)}": g["lr"] for i, g in enumerate(optimizer.param_groups)}
