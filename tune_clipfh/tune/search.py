"""The Optuna search beyond v10: a Tune experiment of sampled trials on VALIDATION metrics.

It is warm-started with the versions (their knobs as points to evaluate first, or their
measured results from a ``reproduce`` experiment added to the study), stops bad trials with
ASHA, may have a compute budget in trial-seconds (:mod:`.budget`), and ends with a race of its
best configurations over more seeds or validation folds (:mod:`.searcher`); its choice is made
by :mod:`.selection`. The study lives in ``<experiment>/optuna.db``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import optuna
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from ..config import ConfigError, RunConfig, build_config
from ..errors import UserError
from .budget import TrialSecondsBudget, TrialShape
from .defaults import (
    ASHA,
    ASHA_GRACE,
    ASHA_REDUCTION,
    OBJECTIVES,
    RACE_OVER,
    RACE_RUNS,
    RACE_TOP,
    SAMPLER,
    SAMPLERS,
    STUDY_FILE,
)
from .experiment import (
    ExperimentOptions,
    fit_experiment,
    fixed_trials,
    plan_trial_gpus,
    prepare_shared_data,
    storage_and_name,
    tune_config,
)
from .results import load_results, trial_seconds_per_seed
from .searcher import BudgetedOptunaSearch, Race, ran_to_end
from .selection import RACE_OF
from .space import SearchSpace, load_space
from .trainable import META_KEYS
from .versions import load_versions


class RaceExemptASHA(ASHAScheduler):
    """ASHA on the image-stage epoch, which leaves race runs alone: they re-run a configuration
    that already trained to its end, to measure it again, not to compete with the others."""

    def on_trial_result(self, tune_controller, trial, result):
        if (trial.config or {}).get(RACE_OF) is not None:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def make_sampler(kind: str, seed: int, startup_trials: int = 0, warm_trials: int = 0):
    """The Optuna sampler ``--sampler`` names (see ``SAMPLERS``). ``startup_trials`` random
    trials of the search's own come first: the model-based samplers count the warm start's
    measured trials (``warm_trials``) as their start-up too, so without them they model from
    the first suggestion."""
    if kind not in SAMPLERS:
        raise ConfigError(f"--sampler: {kind!r} is not valid (valid: {', '.join(SAMPLERS)})")
    startup = warm_trials + startup_trials
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if kind == "gp":
        # deterministic_objective=False: a noise term, as one validation run is noisy.
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=max(startup, 1),
                                         deterministic_objective=False)
    # constant_liar: concurrent trials do not all get the same suggestion.
    multivariate = kind == "tpe"
    return optuna.samplers.TPESampler(seed=seed, multivariate=multivariate, group=multivariate,
                                      constant_liar=True, n_startup_trials=max(startup, 1))


def search(space_path: str | None, num_samples: int, objective: str, backbone: str,
           from_experiment: str | None, options: ExperimentOptions, *,
           asha_grace: int = ASHA_GRACE, asha_reduction: int = ASHA_REDUCTION,
           warm_start: bool = True, sampler: str = SAMPLER, sampler_startup: int = 0,
           asha: bool = ASHA, budget_trial_seconds: float | None = None,
           budget_share: float | None = None, race_top: int = RACE_TOP,
           race_runs: int = RACE_RUNS, race_over: str = RACE_OVER) -> Path:
    """Optuna search on VALIDATION metrics, warm-started with the versions; ``asha`` stops
    trials early (off by default, see ``defaults.ASHA``). It ends after ``num_samples`` trials (race
    runs included) or, with a budget (see :func:`trial_seconds_budget`), when the next trial
    would not fit in it, whichever comes first; a race then re-runs its ``race_top`` best
    configurations until each has ``race_runs`` runs, varying ``race_over`` (``race_top=0``:
    no race)."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective: {objective!r} is not valid (valid: "
                          f"{', '.join(OBJECTIVES)})")
    space = load_space(space_path, profile=options.profile, backbone=backbone)
    space = space.fixing(options.overrides)  # --set fixes a knob in every trial
    storage, name = storage_and_name(options, "search")
    path = Path(storage) / name
    base, base_config = _base_knobs(space, backbone, options)
    # on --resume the searcher's saved state carries the budget and what it has spent
    budget = None if options.resume else trial_seconds_budget(
        budget_trial_seconds, budget_share, from_experiment, backbone, base)
    seed = int(base.get("seed", 0))
    race = _race(race_top, race_runs, race_over, num_samples, seed)
    shared = prepare_shared_data([base], options)
    base["data_dir"] = shared["data_dir"]
    # The memory probe measures the largest batch the space may sample.
    gpus = plan_trial_gpus(options, [base], probe_sets=[
        {**base, "batch_size": space_maximum(space, "batch_size", base_config.batch_size)}])
    metrics = OBJECTIVES[objective]
    path.mkdir(parents=True, exist_ok=True)
    study_url = f"sqlite:///{path / STUDY_FILE}"
    evaluated, points = _warm_start(study_url, name, space, backbone, from_experiment, metrics,
                                    options, warm_start)
    searcher = BudgetedOptunaSearch.create(
        space=space.sample, metric=metrics if len(metrics) > 1 else metrics[0],
        mode="max" if len(metrics) == 1 else ["max"] * len(metrics),
        points_to_evaluate=points or None,
        sampler=make_sampler(sampler, seed, sampler_startup, len(evaluated)), study_name=name,
        storage=optuna.storages.RDBStorage(study_url), budget=budget, race=race,
        max_trials=num_samples)
    scheduler = RaceExemptASHA(time_attr="image_epoch", metric=metrics[-1], mode="max",
                               grace_period=asha_grace, reduction_factor=asha_reduction,
                               max_t=10_000) if asha else None
    return fit_experiment(
        options, storage, name, base, shared, gpus,
        {"kind": "search", "backbone": backbone, "objective": objective, "metrics": metrics,
         "num_samples": num_samples, "space": space.source, "optuna_storage": study_url,
         "budget_trial_seconds": budget.limit_s if budget else None,
         "from_experiment": str(Path(from_experiment).resolve()) if from_experiment else None,
         "sampler": sampler, "sampler_startup": sampler_startup, "asha": asha,
         "race": None if race is None else
         {"top": race.top, "runs": race.runs, "replicate": race.replicate},
         "base_knobs": base, "study_name": name},
        tune_config=tune_config(search_alg=searcher, scheduler=scheduler,
                                num_samples=num_samples,
                                max_concurrent_trials=options.max_concurrent or 2))


