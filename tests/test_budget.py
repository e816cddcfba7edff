"""The search's trial-seconds budget (no Ray): which trials it lets start."""

import pytest

from tune_clipfh.tune.budget import TrialSecondsBudget


def test_without_a_known_trial_length_trials_start_while_spent_is_below_the_limit():
    budget = TrialSecondsBudget(100.0)
    assert budget.expected_s is None and budget.allows_new_trial()
    budget.started("a")
    budget.reported("a", 99.0)
    assert budget.allows_new_trial()
    budget.reported("a", 100.0)
    assert not budget.allows_new_trial()


def test_a_trial_starts_only_if_it_fits_beside_what_running_trials_still_need():
    budget = TrialSecondsBudget(250.0, prior_lengths_s=[100.0])
    budget.started("a")
    budget.started("b")  # committed: 2 x 100 expected
    assert budget.committed_s() == 200.0 and not budget.allows_new_trial()
    budget.reported("a", 100.0)
    budget.ended("a", 100.0, ran_to_end=True)
    budget.reported("b", 50.0)
    assert budget.committed_s() == 200.0 and not budget.allows_new_trial()
    # A trial the scheduler stops costs what it ran, and its length is not a trial's length.
    budget.ended("b", 50.0, ran_to_end=False)
    assert budget.lengths_s == [100.0]
    assert budget.committed_s() == 150.0 and budget.allows_new_trial()  # 150 + 100 <= 250


def test_the_searchs_own_trials_replace_the_warm_start_lengths_once_one_ran_to_its_end():
    budget = TrialSecondsBudget(1000.0, prior_lengths_s=[100.0, 140.0])
    assert budget.expected_s == 120.0
    budget.started("a")
    budget.ended("a", 300.0, ran_to_end=True)
    budget.started("b")
    budget.ended("b", 10.0, ran_to_end=False)  # stopped early: not a trial's length
    assert budget.expected_s == 300.0
    assert "310 of 1000 trial-s spent" in budget.summary()


@pytest.mark.parametrize("limit", [0.0, -5.0, float("nan")])
def test_a_budget_must_be_positive(limit):
    with pytest.raises(ValueError, match="must be positive"):
        TrialSecondsBudget(limit)
