"""``tune-clipfh best``: the configuration a search chose, with its provenance, as a config YAML.

The choice is :func:`.selection.select`'s (the best mean validation metric over each
configuration's runs, elitist after a race), among the search's configurations and the
versions of its warm-start experiment. The YAML holds the search's base knobs and the chosen
trial's sampled values (or the chosen version's knobs), checked with ``build_config``, so
``tune-clipfh train --config`` takes it as it is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

from ..config import build_config
from ..errors import UserError
from .results import experiment_meta, load_results, trial_config
from .selection import Configuration, Selection, select
from .trainable import META_KEYS

CANDIDATES_SHOWN = 5


def choose(experiment: str | Path, metric: str | None = None) -> tuple[Selection, dict]:
    """The search experiment's selection and its meta (one-line UserError when the folder is
    not a finished search)."""
    path = Path(experiment)
    meta = experiment_meta(path) if path.is_dir() else {}
    if meta.get("kind") != "search":
        found = f"a {meta['kind']} experiment" if meta.get("kind") else "no experiment"
        raise UserError(f"{experiment}: {found} here (expected a search experiment folder, "
                        f"e.g. runs/ray/search-...)")
    metric = metric or meta["metrics"][0]
    versions = None
    warm = meta.get("from_experiment")
    if warm and Path(warm).is_dir():
        versions = load_results(warm)
    selection = select(load_results(path), metric, versions, backbone=meta.get("backbone"))
    if selection.winner is None:
        raise UserError(f"{experiment}: no trial trained to its end, so there is no choice yet "
                        f"(resume it with tune-clipfh search --resume --name {path.name})")
    return selection, meta


def chosen_knobs(winner: Configuration, meta: dict[str, Any],
                 experiment: str | Path) -> dict[str, Any]:
    """Every knob the chosen configuration trained with (its first run's trial config over
    the search's base knobs, or the version's knobs), typed as the schema types them."""
    if winner.kind == "search":
        config = trial_config(experiment, winner.trial_ids[0])
        knobs = {**(meta.get("base_knobs") or {}), **config}
    else:
        knobs = dict(winner.knobs)
    knobs = {k: v for k, v in knobs.items() if k not in META_KEYS and k != "fixed"}
    knobs["seed"] = winner.seeds[0]
    knobs["experiment"] = f"{meta.get('study_name', 'search')}-best"
    config = build_config(knobs, f"the choice of {meta.get('study_name', 'the search')}").config
    typed = config.to_dict()
    return {k: typed[k] for k in knobs}


def _percent(values_mean: float, values_std: float) -> str:
    std = "" if math.isnan(values_std) else f" ± {100 * values_std:.1f}"
    return f"{100 * values_mean:.1f}{std}"


def _runs(config: Configuration) -> str:
    runs = ", ".join(f"{t} (seed {s}{f', fold {f}' if f else ''})"
                     for t, s, f in zip(config.trial_ids, config.seeds, config.folds, strict=True))
    return f"{config.runs} run{'s' if config.runs > 1 else ''}: {runs}"


def describe_choice(experiment: str | Path, metric: str | None = None) -> tuple[list[str], dict]:
    """Lines saying what the search chose and why, and the chosen knobs."""
    selection, meta = choose(experiment, metric)
    winner = selection.winner
    frame_seconds = sum(c.seconds for c in selection.configurations if c.kind == "search")
    budget = meta.get("budget_trial_seconds")
    lines = [
        f"search {meta.get('study_name', Path(experiment).name)} ({meta.get('backbone')}, "
        f"{meta.get('profile')} profile): {frame_seconds:.0f} trial-s spent"
        + (f" of a budget of {budget:.0f}" if budget else ""),
        f"chosen: {winner.label}, by the mean {selection.metric} over its runs "
        f"(among {len(selection.candidates)} configurations with at least "
        f"{selection.min_runs} run{'s' if selection.min_runs > 1 else ''})",
        f"  {_runs(winner)}",
        f"  validation {selection.metric}: {_percent(winner.val_mean, winner.val_std)}",
        f"  test Rank-1 (reported, never used to choose): "
        f"{_percent(winner.test_mean, winner.test_std)}",
    ]
    version = selection.best_version
    if version is not None and version is not winner:
        lines.append(f"the best version, {version.label}: validation "
                     f"{_percent(version.val_mean, version.val_std)} over {version.runs} seeds, "
                     f"test Rank-1 {_percent(version.test_mean, version.test_std)}")
    lines.append("candidates, best first:")
    for config in selection.candidates[:CANDIDATES_SHOWN]:
        lines.append(f"  {config.label}: validation {_percent(config.val_mean, config.val_std)}"
                     f" over {config.runs} run{'s' if config.runs > 1 else ''}")
    return lines, chosen_knobs(winner, meta, experiment)


def write_choice(knobs: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("# Written by tune-clipfh best: the search's chosen configuration.\n"
                   + yaml.safe_dump(knobs, sort_keys=False), encoding="utf-8")
    return out
