"""The two-stage CLIP-ReID joint training, done correctly, as plain PyTorch (no Ray here).

Stage 1 (prompt): image and text encoders frozen, image features computed once and cached, only the
per-identity context vectors train, with SupCon image<->text in both directions.
Stage 2 (image): a fresh optimizer and schedule (B8) over the unfrozen image blocks and the heads
(B4, B5); the losses of :mod:`..loss_table` against the frozen per-identity text features;
validation every epoch on held-out TRAINING identities (B11); early stopping on validation
Rank-1; the best weights are deep-copied (B9) and restored before the 10-split test, which ranks
image features only (B12).

The :class:`Trainer` keeps the epoch loop. It reports each epoch to a callback and exposes
``state_dict`` / ``load_state_dict`` so an adapter (the Ray trainable, the CLI) can checkpoint
and resume. The model parts live in :mod:`.parts`, optimizers and schedules in :mod:`.optim`,
the kept epoch and early stopping in :mod:`.best_epoch`, mixed precision in :mod:`.precision`.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..config import RunConfig
from ..data.loader import BatchLoader
from ..data.prepared import PreparedData
from ..data.sampler import PKSampler, RandomBatchSampler
from ..data.store import Augment
from ..errors import UserError
from ..loss_table import TOTAL_COLUMNS, LossInputs, weighted_terms
from ..model.backbone import configure_visual_trainable
from ..model.registry import backbone_spec
from .best_epoch import BestEpoch
from .evaluate import EXPECTED_METRICS, Evaluator
from .optim import OptimizerFactory, StageOptimization, group_learning_rates
from .parts import ReIDModel
from .precision import Precision, autocast_dtype

RAN_TO_END = ("completed", "early_stopped")  # a diverged run ends before its schedule does


@dataclass
class EpochRecord:
    """One epoch's outcome, as reported to callbacks and written to metrics.jsonl."""

    stage: str  # "prompt" | "image"
    epoch: int  # 1-based within the stage
    iteration: int  # 1-based over both stages
    metrics: dict[str, float]


@dataclass
class TrainResult:
    status: str
    epochs_run: dict[str, int]
    best_epoch: int | None
    best_val: dict[str, float]
    test: dict[str, Any] | None
    diverged_at: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class InjectedFault(RuntimeError):
    """Raised by ``fault_injection: raise@STAGE:EPOCH`` (fault-tolerance tests)."""


class Diverged(Exception):
    """A non-finite loss: the run stops at once with status ``diverged``."""

    def __init__(self, where: dict[str, Any]):
        super().__init__(f"non-finite loss at {where}")
        self.where = where


class DeviceUnavailable(UserError):
    """A run that asks for a device this process cannot see."""


