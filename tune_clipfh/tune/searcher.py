"""The search's Ray Tune searcher: Optuna, a trial-seconds budget, and a race at the end.

:class:`BudgetedOptunaSearch` is an ``OptunaSearch`` that

* records trials the scheduler stopped as PRUNED: OptunaSearch tells Optuna the last reported
  row, and a trial ASHA stopped would enter the study as COMPLETE with under-trained metrics
  (anchors 3.3, pitfall 2); only a trial's final row (``final == 1``) counts;
* starts no trial that would not fit in its budget (:mod:`.budget`), judged on the trial's own
  shape (its stage lengths), so a long image stage costs what it costs;
* ends with a race (:class:`Race`) when given one: one validation run of a configuration is a
  noisy estimate (validation on 16 identities moves by several points with the seed), so the
  best configurations by one run are run again with other seeds (or on other validation
  folds) before one is chosen, as SMAC's intensifier and irace do. The race's runs are part of
  the budget: exploration stops early enough to leave room for them. Race runs are not told to
  Optuna (the study holds one trial per configuration); :mod:`.selection` chooses by their
  mean.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ..train.stages import RAN_TO_END
from .budget import TrialSecondsBudget
from .selection import RACE_OF

_ENDED = object()
REPLICATES = ("seed", "val_fold")
"""What a race varies between runs of one configuration: the seed, or the validation fold."""


def ran_to_end(result: dict[str, Any]) -> bool:
    """A trial's last row says it trained to its end (its schedule or its early stopping)."""
    return bool(result.get("final")) and result.get("status") in RAN_TO_END


@dataclass
class Race:
    """The top ``top`` configurations of the exploration (by one run's validation metric) run
    ``runs - 1`` more times each, varying ``replicate`` (seed: base seed + 1, + 2, ...; fold:
    validation folds 1, 2, ...)."""

    top: int
    runs: int
    replicate: str = "seed"
    base_seed: int = 0
    queued: list[dict[str, Any]] = field(default_factory=list)
    started: bool = False

    def __post_init__(self) -> None:
        if self.top < 1 or self.runs < 2:
            raise ValueError(f"a race needs top >= 1 and runs >= 2 (got top {self.top}, runs "
                             f"{self.runs})")
        if self.replicate not in REPLICATES:
            raise ValueError(f"race replicate {self.replicate!r} is not valid (valid: "
                             f"{', '.join(REPLICATES)})")

    @property
    def trials(self) -> int:
        return self.top * (self.runs - 1)

    def replicate_value(self, run: int) -> int:
        """The seed or fold of a configuration's ``run``-th race run (1-based)."""
        return self.base_seed + run if self.replicate == "seed" else run

    def start(self, finished: dict[str, tuple[dict[str, Any], float]]) -> list[str]:
        """Queue the race runs of the best finished configurations (``trial id -> (config,
        metric)``); returns the trial ids raced."""
        ranked = sorted(finished, key=lambda t: finished[t][1], reverse=True)[:self.top]
        self.queued = [{**finished[trial_id][0], self.replicate: self.replicate_value(run),
                        RACE_OF: trial_id}
                       for run in range(1, self.runs) for trial_id in ranked]
        self.started = True
        return ranked


class BudgetedOptunaSearch(OptunaSearch):
    """See the module docstring. Build with :meth:`create`."""

    budget: TrialSecondsBudget | None = None
    race: Race | None = None
    max_trials: int | None = None

    @classmethod
    def create(cls, budget: TrialSecondsBudget | None = None, race: Race | None = None,
               max_trials: int | None = None, **kwargs) -> BudgetedOptunaSearch:
        searcher = cls(**kwargs)
        # saved and restored with the searcher's state on --resume
        searcher.budget, searcher.race, searcher.max_trials = budget, race, max_trials
        searcher.explored: dict[str, tuple[dict[str, Any], float]] = {}
        searcher.configs: dict[str, dict[str, Any]] = {}
        searcher.running_exploration: set[str] = set()
        searcher.suggested = 0
        searcher.exploration_ended = False
        return searcher

    def _selection_metric(self) -> str:
        return self.metric[0] if isinstance(self.metric, list) else self.metric

    def _race_reserve_s(self) -> float:
        if self.race is None or self.budget is None:
            return 0.0
        return self.race.trials * (self.budget.expected_s() or 0.0)

    def _exploring(self) -> bool:
        race_slots = self.race.trials if self.race is not None else 0
        return not self.exploration_ended and (
            self.max_trials is None or self.suggested < self.max_trials - race_slots)

    def suggest(self, trial_id):
        if self._exploring():
            suggestion = self._explore(trial_id)
            if suggestion is not _ENDED:
                return suggestion
        if self.race is None:
            return Searcher.FINISHED
        if not self.race.started:
            if self.running_exploration:
                return None  # the race starts once the exploration's last trials have ended
            raced = self.race.start(self.explored)
            _stderr(f"[search] race: the best {len(raced)} configurations by one run "
                    f"({', '.join(raced) or 'none'}) run {self.race.runs - 1} more times each "
                    f"(other {self.race.replicate}s)")
        return self._next_race_run(trial_id)

    def _explore(self, trial_id: str):
        """An Optuna suggestion that fits in the budget (the race's share kept), or _ENDED."""
        reserve = self._race_reserve_s()
        if self.budget is None or self.budget.allows(reserve_s=reserve):
            suggestion = super().suggest(trial_id)
            if not isinstance(suggestion, dict):
                return suggestion
            if self.budget is None or self.budget.allows(suggestion, reserve):
                return self._start(trial_id, suggestion, exploration=True)
            # Sampled, but longer than what is left: not run, and not held against it.
            self._tell_not_run(trial_id)
        self.exploration_ended = True
        _stderr(f"[search] exploration ended: no room for another trial in the budget "
                f"({self.budget.summary()})")
        return _ENDED

    def _next_race_run(self, trial_id: str):
        if not self.race.queued:
            return Searcher.FINISHED
        config = self.race.queued[0]
        if self.budget is not None and not self.budget.allows(config):
            _stderr(f"[search] trial-seconds budget reached in the race "
                    f"({self.budget.summary()}): {len(self.race.queued)} race runs not run")
            self.race.queued = []
            return Searcher.FINISHED
        self.race.queued.pop(0)
        return self._start(trial_id, config, exploration=False)

    def _start(self, trial_id: str, config: dict[str, Any], exploration: bool) -> dict:
        self.suggested += 1
        self.configs[trial_id] = config
        if exploration:
            self.running_exploration.add(trial_id)
        if self.budget is not None:
            self.budget.started(trial_id, config)
        return config

    def _tell_not_run(self, trial_id: str) -> None:
        trial = self._ot_trials.pop(trial_id)
        trial.set_user_attr("not_run", "longer than the budget had left")
        self._ot_study.tell(trial, state=_pruned())

    def on_trial_result(self, trial_id, result):
        if self.budget is not None:
            self.budget.reported(trial_id, result)
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        result = result or {}
        finished = not error and ran_to_end(result)
        if self.budget is not None:
            self.budget.ended(trial_id, result, finished)
        if trial_id in self.running_exploration:
            self.running_exploration.discard(trial_id)
            metric = result.get(self._selection_metric())
            if finished and metric is not None:
                self.explored[trial_id] = (self.configs[trial_id], float(metric))
        if trial_id not in self._ot_trials:
            return  # a race run, or a trial restored without its Optuna trial
        super().on_trial_complete(trial_id, result=result if result.get("final") else None,
                                  error=error)


def _pruned():
    import optuna

    return optuna.trial.TrialState.PRUNED


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
