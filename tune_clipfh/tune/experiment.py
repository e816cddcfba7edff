"""Tune experiments: ``reproduce`` (v1-v10 as fixed trials) and ``search`` (Optuna beyond v10).

Both decode the dataset once in the driver (a memory-mapped store every trial opens read-only),
resolve every path to absolute before ``fit()`` (trials run in their own working folders), and
resume an interrupted experiment with ``Tuner.restore`` (finished trials kept, unfinished ones
continued from their checkpoints, the Optuna searcher's state restored).

A Ray cluster started here keeps Ray's token authentication on, with a token file only its user
can read (:func:`init_ray`); trials get GPUs as :mod:`.gpus` plans them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from ..config import AS_RUN_SWITCHES, ConfigError, build_config
from ..data.prepared import identity_set_for, load_prepared, resolve_data_dir
from ..errors import UserError
from ..model.registry import BACKBONES, backbone_spec
from ..train.stages import RAN_TO_END
from .budget import TrialSecondsBudget
from .defaults import ASHA_GRACE, ASHA_REDUCTION
from .gpus import AUTO, plan_gpus, ray_probe
from .progress import TrialProgress, trial_folder_name
from .results import load_results, trial_seconds_per_seed
from .space import SearchSpace, load_space
from .trainable import META_KEYS, clipfh_trainable
from .versions import VERSIONS_AS_RUN_FILE, VERSIONS_FILE, load_versions, scaled_to_overlay

OBJECTIVES = {"rank1": ["best_val_rank1"], "mAP": ["best_val_mAP"],
              "both": ["best_val_rank1", "best_val_mAP"]}
AUTH_MODE_VAR, TOKEN_VAR, TOKEN_PATH_VAR = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"
LOCAL_NODE_IP = "127.0.0.2" if sys.platform.startswith("linux") else None
"""The node address of a cluster started here. Ray 2.60 cannot keep a local cluster on
loopback: its GCS, raylet and worker gRPC servers listen on every interface whatever the node
address, and ``ray.init`` rewrites ``_node_ip_address="127.0.0.1"`` (or ``localhost``) to the
machine's outward address. Another loopback address is kept as given (on Linux all of
127.0.0.0/8 is loopback), so the servers Ray binds to the node address (the runtime-env agent)
and every address Ray advertises stay on loopback. What refuses other hosts and local users at
the wildcard listeners is the token. (Elsewhere Ray already uses 127.0.0.1 for a local
cluster.)"""


@dataclass
class ExperimentOptions:
    name: str | None = None
    storage: str | None = None
    profile: str = "tiny"
    seeds: int = 1
    data: str | None = None
    cache_dir: str | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | str = AUTO
    """``auto`` (see :mod:`.gpus`) or a number of GPUs, fractions sharing a card."""
    max_concurrent: int | None = None
    address: str | None = None
    resume: bool = False
    max_failures: int = 2
    overrides: dict[str, Any] = field(default_factory=dict)


def default_storage() -> Path:
    return (Path.cwd() / "runs" / "ray").resolve()


def init_ray(options: ExperimentOptions, **ray_kwargs: Any) -> None:
    """Connect to ``options.address`` (or ``RAY_ADDRESS``) with the user's own Ray settings, or
    start a local cluster with token authentication on and no dashboard. ``ray_kwargs`` go to
    ``ray.init`` (tests pass ``num_cpus``)."""
    if ray.is_initialized():
        return
    # Trials resolve paths before fit(); keep Ray's own chdir off too, so nothing relative breaks.
    os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
    # Trial logs stay in each trial's folder; the driver prints one line per epoch instead.
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                              "configure_logging": False, **ray_kwargs}
    address = options.address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        ray.init(address=address, **kwargs)
        return
    secure_local_auth()
    if LOCAL_NODE_IP:
        kwargs.setdefault("_node_ip_address", LOCAL_NODE_IP)
    ray.init(**kwargs)


def auth_token_path() -> Path | None:
    """The token file Ray reads here (``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``), or
    None when the token comes from ``RAY_AUTH_TOKEN``."""
    if os.environ.get(TOKEN_VAR):
        return None
    custom = os.environ.get(TOKEN_PATH_VAR)
    return Path(custom).expanduser() if custom else Path.home() / ".ray" / "auth_token"


def secure_local_auth() -> Path | None:
    """Token authentication for a Ray cluster this process starts: on, whatever
    ``RAY_AUTH_MODE`` says, with a token file only this user can read (created here, mode 0600,
    before Ray would write one with the default umask). Returns the token file (None: the token
    is ``RAY_AUTH_TOKEN``)."""
    mode = os.environ.get(AUTH_MODE_VAR)
    if mode is not None and mode.lower() != "token":
        _stderr(f"[ray] {AUTH_MODE_VAR}={mode} ignored: a Ray cluster tune-clipfh starts always "
                f"uses token authentication")
        # Unset, Ray 2.60 turns token authentication on for a new local cluster (and refreshes
        # its configuration, which it read from the environment at import).
        del os.environ[AUTH_MODE_VAR]
    # Ray's own notice for that default says how to opt out; this project does not.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    path = auth_token_path()
    if path is None:
        return None
    try:
        if not path.exists():
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))  # 256 bits, as Ray's own tokens
        elif stat.S_IMODE(path.stat().st_mode) & 0o077:
            path.chmod(0o600)
            _stderr(f"[ray] {path}: made readable by its owner only (mode 0600)")
    except OSError as exc:
        raise UserError(f"Ray authentication token {path}: {exc.strerror or exc} (it must be a "
                        f"file only you can read; set {TOKEN_PATH_VAR} to use another)") from None
    return path


def _storage_and_name(options: ExperimentOptions, prefix: str) -> tuple[str, str]:
    storage = options.storage or str(default_storage())
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    name = options.name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    return storage, name


def _prepare_shared_data(knob_sets: list[dict[str, Any]], options: ExperimentOptions) -> dict:
    """Decode the data once per resolution before any trial starts, and check that it offers
    every identity set the trials train on (as-run trials: all training identities, B11), so
    a bad folder fails here rather than in every trial; return absolute paths."""
    data_dir = resolve_data_dir(options.data, options.cache_dir, log=_stderr)
    sizes = {backbone_spec(k.get("model", "vitb16")).input_size(k.get("profile", options.profile))
             for k in knob_sets}
    identity_sets = {identity_set_for(k.get("select_on", "val")) for k in knob_sets}
    for size in sorted(sizes):
        for identity_set in sorted(identity_sets):  # both views share one decoded store
            load_prepared(data_dir, size, cache_dir=options.cache_dir, progress=True,
                          identity_set=identity_set)
    return {"data_dir": str(data_dir), "cache_dir": options.cache_dir}


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def plan_trial_gpus(options: ExperimentOptions, knob_sets: list[dict[str, Any]],
                    probe_sets: list[dict[str, Any]] | None = None) -> float:
    """Start (or join) Ray, then GPUs per trial for these knob sets (``--gpus-per-trial``, see
    :mod:`.gpus`; the memory probe runs ``probe_sets``, by default the knob sets). When
    the trials must run on the CPU, each knob set's ``device`` becomes ``cpu``."""
    init_ray(options)
    devices = {str(k.get("device", "auto")) for k in knob_sets}
    probed = [{k: v for k, v in knobs.items() if k not in META_KEYS}
              for knobs in probe_sets or knob_sets]
    plan = plan_gpus(options.gpus_per_trial, ray.cluster_resources().get("GPU", 0.0), devices,
                     ray_probe(probed))
    if plan.note:
        _stderr(plan.note)
    if plan.device:
        for knobs in knob_sets:
            knobs["device"] = plan.device
    return plan.gpus_per_trial


