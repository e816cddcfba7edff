"""Claims: plain-English statements, with numbers, of what is signal and what is seed noise.

Every claim compares two configurations of ONE backbone on test Rank-1 (percent); a
configuration is never compared with another backbone's:

* a configuration's **value** is the mean over its seeds (its trials with test results: a
  version's seeds, a search trial with its race runs) of the per-trial test Rank-1 (itself the
  mean over the test splits); its **seed std** is the sample std (ddof 1) of those per-trial
  values, defined with two seeds or more, so a raced configuration has its own. Trials without
  test results (stopped by ASHA, diverged) are skipped; a configuration with none is left out;
* a configuration with a single seed (an unraced search trial) **borrows** its seed std: the
  mean seed std of the versions (fixed configurations) with two seeds or more of the same
  backbone, else of any backbone; with no such version its seed std is unknown;
* a zero-shot evaluation has no seed (fixed weights, a deterministic evaluation): std 0;
* ``delta = value_a - value_b``; ``noise = sqrt(std_a² + std_b²)``, the spread of the
  difference between one run of each (not the standard error of the means, which would shrink
  with more seeds); the verdict is "beyond the seed noise" when ``|delta| > noise``, "within
  the seed noise" otherwise, and "noise unknown (one seed): not a claim" when a seed std is
  unknown.

The claims:

* each search's **choice** (``tune.selection.select`` on the search's first metric: the best
  mean validation over a configuration's runs, elitist after a race) against the best version
  of the search's backbone (best mean validation); the versions are the fixed trials of that
  backbone in the search's warm-start experiment when the report read it, else in every
  experiment read (``choices``);
* each search's choice and the best version of a zero-shot evaluation's backbone against it;
* each version against the previous one (vN against vN-1, both with test results) per
  experiment and backbone.

``claims`` also returns, for each claim that could not be made, the reason;
``choice_sentence`` names a search's choice in words (the summary's first lines).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..tune.selection import Configuration, Selection, select
from .reference import version_number
from .tables import (
    METRIC_NAMES,
    MINIATURE_COLUMN,
    NOT_KNOBS,
    RACE_COLUMN,
    configuration_key,
    configuration_name,
    format_value,
    marked,
)

CLAIM_COLUMNS = ["comparison", "claim", "a", "b", "value_a", "value_b", "delta", "noise",
                 "seeds_a", "seeds_b", "noise_borrowed", "verdict"]
VALUE_COLUMNS = ["key", "kind", "experiment", "backbone", "version", "label", "value", "std",
                 "seeds", MINIATURE_COLUMN]
BEYOND = "beyond the seed noise"
WITHIN = "within the seed noise"
UNKNOWN = "noise unknown (one seed): not a claim"
BEST_VS_BEST = "search choice vs best version"
CHALLENGER_VS_KEPT = "search challenger vs kept version"
VERSUS_ZERO_SHOT = "versus zero-shot"
VERSION_STEP = "version vs previous"
VERSIONS_METRIC = "best_val_rank1"
"""How the best version is chosen where no search says otherwise (the zero-shot claims)."""
MAX_KNOB_DIFFERENCES = 4
"""A choice's knob differences from the best version are named up to this many."""
CAPTION = (
    "Each statement compares two configurations of one backbone on test Rank-1 (percent). A "
    "configuration's value is the mean over its seeds (a search configuration's race runs "
    "count as seeds) of each trial's test Rank-1 (the mean over the test splits); its seed "
    "std is the sample std over those seeds (two or more). The signed number, delta, is a − b; "
    "the ± is the noise sqrt(std_a² + std_b²), the spread of the difference between one run of "
    "each. It is beyond the seed noise when |delta| > noise, else within it. "
    "A single-seed configuration borrows the mean seed std of the versions with two or more "
    "seeds (same backbone, else any); with none, its noise is unknown and the statement is "
    "not a claim. A zero-shot evaluation has no seed (std 0). A search's choice is the "
    "configuration with the best mean validation over its runs (see above); the best version "
    "is the one with the best mean validation; trials without test results are skipped. "
    "Every statement is in claims.csv.")
CHOICES_CAPTION = (
    "What each search chose and on what evidence: the configuration with the best mean of the "
    "search's selection metric (validation, never test) over its runs, and after a race only "
    "among the configurations run as often as the raced ones; ± is the std over the runs. "
    "The best version of the same backbone is shown beside it, with the knobs where the choice "
    "differs from it when they are few.")


