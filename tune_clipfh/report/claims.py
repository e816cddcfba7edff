"""Claims: plain-English statements, with numbers, of what is signal and what is seed noise.

Every claim compares two configurations on test Rank-1 (percent):

* a configuration's **value** is the mean over its seeds (its trials with test results) of the
  per-trial test Rank-1 (itself the mean over the test splits); its **seed std** is the sample
  std (ddof 1) of those per-trial values, defined with two seeds or more. Trials without test
  results (stopped by ASHA, diverged) are skipped; a configuration with none is left out;
* a configuration with a single seed (search trials usually) **borrows** its seed std: the
  mean seed std of the versions (fixed configurations) with two seeds or more of the same
  backbone, else of any backbone; with no such version its seed std is unknown;
* a zero-shot evaluation has no seed (fixed weights, a deterministic evaluation): std 0;
* ``delta = value_a - value_b``; ``noise = sqrt(std_a² + std_b²)``, the spread of the
  difference between one run of each (not the standard error of the means, which would shrink
  with more seeds); the verdict is "beyond the seed noise" when ``|delta| > noise``, "within
  the seed noise" otherwise, and "noise unknown (one seed): not a claim" when a seed std is
  unknown.

The claims: the best search configuration against the best version (both by best validation
Rank-1, the summary table's ranking); the best search configuration and the best version of
a zero-shot evaluation's backbone against it; each version against the previous one (vN
against vN-1, both with test results) per experiment and backbone. ``claims`` also returns,
for each kind of claim that could not be made, the reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pandas as pd

from .tables import configuration_key, ranked, run_name, version_number

CLAIM_COLUMNS = ["comparison", "claim", "a", "b", "value_a", "value_b", "delta", "noise",
                 "seeds_a", "seeds_b", "noise_borrowed", "verdict"]
VALUE_COLUMNS = ["key", "kind", "experiment", "backbone", "version", "label", "value", "std",
                 "seeds"]
BEYOND = "beyond the seed noise"
WITHIN = "within the seed noise"
UNKNOWN = "noise unknown (one seed): not a claim"
BEST_VS_BEST = "best search vs best version"
VERSUS_ZERO_SHOT = "versus zero-shot"
VERSION_STEP = "version vs previous"
CAPTION = (
    "Each statement compares two configurations on test Rank-1 (percent). A configuration's "
    "value is the mean over its seeds of each trial's test Rank-1 (the mean over the test "
    "splits); its seed std is the sample std over those seeds (two or more). The signed "
    "number, delta, is a − b; the ± is the noise sqrt(std_a² + std_b²), the spread of the "
    "difference between one run of each. It is beyond the seed noise when |delta| > noise, "
    "else within it. "
    "A single-seed configuration borrows the mean seed std of the versions with two or more "
    "seeds (same backbone, else any); with none, its noise is unknown and the statement is "
    "not a claim. A zero-shot evaluation has no seed (std 0). 'Best' is by best validation "
    "Rank-1, as in the table below; trials without test results are skipped. Every statement "
    "is in claims.csv.")


@dataclass(frozen=True)
class Side:
    """One side of a comparison: test Rank-1 (percent) over seeds."""

    label: str
    value: float
    std: float  # seed std; NaN when unknown
    seeds: int  # 0: a zero-shot evaluation
    borrowed: bool = False  # std borrowed from the versions (a single seed)


def seed_values(trials: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration with test results: its value and seed std (percent), seeds.

    ``label`` is ``<backbone>-<version>`` for a version, ``search-<trial_id>`` for a search
    trial, with `` (<experiment>)`` added where two configurations would share it.
    """
    if trials.empty or "test_rank1" not in trials or trials["test_rank1"].isna().all():
        return pd.DataFrame(columns=VALUE_COLUMNS)
    tested = trials[trials["test_rank1"].notna()]
    rows = []
    for key, group in tested.groupby(tested.apply(configuration_key, axis=1), sort=False):
        first = group.iloc[0]
        percent = 100 * group["test_rank1"].astype(float)
        rows.append({
            "key": key, "kind": first.get("kind"), "experiment": first.get("experiment"),
            "backbone": first.get("backbone"), "version": first.get("version"),
            "label": f"{first.get('backbone')}-{first.get('version')}"
            if first.get("kind") == "fixed" else run_name(first),
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


def best_configuration(values: pd.DataFrame, ranking: list[str], kind: str,
                       backbone: Any = None) -> pd.Series | None:
    """The configuration of ``kind`` (and ``backbone``) ranked first in ``ranking`` (keys,
    best validation first) among those with test results; None when there is none."""
    pool = values[values["kind"] == kind]
    if backbone is not None:
        pool = pool[pool["backbone"] == backbone]
    if pool.empty:
        return None
    order = {key: position for position, key in enumerate(ranking)}
    return pool.loc[pool["key"].map(order).idxmin()]


def best_search_vs_best_version(values: pd.DataFrame,
                                ranking: list[str]) -> tuple[list[dict], str]:
    search = best_configuration(values, ranking, "search")
    version = best_configuration(values, ranking, "fixed")
    if search is None or version is None:
        what = "search configuration" if search is None else "version (v1-v10)"
        return [], f"Best search configuration vs best version: no {what} has test results."
    return [compare(BEST_VS_BEST, side(search, values), side(version, values),
                    f"The best search configuration ({search['label']})",
                    f"the best version ({version['label']})")], ""


def versus_zero_shots(values: pd.DataFrame, ranking: list[str],
                      zero_shots: Iterable[dict[str, Any]]) -> tuple[list[dict], str]:
    """The best search configuration and the best version of each zero-shot evaluation's
    backbone against it: what fine-tuning gained over the pretrained weights."""
    zero_shots = list(zero_shots)
    if not zero_shots:
        return [], "Against zero-shot: no zero-shot evaluation given (report --zero-shot DIR)."
    rows, unmatched = [], []
    for zero_shot in zero_shots:
        baseline = zero_shot_side(zero_shot)
        found = False
        for kind, what in (("search", "The best search configuration"),
                           ("fixed", "The best version")):
            best = best_configuration(values, ranking, kind, zero_shot.get("backbone"))
            if best is not None:
                found = True
                rows.append(compare(VERSUS_ZERO_SHOT, side(best, values), baseline,
                                    f"{what} ({best['label']})", baseline.label))
        if not found:
            unmatched.append(f"{baseline.label}: no configuration of backbone "
                             f"{zero_shot.get('backbone')} has test results")
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


def claims(trials: pd.DataFrame, configs: pd.DataFrame,
           zero_shots: Iterable[dict[str, Any]] = ()) -> tuple[pd.DataFrame, list[str]]:
    """Every claim (``CLAIM_COLUMNS``) and, per kind of claim not made, why not.

    ``configs`` (``tables.configurations`` of the same trials) gives the validation ranking.
    """
    values = seed_values(trials)
    ranking = list(ranked(configs)["key"]) if "key" in configs else []
    rows, reasons = [], []
    for made, reason in (best_search_vs_best_version(values, ranking),
                         versus_zero_shots(values, ranking, zero_shots),
                         version_steps(values)):
        rows += made
        if reason:
            reasons.append(reason)
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS), reasons
