"""A search's compute budget in trial-seconds (the sum of its trials' ``time_total_s``).

A budget stops the search from starting trials; it never cuts a running one short (the
scheduler does that). So that the search ends within its budget rather than one trial past
it, a new trial starts only if it fits with room for a trial of the expected length::

    spent + sum over running trials of max(0, expected - elapsed) + expected <= limit

``expected`` is the mean length of the search's own trials that ran to their end; until one
has, that of the experiment the search was warm-started from (the versions), whose
configurations may train faster or slower than the searched ones. A trial the scheduler stops
costs only what it ran. Until some length is known, trials start while ``spent`` is below the
limit.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class TrialSecondsBudget:
    limit_s: float
    prior_lengths_s: list[float] = field(default_factory=list)
    """Lengths of the warm-start experiment's trials that ran to their end."""
    lengths_s: list[float] = field(default_factory=list)
    """Lengths of the search's own trials that ran to their end."""
    elapsed_s: dict[str, float] = field(default_factory=dict)
    """Every trial started so far: its latest ``time_total_s``."""
    running: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.limit_s > 0:
            raise ValueError(f"a trial-seconds budget must be positive, not {self.limit_s}")

    @property
    def expected_s(self) -> float | None:
        known = self.lengths_s or self.prior_lengths_s
        return statistics.mean(known) if known else None

    def spent_s(self) -> float:
        return sum(self.elapsed_s.values())

    def committed_s(self) -> float:
        """Spent, plus what the running trials are expected to need to reach their end."""
        expected = self.expected_s or 0.0
        return self.spent_s() + sum(max(0.0, expected - self.elapsed_s[t])
                                    for t in self.running)

    def allows_new_trial(self) -> bool:
        expected = self.expected_s
        if expected is None:
            return self.spent_s() < self.limit_s
        return self.committed_s() + expected <= self.limit_s

    def started(self, trial_id: str) -> None:
        self.elapsed_s.setdefault(trial_id, 0.0)
        self.running.add(trial_id)

    def reported(self, trial_id: str, seconds: float) -> None:
        self.elapsed_s[trial_id] = float(seconds)

    def ended(self, trial_id: str, seconds: float | None, ran_to_end: bool) -> None:
        if seconds is not None:
            self.elapsed_s[trial_id] = float(seconds)
        if ran_to_end and trial_id in self.elapsed_s:
            self.lengths_s.append(self.elapsed_s[trial_id])
        self.running.discard(trial_id)

    def summary(self) -> str:
        expected = "unknown" if self.expected_s is None else f"{self.expected_s:.0f}"
        return (f"{self.spent_s():.0f} of {self.limit_s:.0f} trial-s spent, running trials: "
                f"{len(self.running)}, a trial to its end: {expected} s")
