"""The two-stage CLIP-ReID joint training, done correctly, as plain PyTorch (no Ray here).

Stage 1 (prompt): image and text encoders frozen, image features computed once and cached, only the
per-identity context vectors train, with SupCon image<->text in both directions.
Stage 2 (image): a fresh optimizer and schedule (B8) over the unfrozen image blocks and the heads
(B4, B5); ID (linear or ArcFace) + triplet + center + image-to-all-identities text CE against
the frozen per-identity text features; validation every epoch on held-out TRAINING identities
(B11); early stopping on validation Rank-1; the best weights are deep-copied (B9) and restored
before the 10-split test, which ranks image features only (B12).

The :class:`Trainer` reports each epoch to a callback and exposes ``state_dict`` /
``load_state_dict`` so an adapter (the Ray trainable, the CLI) can checkpoint and resume.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import RunConfig
from ..data.prepared import PreparedData
from ..data.sampler import PKSampler, RandomBatchSampler
from ..data.store import Augment, augment, normalize
from ..evaluation import evaluate_splits, rank_metrics_from_features
from ..losses import (
    CenterLoss,
    batch_hard_triplet,
    id_loss,
    image_to_text_ce,
    rescale_center_grads,
    supcon_loss,
)
from ..model import (
    ClipBackbone,
    LinearHead,
    PromptLearner,
    ReIDHead,
    configure_text_trainable,
    configure_visual_trainable,
    create_backbone,
)
from .optim import ParamGroup, ScheduleSpec, StageSchedule, build_optimizer, group_learning_rates
from .upstream_schedules import UpstreamSchedules

STATUSES = ("completed", "early_stopped", "diverged")


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


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device: cuda requested but no CUDA device is available "
                             "(valid here: auto, cpu)")
        return torch.device("cuda")
    return torch.device("cpu")


def autocast_dtype(config: RunConfig, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only (bf16 where supported); fp32 on CPU."""
    if device.type != "cuda" or config.amp == "off":
        return None
    if config.amp == "fp16":
        return torch.float16
    if config.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


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
        self.amp_dtype = autocast_dtype(config, self.device)
        seed_everything(config.seed)

        self.backbone: ClipBackbone = create_backbone(
            config.model, config.profile, config.resolved_pretrained, cache_dir=config.cache_dir)
        if self.backbone.image_size != data.image_size:
            raise ValueError(f"the data store holds {data.image_size} px images but the "
                             f"{config.profile} {config.model} backbone expects "
                             f"{self.backbone.image_size} px")
        identity_count = len(data.identities)
        self.prompts = PromptLearner(
            self.backbone, identity_count, n_ctx=config.n_ctx, template=config.prompt_template,
            templates=config.prompt_template_list, ctx_init=config.ctx_init,
            aspect=data.manifest.aspect)
        self.head = ReIDHead(self.backbone.embed_dim, identity_count, id_head=config.id_head,
                             arcface_scale=config.arcface_scale,
                             arcface_margin=config.arcface_margin)
        self.center = CenterLoss(identity_count, self.backbone.embed_dim)
        # Upstream v3+ took the ID loss from a linear classifier while ArcFace only logged (B4).
        self.loss_head = LinearHead(self.backbone.embed_dim, identity_count) \
            if config.id_loss_head == "linear" and config.id_head == "arcface" else None
        self.shared_optimizer: torch.optim.Optimizer | None = None
        self.upstream_schedules: UpstreamSchedules | None = None
        for module in (self.backbone, self.prompts, self.head, self.center, self.loss_head):
            if module is None:
                continue
            module.to(self.device)
        if self.device.type == "cuda" and config.model == "rn50":
            self.backbone.to(memory_format=torch.channels_last)
        configure_text_trainable(self.backbone, not config.freeze_text_encoder)
        # Frozen CLIP temperature: the scale CLIP itself compares images and texts at.
        self.logit_scale = float(self.backbone.clip.logit_scale.detach().exp().clamp(max=100))

        self.stage = "prompt" if config.stage_mode != "image_only" else "image"
        self.epoch_done = 0  # epochs finished in the current stage
        self.iteration = 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"rank1": -1.0, "mAP": -1.0, "epoch": None, "state": None}
        self.patience = 0
        self.status: str | None = None
        self.diverged_at: dict[str, Any] | None = None
        self.initial_val: dict[str, float] | None = None
        self._stage_setup: str | None = None
        self._pending_optim_state: dict[str, Any] | None = None
        self.fault = None
        if config.fault_injection:
            kind, place = config.fault_injection.split("@")
            stage, epoch = place.split(":")
            self.fault = (kind, stage, int(epoch))

    # ------------------------------------------------------------------ orchestration
    def run(self, on_epoch: Callable[[EpochRecord], None] | None = None) -> TrainResult:
        """Run (or continue) both stages, then test the best weights on the 10 splits."""
        cfg = self.config
        try:
            if self.initial_val is None:
                self.initial_val = self.validate()
                self.log(f"[val] before training: Rank-1 {self.initial_val['rank1']:.4f} "
                         f"mAP {self.initial_val['mAP']:.4f}")
            if self.stage == "prompt":
                self._run_stage("prompt", cfg.epochs_prompt, self._prompt_epoch, on_epoch)
                if cfg.stage_mode == "prompt_then_image":
                    self._enter_stage("image")
                else:
                    self._enter_stage("done")
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
            test = self.test()
        return TrainResult(status=self.status,
                           epochs_run=self._epochs_run(), best_epoch=self.best["epoch"],
                           best_val={"rank1": self.best["rank1"], "mAP": self.best["mAP"]},
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
        bar = tqdm(total=epochs * self._batches_per_epoch, desc=f"{stage} stage", leave=False,
                   disable=not self.progress, unit="batch", initial=self.epoch_done
                   * self._batches_per_epoch)
        with bar:
            while self.epoch_done < epochs and self.status is None:
                epoch = self.epoch_done + 1
                started = time.perf_counter()
                seed_everything(self.config.seed * 100_003 + self.iteration)
                if self.fault == ("raise", stage, epoch):
                    raise InjectedFault(f"injected fault at {stage} epoch {epoch}")
                metrics = epoch_fn(epoch, bar)
                metrics["epoch_time_s"] = time.perf_counter() - started
                self.epoch_done = epoch
                self.iteration += 1
                record = EpochRecord(stage, epoch, self.iteration, metrics)
                self.history.append({"stage": stage, "epoch": epoch,
                                     "iteration": self.iteration, **metrics})
                self.log(format_epoch_line(record))
                if self.status == "early_stopped":
                    self.log(f"[train] early stop: no better validation Rank-1 for "
                             f"{self.patience} epochs (best {self.best['rank1']:.4f} at epoch "
                             f"{self.best['epoch']})")
                if on_epoch is not None:
                    on_epoch(record)

    # ------------------------------------------------------------------ stage set-up
    def _setup_stage(self, stage: str) -> None:
        if self._stage_setup == stage:
            return
        cfg = self.config
        if stage == "prompt":
            self._cache_prompt_features()
            self.prompts.requires_grad_(True)
            self.prompts.pool = cfg.text_pool_prompt
            self.center_optimizer = None
            if not cfg.shared_optimizer_across_stages:
                groups = [self._group("prompt", self.prompts.parameters()), *self._text_group()]
                self.optimizer = build_optimizer(cfg.prompt_optimizer, groups)
                spec = ScheduleSpec(kind="cosine", eta_min=cfg.eta_min,
                                    warmup_epochs=cfg.prompt_warmup_epochs,
                                    warmup_start_factor=cfg.warmup_start_factor)
                self.schedule = StageSchedule(self.optimizer, spec, cfg.epochs_prompt,
                                              self._batches_per_epoch)
        else:
            configure_visual_trainable(self.backbone, cfg.unfreeze_blocks, cfg.unfreeze_mode)
            self.prompts.requires_grad_(not cfg.freeze_prompt)
            self.prompts.pool = cfg.text_pool_image
            self._sampler = self._make_sampler()
            self._batches_per_epoch = len(self._sampler)
            self.center_optimizer = (torch.optim.SGD(self.center.parameters(), lr=cfg.center_lr)
                                     if cfg.loss_use_center else None)
            self._identity_text = self._identity_text_features()
        if cfg.shared_optimizer_across_stages:
            self._use_shared_optimizer(stage)
        elif stage == "image":
            visual = [p for p in self.backbone.clip.visual.parameters() if p.requires_grad]
            groups = [self._group("visual", visual), *self._head_group(), *self._text_group()]
            if not cfg.freeze_prompt:
                groups.append(self._group("prompt", self.prompts.parameters()))
            self.optimizer = build_optimizer(cfg.optimizer, groups)
            spec = ScheduleSpec(
                kind=cfg.scheduler, per_batch=cfg.scheduler_step == "batch", eta_min=cfg.eta_min,
                warmup_epochs=cfg.warmup_epochs, warmup_start_factor=cfg.warmup_start_factor,
                onecycle_pct_start=cfg.onecycle_pct_start,
                onecycle_div_factor=cfg.onecycle_div_factor,
                step_milestones=tuple(cfg.step_milestones), step_gamma=cfg.step_gamma)
            if cfg.scheduler == "onecycle":
                spec.per_batch = True  # OneCycle is defined over optimizer steps
            self.schedule = StageSchedule(self.optimizer, spec, cfg.epochs_image,
                                          self._batches_per_epoch)
        if self._pending_optim_state is not None and self._pending_optim_state["stage"] == stage:
            self._load_optim_state(self._pending_optim_state)
        self._pending_optim_state = None
        self._stage_setup = stage

    def _group(self, name: str, params) -> ParamGroup:
        return ParamGroup(name, list(params), self.config.group_lr(name),
                          self.config.group_weight_decay(name))

    def _head_group(self) -> list[ParamGroup]:
        if not self.config.heads_trainable:  # upstream left the heads out of the optimizer (B5)
            return []
        heads = list(self.head.parameters())
        if self.loss_head is not None:
            heads += list(self.loss_head.parameters())
        return [self._group("head", heads)]

    def _text_group(self) -> list[ParamGroup]:
        if self.config.freeze_text_encoder:
            return []
        return [self._group("text", self._text_parameters())]

    def _text_parameters(self) -> list[torch.nn.Parameter]:
        return [p for n, p in self.backbone.clip.named_parameters() if not n.startswith("visual.")
                and n != "logit_scale"]

    def _use_shared_optimizer(self, stage: str) -> None:
        """One optimizer for both stages, built once over every group (B8e), with either a
        fresh per-stage schedule or upstream's scheduler call pattern (B8)."""
        cfg = self.config
        if self.shared_optimizer is None:
            groups = [self._group("prompt", self.prompts.parameters()),
                      self._group("visual", self.backbone.clip.visual.parameters()),
                      self._group("text", self._text_parameters()), *self._head_group()]
            self.shared_optimizer = build_optimizer(cfg.optimizer, groups, only_trainable=False)
            if cfg.schedule_mode != "per_stage":
                self.upstream_schedules = UpstreamSchedules(
                    cfg.schedule_mode, self.shared_optimizer, cfg.epochs_prompt,
                    cfg.epochs_image, self._batches_per_epoch, cfg.eta_min)
        self.optimizer = self.shared_optimizer
        if self.upstream_schedules is not None:
            self.schedule = self.upstream_schedules.for_stage(stage)
            return
        epochs = cfg.epochs_prompt if stage == "prompt" else cfg.epochs_image
        spec = ScheduleSpec(kind="cosine", eta_min=cfg.eta_min)
        self.schedule = StageSchedule(self.optimizer, spec, epochs, self._batches_per_epoch)

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
        self.backbone.eval()
        self._prompt_features = self.extract(self.data.train_rows, feature="raw",
                                             normalized=self.config.train_normalize)
        self._prompt_labels = torch.as_tensor(self.data.train_labels, device=self.device)
        self._sampler = self._make_sampler()
        self._batches_per_epoch = len(self._sampler)

    def _prompt_epoch(self, epoch: int, bar) -> dict[str, float]:
        cfg = self.config
        self.prompts.train()
        sums = _Sums()
        self._sampler.set_epoch(self.iteration)
        for batch in self._sampler:
            index = torch.as_tensor(batch, device=self.device)
            image = self._prompt_features[index]
            labels = self._prompt_labels[index]
            with self._autocast():
                text = self.prompts(labels)
            text = text.float()
            own = cfg.supcon_exclude_own_pair
            loss_i2t = supcon_loss(image, text, labels, labels, self.logit_scale,
                                   exclude_own_pair=own)
            loss_t2i = supcon_loss(text, image, labels, labels, self.logit_scale,
                                   exclude_own_pair=own)
            loss = cfg.weight_supcon * (loss_i2t + loss_t2i)
            self._check_finite(loss, "prompt", epoch)
            self._step(loss, self.prompts.parameters())
            sums.add(len(batch), prompt_loss=loss, prompt_loss_i2t=loss_i2t,
                     prompt_loss_t2i=loss_t2i)
            bar.update(1)
        self.schedule.after_epoch()
        metrics = sums.means()
        metrics.update(group_learning_rates(self.optimizer))
        metrics.update(self._val_columns(self.initial_val))
        return metrics

    # ------------------------------------------------------------------ stage 2
    @torch.no_grad()
    def _identity_text_features(self) -> torch.Tensor:
        self.prompts.eval()
        with self._autocast():
            return self.prompts.all_identity_features().float()

    def _image_epoch(self, epoch: int, bar) -> dict[str, float]:
        cfg, data = self.config, self.data
        self.backbone.train()
        self.head.train()
        sums = _Sums()
        generator = torch.Generator().manual_seed(cfg.seed * 7919 + self.iteration)
        aug = Augment(hflip=cfg.aug_hflip, pad_crop=cfg.aug_pad_crop,
                      random_erasing=cfg.aug_random_erasing)
        self._sampler.set_epoch(self.iteration)
        for batch in self._sampler:
            images = augment(normalize(data.store.batch(data.train_rows[batch]),
                                       cfg.train_normalize), aug, generator)
            images = self._to_device(images)
            labels = torch.as_tensor(data.train_labels[batch], device=self.device)
            with self._autocast():
                features = self.backbone.encode_image(images)
                bn_features, logits = self.head(features, labels)
            features, bn_features = features.float(), bn_features.float()
            terms: dict[str, torch.Tensor] = {}
            if cfg.loss_use_id:
                if self.loss_head is not None:
                    logits = self.loss_head(bn_features)
                terms["loss_id"] = cfg.weight_id * id_loss(logits.float(), labels,
                                                           cfg.label_smoothing)
            if cfg.loss_use_triplet:
                terms["loss_triplet"] = cfg.weight_triplet * batch_hard_triplet(
                    features, labels, cfg.triplet_margin)
            if cfg.loss_use_center:
                terms["loss_center"] = cfg.center_loss_weight * self.center(bn_features, labels)
            if cfg.loss_use_i2t and cfg.stage_mode == "prompt_then_image":
                text = self._identity_text if cfg.freeze_prompt else self.prompts(
                    torch.arange(len(data.identities), device=self.device)).float()
                terms["loss_i2t"] = cfg.weight_i2t * image_to_text_ce(
                    features, text, labels, self.logit_scale, cfg.label_smoothing)
            loss = sum(terms.values())
            self._check_finite(loss, "image", epoch)
            self._step(loss, [p for g in self.optimizer.param_groups for p in g["params"]],
                       center=cfg.loss_use_center and cfg.update_centers)
            sums.add(len(batch), loss_total=loss, **terms)
            bar.update(1)
        self.schedule.after_epoch()
        metrics = sums.means()
        metrics.update(group_learning_rates(self.optimizer))
        val = self.validate()
        improved = (val["rank1"], val["mAP"]) > (self.best["rank1"], self.best["mAP"])
        if improved:
            self.best.update(rank1=val["rank1"], mAP=val["mAP"], epoch=epoch,
                             state=self.model_state(copy_tensors=True))
            self.patience = 0
        else:
            self.patience += 1
        metrics.update(self._val_columns(val))
        metrics["is_best"] = float(improved)
        if cfg.early_stop_patience and self.patience >= cfg.early_stop_patience \
                and epoch < cfg.epochs_image:
            self.status = "early_stopped"
        return metrics

    def _val_columns(self, val: dict[str, float] | None) -> dict[str, float]:
        val = val or {}
        best_r1 = max(self.best["rank1"], val.get("rank1", -1.0)) if self.stage == "image" \
            else val.get("rank1", float("nan"))
        best_map = max(self.best["mAP"], val.get("mAP", -1.0)) if self.stage == "image" \
            else val.get("mAP", float("nan"))
        return {"val_rank1": val.get("rank1", float("nan")),
                "val_rank5": val.get("rank5", float("nan")),
                "val_rank10": val.get("rank10", float("nan")),
                "val_mAP": val.get("mAP", float("nan")),
                "best_val_rank1": best_r1, "best_val_mAP": best_map}

    # ------------------------------------------------------------------ shared steps
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.amp_dtype)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        if self.device.type == "cuda" and self.config.model == "rn50":
            images = images.contiguous(memory_format=torch.channels_last)
        return images

    def _check_finite(self, loss: torch.Tensor, stage: str, epoch: int) -> None:
        if self.fault == ("nan", stage, epoch):
            loss = loss * float("nan")
        if not torch.isfinite(loss):
            raise Diverged({"stage": stage, "epoch": epoch, "iteration": self.iteration + 1,
                            "loss": float(loss.detach())})

    def _step(self, loss: torch.Tensor, params, center: bool = False) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.center_optimizer is not None:
            self.center_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.config.max_norm is not None:
            torch.nn.utils.clip_grad_norm_(list(params), self.config.max_norm)
        self.optimizer.step()
        if center and self.center_optimizer is not None:
            # Undo the loss weight on the centres' gradient, then actually step them (B6).
            rescale_center_grads(self.center, self.config.center_loss_weight)
            self.center_optimizer.step()
        self.schedule.after_batch()

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def extract(self, rows: np.ndarray, feature: str | None = None,
                normalized: bool = True) -> torch.Tensor:
        """L2-normalised features of store rows in eval mode: "raw", "pre_bn" or "post_bn";
        ``normalized=False`` feeds [0,1] pixels (upstream train/val inputs, B1)."""
        feature = feature or self.config.eval_feature
        was_training = self.backbone.training
        self.backbone.eval()
        self.head.eval()
        outputs = []
        batch_size = max(self.config.batch_size, 64)
        for start in range(0, len(rows), batch_size):
            batch = self.data.store.batch(rows[start:start + batch_size])
            images = self._to_device(normalize(batch, normalized))
            with self._autocast():
                f = self._embed(images, feature)
                if self.config.eval_flip and feature != "raw":
                    f = (f + self._embed(images.flip(-1), feature)) / 2
            outputs.append(f.float())
        self.backbone.train(was_training)
        features = torch.cat(outputs)
        return F.normalize(features, dim=1)

    def _embed(self, images: torch.Tensor, feature: str) -> torch.Tensor:
        f = self.backbone.encode_image(images)
        if feature == "post_bn":
            f = self.head.bnneck(f.float())
        return f

    def validate(self) -> dict[str, float]:
        """Selection metrics: held-out training identities, or test split 1 (B11 switch)."""
        data, cfg = self.data, self.config
        if cfg.select_on == "test_split0":
            rows, ids, split = data.test_rows, data.test_ids, data.test_splits[0]
        else:
            rows, ids, split = data.val_rows, data.val_ids, data.val_split
        features = self.extract(rows, normalized=cfg.train_normalize).cpu()
        result = rank_metrics_from_features(
            features[split.query], features[split.gallery], ids[split.query],
            ids[split.gallery], metric=cfg.eval_metric, ap=cfg.eval_ap)
        return {k: float(result[k]) for k in ("rank1", "rank5", "rank10", "mAP", "mINP")}

    def test(self) -> dict[str, Any]:
        """The 10-split test: features of every test image extracted once, ranked per split."""
        data, cfg = self.data, self.config
        features = self.extract(data.test_rows).cpu()
        metric = cfg.eval_metric
        if cfg.eval_fusion == "sos_text":
            features, metric = self._fuse_sos_text(features), "dot"
        splits = [(s.query, s.gallery) for s in data.test_splits]
        return evaluate_splits(features, data.test_ids, splits, metric=metric, ap=cfg.eval_ap)

    @torch.no_grad()
    def _fuse_sos_text(self, features: torch.Tensor) -> torch.Tensor:
        """Upstream's test features (B12): (image + SOS text feature) / 2, not re-normalised.
        The SOS output of the causal text transformer is the same for every identity."""
        pool = self.prompts.pool
        self.prompts.pool = "sos"
        text = self.prompts(torch.zeros(1, dtype=torch.long, device=self.device)).float().cpu()
        self.prompts.pool = pool
        return (features + F.normalize(text, dim=1)) / 2

    # ------------------------------------------------------------------ state
    def model_state(self, copy_tensors: bool = False) -> dict[str, dict[str, torch.Tensor]]:
        state = {"backbone": self.backbone.state_dict(), "prompts": self.prompts.state_dict(),
                 "head": self.head.state_dict(), "center": self.center.state_dict()}
        if self.loss_head is not None:
            state["loss_head"] = self.loss_head.state_dict()
        if copy_tensors:  # a real snapshot, not views of the live weights (B9)
            state = {k: {n: t.detach().clone() for n, t in v.items()} for k, v in state.items()}
        return state

    def load_model_state(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.prompts.load_state_dict(state["prompts"])
        self.head.load_state_dict(state["head"])
        self.center.load_state_dict(state["center"])
        if self.loss_head is not None:
            self.loss_head.load_state_dict(state["loss_head"])

    def restore_best(self) -> None:
        if self.best["state"] is not None:
            self.load_model_state(self.best["state"])
            self.log(f"[train] restored the best weights (stage-2 epoch {self.best['epoch']}, "
                     f"val Rank-1 {self.best['rank1']:.4f})")

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run exactly where it is."""
        return {
            "config": self.config.to_dict(),
            "stage": self.stage, "epoch_done": self.epoch_done, "iteration": self.iteration,
            "status": self.status, "patience": self.patience,
            "history": copy.deepcopy(self.history), "initial_val": self.initial_val,
            "best": {k: v for k, v in self.best.items()},
            "model": self.model_state(),
            "optim": self._optim_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def _optim_state(self) -> dict[str, Any] | None:
        if self._stage_setup is None:
            return None
        return {"stage": self._stage_setup, "optimizer": self.optimizer.state_dict(),
                "schedule": self.schedule.state_dict(),
                "center": self.center_optimizer.state_dict() if self.center_optimizer else None}

    def _load_optim_state(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        if state["center"] is not None and self.center_optimizer is not None:
            self.center_optimizer.load_state_dict(state["center"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.load_model_state(state["model"])
        self.stage, self.epoch_done = state["stage"], state["epoch_done"]
        self.iteration, self.status = state["iteration"], state["status"]
        self.patience, self.history = state["patience"], state["history"]
        self.initial_val, self.best = state["initial_val"], dict(state["best"])
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
