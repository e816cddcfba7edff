"""Tune experiments of fixed trials: ``reproduce`` (v1-v10) and ``ablate``, and what every
experiment shares (its options, data set-up, GPU plan, run folder and resume).

Experiments decode the dataset once in the driver (a memory-mapped store every trial opens
read-only), resolve every path to absolute before ``fit()`` (trials run in their own working
folders), and resume an interrupted experiment with ``Tuner.restore`` (finished trials kept,
unfinished ones continued from their checkpoints, a searcher's state restored). Ray starts as
:mod:`.ray_session` starts it; trials get GPUs as :mod:`.gpus` plans them. The Optuna search
is :mod:`.search`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import tune

from ..config import AS_RUN_SWITCHES, FIELDS, ConfigError, build_config
from ..data.manifest import load_manifest
from ..data.prepared import (
    check_prepared_for,
    identity_set_for,
    load_prepared,
    resolve_data_dir,
)
from ..errors import UserError
from ..model.registry import BACKBONES, backbone_spec
from .gpus import AUTO, plan_gpus, ray_probe
from .progress import TrialProgress, trial_folder_name
from .ray_session import init_ray
from .tracking import tracking_callbacks
from .trainable import META_KEYS, clipfh_trainable
from .versions import VERSIONS_AS_RUN_FILE, VERSIONS_FILE, load_versions, scaled_to_overlay


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
    mlflow: str | None = None
    """An MLflow tracking URI: each trial becomes a run there (see :mod:`.tracking`)."""


def default_storage() -> Path:
    return (Path.cwd() / "runs" / "ray").resolve()


def storage_and_name(options: ExperimentOptions, prefix: str) -> tuple[str, str]:
    storage = options.storage or str(default_storage())
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    name = options.name or f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"
    return storage, name


def prepare_shared_data(knob_sets: list[dict[str, Any]], options: ExperimentOptions) -> dict:
    """Decode the data once per resolution before any trial starts, and check that it offers
    every identity set the trials train on (as-run trials: all training identities, B11) and
    was prepared for their dataset and aspect, so a bad folder fails here rather than in every
    trial; return absolute paths."""
    data_dir = resolve_data_dir(options.data, options.cache_dir, log=_stderr)
    manifest = load_manifest(data_dir)
    for knobs in knob_sets:
        dataset, aspect = (knobs.get(key, FIELDS[key].default) for key in ("dataset", "aspect"))
        check_prepared_for(manifest, dataset, aspect, data_dir)
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


def _run_config(options: ExperimentOptions, storage: str, name: str, callbacks: list):
    return tune.RunConfig(
        name=name, storage_path=storage,
        failure_config=tune.FailureConfig(max_failures=options.max_failures),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
        callbacks=callbacks, verbose=0)


def tune_config(**kwargs):
    """TuneConfig with short, readable trial names and folders (label + trial id).

    Trial actors are reused (every trial of an experiment asks for the same resources): a fresh
    actor per trial costs a worker process importing torch and open_clip, about 10 s per tiny
    trial on 2 busy cores against about 1.5 s reused. Every trial builds its Trainer from
    scratch and seeds it explicitly, so reuse changes no result.
    """
    kwargs.setdefault("reuse_actors", True)
    return tune.TuneConfig(trial_name_creator=trial_folder_name,
                           trial_dirname_creator=trial_folder_name, **kwargs)


def _restore(path: Path, trainable, callbacks: list):
    """The interrupted experiment, with this call's callbacks: its saved ones would keep the
    tracking of the first call (``--mlflow`` given then or not), and Tuner.restore takes no
    run config, so they are replaced in the restored one."""
    if tune.Tuner.can_restore(str(path)):
        _stderr(f"[tune] resuming experiment {path}")
        tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True,
                                   resume_errored=True)
        tuner._local_tuner.get_run_config().callbacks = callbacks
        return tuner
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
    storage, name = storage_and_name(options, prefix)
    shared = prepare_shared_data(trials, options)
    gpus = plan_trial_gpus(options, trials)
    return fit_experiment(
        options, storage, name, {}, shared, gpus,
        {"kind": "reproduce", "seeds": options.seeds, **meta},
        param_space={"fixed": tune.grid_search(trials),
                     "seed": tune.grid_search(list(range(options.seeds)))},
        tune_config=tune_config(max_concurrent_trials=options.max_concurrent))


def fit_experiment(options: ExperimentOptions, storage: str, name: str,
                    base_knobs: dict[str, Any], shared: dict, gpus_per_trial: float,
                    meta: dict[str, Any], **tuner_kwargs: Any) -> Path:
    """Start (or, with ``options.resume``, restore) one Tune experiment of the trainable, record
    what it is next to Ray's own state, and run it to the end; returns its folder."""
    path = Path(storage) / name
    trainable = tune.with_resources(
        tune.with_parameters(clipfh_trainable, base_knobs=base_knobs, **shared),
        {"cpu": options.cpus_per_trial, "gpu": gpus_per_trial})
    init_ray(options)
    callbacks = [TrialProgress(), *tracking_callbacks(options.mlflow, path, base_knobs)]
    if options.resume:
        tuner = _restore(path, trainable, callbacks)
    else:
        tuner = tune.Tuner(trainable, run_config=_run_config(options, storage, name, callbacks),
                           **tuner_kwargs)
    _write_meta(path, {"profile": options.profile, "data_dir": shared["data_dir"],
                       "gpus_per_trial": gpus_per_trial, **meta})
    tuner.fit()
    return path


def _write_meta(path: Path, meta: dict[str, Any]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "tune_clipfh_experiment.json").write_text(json.dumps(meta, indent=1))
