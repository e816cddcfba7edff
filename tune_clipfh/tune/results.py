"""Reading Tune experiments back: one row per trial from Ray's own result API.

Each trial's LAST row is its ``final`` row (test metrics, status, running-best validation
metrics); a trial without one was stopped by the scheduler (``status = stopped_by_scheduler``)
or errored. ``best_val_*`` are running maxima, so the last row holds the best validation epoch's
values (anchors 3.3, pitfall 11).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import ExperimentAnalysis

from .progress import trial_label

SUMMARY_COLUMNS = ["trial_id", "label", "seed", "status", "epoch", "best_val_rank1",
                   "best_val_mAP", "test_rank1", "test_mAP", "time_total_s", "device",
                   "gpu_name"]


def experiment_meta(path: Path) -> dict[str, Any]:
    meta = path / "tune_clipfh_experiment.json"
    return json.loads(meta.read_text()) if meta.is_file() else {}


def load_results(path: str | Path) -> pd.DataFrame:
    """One row per trial: knobs (``config/...``), its last reported metrics (``device`` and
    ``gpu_name`` among them), status, label."""
    analysis = ExperimentAnalysis(str(Path(path).resolve()))
    # a search's trials take the seed of its base knobs unless their config sets one (a race)
    base_seed = (experiment_meta(Path(path)).get("base_knobs") or {}).get("seed", 0)
    rows = []
    for trial in analysis.trials:
        result = dict(trial.last_result or {})
        config = trial.config or {}
        knobs = {**{k: v for k, v in (config.get("fixed") or {}).items()},
                 **{k: v for k, v in config.items() if k != "fixed"}}
        row = {f"config/{k}": v for k, v in knobs.items() if not isinstance(v, (dict, list))}
        row.update({k: v for k, v in result.items() if not isinstance(v, (dict, list))})
        row["trial_id"] = trial.trial_id
        row["label"] = trial_label(config)
        row["kind"] = "fixed" if config.get("fixed") else "search"
        row["seed"] = knobs.get("seed", base_seed)
        row["trial_status"] = trial.status
        row["status"] = trial_outcome(result, errored=trial.status == "ERROR",
                                      ended=trial.status == "TERMINATED")
        rows.append(row)
    return pd.DataFrame(rows)


def trial_outcome(result: dict[str, Any], errored: bool, ended: bool) -> str | None:
    """A trial's status from its last row: the run's own (completed, early_stopped, diverged,
    ...) when it has its final row, else ``errored``, ``stopped_by_scheduler`` (ASHA) or
    ``unfinished``."""
    if result.get("final"):
        return result.get("status")
    return "errored" if errored else ("stopped_by_scheduler" if ended else "unfinished")


def trial_config(path: str | Path, trial_id: str) -> dict[str, Any]:
    """A trial's config as Tune gave it (list values kept, which ``load_results`` leaves out
    of its flat columns)."""
    analysis = ExperimentAnalysis(str(Path(path).resolve()))
    for trial in analysis.trials:
        if trial.trial_id == trial_id:
            return dict(trial.config or {})
    raise KeyError(f"{path}: no trial {trial_id}")


def trial_seconds_per_seed(frame: pd.DataFrame) -> float:
    """The trial-seconds (summed ``time_total_s``) an experiment's trials took per seed."""
    return float(frame["time_total_s"].sum()) / frame["seed"].nunique()


def summarize_experiment(path: str | Path) -> str:
    """A short text table of the experiment's trials, best first."""
    frame = load_results(path)
    if frame.empty:
        return f"{path}: no trials"
    # gpu_name only when some trial ran on a GPU
    present = [c for c in SUMMARY_COLUMNS if c in frame.columns
               and (c != "gpu_name" or frame[c].fillna("").astype(bool).any())]
    table = frame[present].sort_values("best_val_rank1", ascending=False,
                                       na_position="last")
    counts = frame["status"].value_counts().to_dict()
    lines = [f"{len(frame)} trials: " + ", ".join(f"{n} {s}" for s, n in counts.items()),
             table.to_string(index=False, float_format=_fmt)]
    return "\n".join(lines)


def _fmt(value: float) -> str:
    return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.4f}"