@dataclass(frozen=True)
class Side:
    """One side of a comparison: test Rank-1 (percent) over seeds."""

    label: str
    value: float
    std: float  # seed std; NaN when unknown
    seeds: int  # 0: a zero-shot evaluation
    borrowed: bool = False  # std borrowed from the versions (a single seed)


@dataclass(frozen=True)
class SearchExperiment:
    """A search experiment as the claims read it (its ``tune_clipfh_experiment.json``)."""

    name: str
    backbone: str | None
    metric: str  # the selection metric: the first of the search's metrics
    from_experiment: str | None = None  # the warm-start experiment's folder name

    @classmethod
    def from_meta(cls, name: str, meta: dict[str, Any],
                  trials: pd.DataFrame) -> SearchExperiment:
        backbone = meta.get("backbone")
        if backbone is None and "backbone" in trials and trials["backbone"].notna().any():
            backbone = trials["backbone"].dropna().iloc[0]
        # by folder name, as the trials' ``experiment`` column names experiments
        warm_start = meta.get("from_experiment")
        return cls(name=name, backbone=backbone,
                   metric=(meta.get("metrics") or [VERSIONS_METRIC])[0],
                   from_experiment=Path(str(warm_start)).name if warm_start else None)

    @property
    def named(self) -> str:
        """``s (rn50)``: its name and backbone."""
        return self.name + (f" ({self.backbone})" if self.backbone else "")


@dataclass(frozen=True)
class Choice:
    """A search's choice and what it was chosen from."""

    search: SearchExperiment
    selection: Selection
    versions_from: tuple[str, ...]  # the experiments whose versions competed
    trials: int  # the search's trials, race runs included
    race_runs: int
    trial_seconds: float


def versions_of(trials: pd.DataFrame, backbone: Any) -> pd.DataFrame:
    """The fixed trials (versions) of ``backbone`` among ``trials``."""
    if trials.empty or "kind" not in trials:
        return trials.iloc[:0]
    return trials[(trials["kind"] == "fixed") & (trials["backbone"] == backbone)]


def choices(trials: pd.DataFrame, searches: Iterable[SearchExperiment]) -> list[Choice]:
    """Each search's choice among its configurations and the versions of its backbone: its
    warm-start experiment's when read, else those of every experiment read."""
    made = []
    for search in searches:
        own = trials[(trials["experiment"] == search.name) & (trials["kind"] != "fixed")] \
            if not trials.empty else trials
        versions = versions_of(trials, search.backbone)
        if search.from_experiment in set(versions.get("experiment", ())):
            versions = versions[versions["experiment"] == search.from_experiment]
        made.append(Choice(
            search=search, selection=select(own, search.metric, versions, search.backbone),
            versions_from=tuple(sorted(set(versions.get("experiment", ())))),
            trials=len(own),
            race_runs=int(own[RACE_COLUMN].notna().sum()) if RACE_COLUMN in own else 0,
            trial_seconds=float(own["time_total_s"].sum()) if "time_total_s" in own else 0.0))
    return made


def best_version(trials: pd.DataFrame, backbone: Any) -> Configuration | None:
    """The version of ``backbone`` with the best mean validation Rank-1 over its seeds."""
    return select(trials.iloc[:0], VERSIONS_METRIC, versions_of(trials, backbone),
                  backbone).best_version


