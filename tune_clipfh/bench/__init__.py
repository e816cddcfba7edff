"""``tune-clipfh bench``: the performance benchmark.

Every figure is a ratio of two things measured side by side in the same run (the machine may be
shared, so absolute times are noisy); the absolute times are reported too, with the machine.

Lines (``--only 1,3`` selects some):

1. Evaluator: ``rank_metrics`` against a per-query NumPy loop of the standard definition on
   random problems (same results checked), and the extra memory of a 20,000 x 20,000
   evaluation through the batched features path.
2. Tune overhead: one tiny training run as a plain function call and as a single Ray Tune
   trial (Ray start reported apart).
3. Input pipeline: share of an image-stage epoch spent producing batches from the decoded-once
   store, and the store's speed-up over decoding the same batches from JPEG; at 224 px (64
   images, flip + pad-crop + erasing) the host's work per batch on the device path, the batched
   path against the old per-image one on this CPU, and on CUDA only the share of an epoch spent
   waiting for data (:class:`~tune_clipfh.data.loader.BatchLoader` vs one ready batch).
4. Prompt stage: epoch time with the cached image features against re-encoding every epoch.
5. Concurrency: two 1-CPU trials at once against one 2-CPU trial after the other.
6. Memory: peak RSS of one tiny trial and of the Ray driver during a search, and the driver's
   growth per finished trial.
7. Search efficiency: the test Rank-1 of the best version (chosen on validation, over seeds)
   against TPE + ASHA warm-started with the versions (over search seeds), and the search's
   compute against the versions'.
8. CUDA (skipped on CPU): stage-2 training-step images/s at 224 px, batch 64, bf16 AMP vs fp32,
   with model FLOP utilisation; feature-extraction images/s.
9. Learning-rate transfer: the relative weight change per epoch of the full and the tiny image
   towers at one rate, whose ratio each backbone's ``tiny_lr_scale`` in the registry holds.

One module per line returns its rows (:mod:`.evaluator`, :mod:`.tune_overhead`,
:mod:`.input_pipeline`, :mod:`.prompt_cache`, :mod:`.concurrency`, :mod:`.memory`,
:mod:`.search_efficiency`, :mod:`.cuda`, :mod:`.lr_transfer`), all on one shared
:mod:`.harness` (settings, rows and targets, timing, RSS sampling, the run context, table and
JSON); :mod:`.runner` holds the line
registry and :func:`run_bench`, which runs the selected lines (Ray started once, on first need,
with storage in a temporary folder), prints an aligned table and writes JSON.
"""

from __future__ import annotations

from .harness import (
    ALL_LINES,
    FULL,
    LINE_TITLES,
    QUICK,
    RAY_LINES,
    SCHEMA_VERSION,
    Context,
    Row,
    Settings,
    error_row,
    format_table,
    make_row,
    settings_for,
    skipped_row,
)
from .runner import LINES, parse_lines, run_bench

__all__ = [
    "ALL_LINES",
    "FULL",
    "LINES",
    "LINE_TITLES",
    "QUICK",
    "RAY_LINES",
    "SCHEMA_VERSION",
    "Context",
    "Row",
    "Settings",
    "error_row",
    "format_table",
    "make_row",
    "parse_lines",
    "run_bench",
    "settings_for",
    "skipped_row",
]
