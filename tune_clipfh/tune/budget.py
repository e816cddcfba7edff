"""A search's compute budget in trial-seconds (the sum of its trials' ``time_total_s``).

A budget stops the search from starting trials; it never cuts a running one short (the
scheduler does that). So that the search ends within its budget rather than one trial past
it, a trial starts only if it fits beside what the running trials are still expected to need::

    spent + sum over running trials of max(0, expected(t) - elapsed(t)) + expected(new) <= limit

A trial's expected length follows from its shape (:class:`TrialShape`): how many epochs each
stage runs, and whether the text tower trains in the prompt stage (on the tiny RN50 such a
prompt epoch costs 2 s against 0.3 s with the tower frozen)::

    expected = overhead + epochs_prompt x prompt_epoch_s(text trains) + epochs_image x image_epoch_s

The per-epoch seconds are the means over every epoch the trials reported (the warm-start
experiment's trials count from the start, by their summed stage times); the overhead (the
validation before training, the test) is the mean over trials that ran to their end. So a
search whose image stage is searched pays for a long stage what it costs. Until a kind of epoch
has been seen, the mean length of whole trials stands in (the warm-start experiment's, then the
search's own); with nothing known, trials start while ``spent`` is below the limit. A trial the
scheduler stops costs only what it ran.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TrialShape:
    """What a trial's length depends on."""

    epochs_prompt: int
    epochs_image: int
    text_trains: bool

    @classmethod
    def of(cls, knobs: dict[str, Any]) -> TrialShape:
        """The shape of a trial with these knobs (RunConfig defaults where unset)."""
        from ..config import FIELDS  # torch-free

        def knob(name: str) -> Any:
            return knobs.get(name, FIELDS[name].default)

        mode = knob("stage_mode")
        return cls(epochs_prompt=int(knob("epochs_prompt")) if mode != "image_only" else 0,
                   epochs_image=int(knob("epochs_image")) if mode != "prompt_only" else 0,
                   text_trains=not knob("freeze_text_encoder"))

    def epoch_kinds(self) -> dict[str, int]:
        """Epochs of each kind this shape runs (kinds with none left out)."""
        kinds = {prompt_kind(self.text_trains): self.epochs_prompt, "image": self.epochs_image}
        return {kind: epochs for kind, epochs in kinds.items() if epochs}


def prompt_kind(text_trains: bool) -> str:
    return "prompt_text" if text_trains else "prompt"


@dataclass
class TrialSecondsBudget:
    limit_s: float
    base_knobs: dict[str, Any] = field(default_factory=dict)
    """The knobs every trial shares; a trial's own config is laid over them for its shape."""
    prior_lengths_s: list[float] = field(default_factory=list)
    """Lengths of the warm-start experiment's trials that ran to their end."""
    lengths_s: list[float] = field(default_factory=list)
    """Lengths of the search's own trials that ran to their end."""
    epoch_seconds: dict[str, list[float]] = field(default_factory=dict)
    """Per kind of epoch (``prompt``, ``prompt_text``, ``image``): [seconds, epochs] seen."""
    overheads_s: list[float] = field(default_factory=list)
    elapsed_s: dict[str, float] = field(default_factory=dict)
    """Every trial started so far: its latest ``time_total_s``."""
    shapes: dict[str, TrialShape] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        if not self.limit_s > 0:
            raise ValueError(f"a trial-seconds budget must be positive, not {self.limit_s}")

    # ---------------------------------------------------------------- what is known
    def shape(self, config: dict[str, Any] | None) -> TrialShape:
        return TrialShape.of({**self.base_knobs, **(config or {})})

    def learn(self, shape: TrialShape, prompt_s: float, image_s: float, total_s: float) -> None:
        """A trial that ran to its end with this shape (the warm start's, or the search's)."""
        for kind, seconds in ((prompt_kind(shape.text_trains), prompt_s), ("image", image_s)):
            epochs = shape.epoch_kinds().get(kind, 0)
            if epochs:
                self._add_epochs(kind, seconds, epochs)
        self.overheads_s.append(max(0.0, total_s - prompt_s - image_s))

    def _add_epochs(self, kind: str, seconds: float, epochs: int) -> None:
        total = self.epoch_seconds.setdefault(kind, [0.0, 0])
        total[0] += seconds
        total[1] += epochs

    def expected_s(self, shape: TrialShape | None = None) -> float | None:
        """Expected length of a trial of ``shape`` (None: of a typical trial), or None."""
        kinds = shape.epoch_kinds() if shape is not None else {}
        if shape is not None and all(kind in self.epoch_seconds for kind in kinds):
            overhead = statistics.mean(self.overheads_s) if self.overheads_s else 0.0
            return overhead + sum(epochs * self.epoch_seconds[kind][0] / self.epoch_seconds[kind][1]
                                  for kind, epochs in kinds.items())
        known = self.lengths_s or self.prior_lengths_s
        return statistics.mean(known) if known else None

    def spent_s(self) -> float:
        return sum(self.elapsed_s.values())

    def committed_s(self) -> float:
        """Spent, plus what the running trials are expected to need to reach their end."""
        return self.spent_s() + sum(
            max(0.0, (self.expected_s(self.shapes.get(t)) or 0.0) - self.elapsed_s[t])
            for t in self.running)

    def allows(self, config: dict[str, Any] | None = None, reserve_s: float = 0.0) -> bool:
        """Whether a trial with this config (None: a typical one) fits, ``reserve_s`` kept."""
        expected = self.expected_s(self.shape(config) if config is not None else None)
        if expected is None:
            return self.spent_s() + reserve_s < self.limit_s
        return self.committed_s() + expected + reserve_s <= self.limit_s

    def allows_new_trial(self) -> bool:
        return self.allows(None)

    # ---------------------------------------------------------------- what trials do
    def started(self, trial_id: str, config: dict[str, Any] | None = None) -> None:
        self.elapsed_s.setdefault(trial_id, 0.0)
        self.shapes[trial_id] = self.shape(config)
        self.running.add(trial_id)

    def reported(self, trial_id: str, result: dict[str, Any]) -> None:
        """An epoch row (or the final row) of a trial."""
        if "time_total_s" in result:
            self.elapsed_s[trial_id] = float(result["time_total_s"])
        stage, seconds = result.get("stage"), result.get("epoch_time_s")
        if result.get("final") or stage not in ("prompt", "image") or seconds is None:
            return
        shape = self.shapes.get(trial_id)
        kind = prompt_kind(shape.text_trains if shape else False) if stage == "prompt" \
            else "image"
        self._add_epochs(kind, float(seconds), 1)

    def ended(self, trial_id: str, result: dict[str, Any] | None, ran_to_end: bool) -> None:
        result = result or {}
        if result.get("time_total_s") is not None:
            self.elapsed_s[trial_id] = float(result["time_total_s"])
        if ran_to_end and trial_id in self.elapsed_s:
            total = self.elapsed_s[trial_id]
            self.lengths_s.append(total)
            if "prompt_seconds" in result and "image_seconds" in result:
                self.overheads_s.append(max(0.0, total - float(result["prompt_seconds"])
                                            - float(result["image_seconds"])))
        self.running.discard(trial_id)

    def summary(self) -> str:
        expected = self.expected_s()
        typical = "unknown" if expected is None else f"{expected:.0f}"
        return (f"{self.spent_s():.0f} of {self.limit_s:.0f} trial-s spent, running trials: "
                f"{len(self.running)}, a trial to its end: {typical} s")