def seed_values(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration with test results: its value and seed std (percent), seeds.

    ``label`` is ``<backbone>-<version>`` for a version, ``search-<trial_id>`` (its first
    run's) for a search configuration, with `` (<experiment>)`` added where two
    configurations would share it.
    """
    if trials.empty or "test_rank1" not in trials or trials["test_rank1"].isna().all():
        return pd.DataFrame(columns=VALUE_COLUMNS)
    tested = trials[trials["test_rank1"].notna()]
    rows = []
    for key, group in tested.groupby(tested.apply(configuration_key, axis=1), sort=False):
        first = group.iloc[0]
        percent = 100 * group["test_rank1"].astype(float)
        rows.append({
            MINIATURE_COLUMN: first.get(MINIATURE_COLUMN, ""),
            "key": key, "kind": first.get("kind"), "experiment": first.get("experiment"),
            "backbone": first.get("backbone"), "version": first.get("version"),
            "label": marked(f"{first.get('backbone')}-{first.get('version')}"
                            if first.get("kind") == "fixed" else configuration_name(first),
                            first),
            "value": percent.mean(),
            "std": percent.std(ddof=1),  # NaN for one seed
            "seeds": len(group)})
    values = pd.DataFrame(rows, columns=VALUE_COLUMNS)
    shared = values["label"].duplicated(keep=False)
    values.loc[shared, "label"] += " (" + values.loc[shared, "experiment"].astype(str) + ")"
    return values


def borrowed_std(values: pd.DataFrame, backbone: Any) -> float:
    """Mean seed std of the versions with two seeds or more, of ``backbone`` if it has any,
    else of every backbone; NaN when there is none."""
    versions = values[(values["kind"] == "fixed") & (values["seeds"] >= 2)]
    same = versions[versions["backbone"] == backbone]
    pool = same if len(same) else versions
    return float(pool["std"].mean()) if len(pool) else math.nan


def side(row: pd.Series, values: pd.DataFrame) -> Side:
    """A configuration as one side of a comparison, its std borrowed when it has one seed."""
    if row["seeds"] >= 2:
        return Side(row["label"], float(row["value"]), float(row["std"]), int(row["seeds"]))
    std = borrowed_std(values, row["backbone"])
    return Side(row["label"], float(row["value"]), std, 1, borrowed=not math.isnan(std))


def configuration_side(config: Configuration, values: pd.DataFrame) -> Side | None:
    """A selected configuration (its runs with test results) as one side of a comparison,
    its std borrowed when it has one; None when no run has test results."""
    if not config.test_rank1:
        return None
    same = values[values["key"] == config.key]
    label = marked(config.label, same.iloc[0]) if len(same) else config.label
    row = pd.Series({"label": label, "backbone": config.backbone,
                     "value": 100 * config.test_mean, "std": 100 * config.test_std,
                     "seeds": len(config.test_rank1)})
    return side(row, values)


def zero_shot_side(zero_shot: dict[str, Any]) -> Side:
    """A zero-shot evaluation: fixed weights, no seed, so no seed noise (its std over the test
    splits is not seed noise and is not used)."""
    return Side(zero_shot["label"], float(zero_shot["rank1"]), 0.0, 0)


def compare(comparison: str, a: Side, b: Side, text_a: str, text_b: str) -> dict[str, Any]:
    """One claim row: a against b, with its sentence (``text_a vs text_b: +d ± n ...``)."""
    delta = a.value - b.value
    noise = math.hypot(a.std, b.std)  # NaN when either std is unknown
    verdict = UNKNOWN if math.isnan(noise) else BEYOND if abs(delta) > noise else WITHIN
    spread = "" if math.isnan(noise) else f" ± {noise:.1f}"
    sentence = (f"{text_a} vs {text_b}: {delta:+.1f}{spread} test Rank-1 points "
                f"({seeds_text(a, b)}): {verdict}.")
    return {"comparison": comparison, "claim": sentence, "a": a.label, "b": b.label,
            "value_a": a.value, "value_b": b.value, "delta": delta, "noise": noise,
            "seeds_a": a.seeds, "seeds_b": b.seeds,
            "noise_borrowed": ", ".join(s.label for s in (a, b) if s.borrowed),
            "verdict": verdict}


def seeds_text(a: Side, b: Side) -> str:
    """``3 seeds each``, ``1 seed vs 3 seeds; seed noise of X borrowed from the versions``."""
    if a.seeds == b.seeds:
        text = f"{_seed_count(a)} each"
    else:
        text = f"{_seed_count(a)} vs {_seed_count(b)}"
    borrowed = [s.label for s in (a, b) if s.borrowed]
    if borrowed:
        text += f"; seed noise of {' and '.join(borrowed)} borrowed from the versions"
    return text


def _seed_count(s: Side) -> str:
    if s.seeds == 0:
        return "a seedless zero-shot evaluation"
    return f"{s.seeds} seed{'s' if s.seeds > 1 else ''}"


def choice_vs_best_version(choice: Choice, values: pd.DataFrame,
                           version_backbones: set[Any]) -> tuple[list[dict], str]:
    """A search's choice against the best version of its backbone (``version_backbones``:
    the backbones that have versions, to say why none is compared)."""
    search, selection = choice.search, choice.selection
    winner, version = selection.winner, selection.best_version
    what = f"The choice of search {search.named} vs the best version"
    if winner is None:
        return [], f"{what}: no choice ({selection.reason})."
    if version is None:
        others = sorted(map(str, version_backbones - {search.backbone}))
        read = f" (only {' and '.join(others)} versions were read: another backbone is no " \
               f"comparison)" if others else ""
        return [], (f"{what}: no {search.backbone} version (v1-v10) trained to its end among "
                    f"the experiments read{read}.")
    if winner is version:
        return _challenger_vs_kept_version(choice, values, what)
    a, b = configuration_side(winner, values), configuration_side(version, values)
    if a is None or b is None:
        return [], f"{what}: {(winner if a is None else version).label} has no test results."
    return [compare(BEST_VS_BEST, a, b, f"The choice of search {search.name} ({winner.label})",
                    f"the best version ({version.label})")], ""


def _challenger_vs_kept_version(choice: Choice, values: pd.DataFrame,
                                what: str) -> tuple[list[dict], str]:
    """A search that kept the best version: its best challenger by validation against that
    version on test, so the report says whether keeping it was right or within the noise."""
    version = choice.selection.best_version
    tried = [c for c in choice.selection.configurations if c.kind == "search"]
    sides = [(c, found) for c in sorted(tried, key=lambda c: c.val_mean, reverse=True)
             if (found := configuration_side(c, values)) is not None]
    kept = configuration_side(version, values)
    if not sides or kept is None:
        return [], (f"{what}: it chose the best version, {version.label}, itself, and no "
                    f"configuration it tried has test results to compare.")
    challenger, side_a = sides[0]
    return [compare(CHALLENGER_VS_KEPT, side_a, kept,
                    f"Search {choice.search.name}'s best challenger by validation "
                    f"({challenger.label}, not chosen)",
                    f"the version it kept ({version.label})")], ""


def versus_zero_shots(trials: pd.DataFrame, values: pd.DataFrame, made: list[Choice],
                      zero_shots: Iterable[dict[str, Any]]) -> tuple[list[dict], str]:
    """The choice of each search of a zero-shot evaluation's backbone, and the best version
    of that backbone, against it: what fine-tuning gained over the pretrained weights."""
    zero_shots = list(zero_shots)
    if not zero_shots:
        return [], "Against zero-shot: no zero-shot evaluation given (report --zero-shot DIR)."
    rows, unmatched = [], []
    for zero_shot in zero_shots:
        baseline = zero_shot_side(zero_shot)
        backbone = zero_shot.get("backbone")
        version = best_version(trials, backbone)
        contenders = [(f"The choice of search {c.search.name} ({c.selection.winner.label})",
                       c.selection.winner) for c in made
                      if c.search.backbone == backbone and c.selection.winner is not None
                      # a search that kept the best version: said once, as the version
                      and (version is None or c.selection.winner.label != version.label)]
        if version is not None:
            contenders.append((f"The best version ({version.label})", version))
        sides = [(text, found) for text, config in contenders
                 if (found := configuration_side(config, values)) is not None]
        for text, found in sides:
            rows.append(compare(VERSUS_ZERO_SHOT, found, baseline, text, baseline.label))
        if not sides:
            unmatched.append(f"{baseline.label}: no configuration of backbone {backbone} has "
                             f"test results")
    return rows, ("Against zero-shot: " + "; ".join(unmatched) + ".") if unmatched else ""


def version_steps(values: pd.DataFrame) -> tuple[list[dict], str]:
    """Each version against the previous one (vN against vN-1) per experiment and backbone;
    a version whose predecessor has no test results is not compared (no skipping over it:
    vN against vN-2 would mix two versions' changes)."""
    versions = values[values["kind"] == "fixed"]
    rows = []
    for _, group in versions.groupby(["experiment", "backbone"], sort=True):
        by_number = {version_number(row["version"]): row for _, row in group.iterrows()}
        for number in sorted(by_number):
            if number - 1 in by_number:
                current, previous = by_number[number], by_number[number - 1]
                rows.append(compare(VERSION_STEP, side(current, values),
                                    side(previous, values), current["label"],
                                    previous["label"]))
    reason = "" if rows else ("Version vs the previous one: no backbone has two consecutive "
                              "versions (vN and vN-1) with test results.")
    return rows, reason


def claims(trials: pd.DataFrame, made: Iterable[Choice] = (),
           zero_shots: Iterable[dict[str, Any]] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Every claim (``CLAIM_COLUMNS``) and, per claim not made, why not.

    ``made``: the searches' choices (``choices`` of the same trials).
    """
    made = list(made)
    values = seed_values(trials)
    version_backbones = set(values.loc[values["kind"] == "fixed", "backbone"].dropna())
    parts = [choice_vs_best_version(choice, values, version_backbones) for choice in made] \
        or [([], "Search choice vs best version: no search experiment read.")]
    parts += [versus_zero_shots(trials, values, made, zero_shots), version_steps(values)]
    rows, reasons = [], []
    for found, reason in parts:
        rows += found
        if reason:
            reasons.append(reason)
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS), reasons


def choice_sentence(choice: Choice) -> str:
    """``Search s (rn50) chose search-1a2b: validation Rank-1 86.1 ± 1.2 over 3 runs (seeds 0,
    1, 2), test Rank-1 55.0 ± 2.1; the best version in r, rn50-v5: ...``: the choice, the
    best version of its backbone (in the experiments its versions came from) and what the
    search ran."""
    search, selection = choice.search, choice.selection
    winner, version = selection.winner, selection.best_version
    if winner is None:
        return f"Search {search.named} chose nothing: {selection.reason}."
    metric = METRIC_NAMES.get(selection.metric, selection.metric)
    text = f"Search {search.named} chose {winner.label}: {evidence(winner, metric)}"
    if version is winner:
        text += " (the best version)"
    elif version is not None:
        text += (f"; the best version in {' and '.join(choice.versions_from)}, "
                 f"{version.label}: {evidence(version, metric)}"
                 f"{knob_differences(winner, version)}")
    else:
        text += f"; no {search.backbone} version competed"
    race = f", {choice.race_runs} of them race runs," if choice.race_runs else ""
    elitist = f"; after the race only configurations with {selection.min_runs} runs or more " \
              f"competed" if selection.min_runs > 1 else ""
    return (f"{text}. The search ran {choice.trials} trial{'s' * (choice.trials != 1)}{race} "
            f"in {choice.trial_seconds:.0f} trial-s{elitist}.")


def evidence(config: Configuration, metric: str) -> str:
    """``validation Rank-1 86.1 ± 1.2 over 3 runs (seeds 0, 1, 2), test Rank-1 55.0 ± 2.1``
    (percent; ± the std over the runs)."""
    # a race over validation folds keeps the seed: name what varied
    folds = len(set(config.folds)) > 1
    replicates = config.folds if folds else config.seeds
    named = f"{'fold' if folds else 'seed'}{'s' * (len(replicates) != 1)} " \
            f"{', '.join(map(str, replicates))}"
    test = f"test Rank-1 {_plus_minus(config.test_mean, config.test_std)}" \
        if config.test_rank1 else "no test results"
    return (f"{metric} {_plus_minus(config.val_mean, config.val_std)} over {config.runs} "
            f"run{'s' * (config.runs != 1)} ({named}), {test}")


def knob_differences(winner: Configuration, version: Configuration) -> str:
    """``; search-1a2b differs from rn50-v5 in lr_visual 3e-05 instead of 5e-06`` over the
    knobs both set, when there are at most ``MAX_KNOB_DIFFERENCES``; '' otherwise."""
    differing = [(knob, format_value(winner.knobs[knob]), format_value(version.knobs[knob]))
                 for knob in sorted(winner.knobs.keys() & version.knobs.keys())
                 if knob not in NOT_KNOBS
                 and format_value(winner.knobs[knob]) != format_value(version.knobs[knob])]
    if not differing or len(differing) > MAX_KNOB_DIFFERENCES:
        return ""
    return f"; {winner.label} differs from {version.label} in " + ", ".join(
        f"{knob} {ours} instead of {theirs}" for knob, ours, theirs in differing)


def _plus_minus(fraction: float, std: float) -> str:
    if math.isnan(std):
        return f"{100 * fraction:.1f}"
    return f"{100 * fraction:.1f} ± {100 * std:.1f}"
