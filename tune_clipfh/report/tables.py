"""The report's tables: pure functions from the trials / per-epoch dataframes to dataframes.

Inputs are ``load_results`` rows (one per trial, with ``experiment``, ``backbone`` and
``version`` columns added by ``report.data``) and per-epoch rows from
``ExperimentAnalysis.trial_dataframes`` (with ``experiment`` and ``trial_id``). Metrics arrive
as fractions in [0, 1]; every table and figure shows percent.

CSV files written by ``write_csvs``:

* ``eval_table.csv``: the upstream ``stage2_*_eval_table.csv`` format, ``version,
  split1_R1 ... split10_mAP, final_R1, final_R5, final_R10, final_mAP`` (percent, 2
  decimals, ``final_*`` = mean over splits; ``evaluation.UPSTREAM_COLUMNS``), one row per trial
  (run), then ``backbone, seed, trial_id, experiment`` so runs of one version stay apart.
  ``version`` is ``v1`` .. ``v10`` for fixed trials and ``search-<trial_id>`` for search trials.
* ``train_table.csv``: the upstream ``stage2_*_train_table.csv`` columns ``version, epoch,
  learning_rate, loss_id, loss_triplet, loss_center, loss_i2t, loss_t2i, rank1, rank5, rank10,
  map, is_best``, then ``trial_id, seed, backbone, experiment``; rows grouped by run (never
  mixed, unlike upstream, bug B15). Mapping from what our trials report:

  - rows: the image-stage (stage 2) epochs only, as upstream (one row per validation block);
  - ``epoch``: the image-stage epoch (``stage_epoch``, from 1);
  - ``learning_rate``: ``lr_visual``, the image encoder's rate (upstream logs one rate);
  - ``loss_id``, ``loss_triplet``, ``loss_center``: the epoch means of those losses;
  - ``loss_i2t``: the stage-2 image-to-text loss (``loss_i2t``);
  - ``loss_t2i``: empty: text-to-image exists only as the stage-1 SupCon direction
    (``prompt_loss_t2i``), stage 2 has no t2i term;
  - ``rank1``, ``rank5``, ``rank10``, ``map``: validation metrics in percent, 2 decimals;
  - ``is_best``: ``yes`` when that epoch became the selected (best) one, else ``no``.
* ``configurations.csv``: one row per configuration (a fixed version x backbone over its seeds,
  or a search trial with its race runs, ``race_of``, as its seeds or validation folds): mean
  and std over splits and seeds, best validation (mean over its runs), time, and the devices
  its trials ran on (``device``: ``cpu`` or the GPU's name and the node's card index).
* ``summary.csv``: the summary table (configurations ranked by validation).
* ``versus_thesis.csv``: per version and backbone, ours against the thesis's numbers.
* ``claims.csv``: the summary's claims, signal or seed noise (``report.claims``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..evaluation import UPSTREAM_COLUMNS, upstream_table_row
from ..model.registry import BACKBONES
from ..tune.searcher import RACE_OF
from .reference import (  # noqa: F401  (re-exported: the report's tests read them here)
    THESIS_LABEL,
    load_reference,
    version_number,
    versus_reference,
)

METRICS = ("rank1", "rank5", "rank10", "mAP")
CMC_RANKS = tuple(range(1, 21))
STOPPED_EARLY = ("stopped_by_scheduler", "early_stopped")
NOT_KNOBS = {"version", "backbone", "kind", "thesis_run", "experiment", "data_dir", "cache_dir",
             "output_dir", "seed", "device", "amp", "checkpoint_every",
             "checkpoint_min_interval_s", RACE_OF, "val_fold"}
RACE_COLUMN = f"config/{RACE_OF}"
"""A race run's ``config/race_of``: the trial id of its configuration's first run."""
FOLD_COLUMN = "config/val_fold"
METRIC_NAMES = {"best_val_rank1": "validation Rank-1", "best_val_mAP": "validation mAP"}
TRAIN_COLUMNS = ("version", "epoch", "learning_rate", "loss_id", "loss_triplet", "loss_center",
                 "loss_i2t", "loss_t2i", "rank1", "rank5", "rank10", "map", "is_best")
RUN_COLUMNS = ("trial_id", "seed", "backbone", "experiment")
MINIATURE_COLUMN = "miniature"
"""A trial's backbone's ``miniature`` finding when its experiment ran the tiny profile."""
MECHANICS_ONLY = "mechanics only"


def with_miniature(trials: pd.DataFrame, profile: str | None) -> pd.DataFrame:
    """``trials`` with :data:`MINIATURE_COLUMN`: the registry's finding for a tiny-profile
    experiment's backbones, empty for the full profile (no miniature)."""
    def finding(backbone: object) -> str:
        spec = BACKBONES.get(str(backbone))
        return spec.miniature if profile == "tiny" and spec is not None else ""
    if trials.empty or "backbone" not in trials:
        return trials
    return trials.assign(**{MINIATURE_COLUMN: trials["backbone"].map(finding)})


