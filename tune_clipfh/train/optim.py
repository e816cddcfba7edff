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
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..loss_table import LossTerm, active_terms
from ..names import OPTIMIZERS, SCHEDULES
from .parts import ReIDModel
from .precision import Precision
from .upstream_schedules import UpstreamSchedules


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


@dataclass
class StageOptimization:
    """What one stage steps: its optimizer, its schedule and the SGD of its active stateful
    loss rows (the centres), one group per row at the rate of the row's ``state_lr`` knob."""

    stage: str
    optimizer: torch.optim.Optimizer
    schedule: Any  # StageSchedule, or a stage's view of UpstreamSchedules
    state_optimizer: torch.optim.Optimizer | None
    states: dict[LossTerm, nn.Module]  # the stage's active stateful rows and their modules

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.state_optimizer is not None:
            self.state_optimizer.zero_grad(set_to_none=True)

    def ready_state_step(self, config: RunConfig, precision: Precision,
                         ) -> list[torch.optim.Optimizer]:
        """The stateful rows' SGD, ready to step after ``backward``: true gradients, each row's
        rescale applied, the rows that may not update (``state_updates``) left out. Empty when
        no row updates."""
        updating = [term for term in self.states if term.updates_state(config)]
        if self.state_optimizer is None or not updating:
            return []
        for term, module in self.states.items():
            if term not in updating:
                module.zero_grad(set_to_none=True)  # a parameter without gradient stays put
        precision.unscale(self.state_optimizer)
        for term in updating:
            if term.rescale_state_grads is not None:
                term.rescale_state_grads(self.states[term], getattr(config, term.weight))
        return [self.state_optimizer]

    def state_dict(self, precision: Precision) -> dict[str, Any]:
        return {"stage": self.stage, "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                # "center": the key predates other stateful rows; old checkpoints keep loading
                "center": (self.state_optimizer.state_dict()
                           if self.state_optimizer is not None else None),
                "scaler": precision.state_dict()}

    def load_state_dict(self, state: dict[str, Any], precision: Precision) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state["center"] is not None and self.state_optimizer is not None:
            self.state_optimizer.load_state_dict(state["center"])
        precision.load_state_dict(state.get("scaler"))


class OptimizerFactory:
    """Builds each stage's optimizer and schedule when the stage begins.

    Correct mode: a fresh optimizer over the stage's trainable groups, each group at its own
    rate, and a fresh schedule whose horizon is the stage's own steps (B8). The as-run switch
    ``shared_optimizer_across_stages`` keeps one optimizer over every group for both stages
    (B8e), with either a fresh per-stage cosine or one of upstream's scheduler call patterns.
    """

    def __init__(self, config: RunConfig, model: ReIDModel):
        self.config = config
        self.model = model
        self.shared: torch.optim.Optimizer | None = None
        self.upstream: UpstreamSchedules | None = None

    def _group(self, name: str, params) -> ParamGroup:
        return ParamGroup(name, list(params), self.config.group_lr(name),
                          self.config.group_weight_decay(name))

    def _optional_groups(self) -> list[ParamGroup]:
        groups = []
        if self.config.heads_trainable:  # upstream left the heads out of the optimizer (B5)
            groups.append(self._group("head", self.model.head_parameters()))
        if not self.config.freeze_text_encoder:
            groups.append(self._group("text", self.model.text_parameters()))
        return groups

    def _states(self, stage: str) -> tuple[dict[LossTerm, nn.Module], torch.optim.Optimizer | None]:
        """The stage's active stateful loss rows with their modules, and their own SGD."""
        loss_states = self.model.loss_states()
        states = {term: loss_states[term.name] for term in active_terms(self.config, stage)
                  if term.state is not None}
        if not states:
            return states, None
        return states, torch.optim.SGD([
            {"params": list(module.parameters()), "lr": getattr(self.config, term.state_lr)}
            for term, module in states.items()])

    def for_stage(self, stage: str, batches_per_epoch: int) -> StageOptimization:
        cfg = self.config
        states, state_optimizer = self._states(stage)
        if cfg.shared_optimizer_across_stages:
            optimizer, schedule = self._shared_for_stage(stage, batches_per_epoch)
            return StageOptimization(stage, optimizer, schedule, state_optimizer, states)
        if stage == "prompt":
            groups = [self._group("prompt", self.model.prompts.parameters())]
            if not cfg.freeze_text_encoder:
                groups.append(self._group("text", self.model.text_parameters()))
            optimizer = build_optimizer(cfg.prompt_optimizer, groups)
            spec = ScheduleSpec(kind="cosine", eta_min=cfg.eta_min,
                                warmup_epochs=cfg.prompt_warmup_epochs,
                                warmup_start_factor=cfg.warmup_start_factor)
            epochs = cfg.epochs_prompt
        else:
            visual = [p for p in self.model.backbone.clip.visual.parameters() if p.requires_grad]
            groups = [self._group("visual", visual), *self._optional_groups()]
            if not cfg.freeze_prompt:
                groups.append(self._group("prompt", self.model.prompts.parameters()))
            optimizer = build_optimizer(cfg.optimizer, groups)
            spec = ScheduleSpec(
                kind=cfg.scheduler,
                # OneCycle is defined over optimizer steps
                per_batch=cfg.scheduler_step == "batch" or cfg.scheduler == "onecycle",
                eta_min=cfg.eta_min, warmup_epochs=cfg.warmup_epochs,
                warmup_start_factor=cfg.warmup_start_factor,
                onecycle_pct_start=cfg.onecycle_pct_start,
                onecycle_div_factor=cfg.onecycle_div_factor,
                step_milestones=tuple(cfg.step_milestones), step_gamma=cfg.step_gamma)
            epochs = cfg.epochs_image
        schedule = StageSchedule(optimizer, spec, epochs, batches_per_epoch)
        return StageOptimization(stage, optimizer, schedule, state_optimizer, states)

    def _shared_for_stage(self, stage: str, batches_per_epoch: int):
        cfg, model = self.config, self.model
        if self.shared is None:
            groups = [self._group("prompt", model.prompts.parameters()),
                      self._group("visual", model.backbone.clip.visual.parameters()),
                      self._group("text", model.text_parameters())]
            if cfg.heads_trainable:
                groups.append(self._group("head", model.head_parameters()))
            self.shared = build_optimizer(cfg.optimizer, groups, only_trainable=False)
            if cfg.schedule_mode != "per_stage":
                self.upstream = UpstreamSchedules(cfg.schedule_mode, self.shared,
                                                  cfg.epochs_prompt, cfg.epochs_image,
                                                  batches_per_epoch, cfg.eta_min)
        if self.upstream is not None:
            return self.shared, self.upstream.for_stage(stage)
        epochs = cfg.epochs_prompt if stage == "prompt" else cfg.epochs_image
        spec = ScheduleSpec(kind="cosine", eta_min=cfg.eta_min)
        return self.shared, StageSchedule(self.shared, spec, epochs, batches_per_epoch)
