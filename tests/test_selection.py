"""The search's choice (no Ray): configurations over their runs, elitist after a race, versions
of the same backbone, test metrics carried but never used."""

import pandas as pd
import pytest

from tune_clipfh.tune.selection import configurations, select

METRIC = "best_val_rank1_at_test_size"


def _trials(rows: list[dict]) -> pd.DataFrame:
    base = {"final": 1, "status": "completed", "kind": "search", "seed": 0,
            "time_total_s": 10.0, "config/race_of": None}
    return pd.DataFrame([{**base, **row} for row in rows])


def test_race_runs_join_their_configuration_and_only_raced_ones_compete():
    search = _trials([
        {"trial_id": "a", METRIC: 0.70, "test_rank1": 0.50, "config/lr_visual": 1e-4},
        {"trial_id": "b", METRIC: 0.90, "test_rank1": 0.40},  # one lucky run, not raced
        {"trial_id": "c", METRIC: 0.60, "test_rank1": 0.45},
        {"trial_id": "d", METRIC: 0.80, "test_rank1": 0.54, "config/race_of": "a", "seed": 1},
        {"trial_id": "e", METRIC: 0.50, "test_rank1": 0.44, "config/race_of": "c", "seed": 1},
        {"trial_id": "f", METRIC: 0.99, "test_rank1": 0.10, "status": "stopped_by_scheduler",
         "final": 0},  # did not train to its end: not a configuration
    ])
    selection = select(search, METRIC)
    assert selection.min_runs == 2
    assert [c.label for c in selection.candidates] == ["search-a", "search-c"]
    winner = selection.winner
    assert winner.trial_ids == ["a", "d"] and winner.seeds == [0, 1]
    assert winner.val_mean == pytest.approx(0.75)
    assert winner.test_mean == pytest.approx(0.52)
    assert winner.knobs == {"lr_visual": 1e-4}  # the first run's config, race keys removed
    assert {c.key for c in selection.configurations} == {"a", "b", "c"}
    assert selection.best_tried.key == "a"


def test_without_a_race_every_configuration_competes_with_the_versions_of_its_backbone():
    search = _trials([{"trial_id": "a", METRIC: 0.70, "test_rank1": 0.50}])
    versions = _trials([
        {"trial_id": f"v{i}", "kind": "fixed", "config/backbone": backbone,
         "config/version": version, "seed": seed, METRIC: value, "test_rank1": 0.3}
        for i, (backbone, version, seed, value) in enumerate([
            ("rn50", "v5", 0, 0.72), ("rn50", "v5", 1, 0.66), ("rn50", "v1", 0, 0.60),
            ("vitb16", "v5", 0, 0.95)])])
    selection = select(search, METRIC, versions, backbone="rn50")
    assert [c.label for c in selection.candidates] == ["search-a", "rn50-v5", "rn50-v1"]
    assert selection.best_version.label == "rn50-v5"
    assert selection.best_version.val_mean == pytest.approx(0.69)
    assert all(c.backbone == "rn50" for c in selection.configurations)


def test_no_trial_trained_to_its_end_is_no_choice():
    search = _trials([{"trial_id": "a", METRIC: 0.7, "status": "diverged"}])
    selection = select(search, METRIC)
    assert selection.winner is None and selection.reason
    assert configurations(search.iloc[:0], METRIC) == []