def _base_knobs(space: SearchSpace, backbone: str,
                options: ExperimentOptions) -> tuple[dict[str, Any], RunConfig]:
    """The knobs every trial starts from (the space's base, the backbone, ``--set``), raw and
    validated."""
    base = {**space.base, "model": backbone, "profile": options.profile, "pretrained": "auto",
            **options.overrides}
    base["data_dir"], base["cache_dir"] = None, options.cache_dir
    return base, build_config(base, f"{space.source} base").config


def _race(top: int, runs: int, over: str, num_samples: int, seed: int) -> Race | None:
    """The search's closing race (None for ``top=0``), checked against ``num_samples``."""
    if not top:
        return None
    try:
        race = Race(top=top, runs=runs, replicate=over, base_seed=seed)
    except ValueError as exc:
        raise UserError(f"--race-top/--race-runs/--race-over: {exc}") from None
    if race.trials >= num_samples:
        raise UserError(f"--race-top {race.top} x (--race-runs {race.runs} - 1) = {race.trials} "
                        f"race runs leave none of --num-samples {num_samples} to explore")
    return race


def _warm_start(study_url: str, name: str, space: SearchSpace, backbone: str,
                from_experiment: str | None, metrics: list[str], options: ExperimentOptions,
                warm_start: bool) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The versions' measured points added to the study (from ``from_experiment``) and the
    version points still to run first. On --resume the study already holds both: OptunaSearch
    enqueues points_to_evaluate into the shared storage when built, so passing them again would
    run them a second time."""
    if options.resume:
        return [], []
    evaluated = seed_study_with_results(study_url, name, space, Path(from_experiment), metrics,
                                        backbone) if from_experiment else []
    points = [p for p in version_points(space, backbone, options.profile, options.overrides)
              if p not in evaluated] if warm_start else []
    return evaluated, points


def trial_seconds_budget(seconds: float | None, share: float | None,
                         from_experiment: str | None, backbone: str,
                         base_knobs: dict[str, Any] | None = None) -> TrialSecondsBudget | None:
    """The search's budget: ``seconds`` of trial time, or ``share`` of the trial-seconds per seed
    that ``from_experiment``'s trials of ``backbone`` took (0.5: half the versions' compute). The
    versions there that trained to their end teach the budget what an epoch of each kind costs
    until the search's own trials do."""
    if seconds is not None and share is not None:
        raise UserError("--budget-trial-seconds and --budget-share: give one of them")
    if seconds is None and share is None:
        return None
    if share is not None and not from_experiment:
        raise UserError("--budget-share needs --from-experiment: the share is of that "
                        "experiment's trial-seconds")
    for flag, value in (("--budget-trial-seconds", seconds), ("--budget-share", share)):
        if value is not None and not value > 0:
            raise UserError(f"{flag} {value}: must be positive")
    versions = None
    if from_experiment:
        frame = load_results(experiment_folder(from_experiment))
        versions = frame[frame["config/backbone"] == backbone] \
            if "config/backbone" in frame else frame.iloc[:0]
        if share is not None:
            if versions.empty:
                raise UserError(f"--budget-share: {from_experiment} has no {backbone} trials "
                                f"to take a share of")
            seconds = share * trial_seconds_per_seed(versions)
    budget = TrialSecondsBudget(float(seconds), base_knobs=dict(base_knobs or {}))
    for row in versions.to_dict("records") if versions is not None else []:
        if not ran_to_end(row):
            continue
        budget.prior_lengths_s.append(float(row["time_total_s"]))
        if row.get("prompt_seconds") is not None and row.get("image_seconds") is not None:
            knobs = {k.removeprefix("config/"): v for k, v in row.items()
                     if k.startswith("config/")}
            budget.learn(TrialShape.of(knobs), float(row["prompt_seconds"]),
                         float(row["image_seconds"]), float(row["time_total_s"]))
    if not budget.allows(budget.base_knobs):
        raise UserError(f"search budget of {budget.limit_s:.0f} trial-s: shorter than one trial "
                        f"({budget.expected_s(budget.shape(None)):.0f} s as the versions in "
                        f"{from_experiment} ran); give more")
    expected = budget.expected_s(budget.shape(None))
    known = "" if expected is None else \
        f"; a trial of the space's base shape is expected to take {expected:.0f} s"
    _stderr(f"[search] budget: {budget.limit_s:.0f} trial-s, no trial starts that would not "
            f"fit{known}")
    return budget