def _run_config(options: ExperimentOptions, storage: str, name: str):
    return tune.RunConfig(
        name=name, storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=[TrialProgress()], verbose=0)


def _tune_config(**kwargs):
    """TuneConfig with short, readable trial names and folders (label + trial id).

    Trial actors are reused (every trial of an experiment asks for the same resources): a fresh
    actor per trial costs a worker process importing torch and open_clip, about 10 s per tiny
    trial on 2 busy cores against about 1.5 s reused. Every trial builds its Trainer from
    scratch and seeds it explicitly, so reuse changes no result.
    """
    kwargs.setdefault("reuse_actors", True)
    return tune.TuneConfig(trial_name_creator=trial_folder_name,
                           trial_dirname_creator=trial_folder_name, **kwargs)


def _restore(path: Path, trainable):
    if tune.Tuner.can_restore(str(path)):
        _stderr(f"[tune] resuming experiment {path}")
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True,
                                  resume_errored=True)
    raise UserError(f"--resume: no experiment to resume at {path} (check --name and --storage)")


def fixed_trials(backbones: list[str], versions: list[str] | None, profile: str,
                 overrides: dict[str, Any], as_run: bool = False) -> list[dict[str, Any]]:
    """Resolved knobs of each chosen version, with its name and backbone, ready for a trial.

    ``as_run`` takes the versions as they ran upstream (versions_as_run.yaml) instead of as
    stated, trained correctly (versions.yaml).
    """
    trials = []
    path = VERSIONS_AS_RUN_FILE if as_run else None
    defined = load_versions(path, profile=profile)
    for backbone in backbones:
        resolved = defined.get(backbone)
        if resolved is None:
            raise ConfigError(_unknown_backbone(backbone, list(defined), path or VERSIONS_FILE))
        chosen = versions or list(resolved)
        for version in chosen:
            if version not in resolved:
                raise ConfigError(f"--versions: {version!r} is not defined for {backbone} "
                                  f"(valid: {', '.join(resolved)})")
            item = resolved[version]
            # an override of a stage's length shortens its warm-ups with it, as overlays do
            knobs = {**item.knobs, **scaled_to_overlay(item.knobs, overrides), **overrides,
                     "experiment": f"{backbone}-{version}"}
            build_config(knobs, f"{backbone} {version}")  # fail before Ray starts
            trials.append({"version": version, "backbone": backbone, "kind": "fixed",
                           "behaviour": "as_run" if as_run else "correct",
                           "thesis_run": item.thesis_run, **knobs})
    return trials