def marked(label: str, row: pd.Series) -> str:
    """A label of a tiny-profile configuration whose backbone's miniature is mechanics only,
    marked so wherever it is shown."""
    return f"{label} ({MECHANICS_ONLY})" if row.get(MINIATURE_COLUMN) == MECHANICS_ONLY \
        else label


# ---------------------------------------------------------------------------------------------
# Pareto front
# ---------------------------------------------------------------------------------------------


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices (ascending) of the points no other point dominates, maximising both coordinates.

    ``q`` dominates ``p`` when it is at least as good in both and better in one; equal points
    do not dominate each other (both stay). Points with a NaN coordinate are never on the front.
    """
    valid = [(i, float(x), float(y)) for i, (x, y) in enumerate(points)
             if not (math.isnan(float(x)) or math.isnan(float(y)))]
    valid.sort(key=lambda p: (-p[1], -p[2]))
    front: list[int] = []
    best_y = -math.inf  # highest y among points with a strictly larger x
    start = 0
    while start < len(valid):
        end = start
        while end < len(valid) and valid[end][1] == valid[start][1]:
            end += 1
        group_max = valid[start][2]  # sorted by y descending within equal x
        if group_max > best_y:
            front += [i for i, _, y in valid[start:end] if y == group_max]
            best_y = group_max
        start = end
    return sorted(front)


# ---------------------------------------------------------------------------------------------
# Knobs
# ---------------------------------------------------------------------------------------------


def knob_columns(trials: pd.DataFrame) -> list[str]:
    """``config/<knob>`` columns that configure training (not metadata, paths or the seed)."""
    return [c for c in trials.columns if c.startswith("config/")
            and c.split("/", 1)[1] not in NOT_KNOBS]


def varying_knobs(trials: pd.DataFrame) -> list[str]:
    """Knob columns whose value differs between the given trials (missing counts as a value)."""
    columns = []
    for column in knob_columns(trials):
        values = {format_value(v) for v in trials[column]}
        if len(values) > 1:
            columns.append(column)
    return columns


def hover_knobs(trials: pd.DataFrame) -> dict[Any, list[str]]:
    """Per trial index, the knobs worth showing: a search trial's sampled knobs (its whole
    config), a fixed trial's knobs that differ between the fixed trials of its experiment."""
    shown: dict[Any, list[str]] = {}
    for (_, kind), group in trials.groupby([trials["experiment"], trials["kind"]], sort=False):
        if kind == "search":
            for index, row in group.iterrows():
                shown[index] = [c for c in knob_columns(group) if not _missing(row[c])]
        else:
            columns = varying_knobs(group)
            for index in group.index:
                shown[index] = columns
    return shown


def format_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "none"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower()
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3g}"
    return str(value)


IDENTITY_SET_TEXT = {"val_held_out": "train ids minus validation",
                     "upstream_all_train": "all train ids (upstream)"}


def identity_set_text(trials: pd.DataFrame) -> str:
    """Which identities a configuration's trials trained on, with how many."""
    if "identity_set" not in trials:
        return ""
    texts = set()
    for _, row in trials.iterrows():
        if _missing(row.get("identity_set")) or not row["identity_set"]:
            continue
        count = row.get("train_identities")
        texts.add(IDENTITY_SET_TEXT.get(row["identity_set"], row["identity_set"])
                  + ("" if _missing(count) else f" ({int(count)})"))
    return ", ".join(sorted(texts))


def device_text(row: pd.Series) -> str:
    """Where a trial ran: ``cpu``, ``NVIDIA H200 #3`` (the GPU's name, the node's card index
    Ray gave it), ``no device`` (it asked for CUDA and saw none); '' when not recorded."""
    device = row.get("device")
    if _missing(device) or not device:
        return ""
    if device == "none":
        return "no device"
    if not str(device).startswith("cuda"):
        return str(device)
    name = row.get("gpu_name")
    name = str(device) if _missing(name) or not name else str(name)
    ids = row.get("gpu_ids")
    return f"{name} #{ids}" if not _missing(ids) and ids else name


