"""Which configuration a search chose: the best mean validation metric over its runs.

A configuration's runs are a search trial with its race runs (``race_of``, see
:mod:`.searcher`), or a version with its seeds (the warm-start experiment's trials of the same
backbone). Selection is elitist, as irace's: once a race has run, only configurations run at
least as often as the raced ones compete (the raced configurations and the versions with as
many seeds), so a configuration seen once cannot win on one lucky validation run; without a
race every configuration competes. Only trials that trained to their end count, and the test
metrics are carried along, never looked at.

Pure functions of :func:`.results.load_results` frames; no Ray.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..train.stages import RAN_TO_END

RACE_OF = "race_of"
"""Trial-config key of a race run (:mod:`.searcher`): the trial id of its configuration's
first run."""


@dataclass
class Configuration:
    key: str
    kind: str  # "search" | "fixed"
    label: str  # "search-<trial id>" or "<backbone>-<version>"
    backbone: str | None
    trial_ids: list[str]
    seeds: list[int]
    folds: list[int]
    val: list[float]  # the selection metric per run
    test_rank1: list[float]
    test_mAP: list[float]
    seconds: float
    knobs: dict[str, Any] = field(default_factory=dict)
    """The first run's trial config (``config/...`` columns, the seed and race keys removed)."""

    @property
    def runs(self) -> int:
        return len(self.val)

    @staticmethod
    def _mean(values: list[float]) -> float:
        return sum(values) / len(values) if values else math.nan

    @staticmethod
    def _std(values: list[float]) -> float:
        if len(values) < 2:
            return math.nan
        mean = sum(values) / len(values)
        return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

    @property
    def val_mean(self) -> float:
        return self._mean(self.val)

    @property
    def val_std(self) -> float:
        return self._std(self.val)

    @property
    def test_mean(self) -> float:
        return self._mean(self.test_rank1)

    @property
    def test_std(self) -> float:
        return self._std(self.test_rank1)


@dataclass
class Selection:
    winner: Configuration | None
    candidates: list[Configuration]
    """The configurations that competed, best first."""
    configurations: list[Configuration]
    """Every configuration with a run that trained to its end."""
    metric: str
    min_runs: int
    reason: str = ""

    @property
    def best_version(self) -> Configuration | None:
        versions = [c for c in self.configurations if c.kind == "fixed"]
        return max(versions, key=lambda c: c.val_mean) if versions else None

    @property
    def best_tried(self) -> Configuration | None:
        """The search configuration with the best mean test Rank-1 (regret's reference only)."""
        tried = [c for c in self.configurations if c.kind == "search" and c.test_rank1]
        return max(tried, key=lambda c: c.test_mean) if tried else None


def _trained(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    if frame.empty or metric not in frame:
        return frame.iloc[:0]
    done = frame[(frame.get("final") == 1) & frame["status"].isin(RAN_TO_END)
                 & frame[metric].notna()]
    return done


def _value(row: pd.Series, column: str, default: Any = None) -> Any:
    value = row.get(column, default)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return default
    return value


def configurations(frame: pd.DataFrame, metric: str,
                   backbone: str | None = None) -> list[Configuration]:
    """Group the trials that trained to their end into configurations (see the module)."""
    found: dict[str, Configuration] = {}
    for _, row in _trained(frame, metric).iterrows():
        fixed = row.get("kind") == "fixed"
        row_backbone = _value(row, "config/backbone") if fixed else \
            _value(row, "config/model", backbone)
        if backbone is not None and row_backbone not in (None, backbone):
            continue
        if fixed:
            key = f"{row_backbone}-{_value(row, 'config/version')}"
            label = key
        else:
            key = str(_value(row, f"config/{RACE_OF}", row["trial_id"]))
            label = f"search-{key}"
        config = found.get(key)
        if config is None:
            knobs = {c.removeprefix("config/"): v for c, v in row.items()
                     if c.startswith("config/") and not _missing(v)}
            for name in ("seed", RACE_OF, "val_fold"):
                knobs.pop(name, None)
            config = found[key] = Configuration(
                key=key, kind="fixed" if fixed else "search", label=label,
                backbone=row_backbone, trial_ids=[], seeds=[], folds=[], val=[], test_rank1=[],
                test_mAP=[], seconds=0.0, knobs=knobs)
        config.trial_ids.append(str(row["trial_id"]))
        config.seeds.append(int(_value(row, "seed", 0)))
        config.folds.append(int(_value(row, "config/val_fold", 0)))
        config.val.append(float(row[metric]))
        for values, column in ((config.test_rank1, "test_rank1"), (config.test_mAP, "test_mAP")):
            if not _missing(row.get(column)):
                values.append(float(row[column]))
        config.seconds += float(_value(row, "time_total_s", 0.0))
    return list(found.values())


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def select(search: pd.DataFrame, metric: str, versions: pd.DataFrame | None = None,
           backbone: str | None = None) -> Selection:
    """The search's choice among its configurations and (when given) the warm-start
    experiment's versions of ``backbone``; see the module docstring."""
    configs = configurations(search, metric, backbone)
    if versions is not None and not versions.empty:
        configs += configurations(versions[versions.get("kind") == "fixed"], metric, backbone)
    if not configs:
        return Selection(None, [], [], metric, 0, "no trial trained to its end")
    raced = [c for c in configs if c.kind == "search" and c.runs > 1]
    min_runs = min(c.runs for c in raced) if raced else 1
    candidates = sorted((c for c in configs if c.runs >= min_runs),
                        key=lambda c: c.val_mean, reverse=True)
    return Selection(candidates[0], candidates, configs, metric, min_runs)
