"""Experiment defaults shared by the Python API (:mod:`.experiment`) and the CLI.

Ray- and torch-free, so the CLI reads them without loading either.
"""

ASHA = False
"""Whether a search stops trials with ASHA by default. Off: on the tiny RN50 the kept epoch's
validation at image epochs 3, 9 and 15 correlates negatively with the final test Rank-1
(Pearson -0.36, -0.55, -0.49 over 16 trials of the v5 -> tiny_synthetic ablation): the
configurations that end best dip deepest first, so ASHA at these rungs stops the best trials
first (docs/performance.md). ``search --asha`` turns it on."""
ASHA_GRACE = 3
"""ASHA's grace period in image-stage epochs: a search trial runs at least this many."""
ASHA_REDUCTION = 3
"""ASHA's reduction factor: about 1 in this many trials goes on at each rung."""
SAMPLERS = ("tpe", "tpe-univariate", "gp", "random")
"""``--sampler``: multivariate TPE (grouped, constant liar), univariate TPE, Optuna's Gaussian
process, random search."""
SAMPLER = "tpe"
SAMPLER_STARTUP = 0
"""Random trials of the search's own before the sampler models (the warm start counts too)."""
RACE_TOP = 2
RACE_RUNS = 2
RACE_OVER = "val_fold"
"""The search's race: its 2 best configurations by one run get a second run, on another
validation fold of the training identities. Chosen by measurement (docs/performance.md,
"Choosing under noisy validation"): at half the versions' compute it never chose worse than
the best version (regret 0 over 3 search seeds), where no race chose 10 points below it once;
a race over seeds left too little for exploration."""

OBJECTIVES = {"rank1": ["best_val_rank1"], "mAP": ["best_val_mAP"],
              "rank1_expected": ["best_val_rank1_expected"],
              "rank1_at_test_size": ["best_val_rank1_at_test_size"],
              "both": ["best_val_rank1", "best_val_mAP"]}
"""``--objective``: the validation metrics the search maximises, each at the trial's kept (best)
epoch; the first chooses among configurations (:mod:`.selection`). ``rank1_expected`` is Rank-1
averaged over every gallery draw of the validation identities, ``rank1_at_test_size`` the same
read at the test gallery's size (``evaluation.expected_rank1``)."""
OBJECTIVE = "rank1_at_test_size"

STUDY_FILE = "optuna.db"
"""Where a search keeps its Optuna study, in its experiment folder (``dashboard`` opens it)."""
