"""The schema of a training run: every knob, typed, with its default, help, bounds and group.

A run is described by one flat mapping of knobs (flat so that YAML files, ``--set key=value``
overrides and Ray Tune parameter spaces all address the same names). Every knob of the upstream
CLIP-FH Stage-2 YAML is accepted under its upstream name; knobs that upstream accepted but never
used are accepted and reported as ignored, with the reason (see ``IGNORED_UPSTREAM_KEYS``).

A knob is one ``knob()`` field of :class:`RunConfig`. Reading YAML, checking values against
this schema and the rules that tie knobs together are :mod:`.config`'s.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal

import yaml

from .model.registry import BACKBONES, PROFILES
from .names import (
    AMP_MODES,
    AP_MODES,
    ASPECTS,
    CTX_PLACEHOLDER,
    DATASETS,
    EVAL_METRICS,
    ID_HEADS,
    OPTIMIZERS,
    SCHEDULE_MODES,
    SCHEDULES,
    TEXT_POOLS,
    UNFREEZE_MODES,
)

BackboneKey = Literal[tuple(BACKBONES)]  # the registry's backbones, whatever it holds
Profile = Literal[PROFILES]

FAULT_PATTERN = re.compile(r"(nan|raise)@(prompt|image):([1-9][0-9]*)")
PRETRAINED_GROUPS = ("visual", "text")
"""Parameter groups that start from pretrained weights (the tiny profile scales their rates)."""

IGNORED_UPSTREAM_KEYS = {
    "loss_list": "upstream built only SupCon from it; each loss is gated by its loss_use_* flag",
    "shuffle": "upstream never read it; batches come from the P x K or random sampler (`sampler`)",
    "pin_memory": "upstream never read it; images live in a decoded uint8 store in memory",
    "num_workers": "images are decoded once into a shared uint8 store, so batches need no workers",
    "input_size": "upstream never read it; the resolution follows the backbone profile "
                  "(224 full, 64 tiny)",
    "save_dir": "a run writes its checkpoints into its own run folder under output_dir",
    "log_dir": "a run writes its logs into its own run folder under output_dir",
    # keys of upstream's other scripts: accepted in any file, reported, then dropped (not knobs)
    "model_path": "the checkpoint an upstream eval file evaluates (experiments/run_eval_clip.py)"
                  "; `tune-clipfh eval --upstream-config FILE` reads it, a run trains from "
                  "`pretrained`",
    "loss": "read only by upstream's archived loss-variant trainer (engine/archived/"
            "finetune_trainer_stage2_loss.py); each loss is gated by its loss_use_* flag",
    "save_path": "upstream's archived loss-variant trainer saved its weights there; a run "
                 "writes its checkpoints into its own run folder under output_dir",
    "log_path": "upstream's archived loss-variant trainer wrote its log there; a run writes its "
                "logs into its own run folder under output_dir",
}

UPSTREAM_RENAMED_KEYS = {
    "epochs": ("epochs_image", "upstream's archived loss-variant trainer (engine/archived/"
               "finetune_trainer_stage2_loss.py) ran `epochs` epochs of image-encoder "
               "fine-tuning and no prompt stage (set stage_mode: image_only to match)"),
}
"""Upstream keys of other scripts that mean one of our knobs: key -> (knob, what it meant)."""


AS_RUN_SWITCHES = {
    "B1 train_normalize": ("train_normalize",),
    "B2/B3 text_pool": ("text_pool_prompt", "text_pool_image"),
    "B4 id_loss_head": ("id_loss_head",),
    "B5 heads_trainable": ("heads_trainable",),
    "B6 update_centers": ("update_centers",),
    "B7 supcon_exclude_own_pair": ("supcon_exclude_own_pair",),
    "B7 sampler": ("sampler", "pk_k"),
    "B8 schedule_mode": ("schedule_mode", "shared_optimizer_across_stages"),
    "B10 text_encoder": ("freeze_text_encoder",),
    "B11 select_on": ("select_on",),
    "B12 eval_fusion": ("eval_fusion",),
    "B13 unfreeze_mode": ("unfreeze_mode", "unfreeze_blocks"),
}
"""Upstream behaviours an ablation switches back to correct one at a time, with the knobs
that make up each (a v* schedule replay needs the shared optimizer, so B8 resets both)."""


def knob(default: Any, help: str, *, choices: tuple | None = None, low: float | None = None,
         high: float | None = None, low_open: bool = False, high_open: bool = False,
         group: str = "run") -> Any:
    """A schema field with its documentation and bounds (closed unless *_open)."""
    meta = {"help": help, "choices": choices, "low": low, "high": high,
            "low_open": low_open, "high_open": high_open, "group": group}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Every knob of one training run (upstream Stage-2 names first, then ours)."""

    # --- identification of the run (upstream) ---
    experiment: str = knob("tiny_synthetic", "run name, used for the run folder")
    dataset: Literal[DATASETS] = knob(
        "11k", "dataset data_dir was prepared from (synthetic data is 11k); a run refuses a "
        "folder prepared from another")
    aspect: Literal[ASPECTS] = knob(
        "dorsal_r", "hand aspect data_dir was prepared for, named in the prompt; a run refuses "
        "an 11k folder of another aspect (not checked for hd, which has none)")
    model: BackboneKey = knob("vitb16", "CLIP backbone (model/registry.py)", group="model")
    variant: str = knob("clipid", "free-form variant tag (upstream naming only)")

    # --- prompt learner (upstream) ---
    n_ctx: int = knob(4, "learnable context tokens per identity", low=1, high=32, group="prompt")
    ctx_init: str | None = knob(None, "phrase whose token embeddings initialise the context",
                                group="prompt")
    prompt_template: str = knob(
        "A photo of a {ctx} {aspect} hand.",
        "prompt template; {ctx} marks the identity's context tokens ({} in upstream files)",
        group="prompt")
    prompt_template_list: list[str] | None = knob(
        None, "extra templates; text features are averaged over them", group="prompt")
    freeze_prompt: bool = knob(True, "stage 2 uses the stage-1 prompts frozen (CLIP-ReID)",
                               group="prompt")
    freeze_text_encoder: bool = knob(True, "keep the CLIP text transformer frozen (B10)",
                                     group="prompt")

    # --- stages (upstream) ---
    stage_mode: Literal["prompt_then_image", "prompt_only", "image_only"] = knob(
        "prompt_then_image", "which stages run", group="schedule")
    epochs_prompt: int = knob(10, "stage-1 epochs", low=0, high=10_000, group="schedule")
    epochs_image: int = knob(10, "stage-2 epochs (maximum)", low=0, high=10_000, group="schedule")
    early_stop_patience: int = knob(
        5, "stage-2 epochs without a better validation Rank-1 before stopping (0: off)",
        low=0, high=10_000, group="schedule")

    # --- learning rates and weight decay (upstream); None falls back to lr / weight_decay ---
    lr: float = knob(1e-4, "default learning rate of every group without its own", low=0,
                     low_open=True, high=10, group="optim")
    lr_visual: float | None = knob(None, "image-encoder learning rate", low=0, low_open=True,
                                   high=10, group="optim")
    lr_prompt: float | None = knob(None, "prompt-context learning rate", low=0, low_open=True,
                                   high=10, group="optim")
    lr_text: float | None = knob(None, "text-encoder learning rate (when trainable)", low=0,
                                 low_open=True, high=10, group="optim")
    lr_head: float | None = knob(None, "BNNeck and ID-head learning rate", low=0,
                                 low_open=True, high=10, group="optim")
    weight_decay: float = knob(5e-4, "default weight decay", low=0, high=1, group="optim")
    weight_decay_visual: float | None = knob(None, "image-encoder weight decay", low=0, high=1,
                                             group="optim")
    weight_decay_prompt: float | None = knob(None, "prompt weight decay", low=0, high=1,
                                             group="optim")
    weight_decay_text: float | None = knob(None, "text-encoder weight decay", low=0, high=1,
                                           group="optim")
    weight_decay_head: float | None = knob(None, "head weight decay", low=0, high=1,
                                           group="optim")
    center_lr: float = knob(0.5, "SGD learning rate of the center-loss centres", low=0,
                            low_open=True, high=100, group="loss")
    center_loss_weight: float = knob(5e-4, "weight of the center loss", low=0, high=100,
                                     group="loss")

    # --- heads and losses (upstream) ---
    use_arcface: bool | None = knob(None, "upstream alias: true selects id_head: arcface",
                                    group="loss")
    arcface_scale: float = knob(30.0, "ArcFace scale s", low=0, low_open=True, high=256,
                                group="loss")
    arcface_margin: float = knob(0.5, "ArcFace additive angular margin m (radians)", low=0,
                                 high=math.pi / 2, high_open=True, group="loss")
    loss_list: list[str] | None = knob(None, "(ignored: see IGNORED_UPSTREAM_KEYS)",
                                       group="loss")
    loss_use_supcon: bool = knob(True, "SupCon image<->text (stage 1) loss", group="loss")
    loss_use_arcface: bool | None = knob(None, "upstream alias: true selects id_head: arcface",
                                         group="loss")
    loss_use_triplet: bool = knob(True, "batch-hard triplet loss (stage 2)", group="loss")
    loss_use_center: bool = knob(False, "center loss (stage 2)", group="loss")
    loss_use_id: bool = knob(True, "ID cross-entropy through the ID head (stage 2)",
                             group="loss")
    loss_use_i2t: bool = knob(True, "stage-2 image-to-all-identities text cross-entropy",
                              group="loss")
    unfreeze_blocks: int = knob(
        2, "train the last N image-tower blocks (ViT resblocks 0..12, RN50 layers 0..4)",
        low=0, group="model")
    unfreeze_mode: Literal[UNFREEZE_MODES] = knob(
        "last_n", "last_n: the last unfreeze_blocks blocks and every layer after them (ViT "
        "ln_post and proj, RN50 attnpool); last_n_blocks: the blocks alone, under a frozen "
        "projection (upstream v6+, B13); all: the whole image tower including the stem "
        "(upstream v1-v5)", group="model")

    # --- data loading (upstream) ---
    batch_size: int = knob(32, "images per stage-2 batch (and stage-1 feature batch)", low=2,
                           high=4096, group="data")
    num_workers: int = knob(0, "(ignored: see IGNORED_UPSTREAM_KEYS)", low=0, high=256,
                            group="data")
    shuffle: bool = knob(True, "(ignored)", group="data")
    pin_memory: bool = knob(False, "(ignored)", group="data")
    input_size: int | None = knob(None, "(ignored)", low=8, high=4096, group="data")
    output_dir: str = knob("runs", "folder that receives the run folder")
    save_dir: str | None = knob(None, "(ignored)")
    log_dir: str | None = knob(None, "(ignored)")

    # --- ours: model ---
    profile: Profile = knob(
        "full", "full: real architectures at 224 px; tiny: small configs at 64 px whose "
        "pretrained towers train at the stated rates x the backbone's tiny_lr_scale",
        group="model")
    pretrained: str = knob(
        "auto", "openai (full) | synthetic (tiny: pretrained on synthetic captioned hands, "
        "shipped or built on first use) | none | path to a local weights file (auto: openai "
        "for full, synthetic for tiny)", group="model")
    id_head: Literal[ID_HEADS] | None = knob(
        None, "ID head after the BNNeck (default linear, or arcface via use_arcface)",
        group="loss")

    # --- ours: optimisation ---
    optimizer: Literal[OPTIMIZERS] = knob("adamw", "stage-2 optimizer", group="optim")
    prompt_optimizer: Literal[OPTIMIZERS] = knob("adam", "stage-1 optimizer", group="optim")
    scheduler: Literal[SCHEDULES] = knob(
        "cosine", "stage-2 learning-rate schedule", group="optim")
    scheduler_step: Literal["epoch", "batch"] = knob(
        "epoch", "step the schedule per epoch or per batch (horizon scales accordingly)",
        group="optim")
    eta_min: float = knob(1e-6, "cosine floor learning rate", low=0, high=10, group="optim")
    warmup_epochs: float = knob(0.0, "linear warm-up length in epochs (cosine, step)", low=0,
                                high=1000, group="optim")
    warmup_start_factor: float = knob(0.1, "warm-up starts at this fraction of each rate",
                                      low=0, low_open=True, high=1, group="optim")
    onecycle_pct_start: float = knob(0.1, "OneCycle share of steps spent rising", low=0,
                                     low_open=True, high=1, high_open=True, group="optim")
    onecycle_div_factor: float = knob(25.0, "OneCycle initial rate = max / div_factor", low=1,
                                      high=1e6, group="optim")
    step_milestones: list[int] = knob([30, 50], "epochs where the step schedule decays",
                                      group="optim")
    step_gamma: float = knob(0.1, "step-schedule decay factor", low=0, low_open=True, high=1,
                             group="optim")
    prompt_warmup_epochs: float = knob(0.0, "stage-1 linear warm-up in epochs", low=0,
                                       high=1000, group="optim")
    max_norm: float | None = knob(None, "gradient clipping max norm (none: off)", low=0,
                                  low_open=True, high=1e6, group="optim")

    # --- ours: loss weights and options ---
    weight_id: float = knob(1.0, "weight of the ID loss", low=0, high=100, group="loss")
    weight_triplet: float = knob(1.0, "weight of the triplet loss", low=0, high=100,
                                 group="loss")
    weight_supcon: float = knob(1.0, "weight of each SupCon direction (stage 1)", low=0,
                                high=100, group="loss")
    weight_i2t: float = knob(1.0, "weight of the stage-2 i2t loss", low=0, high=100,
                             group="loss")
    triplet_margin: float = knob(0.3, "triplet margin", low=0, high=10, group="loss")
    label_smoothing: float = knob(0.0, "label smoothing of the ID and i2t cross-entropies",
                                  low=0, high=1, high_open=True, group="loss")

    # --- ours: sampling and augmentation ---
    sampler: Literal["pk", "random"] = knob("pk", "P x K identity sampler or random batches",
                                            group="data")
    pk_k: int = knob(4, "images per identity in a P x K batch (P = batch_size / K)", low=1,
                     high=1024, group="data")
    aug_hflip: float = knob(
        0.0, "horizontal-flip probability (off by default: a mirrored right hand is a left "
        "hand, an aspect the test never shows)", low=0, high=1, group="data")
    aug_pad_crop: int = knob(0, "pixels of padding before a random crop (0: off)", low=0,
                             high=256, group="data")
    aug_random_erasing: float = knob(0.0, "random-erasing probability", low=0, high=1,
                                     group="data")

    # --- ours: data and evaluation ---
    data_dir: str | None = knob(
        None, "prepared dataset folder (manifest.json); none: the embedded synthetic dataset",
        group="data")
    cache_dir: str | None = knob(None, "decoded-image cache (default ~/.cache/tune-clipfh)",
                                 group="data")
    val_fold: int = knob(
        0, "which training identities validate: 0 the prepared ones; k the k-th other group of "
        "as many training identities, the prepared ones training instead (cross-validation; "
        "selection never uses test identities)", low=0, high=1000, group="data")
    eval_metric: Literal[EVAL_METRICS] = knob("cosine", "retrieval distance", group="eval")
    eval_ap: Literal[AP_MODES] = knob(
        "standard", "AP definition (trapezoid: the MBA-Net variant)", group="eval")
    eval_feature: Literal["pre_bn", "post_bn", "concat"] = knob(
        "pre_bn", "retrieval feature: before or after the BNNeck, or concat (CLIP-ReID: the "
        "pre-projection and the projected feature, each normalised, concatenated)",
        group="eval")
    eval_flip: bool = knob(False, "average features of each image and its mirror",
                           group="eval")

    # --- ours: execution ---
    seed: int = knob(0, "seed for every random stream", low=0, high=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = knob("auto", "auto: cuda when available")
    amp: Literal[AMP_MODES] = knob(
        "auto", "mixed precision of the encoders on CUDA (auto: bf16 on compute capability "
        ">= 8.0, else fp16 with a gradient scaler); heads, losses and logits stay fp32; "
        "always fp32 on CPU")
    limit_train_batches: int | None = knob(
        None, "smoke runs: at most this many batches per epoch in both stages (none: all)",
        low=1, high=10**9, group="schedule")
    checkpoint_every: int = knob(2, "epochs between resumable checkpoints", low=1,
                                 high=10_000)
    checkpoint_min_interval_s: float = knob(
        10.0, "Tune trials: at least this many seconds between checkpoints (sub-second tiny "
        "epochs would otherwise snapshot the experiment constantly)", low=0, high=1e6)

    fault_injection: str | None = knob(
        None, "testing fault tolerance: 'nan@STAGE:EPOCH' makes that epoch's loss NaN, "
        "'raise@STAGE:EPOCH' raises there once (not after a restore); STAGE prompt|image")

    # --- upstream "as-run" behaviour switches: each defaults to the correct behaviour and
    # reproduces one upstream bug when changed (upstream_stage2_spec.md section 6) ---
    train_normalize: bool = knob(
        True, "CLIP-normalise train and validation inputs (false: [0,1] pixels while the test "
        "is normalised, B1)", group="as_run")
    text_pool_prompt: Literal[TEXT_POOLS] = knob(
        "eot", "stage-1 text pooling (upstream: mean over all 77 tokens, B2/B3)", group="as_run")
    text_pool_image: Literal[TEXT_POOLS] = knob(
        "eot", "stage-2 text pooling (upstream: SOS token, a constant vector, B2)",
        group="as_run")
    id_loss_head: Literal["id_head", "linear"] = knob(
        "id_head", "which head's logits enter the ID loss (linear: an extra linear classifier "
        "while the ArcFace head only logs, upstream v3+, B4)", group="as_run")
    heads_trainable: bool = knob(True, "BNNeck and ID heads in the optimizer (false: B5)",
                                 group="as_run")
    update_centers: bool = knob(True, "step the center-loss centres (false: B6)",
                                group="as_run")
    supcon_exclude_own_pair: bool = knob(
        False, "drop the own image-text pair from SupCon positives and denominator (B7)",
        group="as_run")
    schedule_mode: Literal[SCHEDULE_MODES] = knob(
        "per_stage", "per_stage: a fresh schedule per stage; the v* modes replay upstream's "
        "scheduler call patterns on one shared optimizer (B8)", group="as_run")
    shared_optimizer_across_stages: bool = knob(
        False, "one optimizer (prompt, visual, text groups) for both stages (B8e)",
        group="as_run")
    select_on: Literal["val", "test_split0"] = knob(
        "val", "model selection and early stopping on validation or on test split 1 (B11)",
        group="as_run")
    eval_fusion: Literal["none", "sos_text"] = knob(
        "none", "test features: image only, or (image + constant SOS text)/2 ranked by dot "
        "product (B12)", group="as_run")

    # -------------------------------------------------------------------------------------
    @property
    def blocks(self) -> int:
        return BACKBONES[self.model].blocks

    @property
    def pk_p(self) -> int:
        return self.batch_size // self.pk_k

    def stated_lr(self, group: str) -> float:
        """The rate stated for a parameter group (visual, prompt, text, head): its own, else
        the shared ``lr``."""
        value = getattr(self, f"lr_{group}")
        return self.lr if value is None else value

    def group_lr(self, group: str) -> float:
        """Learning rate a parameter group (visual, prompt, text, head) trains at: the stated
        rate, times the backbone's ``tiny_lr_scale`` for the pretrained towers in the tiny
        profile (the prompts and heads start from scratch in both profiles)."""
        rate = self.stated_lr(group)
        if self.profile == "tiny" and group in PRETRAINED_GROUPS:
            return rate * BACKBONES[self.model].tiny_lr_scale
        return rate

    def group_weight_decay(self, group: str) -> float:
        value = getattr(self, f"weight_decay_{group}")
        return self.weight_decay if value is None else value

    @property
    def fault(self) -> tuple[str, str, int] | None:
        """``fault_injection`` parsed: (kind, stage, epoch), or None."""
        if self.fault_injection is None:
            return None
        kind, stage, epoch = FAULT_PATTERN.fullmatch(self.fault_injection).groups()
        return kind, stage, int(epoch)

    @property
    def resolved_pretrained(self) -> str:
        if self.pretrained == "auto":
            return "openai" if self.profile == "full" else "synthetic"
        return self.pretrained

    def template_error(self) -> str | None:
        if self.prompt_template.count(CTX_PLACEHOLDER) != 1:
            return (f"{self.prompt_template!r} must contain the identity placeholder "
                    f"{CTX_PLACEHOLDER} exactly once")
        return None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = {f.name: f for f in fields(RunConfig)}
KNOB_TYPES = typing.get_type_hints(RunConfig)
"""Knob name -> its type annotation, resolved (what loading checks values against)."""
RATE_GROUPS = ("visual", "prompt", "text", "head")
"""The parameter groups with a rate and a weight decay of their own (unset: the shared one)."""
GROUP_KNOBS = tuple(f"{shared}_{group}" for shared in ("lr", "weight_decay")
                    for group in RATE_GROUPS)
NOT_TRAINING_KNOBS = frozenset(
    [name for name, f in FIELDS.items() if f.metadata["group"] == "run"]
    + list(IGNORED_UPSTREAM_KEYS)
    + ["data_dir", "cache_dir", "val_fold", "limit_train_batches", "use_arcface",
       "loss_use_arcface"])
"""Knobs that say where, under which name or seed a run trains, what data it reads, or that
repeat another knob (the ArcFace aliases of ``id_head``): two configurations that differ only
in these train the same way."""


def training_knobs(config: RunConfig) -> dict[str, Any]:
    """What a configuration trains with: every knob but ``NOT_TRAINING_KNOBS``, each group's
    rate and weight decay as in effect (its own, else the shared one) instead of as written."""
    knobs = {name: getattr(config, name) for name in FIELDS
             if name not in NOT_TRAINING_KNOBS and name not in GROUP_KNOBS
             and name not in ("lr", "weight_decay")}
    knobs["pretrained"] = config.resolved_pretrained
    for group in RATE_GROUPS:
        knobs[f"lr_{group}"] = config.stated_lr(group)
        knobs[f"weight_decay_{group}"] = config.group_weight_decay(group)
    return knobs
