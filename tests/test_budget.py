"""The search's trial-seconds budget (no Ray): which trials it lets start, and what it expects a
trial of a given shape to cost."""

import pytest

from tune_clipfh.tune.budget import TrialSecondsBudget, TrialShape

FROZEN_TEXT = {"epochs_prompt": 10, "epochs_image": 20, "freeze_text_encoder": True}


def test_without_a_known_trial_length_trials_start_while_spent_is_below_the_limit():
    budget = TrialSecondsBudget(100.0)
    assert budget.expected_s() is None and budget.allows_new_trial()
    budget.started("a")
    budget.reported("a", {"time_total_s": 99.0})
    assert budget.allows_new_trial()
    budget.reported("a", {"time_total_s": 100.0})
    assert not budget.allows_new_trial()


def test_a_trial_starts_only_if_it_fits_beside_what_running_trials_still_need():
    budget = TrialSecondsBudget(250.0, prior_lengths_s=[100.0])
    budget.started("a")
    budget.started("b")  # committed: 2 x 100 expected
    assert budget.committed_s() == 200.0 and not budget.allows_new_trial()
    budget.reported("a", {"time_total_s": 100.0})
    budget.ended("a", {"time_total_s": 100.0}, ran_to_end=True)
    budget.reported("b", {"time_total_s": 50.0})
    assert budget.committed_s() == 200.0 and not budget.allows_new_trial()
    # A trial the scheduler stops costs what it ran, and its length is not a trial's length.
    budget.ended("b", {"time_total_s": 50.0}, ran_to_end=False)
    assert budget.lengths_s == [100.0]
    assert budget.committed_s() == 150.0 and budget.allows_new_trial()  # 150 + 100 <= 250


def test_the_searchs_own_trials_replace_the_warm_start_lengths_once_one_ran_to_its_end():
    budget = TrialSecondsBudget(1000.0, prior_lengths_s=[100.0, 140.0])
    assert budget.expected_s() == 120.0
    budget.started("a")
    budget.ended("a", {"time_total_s": 300.0}, ran_to_end=True)
    budget.started("b")
    budget.ended("b", {"time_total_s": 10.0}, ran_to_end=False)  # stopped early: not a length
    assert budget.expected_s() == 300.0
    assert "310 of 1000 trial-s spent" in budget.summary()


def test_a_trials_expected_length_follows_its_stage_lengths_and_text_tower():
    """Per-epoch seconds of each kind, learnt from the warm start's stage times, price a trial
    by its own shape: a longer image stage costs more, a trained text tower more per prompt
    epoch."""
    budget = TrialSecondsBudget(10_000.0, base_knobs=FROZEN_TEXT)
    # a version: 30 prompt epochs with the text tower training (2 s each), 30 image (3 s each)
    budget.learn(TrialShape(30, 30, text_trains=True), prompt_s=60.0, image_s=90.0,
                 total_s=160.0)
    # another: frozen text tower, 0.5 s per prompt epoch
    budget.learn(TrialShape(30, 30, text_trains=False), prompt_s=15.0, image_s=90.0,
                 total_s=115.0)
    overhead = 10.0  # both: total - stage seconds
    assert budget.expected_s(budget.shape({})) == pytest.approx(overhead + 10 * 0.5 + 20 * 3)
    assert budget.expected_s(budget.shape({"epochs_image": 60})) == \
        pytest.approx(overhead + 10 * 0.5 + 60 * 3)
    assert budget.expected_s(budget.shape({"freeze_text_encoder": False})) == \
        pytest.approx(overhead + 10 * 2 + 20 * 3)
    # the search's own epoch rows teach it too: image epochs now average (90 + 2 x 6) / 32 s
    budget.started("a", {})
    for seconds in (6.0, 6.0):
        budget.reported("a", {"stage": "image", "epoch_time_s": seconds, "time_total_s": 1.0})
    assert budget.epoch_seconds["image"] == [192.0, 62]


def test_a_trial_longer_than_what_is_left_does_not_fit_where_a_shorter_one_does():
    budget = TrialSecondsBudget(200.0, base_knobs=FROZEN_TEXT)
    budget.learn(TrialShape(10, 20, text_trains=False), prompt_s=10.0, image_s=100.0,
                 total_s=110.0)  # 1 s per prompt epoch, 5 s per image epoch, no overhead
    budget.started("a", {})
    budget.ended("a", {"time_total_s": 110.0}, ran_to_end=True)
    assert budget.allows({"epochs_image": 15})  # 110 + 10 + 75 <= 200
    assert not budget.allows({"epochs_image": 20})  # 110 + 110 > 200
    assert not budget.allows({"epochs_image": 15}, reserve_s=10.0)


def test_shape_of_knobs_follows_the_stage_mode():
    assert TrialShape.of({"stage_mode": "image_only", "epochs_prompt": 5}).epochs_prompt == 0
    assert TrialShape.of({"freeze_text_encoder": False}).text_trains


@pytest.mark.parametrize("limit", [0.0, -5.0, float("nan")])
def test_a_budget_must_be_positive(limit):
    with pytest.raises(ValueError, match="must be positive"):
        TrialSecondsBudget(limit)