def knob_text(row: pd.Series, columns: Iterable[str], sep: str = "; ") -> str:
    return sep.join(f"{c.split('/', 1)[1]}={format_value(row[c])}" for c in columns)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# ---------------------------------------------------------------------------------------------
# Configurations: seeds pooled
# ---------------------------------------------------------------------------------------------


def configuration_key(row: pd.Series) -> str:
    """A trial's configuration: a version of a backbone (its seeds), or a search trial with
    its race runs."""
    if row.get("kind") == "fixed":
        return f"{row.get('experiment')}/{row.get('backbone')}-{row.get('version')}"
    return f"{row.get('experiment')}/{first_run_id(row)}"


def first_run_id(row: pd.Series) -> str:
    """The trial id of a search trial's configuration's first run (``race_of`` for a race
    run, else its own)."""
    race_of = row.get(RACE_COLUMN)
    return str(row.get("trial_id") if _missing(race_of) else race_of)


def run_name(row: pd.Series) -> str:
    """``v1`` .. ``v10`` for a fixed trial, ``search-<trial_id>`` for a search trial."""
    if row.get("kind") == "fixed" and not _missing(row.get("version")):
        return str(row["version"])
    return f"search-{row.get('trial_id')}"


def configuration_name(row: pd.Series) -> str:
    """``v1`` .. ``v10`` for a version, ``search-<first run's trial id>`` for a search
    configuration (the same for all its runs)."""
    return run_name(row) if row.get("kind") == "fixed" else f"search-{first_run_id(row)}"


def split_count(trials: pd.DataFrame) -> int:
    found = [int(m.group(1)) for c in trials.columns
             if (m := re.fullmatch(r"test_split(\d+)_rank1", c))]
    return max(found, default=0)


def pooled(rows: pd.DataFrame, metric: str, splits: int) -> tuple[float, float]:
    """Mean and std (ddof 1) over every split of every seed, as fractions.

    Without per-split columns: the seeds' means and, for one seed, its own std over splits.
    """
    values = []
    for _, row in rows.iterrows():
        values += [row[c] for i in range(1, splits + 1)
                   if (c := f"test_split{i}_{metric}") in row and not _missing(row[c])]
    if len(values) >= 2:
        return float(np.mean(values)), float(np.std(values, ddof=1))
    means = rows[f"test_{metric}"].dropna() if f"test_{metric}" in rows else pd.Series([])
    if means.empty:
        return math.nan, math.nan
    if len(means) == 1:
        std_column = f"test_{metric}_std"
        std = rows.loc[means.index[0], std_column] if std_column in rows else math.nan
        return float(means.iloc[0]), float(std)
    return float(means.mean()), float(means.std(ddof=1))