def space_maximum(space: SearchSpace, name: str, default: Any) -> Any:
    """The largest value the space samples for ``name`` (``default`` when it is not searched)."""
    for param in space.parameters:
        if param.name == name:
            return max(param.choices) if param.type == "categorical" else \
                type(default)(param.high)
    return default


def version_points(space: SearchSpace, backbone: str, profile: str,
                   overrides: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The versions' points to evaluate first: their projections onto the space (those whose
    values are in range), each version resolved as ``reproduce`` runs it with ``overrides``."""
    if backbone not in load_versions(profile=profile):
        return []
    points = []
    for trial in fixed_trials([backbone], None, profile, dict(overrides or {})):
        point = space.point_from_knobs({k: v for k, v in trial.items() if k not in META_KEYS})
        if point is not None and point not in points:
            points.append(point)
    return points


def experiment_folder(path: str | Path) -> Path:
    """``--from-experiment``'s folder, which must exist."""
    if not Path(path).is_dir():
        raise UserError(f"--from-experiment {path}: folder does not exist")
    return Path(path)


def seed_study_with_results(study_url: str, study_name: str, space: SearchSpace,
                            experiment: Path, metrics: list[str], backbone: str) -> list[dict]:
    """Add a reproduce run's measured validation results to the study as finished trials:
    those of the versions that lie inside the space (:meth:`SearchSpace.outside`).

    (OptunaSearch's ``evaluated_rewards`` does not work with a define-by-run space, so the
    study is created first in the shared storage and OptunaSearch loads it.)
    """
    analysis = tune.ExperimentAnalysis(str(experiment_folder(experiment).resolve()))
    study = optuna.create_study(storage=study_url, study_name=study_name,
                                directions=["maximize"] * len(metrics), load_if_exists=True)
    added: list[dict] = []
    left_out: list[str] = []
    for trial in analysis.trials:
        result = trial.last_result or {}
        fixed = trial.config.get("fixed") or {}
        if not result.get("final") or fixed.get("backbone") != backbone:
            continue
        knobs = {k: v for k, v in fixed.items() if k not in META_KEYS}
        outside = space.outside(knobs)
        if outside:
            left_out.append(f"{fixed.get('version')} ({', '.join(outside)})")
            continue
        point = space.point_from_knobs(knobs)
        distributions = {p.name: p.distribution() for p in space.active(point)}
        values = [float(result[m]) for m in metrics]
        study.add_trial(optuna.trial.create_trial(
            params=point, distributions=distributions,
            values=values, user_attrs={"source": f"{experiment.name}/{fixed.get('version')}"}))
        added.append(point)
    _stderr(f"[search] warm start: {len(added)} measured versions from {experiment}")
    if left_out:
        # Their results belong to configurations the space cannot train: telling the study
        # that their projections scored so would mislead the sampler.
        _stderr(f"[search] warm start: left out, outside the space (the knobs where they "
                f"differ): {'; '.join(sorted(set(left_out)))}")
    return added


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