def _unknown_backbone(backbone: str, with_versions: list[str], versions_file: Path) -> str:
    reproducible = f"backbones with versions in {Path(versions_file).name}: " \
        f"{', '.join(with_versions)}"
    if backbone in BACKBONES:
        return f"--backbones: {backbone!r} has no versions to reproduce ({reproducible})"
    return (f"--backbones: {backbone!r} is not a backbone (valid: {', '.join(BACKBONES)}; "
            f"{reproducible})")


def ablation_trials(backbone: str, version: str, profile: str,
                    overrides: dict[str, Any]) -> list[dict[str, Any]]:
    """The as-run configuration, the correct one, and the as-run one with each upstream
    behaviour switched back to the correct value, one at a time (switches that the as-run
    version does not change are left out)."""
    correct = fixed_trials([backbone], [version], profile, overrides)[0]
    as_run = fixed_trials([backbone], [version], profile, overrides, as_run=True)[0]
    trials = [{**correct, "ablation": "correct"}, {**as_run, "ablation": "as_run"}]
    for bug, knobs in AS_RUN_SWITCHES.items():
        if all(as_run[k] == correct[k] for k in knobs):
            continue
        fixed = {**as_run, **{k: correct[k] for k in knobs}, "ablation": f"as_run-{bug}",
                 "behaviour": "as_run"}
        build_config({k: v for k, v in fixed.items() if k not in META_KEYS},
                     f"ablation {bug}")
        trials.append(fixed)
    return trials