def configurations(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration, metrics in percent, test rows pooled over splits and seeds.

    A fixed configuration is (experiment, backbone, version) over its seeds; a search
    configuration is a search trial with its race runs (``configuration_key``), which count as
    its seeds (``folds``: their validation folds, when a race varied the fold). ``tested``
    counts the seeds with test metrics.
    """
    if trials.empty:
        return pd.DataFrame(columns=["key", "label", "kind", "rank1", "mAP"])
    trials = trials.copy()
    trials["key"] = trials.apply(configuration_key, axis=1)
    if RACE_COLUMN in trials:
        # a configuration's first run leads its group: its label and knobs are the group's
        trials = trials.sort_values(RACE_COLUMN, key=lambda race_of: race_of.notna(),
                                    kind="stable")
    knobs = hover_knobs(trials)
    splits = split_count(trials)
    rows = []
    for key, group in trials.groupby("key", sort=False):
        first = group.iloc[0]
        tested = group[group["test_rank1"].notna()] if "test_rank1" in group else group.iloc[:0]
        row: dict[str, Any] = {
            "key": key, "experiment": first["experiment"], "kind": first["kind"],
            "backbone": first.get("backbone"), "version": first.get("version"),
            "label": configuration_name(first),
            "trial_ids": ", ".join(map(str, group["trial_id"])),
            "seeds": ", ".join(str(int(s)) for s in sorted(group["seed"].dropna())),
            "folds": folds_text(group),
            "n_trials": len(group), "tested": len(tested),
            "status": ", ".join(sorted({str(s) for s in group["status"].fillna("unfinished")})),
            "stopped_early": bool(group["status"].isin(STOPPED_EARLY).any()),
            "knobs": knob_text(first, knobs.get(group.index[0], [])),
            "knobs_html": knob_text(first, knobs.get(group.index[0], []), sep="<br>"),
            "time_total_s": float(group["time_total_s"].sum()) if "time_total_s" in group
            else math.nan,
            "device": ", ".join(sorted({text for _, r in group.iterrows()
                                        if (text := device_text(r))})),
            "trained_on": identity_set_text(group),
        }
        for metric in ("rank1", "mAP"):
            column = f"best_val_{metric}"
            row[f"val_{metric}"] = 100 * group[column].mean() if column in group else math.nan
        for metric in METRICS:
            mean, std = pooled(tested, metric, splits) if len(tested) else (math.nan, math.nan)
            row[metric], row[f"{metric}_std"] = 100 * mean, 100 * std
        for rank in CMC_RANKS:
            column = f"test_cmc_{rank}"
            row[f"cmc_{rank}"] = 100 * tested[column].mean() if column in tested else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def folds_text(runs: pd.DataFrame) -> str:
    """The validation folds of a configuration's runs (a race that varied the fold); '' when
    every run validated on the prepared fold, 0."""
    folds = sorted(int(f) for f in runs[FOLD_COLUMN].fillna(0)) if FOLD_COLUMN in runs else []
    return ", ".join(map(str, folds)) if any(folds) else ""


def ranked(configs: pd.DataFrame, metric: str = "val_rank1") -> pd.DataFrame:
    """Configurations best first by a VALIDATION metric (selection never looks at test)."""
    if configs.empty:
        return configs
    order = [metric, "val_mAP"] if metric != "val_mAP" else [metric, "val_rank1"]
    return configs.sort_values(order, ascending=False, na_position="last",
                               kind="stable").reset_index(drop=True)


def summary_table(configs: pd.DataFrame, top: int | None = 10,
                  metric: str = "val_rank1") -> pd.DataFrame:
    """Top configurations: knobs, validation and test metrics (percent), seeds, time."""
    best = ranked(configs, metric)
    if top is not None:
        best = best.head(top)
    return pd.DataFrame({
        "rank": range(1, len(best) + 1),
        "configuration": best.get("label", pd.Series(dtype=str)),
        "kind": best.get("kind"), "backbone": best.get("backbone"),
        "experiment": best.get("experiment"), "trials": best.get("trial_ids"),
        "seeds": best.get("seeds"), "folds": best.get("folds"),
        "status": best.get("status"),
        "val_rank1": best.get("val_rank1"), "val_mAP": best.get("val_mAP"),
        "test_rank1": best.get("rank1"), "test_rank1_std": best.get("rank1_std"),
        "test_mAP": best.get("mAP"), "test_mAP_std": best.get("mAP_std"),
        "test_rank5": best.get("rank5"), "test_rank10": best.get("rank10"),
        "time_total_s": best.get("time_total_s"), "device": best.get("device"),
        "trained_on": best.get("trained_on"), "knobs": best.get("knobs"),
    }).round(2)


# ---------------------------------------------------------------------------------------------
# Optimisation history
# ---------------------------------------------------------------------------------------------


def optimisation_history(trials: pd.DataFrame, history: pd.DataFrame,
                         metric: str = "best_val_rank1") -> pd.DataFrame:
    """One row per trial of a search: its value (percent), best so far by trial number (start
    order) and by cumulative compute time (end order), and whether it was stopped early. Race
    runs count in the compute but not in the best so far (they re-measure a configuration)."""
    if trials.empty or metric not in trials:
        return pd.DataFrame(columns=["trial_id", "number", "value", "best_by_number",
                                     "compute_s", "best_by_time", "stopped_early", "status"])
    frame = trials[["trial_id", metric, "status", "time_total_s"]].copy()
    frame["value"] = 100 * frame[metric]
    # a race run measures a configuration again: it costs compute, but is no new point
    raced = trials[RACE_COLUMN].notna() if RACE_COLUMN in trials else \
        pd.Series(False, index=trials.index)
    frame["explored"] = frame["value"].where(~raced)
    frame["order"] = range(len(frame))
    start, end = {}, {}
    if not history.empty and {"timestamp", "time_total_s"} <= set(history.columns):
        for trial_id, rows in history.groupby("trial_id"):
            stamps = rows["timestamp"].astype(float)
            start[trial_id] = float((stamps - rows["time_total_s"].astype(float)).min())
            end[trial_id] = float(stamps.max())
    frame["start"] = frame["trial_id"].map(start)
    frame["end"] = frame["trial_id"].map(end)
    by_start = frame.sort_values(["start", "order"], na_position="last", kind="stable")
    frame.loc[by_start.index, "number"] = range(1, len(frame) + 1)
    frame["best_by_number"] = _best_so_far(frame.loc[by_start.index, "explored"]).reindex(
        frame.index)
    by_end = frame.sort_values(["end", "order"], na_position="last", kind="stable")
    frame.loc[by_end.index, "compute_s"] = by_end["time_total_s"].fillna(0).cumsum()
    frame["best_by_time"] = _best_so_far(frame.loc[by_end.index, "explored"]).reindex(
        frame.index)
    frame["stopped_early"] = frame["status"].isin(STOPPED_EARLY)
    frame["number"] = frame["number"].astype(int)
    return frame.sort_values("number").reset_index(drop=True)[
        ["trial_id", "number", "value", "best_by_number", "compute_s", "best_by_time",
         "stopped_early", "status"]]


def _best_so_far(values: pd.Series) -> pd.Series:
    return values.astype(float).cummax().ffill()


# ---------------------------------------------------------------------------------------------
# CSV tables in the upstream formats
# ---------------------------------------------------------------------------------------------


def eval_table(trials: pd.DataFrame) -> pd.DataFrame:
    """The upstream eval table: one row per trial with test metrics (see the module doc)."""
    columns = ["version", *UPSTREAM_COLUMNS, *RUN_COLUMNS]
    if trials.empty or "test_rank1" not in trials:
        return pd.DataFrame(columns=columns)
    splits = min(split_count(trials), 10)
    rows = []
    for _, trial in trials[trials["test_rank1"].notna()].iterrows():
        per_split = []
        for i in range(1, splits + 1):
            values = {m: trial.get(f"test_split{i}_{m}") for m in METRICS}
            if any(_missing(v) for v in values.values()):
                break
            per_split.append(values)
        mean = {m: trial.get(f"test_{m}", math.nan) for m in METRICS}
        row = {"version": run_name(trial), **upstream_table_row(
            {"per_split": per_split, "mean": mean})}
        row.update({c: trial.get(c) for c in RUN_COLUMNS})
        rows.append(row)
    out = pd.DataFrame(rows, columns=columns)
    out["_v"] = out["version"].map(version_number)
    return out.sort_values(["experiment", "backbone", "_v", "version", "seed"],
                           kind="stable").drop(columns="_v").reset_index(drop=True)


def train_table(history: pd.DataFrame, trials: pd.DataFrame) -> pd.DataFrame:
    """The upstream per-epoch train table, image-stage epochs, one run per row group."""
    columns = [*TRAIN_COLUMNS, *RUN_COLUMNS]
    if history.empty or trials.empty or "stage" not in history:
        return pd.DataFrame(columns=columns)
    image = history[history["stage"] == "image"]
    info = trials.set_index(["experiment", "trial_id"])
    rows = []
    for (experiment, trial_id), epochs in image.groupby(["experiment", "trial_id"], sort=False):
        if (experiment, trial_id) not in info.index:
            continue
        trial = info.loc[(experiment, trial_id)]
        version = run_name(pd.Series({**trial.to_dict(), "trial_id": trial_id}))
        for _, epoch in epochs.sort_values("stage_epoch").iterrows():
            rows.append({
                "version": version, "epoch": int(epoch["stage_epoch"]),
                "learning_rate": _significant(epoch.get("lr_visual"), 6),
                **{c: _round(epoch.get(c), 4) for c in ("loss_id", "loss_triplet",
                                                        "loss_center", "loss_i2t")},
                "loss_t2i": None,
                "rank1": _percent(epoch.get("val_rank1")),
                "rank5": _percent(epoch.get("val_rank5")),
                "rank10": _percent(epoch.get("val_rank10")),
                "map": _percent(epoch.get("val_mAP")),
                "is_best": "yes" if epoch.get("is_best") == 1 else "no",
                "trial_id": trial_id, "seed": trial.get("seed"),
                "backbone": trial.get("backbone"), "experiment": experiment,
            })
    return pd.DataFrame(rows, columns=columns)


def _percent(value: Any) -> float:
    return math.nan if _missing(value) else round(100 * float(value), 2)


def _significant(value: Any, digits: int) -> float:
    return math.nan if _missing(value) else float(f"{float(value):.{digits}g}")


def _round(value: Any, digits: int) -> float:
    return math.nan if _missing(value) else round(float(value), digits)


def write_csvs(out_dir: Path, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """Write each table as ``<name>.csv``; return the paths."""
    paths = []
    for name, table in tables.items():
        path = out_dir / f"{name}.csv"
        table.to_csv(path, index=False)
        paths.append(path)
    return paths
