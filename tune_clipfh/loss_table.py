"""The losses of both stages as one table: a new loss is one row here (plus its function in
:mod:`.losses` and its knobs in the config schema).

Each row names its history column, the knob that switches it on, the knob that weighs it and the
function that computes it from a :class:`LossInputs`. The image epoch sums the active rows, the
config's consistency check refuses a stage with no active row, and the report's history columns
and loss figure are built from the same rows.

A row's function returns the unweighted loss; the trainer multiplies by the weight knob, so the
logged column is the weighted term that enters the total.

A stateful row (the centre loss) also owns parameters: ``state`` builds the module that holds
them, which the model keeps as a part named after the row (so checkpoints save it) and the row's
function finds in ``LossInputs.states``. They train with an SGD of their own at the rate of the
``state_lr`` knob, stepped when the ``state_updates`` knob allows, after ``rescale_state_grads``
(given the row's weight) has adjusted their gradients. The model, the optimizer factory and the
trainer read these fields; none of them names a loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import losses


@dataclass
class LossInputs:
    """What one batch offers the loss functions (fp32 tensors; see the trainer)."""

    config: Any  # RunConfig: kept untyped so this module does not import the schema
    labels: Any
    logit_scale: float
    features: Any = None  # stage 2: image features before the BNNeck
    bn_features: Any = None  # stage 2: after the BNNeck
    logits: Any = None  # stage 2: ID-head logits
    identity_text: Any = None  # stage 2: [identities, dim] text feature of every identity
    states: Any = None  # row name -> the module holding a stateful row's parameters
    image: Any = None  # stage 1: cached image features
    text: Any = None  # stage 1: prompt text features


@dataclass(frozen=True)
class LossTerm:
    name: str
    stage: str  # "prompt" | "image"
    toggle: str  # RunConfig bool knob
    weight: str  # RunConfig float knob
    function: Callable[[LossInputs], Any]
    title: str  # how reports name it
    needs_prompt_stage: bool = False  # compares with learnt prompts, so needs stage 1
    state: Callable[[int, int], Any] | None = None
    """A stateful row's parameters: (identity count, feature dim) -> the nn.Module holding
    them. Built for every run, active or not, so the model's parts and its random stream do
    not depend on the toggles."""
    state_lr: str | None = None  # RunConfig float knob: the rate of its parameters' own SGD
    state_updates: str | None = None  # RunConfig bool knob: step its parameters (None: always)
    rescale_state_grads: Callable[[Any, float], None] | None = None
    """(its module, its weight) -> adjusts the parameters' gradients before they step."""

    def __post_init__(self):
        if (self.state is None) != (self.state_lr is None):
            raise ValueError(f"loss row {self.name!r}: a row with state needs state_lr (the "
                             f"knob of its rate), and only such a row takes one")

    @property
    def column(self) -> str:
        return f"loss_{self.name}" if self.stage == "image" else f"prompt_loss_{self.name}"

    def active(self, config: Any) -> bool:
        if not getattr(config, self.toggle):
            return False
        return not self.needs_prompt_stage or config.stage_mode == "prompt_then_image"

    def updates_state(self, config: Any) -> bool:
        return self.state_updates is None or bool(getattr(config, self.state_updates))


def _supcon(x: LossInputs, anchors: Any, contrasts: Any) -> Any:
    return losses.supcon_loss(anchors, contrasts, x.labels, x.labels, x.logit_scale,
                              exclude_own_pair=x.config.supcon_exclude_own_pair)


LOSS_TABLE: tuple[LossTerm, ...] = (
    LossTerm("i2t", "prompt", "loss_use_supcon", "weight_supcon",
             lambda x: _supcon(x, x.image, x.text), "SupCon image-to-text"),
    LossTerm("t2i", "prompt", "loss_use_supcon", "weight_supcon",
             lambda x: _supcon(x, x.text, x.image), "SupCon text-to-image"),
    LossTerm("id", "image", "loss_use_id", "weight_id",
             lambda x: losses.id_loss(x.logits, x.labels, x.config.label_smoothing),
             "ID (linear or ArcFace head)"),
    LossTerm("triplet", "image", "loss_use_triplet", "weight_triplet",
             lambda x: losses.batch_hard_triplet(x.features, x.labels, x.config.triplet_margin),
             "triplet"),
    LossTerm("center", "image", "loss_use_center", "center_loss_weight",
             lambda x: x.states["center"](x.bn_features, x.labels), "center",
             state=losses.CenterLoss, state_lr="center_lr", state_updates="update_centers",
             rescale_state_grads=losses.rescale_center_grads),
    LossTerm("i2t", "image", "loss_use_i2t", "weight_i2t",
             lambda x: losses.image_to_text_ce(x.features, x.identity_text, x.labels,
                                               x.logit_scale, x.config.label_smoothing),
             "image-to-text", needs_prompt_stage=True),
)


def stage_terms(stage: str) -> tuple[LossTerm, ...]:
    return tuple(term for term in LOSS_TABLE if term.stage == stage)


def active_terms(config: Any, stage: str) -> tuple[LossTerm, ...]:
    return tuple(term for term in stage_terms(stage) if term.active(config))


def stateful_terms() -> tuple[LossTerm, ...]:
    """The rows with parameters of their own, in table order (the model builds them so)."""
    return tuple(term for term in LOSS_TABLE if term.state is not None)


def weighted_terms(config: Any, stage: str, inputs: LossInputs) -> dict[str, Any]:
    """Column -> weight x loss for every active term of a stage."""
    return {term.column: getattr(config, term.weight) * term.function(inputs)
            for term in active_terms(config, stage)}


TOTAL_COLUMNS = {"prompt": "prompt_loss", "image": "loss_total"}
"""The summed loss of each stage's epoch, beside the per-term columns."""


def loss_columns() -> list[tuple[str, str, str]]:
    """(column, title, stage) of every loss an epoch row can hold: each stage's total, then
    its terms, image stage first (what the report plots, one panel each)."""
    columns = []
    for stage in ("image", "prompt"):
        columns.append((TOTAL_COLUMNS[stage], f"total ({stage} stage)", stage))
        columns += [(term.column, term.title, stage) for term in stage_terms(stage)]
    return columns