def reproduce(backbones: list[str], versions: list[str] | None,
              options: ExperimentOptions, as_run: bool = False) -> Path:
    """One Tune experiment whose trials are the chosen versions x seeds."""
    trials = fixed_trials(backbones, versions, options.profile, options.overrides, as_run)
    return run_fixed_trials(trials, options, "reproduce-as-run" if as_run else "reproduce",
                            {"backbones": backbones, "versions": versions, "as_run": as_run})


def ablate(backbone: str, version: str, options: ExperimentOptions) -> Path:
    """Each upstream bug's effect on one version: correct, as-run, as-run minus each bug."""
    trials = ablation_trials(backbone, version, options.profile, options.overrides)
    return run_fixed_trials(trials, options, f"ablation-{backbone}-{version}",
                            {"backbones": [backbone], "versions": [version], "ablation": True})


def run_fixed_trials(trials: list[dict[str, Any]], options: ExperimentOptions, prefix: str,
                     meta: dict[str, Any]) -> Path:
    """One Tune experiment over fixed trials x seeds; each trial runs its own early stopping."""
    storage, name = _storage_and_name(options, prefix)
    shared = _prepare_shared_data(trials, options)
    gpus = plan_trial_gpus(options, trials)
    return _fit_experiment(
        options, storage, name, {}, shared, gpus,
        {"kind": "reproduce", "seeds": options.seeds, **meta},
        param_space={"fixed": tune.grid_search(trials),
                     "seed": tune.grid_search(list(range(options.seeds)))},
        tune_config=_tune_config(max_concurrent_trials=options.max_concurrent))


def _fit_experiment(options: ExperimentOptions, storage: str, name: str,
                    base_knobs: dict[str, Any], shared: dict, gpus_per_trial: float,
                    meta: dict[str, Any], **tuner_kwargs: Any) -> Path:
    """Start (or, with ``options.resume``, restore) one Tune experiment of the trainable, record
    what it is next to Ray's own state, and run it to the end; returns its folder."""
    path = Path(storage) / name
    trainable = tune.with_resources(
        tune.with_parameters(clipfh_trainable, base_knobs=base_knobs, **shared),
        {"cpu": options.cpus_per_trial, "gpu": gpus_per_trial})
    init_ray(options)
    if options.resume:
        tuner = _restore(path, trainable)
    else:
        tuner = tune.Tuner(trainable, run_config=_run_config(options, storage, name),
                           **tuner_kwargs)
    _write_meta(path, {"profile": options.profile, "data_dir": shared["data_dir"],
                       "gpus_per_trial": gpus_per_trial, **meta})
    tuner.fit()
    return path


class FinalRowOptunaSearch(OptunaSearch):
    """An OptunaSearch that records scheduler-stopped trials as PRUNED, and starts no trial
    past its trial-seconds budget (when given one).

    OptunaSearch tells Optuna the last reported row; a trial stopped early by ASHA would enter
    the study as COMPLETE with under-trained metrics (anchors 3.3, pitfall 2). Only trials that
    reached their final row (``final == 1``) count as COMPLETE.
    """

    budget: TrialSecondsBudget | None = None

    @classmethod
    def create(cls, budget: TrialSecondsBudget | None = None, **kwargs) -> FinalRowOptunaSearch:
        searcher = cls(**kwargs)
        searcher.budget = budget  # saved and restored with the searcher's state on --resume
        return searcher

    def suggest(self, trial_id):
        if self.budget is not None and not self.budget.allows_new_trial():
            _stderr(f"[search] trial-seconds budget reached ({self.budget.summary()}): no new "
                    f"trials")
            return Searcher.FINISHED
        suggestion = super().suggest(trial_id)
        if self.budget is not None and isinstance(suggestion, dict):
            self.budget.started(trial_id)
        return suggestion

    def on_trial_result(self, trial_id, result):
        if self.budget is not None and "time_total_s" in result:
            self.budget.reported(trial_id, result["time_total_s"])
        super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id, result=None, error=False):
        if self.budget is not None:
            self.budget.ended(trial_id, (result or {}).get("time_total_s"),
                              not error and ran_to_end(result or {}))
        if result is not None and not result.get("final"):
            result = None
        super().on_trial_complete(trial_id, result=result, error=error)


