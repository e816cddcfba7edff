"""Upstream's learning-rate schedules, replayed exactly (B8; spec Appendix A).

The thesis built its schedulers on ONE optimizer shared by both stages and stepped them in
patterns that differ from what its reports state. Each mode below constructs torch's own
schedulers in upstream's order and steps them as upstream did, so the traces match the logs
digit for digit; the correct path (``schedule_mode: per_stage``) never uses this module.

| mode | construction | prompt stage | image stage |
|---|---|---|---|
| v1_single_epoch_cosine | one Cosine(T_max=epochs_prompt) | per epoch | same scheduler, per epoch |
| v2_batch_then_epoch_cosine | Cosine(epochs_prompt), Cosine(epochs_image) | first, per batch | second, per epoch |
| v3_double_onecycle | two OneCycle(max(group lr)) back to back | first, per batch | second, per batch |
| v8_cyclic_batch_cosine | Cosine(epochs_prompt), Cosine(epochs_image) | first, per batch | second, per batch |

(The second OneCycle reads the rates the first one already divided by 25, so every group of
both stages peaks at max/25; a Cosine with a T_max in epochs stepped per batch cycles every
2 x T_max batches.)
"""

from __future__ import annotations

import torch
from torch.optim import lr_scheduler

from ..names import UPSTREAM_SCHEDULE_MODES


class _StageStepper:
    """One stage's view of an upstream scheduler: steps it per batch or per epoch."""

    def __init__(self, owner: UpstreamSchedules, scheduler, per_batch: bool):
        self.owner, self.scheduler, self.per_batch = owner, scheduler, per_batch

    def after_batch(self) -> None:
        if self.per_batch:
            self.scheduler.step()

    def after_epoch(self) -> None:
        if not self.per_batch:
            self.scheduler.step()

    def state_dict(self) -> dict:
        return self.owner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.owner.load_state_dict(state)


class UpstreamSchedules:
    """The schedulers of one upstream mode, built at once on the shared optimizer."""

    def __init__(self, mode: str, optimizer: torch.optim.Optimizer, epochs_prompt: int,
                 epochs_image: int, batches_per_epoch: int, eta_min: float):
        if mode not in UPSTREAM_SCHEDULE_MODES:
            raise ValueError(f"schedule_mode {mode!r} is not an upstream mode (valid: "
                             f"{', '.join(UPSTREAM_SCHEDULE_MODES)})")
        cosine = lr_scheduler.CosineAnnealingLR
        if mode == "v1_single_epoch_cosine":
            single = cosine(optimizer, T_max=epochs_prompt, eta_min=eta_min)
            self.schedulers = [single]
            plan = {"prompt": (single, False), "image": (single, False)}
        elif mode == "v3_double_onecycle":
            total = max(epochs_prompt, epochs_image) * batches_per_epoch

            def onecycle():
                return lr_scheduler.OneCycleLR(
                    optimizer, max_lr=max(g["lr"] for g in optimizer.param_groups),
                    total_steps=total, pct_start=0.1, anneal_strategy="cos",
                    cycle_momentum=False)

            first = onecycle()
            second = onecycle()
            self.schedulers = [first, second]
            plan = {"prompt": (first, True), "image": (second, True)}
        else:
            first = cosine(optimizer, T_max=epochs_prompt, eta_min=eta_min)
            second = cosine(optimizer, T_max=epochs_image, eta_min=eta_min)
            self.schedulers = [first, second]
            image_per_batch = mode == "v8_cyclic_batch_cosine"
            plan = {"prompt": (first, True), "image": (second, image_per_batch)}
        self._steppers = {stage: _StageStepper(self, scheduler, per_batch)
                          for stage, (scheduler, per_batch) in plan.items()}

    def for_stage(self, stage: str) -> _StageStepper:
        return self._steppers[stage]

    def state_dict(self) -> dict:
        return {"schedulers": [s.state_dict() for s in self.schedulers]}

    def load_state_dict(self, state: dict) -> None:
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)