def pick_device(choice: str) -> torch.device:
    """``cuda`` means CUDA or a clear error, never a silent CPU run."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable("device: cuda requested but this process sees no CUDA device "
                                "(valid here: auto, cpu; in a Ray trial, give it GPUs with "
                                "--gpus-per-trial)")
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


class Trainer:
    """Owns the model parts, the data and the position in the two-stage schedule."""

    def __init__(self, config: RunConfig, data: PreparedData, *, log: Callable[[str], None] = print,
                 progress: bool = True, device: torch.device | None = None):
        self.config = config
        self.data = data
        self.log = log
        self.progress = progress
        self.device = device or pick_device(config.device)
        self.precision = Precision(self.device, autocast_dtype(config.amp, self.device))
        self.channels_last = (self.device.type == "cuda"
                              and backbone_spec(config.model).channels_last)
        if config.select_on == "val" and len(data.val_rows) == 0:
            raise UserError("select_on: val needs validation identities, and the prepared data "
                            "has none (prepare with --val-fraction > 0, or select_on: "
                            "test_split0 for upstream's behaviour, B11)")
        seed_everything(config.seed)

        self.model = ReIDModel(config, len(data.identities), data.manifest.aspect)
        if self.model.backbone.image_size != data.image_size:
            raise ValueError(f"the data store holds {data.image_size} px images but the "
                             f"{config.profile} {config.model} backbone expects "
                             f"{self.model.backbone.image_size} px")
        self.model.to(self.device)
        if self.channels_last:
            self.model.backbone.to(memory_format=torch.channels_last)
        self.loader = BatchLoader(
            data.store, data.train_rows, self.device,
            Augment(hflip=config.aug_hflip, pad_crop=config.aug_pad_crop,
                    random_erasing=config.aug_random_erasing),
            normalize=config.train_normalize, channels_last=self.channels_last,
            generator_seed=config.seed)
        self.evaluator = Evaluator(config, data, self.model, self.loader, self.precision)
        self.optimizers = OptimizerFactory(config, self.model)
        self.sampler = self._make_sampler()
        self.batches_per_epoch = min(len(self.sampler), config.limit_train_batches or math.inf)

        self.stage = "prompt" if config.stage_mode != "image_only" else "image"
        self.epoch_done = 0  # epochs finished in the current stage
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.selection = BestEpoch(config.early_stop_patience, config.epochs_image)
        self.status: str | None = None
        self.diverged_at: dict[str, Any] | None = None
        self.initial_val: dict[str, float] | None = None
        self.optim: StageOptimization | None = None
        self._stage_setup: str | None = None
        self._pending_optim_state: dict[str, Any] | None = None
        self._prompt_features: torch.Tensor | None = None
        self._prompt_labels: torch.Tensor | None = None
        self._identity_text: torch.Tensor | None = None
        self.fault = config.fault  # an adapter may clear it (a crash injected once)

    def model_state(self, copy_tensors: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        return self.model.part_state(copy_tensors)

    # ------------------------------------------------------------------ orchestration
    def run(self, on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainResult:
        """Run (or continue) both stages, then test the best weights on the 10 splits."""
        cfg = self.config
        try:
            if self.initial_val is None:
                self.initial_val = self.evaluator.validate()
                self.log(f"[val] before training: Rank-1 {self.initial_val['rank1']:.4f} "
                         f"mAP {self.initial_val['mAP']:.4f}")
            if self.stage == "prompt":
                self._run_stage("prompt", cfg.epochs_prompt, self._prompt_epoch, on_epoch)
                self._enter_stage("image" if cfg.stage_mode == "prompt_then_image" else "done")
            if self.stage == "image":
                self._run_stage("image", cfg.epochs_image, self._image_epoch, on_epoch)
                self._enter_stage("done")
        except Diverged as exc:
            self.status = "diverged"
            self.diverged_at = exc.where
            self.log(f"[train] diverged: non-finite loss at {exc.where}; stopping this run")
        if self.status is None:
            self.status = "completed"
        test = None
        if self.status != "diverged":
            self.restore_best()
            test = self.evaluator.test()
        best = self.selection.best
        return TrainResult(status=self.status,
                           epochs_run=self._epochs_run(), best_epoch=best["epoch"],
                           best_val={name: best.get(name, math.nan)
                                     for name in ("rank1", "mAP", *EXPECTED_METRICS)},
                           test=test, diverged_at=self.diverged_at, history=self.history)

    def _epochs_run(self) -> dict[str, int]:
        runs: dict[str, int] = {"prompt": 0, "image": 0}
        for row in self.history:
            runs[row["stage"]] = max(runs[row["stage"]], row["epoch"])
        return runs

    def _enter_stage(self, stage: str) -> None:
        self.stage, self.epoch_done = stage, 0
        self._stage_setup = None

    def _run_stage(self, stage: str, epochs: int, epoch_fn, on_epoch) -> None:
        self._setup_stage(stage)
        bar = tqdm(total=epochs * self.batches_per_epoch, desc=f"{stage} stage", leave=False,
                   disable=not self.progress, unit="batch",
                   initial=self.epoch_done * self.batches_per_epoch)
        with bar:
            while self.epoch_done < epochs and self.status is None:
                epoch = self.epoch_done + 1
                started = time.perf_counter()
                seed_everything(self.config.seed * 100_003 + self.iteration)
                if self.fault == ("raise", stage, epoch):
                    raise InjectedFault(f"injected fault at {stage} epoch {epoch}")
                # the rates this epoch trains at (the schedule steps during and after it)
                rates = group_learning_rates(self.optim.optimizer)
                metrics = {**epoch_fn(epoch, bar), **rates}
                metrics["epoch_time_s"] = time.perf_counter() - started
                self.epoch_done = epoch
                self.iteration += 1
                record = EpochRecord(stage, epoch, self.iteration, metrics)
                self.history.append({"stage": stage, "epoch": epoch,
                                     "iteration": self.iteration, **metrics})
                self.log(format_epoch_line(record))
                if self.status == "early_stopped":
                    best = self.selection.best
                    self.log(f"[train] early stop: no better validation Rank-1 for "
                             f"{self.selection.patience} epochs (best {best['rank1']:.4f} at "
                             f"epoch {best['epoch']})")
                if on_epoch is not None:
                    on_epoch(record)

    def _epoch_batches(self):
        """This epoch's batches (seeded by the iteration), capped by ``limit_train_batches``."""
        self.sampler.set_epoch(self.iteration)
        return itertools.islice(self.sampler, self.batches_per_epoch)

    # ------------------------------------------------------------------ stage set-up
    def _setup_stage(self, stage: str) -> None:
        if self._stage_setup == stage:
            return
        cfg, prompts = self.config, self.model.prompts
        if stage == "prompt":
            self._cache_prompt_features()
            prompts.requires_grad_(True)
            prompts.pool = cfg.text_pool_prompt
        else:
            configure_visual_trainable(self.model.backbone, cfg.unfreeze_blocks,
                                       cfg.unfreeze_mode)
            prompts.requires_grad_(not cfg.freeze_prompt)
            prompts.pool = cfg.text_pool_image
            self._identity_text = self._identity_text_features()
        self.optim = self.optimizers.for_stage(stage, self.batches_per_epoch)
        pending = self._pending_optim_state
        if pending is not None and pending["stage"] == stage:
            self.optim.load_state_dict(pending, self.precision)
        self._pending_optim_state = None
        self._stage_setup = stage

    def _make_sampler(self):
        """Batches over the training images: P x K identities (B7) or plain random batches."""
        cfg = self.config
        if cfg.sampler == "pk":
            return PKSampler(self.data.train_labels, p=min(cfg.pk_p, len(self.data.identities)),
                             k=cfg.pk_k, seed=cfg.seed)
        return RandomBatchSampler(len(self.data.train_rows), cfg.batch_size, seed=cfg.seed)

    # ------------------------------------------------------------------ stage 1
    @torch.no_grad()
    def _cache_prompt_features(self) -> None:
        """Frozen image features, computed once for every prompt epoch."""
        self.model.backbone.eval()
        self._prompt_features = self.evaluator.extract(
            self.data.train_rows, feature="raw", normalized=self.config.train_normalize)
        self._prompt_labels = torch.as_tensor(self.data.train_labels, device=self.device)

    def _prompt_epoch(self, epoch: int, bar) -> dict[str, float]:
        cfg = self.config
        self.model.prompts.train()
        sums = _Sums()
        for batch in self._epoch_batches():
            index = torch.as_tensor(batch, device=self.device)
            labels = self._prompt_labels[index]
            with self.precision.autocast():
                text = self.model.prompts(labels)
            with self.precision.fp32():
                inputs = LossInputs(cfg, labels, self.model.logit_scale,
                                    image=self._prompt_features[index], text=text.float(),
                                    states=self.model.loss_states())
                terms = weighted_terms(cfg, "prompt", inputs)
                loss = sum(terms.values())
            self._check_finite(loss, "prompt", epoch)
            self._step(loss, self.model.prompts.parameters())
            sums.add(len(batch), **{TOTAL_COLUMNS["prompt"]: loss}, **terms)
            bar.update(1)
        self.optim.schedule.after_epoch()
        return {**sums.means(), **self._val_columns(self.initial_val)}

    # ------------------------------------------------------------------ stage 2
    @torch.no_grad()
    def _identity_text_features(self) -> torch.Tensor:
        self.model.prompts.eval()
        with self.precision.autocast():
            return self.model.prompts.all_identity_features().float()

    def _image_epoch(self, epoch: int, bar) -> dict[str, float]:
        cfg, data, model = self.config, self.data, self.model
        model.backbone.train()
        model.head.train()
        sums = _Sums()
        batches = self.loader.epoch(self._epoch_batches(), seed=cfg.seed * 7919 + self.iteration)
        for images, batch in batches:
            labels = torch.as_tensor(data.train_labels[batch], device=self.device)
            with self.precision.autocast():
                features = model.backbone.encode_image(images)
            with self.precision.fp32():
                features = features.float()
                bn_features, logits = model.head(features, labels)
                text = self._identity_text if cfg.freeze_prompt else model.prompts(
                    torch.arange(len(data.identities), device=self.device)).float()
                inputs = LossInputs(cfg, labels, model.logit_scale, features=features,
                                    bn_features=bn_features,
                                    logits=model.id_logits(bn_features, logits),
                                    identity_text=text, states=model.loss_states())
                terms = weighted_terms(cfg, "image", inputs)
                loss = sum(terms.values())
            self._check_finite(loss, "image", epoch)
            self._step(loss, [p for g in self.optim.optimizer.param_groups for p in g["params"]])
            sums.add(len(batch), **{TOTAL_COLUMNS["image"]: loss}, **terms)
            bar.update(1)
        self.optim.schedule.after_epoch()
        metrics = sums.means()
        val = self.evaluator.validate()
        improved = self.selection.observe(epoch, val,
                                          lambda: self.model_state(copy_tensors=True))
        metrics.update(self._val_columns(val))
        metrics["is_best"] = float(improved)
        if self.selection.exhausted(epoch):
            self.status = "early_stopped"
        return metrics

    def _val_columns(self, val: dict[str, float] | None) -> dict[str, float]:
        val, best = val or {}, self.selection.best
        nan = float("nan")
        in_image_stage = self.stage == "image"
        best_r1 = max(best["rank1"], val.get("rank1", -1.0)) if in_image_stage \
            else val.get("rank1", nan)
        best_map = max(best["mAP"], val.get("mAP", -1.0)) if in_image_stage \
            else val.get("mAP", nan)
        # the kept epoch's values (before it, the current ones): what a search ranks trials by
        kept = best if in_image_stage and best["epoch"] is not None else val
        return {"val_rank1": val.get("rank1", nan), "val_rank5": val.get("rank5", nan),
                "val_rank10": val.get("rank10", nan), "val_mAP": val.get("mAP", nan),
                **{f"val_{name}": val.get(name, nan) for name in EXPECTED_METRICS},
                "best_val_rank1": best_r1, "best_val_mAP": best_map,
                **{f"best_val_{name}": kept.get(name, nan) for name in EXPECTED_METRICS}}

    # ------------------------------------------------------------------ shared steps
    def _check_finite(self, loss: torch.Tensor, stage: str, epoch: int) -> None:
        if self.fault == ("nan", stage, epoch):
            loss = loss * float("nan")
        if not torch.isfinite(loss):
            raise Diverged({"stage": stage, "epoch": epoch, "iteration": self.iteration + 1,
                            "loss": float(loss.detach())})

    def _step(self, loss: torch.Tensor, params) -> None:
        optim = self.optim
        optim.zero_grad()
        self.precision.backward(loss)
        if self.config.max_norm is not None:
            self.precision.unscale(optim.optimizer)
            torch.nn.utils.clip_grad_norm_(list(params), self.config.max_norm)
        # the stateful loss rows' parameters step too (the centres: their weight undone, B6)
        self.precision.step([optim.optimizer,
                             *optim.ready_state_step(self.config, self.precision)])
        optim.schedule.after_batch()

    # ------------------------------------------------------------------ state
    def restore_best(self) -> None:
        best = self.selection.best
        if best["state"] is not None:
            self.model.load_part_state(best["state"])
            self.log(f"[train] restored the best weights (stage-2 epoch {best['epoch']}, "
                     f"val Rank-1 {best['rank1']:.4f})")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly where it is."""
        selection = self.selection.state_dict()
        optim = (self.optim.state_dict(self.precision)
                 if self._stage_setup is not None and self.optim is not None else None)
        return {
            "config": self.config.to_dict(),
            "stage": self.stage, "epoch_done": self.epoch_done, "iteration": self.iteration,
            "status": self.status, "patience": selection["patience"],
            "history": copy.deepcopy(self.history), "initial_val": self.initial_val,
            "best": selection["best"],
            "model": self.model_state(),
            "optim": optim,
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_part_state(state["model"])
        self.stage, self.epoch_done = state["stage"], state["epoch_done"]
        self.iteration, self.status = state["iteration"], state["status"]
        self.history, self.initial_val = state["history"], state["initial_val"]
        self.selection.load_state_dict(state)
        self._pending_optim_state = state["optim"]
        self._stage_setup = None
        torch.set_rng_state(state["torch_rng"])


class _Sums:
    """Sample-weighted epoch means of loss terms (upstream logged the last batch only: B15)."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.count = 0

    def add(self, n: int, **values: torch.Tensor) -> None:
        self.count += n
        for key, value in values.items():
            self.totals[key] = self.totals.get(key, 0.0) + float(value.detach()) * n

    def means(self) -> dict[str, float]:
        return {k: v / max(1, self.count) for k, v in self.totals.items()}


def format_epoch_line(record: EpochRecord) -> str:
    m = record.metrics
    losses = " ".join(f"{k.removeprefix('loss_').removeprefix('prompt_')}={v:.4f}"
                      for k, v in m.items() if "loss" in k and math.isfinite(v))
    lrs = " ".join(f"{k[3:]}={v:.2e}" for k, v in m.items() if k.startswith("lr_"))
    val = ""
    if record.stage == "image":
        val = f" | val R1 {m['val_rank1']:.4f} mAP {m['val_mAP']:.4f}"
        if m.get("is_best"):
            val += " *"
    return (f"[{record.stage} {record.epoch:3d}] {losses} | lr {lrs}{val} | "
            f"{m['epoch_time_s']:.1f}s")
