"""The names a run chooses among, each list in one place.

Import-free on purpose: ``config.py`` builds its ``Literal`` types from these tuples, and the
modules that act on a name (data preparation, prompts, heads, optimizers, schedules, the
evaluator, the CLI's choices) check against the same tuple, so a name is added or renamed here
once. The backbones are the registry's (``model/registry.py``), not listed here.
"""

# --- data ---
DATASETS = ("11k", "hd")
ASPECT_PHRASES = {
    "dorsal_r": "dorsal right",
    "dorsal_l": "dorsal left",
    "palmar_r": "palmar right",
    "palmar_l": "palmar left",
}
"""11k Hands' aspects: our key -> its ``aspectOfHand`` value in ``HandInfo.csv``, which is also
how a prompt's ``{aspect}`` reads."""
ASPECTS = tuple(ASPECT_PHRASES)
ASPECTS_OF_HAND = tuple(ASPECT_PHRASES.values())  # HandInfo.csv's aspectOfHand values
CAPTION_FIELDS = ("tone", "view", "ring", "nails", "bracelet", "tilt", "marks")
"""Every field a synthetic image's caption can name, in the order they are written."""
DEFAULT_CAPTION_FIELDS = ("tone", "view", "ring", "nails", "marks")
"""The identity-level fields: the same caption for every image of one hand and aspect."""

# --- model and prompt ---
CTX_PLACEHOLDER = "{ctx}"
"""Where a prompt template puts the identity's learnable context tokens."""
TEXT_POOLS = ("eot", "sos", "mean")
"""Which token's output becomes a text feature (``sos`` and ``mean`` reproduce B2/B3)."""
UNFREEZE_MODES = ("last_n", "last_n_blocks", "all")
ID_HEADS = ("linear", "arcface")

# --- optimisation ---
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "onecycle", "step", "constant")
UPSTREAM_SCHEDULE_MODES = ("v1_single_epoch_cosine", "v2_batch_then_epoch_cosine",
                           "v3_double_onecycle", "v8_cyclic_batch_cosine")
"""Upstream's scheduler call patterns, replayed on one shared optimizer (B8)."""
SCHEDULE_MODES = ("per_stage", *UPSTREAM_SCHEDULE_MODES)
AMP_MODES = ("auto", "off", "bf16", "fp16")

# --- evaluation ---
EVAL_METRICS = ("cosine", "euclidean")
AP_MODES = ("standard", "trapezoid")