def ran_to_end(result: dict[str, Any]) -> bool:
    """A trial's last row says it trained to its end (its schedule or its early stopping)."""
    return bool(result.get("final")) and result.get("status") in RAN_TO_END


def make_sampler(kind: str, seed: int):
    """Multivariate TPE (multi-objective TPE when several metrics), or random search."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # constant_liar: concurrent trials do not all get the same suggestion.
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                      constant_liar=True)


def search(space_path: str | None, num_samples: int, objective: str, backbone: str,
           from_experiment: str | None, options: ExperimentOptions, *,
           asha_grace: int = ASHA_GRACE, asha_reduction: int = ASHA_REDUCTION,
           warm_start: bool = True, sampler: str = "tpe", asha: bool = True,
           budget_trial_seconds: float | None = None,
           budget_share: float | None = None) -> Path:
    """Optuna search on VALIDATION metrics, warm-started with the versions, ASHA early stop
    (``asha=False``: every trial runs to its own end; the benchmark's baseline). It ends after
    ``num_samples`` trials or, with a budget (see :func:`trial_seconds_budget`), when the next
    trial would not fit in it, whichever comes first."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"--objective: {objective!r} is not valid (valid: "
                          f"{', '.join(OBJECTIVES)})")
    # on --resume the searcher's saved state carries the budget and what it has spent
    budget = None if options.resume else trial_seconds_budget(
        budget_trial_seconds, budget_share, from_experiment, backbone)
    space = load_space(space_path, profile=options.profile, backbone=backbone)
    storage, name = _storage_and_name(options, "search")
    path = Path(storage) / name
    base = {**space.base, "model": backbone, "profile": options.profile, "pretrained": "auto",
            **options.overrides}
    base["data_dir"], base["cache_dir"] = None, options.cache_dir
    base_config = build_config(base, f"{space.source} base").config
    shared = _prepare_shared_data([base], options)
    base["data_dir"] = shared["data_dir"]
    # The memory probe measures the largest batch the space may sample.
    gpus = plan_trial_gpus(options, [base], probe_sets=[
        {**base, "batch_size": space_maximum(space, "batch_size", base_config.batch_size)}])
    metrics = OBJECTIVES[objective]
    modes = ["max"] * len(metrics)
    study_storage = path / "optuna.db"
    path.mkdir(parents=True, exist_ok=True)
    study_url = f"sqlite:///{study_storage}"
    evaluated = []
    if from_experiment and not options.resume:
        evaluated = seed_study_with_results(study_url, name, space, Path(from_experiment),
                                            metrics, backbone)
    # On --resume the study already holds the points (queued or run): OptunaSearch enqueues
    # points_to_evaluate into the shared storage when built, so passing them again would run
    # them a second time.
    points = [p for p in version_points(space, backbone, options.profile)
              if p not in evaluated] if warm_start and not options.resume else []
    optuna_sampler = make_sampler(sampler, int(options.overrides.get("seed", 0)))
    searcher = FinalRowOptunaSearch.create(
        space=space.sample, metric=metrics if len(metrics) > 1 else metrics[0],
        mode=modes if len(modes) > 1 else modes[0], points_to_evaluate=points or None,
        sampler=optuna_sampler, study_name=name,
        storage=optuna.storages.RDBStorage(study_url), budget=budget)
    scheduler = ASHAScheduler(time_attr="training_iteration", metric=metrics[-1], mode="max",
                              grace_period=asha_grace, reduction_factor=asha_reduction,
                              max_t=10_000) if asha else None
    return _fit_experiment(
        options, storage, name, base, shared, gpus,
        {"kind": "search", "backbone": backbone, "objective": objective, "metrics": metrics,
         "num_samples": num_samples, "space": space.source, "optuna_storage": study_url,
         "budget_trial_seconds": budget.limit_s if budget else None,
         "study_name": name},
        tune_config=_tune_config(search_alg=searcher, scheduler=scheduler,
                                 num_samples=num_samples,
                                 max_concurrent_trials=options.max_concurrent or 2))


def trial_seconds_budget(seconds: float | None, share: float | None,
                         from_experiment: str | None, backbone: str) -> TrialSecondsBudget | None:
    """The search's budget: ``seconds`` of trial time, or ``share`` of the trial-seconds per seed
    that ``from_experiment``'s trials of ``backbone`` took (0.5: half the versions' compute). The
    versions there that trained to their end give the expected length of a trial until the
    search's own trials do."""
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
    lengths: list[float] = []
    if from_experiment:
        frame = load_results(experiment_folder(from_experiment))
        versions = frame[frame["config/backbone"] == backbone] \
            if "config/backbone" in frame else frame.iloc[:0]
        if share is not None:
            if versions.empty:
                raise UserError(f"--budget-share: {from_experiment} has no {backbone} trials "
                                f"to take a share of")
            seconds = share * trial_seconds_per_seed(versions)
        lengths = [float(row["time_total_s"]) for row in versions.to_dict("records")
                   if ran_to_end(row)]
    budget = TrialSecondsBudget(float(seconds), prior_lengths_s=lengths)
    if not budget.allows_new_trial():
        raise UserError(f"search budget of {budget.limit_s:.0f} trial-s: shorter than one trial "
                        f"({budget.expected_s:.0f} s each in {from_experiment}); give more")
    expected = "" if budget.expected_s is None else \
        f"; a trial to its end took {budget.expected_s:.0f} s in {from_experiment}"
    _stderr(f"[search] budget: {budget.limit_s:.0f} trial-s, no trial starts that would not "
            f"fit{expected}")
    return budget


def space_maximum(space: SearchSpace, name: str, default: Any) -> Any:
    """The largest value the space samples for ``name`` (``default`` when it is not searched)."""
    for param in space.parameters:
        if param.name == name:
            return max(param.choices) if param.type == "categorical" else \
                type(default)(param.high)
    return default


def version_points(space: SearchSpace, backbone: str, profile: str) -> list[dict[str, Any]]:
    """The versions' knobs as points to evaluate first (those that fall inside the space)."""
    points = []
    for item in load_versions(profile=profile).get(backbone, {}).values():
        point = space.point_from_knobs(item.knobs)
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
    """Add a reproduce run's measured validation results to the study as finished trials.

    (OptunaSearch's ``evaluated_rewards`` does not work with a define-by-run space, so the
    study is created first in the shared storage and OptunaSearch loads it.)
    """
    analysis = tune.ExperimentAnalysis(str(experiment_folder(experiment).resolve()))
    study = optuna.create_study(storage=study_url, study_name=study_name,
                                directions=["maximize"] * len(metrics), load_if_exists=True)
    added: list[dict] = []
    for trial in analysis.trials:
        result = trial.last_result or {}
        fixed = trial.config.get("fixed") or {}
        if not result.get("final") or fixed.get("backbone") != backbone:
            continue
        point = space.point_from_knobs(fixed)
        if point is None:
            continue
        distributions = {p.name: p.distribution() for p in space.active(point)}
        values = [float(result[m]) for m in metrics]
        study.add_trial(optuna.trial.create_trial(
            params=point, distributions=distributions,
            values=values, user_attrs={"source": f"{experiment.name}/{fixed.get('version')}"}))
        added.append(point)
    _stderr(f"[search] warm start: {len(added)} measured versions from {experiment}")
    return added


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tune_clipfh_experiment.json").write_text(json.dumps(meta, indent=1))
