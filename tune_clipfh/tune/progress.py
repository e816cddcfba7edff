"""Driver-side progress: one line per trial epoch and per finished trial, short trial names."""

from __future__ import annotations

import re
import sys

from ray import tune


def trial_label(config: dict) -> str:
    """vitb16-v5-s0, vitb16-v5-as_run-s0, vitb16-v5-as_run-B6 update_centers-s0, or search."""
    fixed = config.get("fixed") or {}
    if not fixed:
        return "search"
    variant = fixed.get("ablation") or ("as_run" if fixed.get("behaviour") == "as_run" else "")
    parts = [fixed.get("backbone"), fixed.get("version"), variant, f"s{config.get('seed', 0)}"]
    return "-".join(str(p) for p in parts if p)


def trial_folder_name(trial) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", trial_label(trial.config))
    return f"{safe}-{trial.trial_id}"


class TrialProgress(tune.Callback):
    """Prints what each trial reports, so long experiments show where they are."""

    def __init__(self, stream=None):
        # sys.stderr is looked up when printing, not kept: Tune pickles its callbacks with the
        # experiment state, and a replaced stderr (pytest's capture, a notebook's stream)
        # cannot be pickled.
        self.stream = stream

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stderr, flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("final"):
            return
        self._print(f"[tune] {trial_folder_name(trial)} {result.get('stage', '?')} epoch "
                    f"{result.get('stage_epoch', '?')}: val R1 {result.get('val_rank1', float('nan')):.3f}"
                    f" mAP {result.get('val_mAP', float('nan')):.3f} "
                    f"(best R1 {result.get('best_val_rank1', float('nan')):.3f})")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = result.get("status", "stopped by scheduler") if result.get("final") else \
            "stopped by scheduler"
        test = result.get("test_rank1")
        test_text = f", test R1 {test:.3f} mAP {result.get('test_mAP', float('nan')):.3f}" \
            if test is not None else ""
        self._print(f"[tune] {trial_folder_name(trial)} done: {status}, best val R1 "
                    f"{result.get('best_val_rank1', float('nan')):.3f}{test_text}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._print(f"[tune] {trial_folder_name(trial)} raised an error (see its error.txt); "
                    f"retried from its last checkpoint while failures remain")
