"""The Ray Tune layer on tiny random-init models and the synthetic dataset.

Fixed trials (``reproduce``) and the Optuna search (``search``): one row per trial with its knobs,
validation and test metrics; concurrent trials; the Optuna study in ``<experiment>/optuna.db``
with the warm-start points, the measured versions of a reproduce run and ASHA-stopped trials
recorded as PRUNED; invalid sampled configurations recorded, not crashing; search-space
validation. Slow: SIGINT + ``--resume`` of a CLI run, and a two-node cluster (both in drivers of
their own).
"""

from __future__ import annotations

import inspect
import json
import math
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import torch
from ray.tune.schedulers import TrialScheduler

from tune_clipfh.cli import build_parser, main
from tune_clipfh.config import ConfigError, build_config, read_yaml
from tune_clipfh.data.errors import DataError
from tune_clipfh.data.hands11k import prepare_11k
from tune_clipfh.data.synth import synthesize
from tune_clipfh.errors import UserError
from tune_clipfh.model.registry import BACKBONES
from tune_clipfh.resources import config_file
from tune_clipfh.tune import experiment
from tune_clipfh.tune.budget import TrialSecondsBudget, TrialShape
from tune_clipfh.tune.defaults import ASHA_GRACE, ASHA_REDUCTION, OBJECTIVE, OBJECTIVES
from tune_clipfh.tune.experiment import ExperimentOptions, fixed_trials, reproduce
from tune_clipfh.tune.gpus import (
    GpuPlan,
    ProbeResult,
    gpus_from_memory,
    parse_gpus_per_trial,
    plan_gpus,
    probe_knob_sets,
    training_step,
)
from tune_clipfh.tune.results import experiment_meta, load_results
from tune_clipfh.tune.search import RaceExemptASHA, search, trial_seconds_budget, version_points
from tune_clipfh.tune.searcher import BudgetedOptunaSearch, Race
from tune_clipfh.tune.space import load_space
from tune_clipfh.tune.trainable import META_KEYS
from tune_clipfh.tune.versions import load_versions

from tune_helpers import one_trial_done_another_checkpointed, rows_reported, wait_for

# Every trial: one prompt epoch and three image epochs (5 reports with the final row).
QUICK = {"epochs_prompt": 1, "epochs_image": 3, "early_stop_patience": 3}
REPRO_BACKBONES, REPRO_VERSIONS = ["vitb16", "rn50"], ["v1", "v5"]

# A small space, so that few version points exist and a sampled trial follows them: the ViT
# versions project onto (lr_visual, unfreeze_blocks) = (1e-4, 12) [v1: lr_visual unset, so its
# effective rate lr], (1e-5, 12) [v2-v5, v8-v10] and (1e-5, 2) [v6, v7].
SMALL_SPACE = """
base: {epochs_prompt: 1, epochs_image: 3, early_stop_patience: 3, unfreeze_mode: last_n}
parameters:
  lr_visual: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
  unfreeze_blocks: {type: int, low: 1, high: 12}
"""
SMALL_SPACE_POINTS = [{"lr_visual": 1e-4, "unfreeze_blocks": 12},
                      {"lr_visual": 1e-5, "unfreeze_blocks": 12},
                      {"lr_visual": 1e-5, "unfreeze_blocks": 2}]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _same(a, b) -> bool:
    """Equal, with None and NaN (pandas' empty cell) equal to each other."""
    empty = (a is None or (isinstance(a, float) and math.isnan(a)),
             b is None or (isinstance(b, float) and math.isnan(b)))
    if any(empty):
        return all(empty)
    if isinstance(a, float) or isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-12)
    return a == b


def _params(row, names) -> dict:
    return {name: row[f"config/{name}"] for name in names}


def _study(path: Path) -> optuna.Study:
    meta = experiment_meta(path)
    assert meta["optuna_storage"] == f"sqlite:///{path / 'optuna.db'}"
    assert (path / "optuna.db").is_file()
    return optuna.load_study(study_name=meta["study_name"], storage=meta["optuna_storage"])


# ------------------------------------------------------------------------------------------
# Fixed trials


@pytest.fixture(scope="module")
def repro(ray_session, tmp_path_factory):
    """v1 and v5 of both backbones as fixed trials, one seed (shared by the warm-start test)."""
    storage = tmp_path_factory.mktemp("ray-repro")
    path = reproduce(REPRO_BACKBONES, REPRO_VERSIONS,
                     ExperimentOptions(name="repro", storage=str(storage), overrides=QUICK))
    return path, load_results(path)


def test_reproduce_gives_one_row_per_trial_with_knobs_validation_and_test(repro):
    path, frame = repro
    assert path.name == "repro" and experiment_meta(path)["kind"] == "reproduce"
    assert len(frame) == 4 and frame["trial_id"].is_unique
    assert sorted(zip(frame["config/backbone"], frame["config/version"], strict=True)) == \
        sorted((b, v) for b in REPRO_BACKBONES for v in REPRO_VERSIONS)
    for column in ("config/lr_visual", "config/version", "best_val_rank1", "best_val_mAP",
                   "test_rank1", "test_mAP", "test_rank1_std", "test_mAP_std"):
        assert column in frame.columns, column
    assert (frame["final"] == 1).all()
    assert frame["status"].isin(["completed", "early_stopped"]).all()
    assert (frame["trial_status"] == "TERMINATED").all()
    for column in ("best_val_rank1", "best_val_mAP", "test_rank1", "test_mAP"):
        assert frame[column].between(0, 1).all(), column
    assert (frame["test_rank1_std"] >= 0).all() and (frame["test_mAP_std"] >= 0).all()
    # best_val_* are running maxima: the final row holds the best validation epoch's values.
    assert (frame["best_val_rank1"] >= frame["val_rank1"] - 1e-12).all()

    versions = load_versions(profile="tiny")
    keys = ("lr", "lr_visual", "lr_prompt", "optimizer", "scheduler", "id_head",
            "arcface_scale", "arcface_margin", "loss_use_triplet", "loss_use_center",
            "unfreeze_mode", "unfreeze_blocks", "freeze_text_encoder", "n_ctx", "profile")
    for _, row in frame.iterrows():
        backbone, version = row["config/backbone"], row["config/version"]
        knobs = versions[backbone][version].knobs
        assert row["label"] == f"{backbone}-{version}-s0"
        assert row["config/model"] == backbone and row["config/kind"] == "fixed"
        for key in keys:
            assert _same(row[f"config/{key}"], knobs[key]), (backbone, version, key)
        for key, value in QUICK.items():  # the overrides win over the versions' knobs
            assert row[f"config/{key}"] == value
        assert row["epochs_prompt_run"] == 1 and 1 <= row["epochs_image_run"] <= 3


# ------------------------------------------------------------------------------------------
# Search


def _most_in_flight(progress: str) -> int:
    """Most trials running at once, from the driver's progress lines in the order printed:
    a trial is running from its first ``[tune] <trial> ...`` line to its ``done:`` line."""
    running: set[str] = set()
    most = 0
    for line in progress.splitlines():
        if not line.startswith("[tune] "):
            continue
        trial = line.split()[1]
        if " done: " in line:
            running.discard(trial)
        else:
            running.add(trial)
            most = max(most, len(running))
    return most


@pytest.mark.parametrize("objective, metrics", [("rank1", ["best_val_rank1"]),
                                                ("both", ["best_val_rank1", "best_val_mAP"])])
def test_search_runs_concurrently_and_writes_the_study(ray_session, tmp_path, capsys,
                                                       objective, metrics):
    space_file = _write(tmp_path / "space.yaml", SMALL_SPACE)
    path = search(str(space_file), 4, objective, "vitb16", None,
                  ExperimentOptions(name=f"search-{objective}", storage=str(tmp_path / "ray"),
                                    max_concurrent=2, cpus_per_trial=1), race_top=0)
    progress = capsys.readouterr().err
    frame = load_results(path)
    assert len(frame) == 4 and frame["trial_id"].is_unique
    assert (frame["kind"] == "search").all()
    meta = experiment_meta(path)
    assert meta["kind"] == "search" and meta["metrics"] == metrics

    # Two trials at once, never more: a second trial reports before the first one is done.
    assert _most_in_flight(progress) == 2, progress

    # The warm start: the version points run first, as they are.
    names = ["lr_visual", "unfreeze_blocks"]
    points = version_points(load_space(space_file, profile="tiny", backbone="vitb16"),
                            "vitb16", "tiny")
    assert points == SMALL_SPACE_POINTS
    ran = [_params(row, names) for _, row in frame.iterrows()]
    assert all(point in ran for point in points), ran

    # The study, in <experiment>/optuna.db: one trial per Ray trial, same parameters; a trial
    # with its final row is COMPLETE with the final row's values, one stopped by ASHA is PRUNED.
    study = _study(path)
    assert len(study.directions) == len(metrics)
    assert len(study.trials) == 4
    for _, row in frame.iterrows():
        matches = [t for t in study.trials if t.params == _params(row, names)]
        assert matches, _params(row, names)
        if row.get("final") == 1:
            assert any(t.state == optuna.trial.TrialState.COMPLETE
                       and t.values == [row[m] for m in metrics] for t in matches)
        else:
            assert row["status"] == "stopped_by_scheduler"
            assert all(t.state != optuna.trial.TrialState.COMPLETE for t in matches)
            assert any(t.state == optuna.trial.TrialState.PRUNED for t in matches)
    states = sorted(t.state.name for t in study.trials)
    assert states.count("COMPLETE") == int((frame["final"] == 1).sum()), states


@pytest.mark.parametrize("multi", [False, True])
def test_scheduler_stopped_trials_enter_the_study_as_pruned(multi):
    """Without a final row a trial is PRUNED, never COMPLETE with under-trained metrics."""
    metrics = ["best_val_rank1", "best_val_mAP"] if multi else "best_val_rank1"
    storage = optuna.storages.InMemoryStorage()
    searcher = BudgetedOptunaSearch.create(
        space=lambda trial: trial.suggest_float("lr_visual", 1e-5, 1e-2, log=True) and None,
        metric=metrics, mode=["max", "max"] if multi else "max",
        sampler=optuna.samplers.RandomSampler(seed=0), study_name="pruned", storage=storage)
    for trial_id in ("stopped", "finished", "crashed"):
        assert "lr_visual" in searcher.suggest(trial_id)
    row = {"best_val_rank1": 0.5, "best_val_mAP": 0.25, "training_iteration": 2}
    searcher.on_trial_result("stopped", {**row, "final": 0})
    searcher.on_trial_complete("stopped", {**row, "final": 0})
    searcher.on_trial_complete("finished", {**row, "final": 1, "training_iteration": 5})
    searcher.on_trial_complete("crashed", {**row, "final": 0}, error=True)
    stopped, finished, crashed = optuna.load_study(study_name="pruned", storage=storage).trials
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert finished.state == optuna.trial.TrialState.COMPLETE
    assert finished.values == ([0.5, 0.25] if multi else [0.5])
    assert crashed.state == optuna.trial.TrialState.FAIL


def _lr_space(trial) -> None:  # module level: a searcher's saved state pickles its space
    trial.suggest_float("lr_visual", 1e-5, 1e-2, log=True)


def test_the_searcher_starts_no_trial_past_its_budget(tmp_path):
    """With a budget the searcher answers FINISHED once the next trial would not fit."""
    searcher = BudgetedOptunaSearch.create(
        space=_lr_space,
        metric="best_val_rank1", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
        study_name="budget", storage=optuna.storages.InMemoryStorage(),
        budget=TrialSecondsBudget(250.0, prior_lengths_s=[100.0]))
    assert "lr_visual" in searcher.suggest("a") and "lr_visual" in searcher.suggest("b")
    assert searcher.suggest("c") == BudgetedOptunaSearch.FINISHED  # 2 x 100 committed + 100
    row = {"best_val_rank1": 0.5, "final": 1, "status": "completed", "time_total_s": 100.0,
           "training_iteration": 3}
    searcher.on_trial_result("a", {**row, "final": 0, "time_total_s": 60.0})
    assert searcher.budget.spent_s() == 60.0
    searcher.on_trial_complete("a", row)
    assert searcher.budget.lengths_s == [100.0]
    assert searcher.budget.running == {"b"}
    # --resume restores the searcher from its saved state: what was spent stays spent
    searcher.save(str(tmp_path / "searcher.pkl"))
    restored = BudgetedOptunaSearch.create(
        space=_lr_space, metric="best_val_rank1", mode="max", study_name="budget",
        storage=optuna.storages.InMemoryStorage())
    restored.restore(str(tmp_path / "searcher.pkl"))
    assert restored.budget == searcher.budget and restored.budget.spent_s() == 100.0


def test_the_searcher_ends_with_a_race_of_its_best_configurations_within_its_budget():
    """Exploration leaves room for the race; once its trials have ended the best two by one
    run are run once more each with the next seed, marked race_of, not told to Optuna and not
    past the budget."""
    storage = optuna.storages.InMemoryStorage()
    searcher = BudgetedOptunaSearch.create(
        space=_lr_space, metric="best_val_rank1", mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0), study_name="race", storage=storage,
        budget=TrialSecondsBudget(600.0, prior_lengths_s=[100.0]),
        race=Race(top=2, runs=2, base_seed=7), max_trials=20)
    # 600 trial-s, 2 race runs of 100 s kept: 4 trials explore
    explored = [searcher.suggest(t) for t in "abcd"]
    assert all("lr_visual" in config for config in explored)
    assert searcher.suggest("e") is None  # exploration over; the race waits for a, b, c, d
    for trial_id, score in zip("abcd", (0.5, 0.9, 0.7, 0.1), strict=True):
        searcher.on_trial_complete(trial_id, {"best_val_rank1": score, "final": 1,
                                              "status": "completed", "time_total_s": 100.0})
    race = [searcher.suggest("e"), searcher.suggest("f")]
    assert [r["race_of"] for r in race] == ["b", "c"]
    assert [r["seed"] for r in race] == [8, 8]
    assert [r["lr_visual"] for r in race] == [explored[1]["lr_visual"],
                                               explored[2]["lr_visual"]]
    assert searcher.suggest("g") == BudgetedOptunaSearch.FINISHED
    for trial_id in "ef":
        searcher.on_trial_complete(trial_id, {"best_val_rank1": 0.6, "final": 1,
                                              "status": "completed", "time_total_s": 100.0})
    assert len(optuna.load_study(study_name="race", storage=storage).trials) == 4
    assert searcher.budget.spent_s() == 600.0


def test_a_fold_race_runs_on_the_next_validation_folds():
    race = Race(top=1, runs=3, replicate="val_fold", base_seed=7)
    assert race.start({"a": ({"lr_visual": 1e-4}, 0.5), "b": ({"lr_visual": 1e-3}, 0.9)}) == ["b"]
    assert race.queued == [{"lr_visual": 1e-3, "val_fold": 1, "race_of": "b"},
                           {"lr_visual": 1e-3, "val_fold": 2, "race_of": "b"}]


def test_a_sampled_trial_longer_than_the_budget_left_ends_exploration_unrun():
    searcher = BudgetedOptunaSearch.create(
        space=_epochs_space, metric="best_val_rank1", mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0), study_name="long",
        storage=optuna.storages.InMemoryStorage(),
        budget=TrialSecondsBudget(100.0, base_knobs={"epochs_prompt": 1}))
    searcher.budget.learn(TrialShape(1, 10, text_trains=False), 1.0, 10.0, 11.0)  # 1 s/epoch
    config = searcher.suggest("a")  # 60-80 image epochs: 61-81 s of 100
    assert config is not None and config["epochs_image"] >= 60
    assert searcher.suggest("b") == BudgetedOptunaSearch.FINISHED  # another would not fit
    trials = searcher._ot_study.trials
    assert trials[-1].state == optuna.trial.TrialState.PRUNED
    assert "not_run" in trials[-1].user_attrs


def _epochs_space(trial) -> None:
    trial.suggest_int("epochs_image", 60, 80)


def test_search_budget_from_a_reproduce_experiment(repro):
    repro_path, frame = repro
    vit = frame[frame["config/backbone"] == "vitb16"]
    budget = trial_seconds_budget(None, 0.5, str(repro_path), "vitb16")
    # half the ViT versions' trial-seconds of one seed; each version a known trial length
    assert budget.limit_s == pytest.approx(0.5 * vit["time_total_s"].sum())
    assert sorted(budget.prior_lengths_s) == sorted(vit["time_total_s"].tolist())
    with pytest.raises(UserError, match="shorter than one trial"):
        trial_seconds_budget(0.01, None, str(repro_path), "vitb16")


@pytest.mark.parametrize("seconds, share, source, expected", [
    (10.0, 0.5, "x", "give one of them"),
    (None, 0.5, None, "--budget-share needs --from-experiment"),
    (-1.0, None, None, "--budget-trial-seconds -1.0: must be positive"),
    (None, 0.5, "/nonexistent/repro", "--from-experiment /nonexistent/repro: folder does not"),
])
def test_search_budget_errors(seconds, share, source, expected):
    with pytest.raises(UserError, match=expected):
        trial_seconds_budget(seconds, share, source, "vitb16")


def test_search_warm_starts_from_a_reproduce_experiment(repro, tmp_path, capsys):
    """The measured versions that lie inside the space enter the study with their results and
    are not run again; in a space that cannot train them they stay out, and the log says why."""
    repro_path, repro_frame = repro
    path = search(None, 1, "rank1", "vitb16", str(repro_path),
                  ExperimentOptions(name="warm", storage=str(tmp_path / "ray"), overrides=QUICK),
                  race_top=0)
    study = _study(path)
    measured = [t for t in study.trials if "source" in t.user_attrs]
    # The two ViT versions of the reproduce run, with their measured validation Rank-1; the
    # RN50 trials belong to another backbone and stay out.
    assert sorted(t.user_attrs["source"] for t in measured) == ["repro/v1", "repro/v5"]
    space = load_space(profile="tiny", backbone="vitb16").fixing(QUICK)
    versions = load_versions(profile="tiny")["vitb16"]
    for trial in measured:
        version = trial.user_attrs["source"].split("/")[1]
        row = repro_frame[(repro_frame["config/backbone"] == "vitb16")
                          & (repro_frame["config/version"] == version)].iloc[0]
        assert trial.state == optuna.trial.TrialState.COMPLETE
        assert trial.values == [row["best_val_rank1"]]
        knobs = fixed_trials(["vitb16"], [version], "tiny", QUICK)[0]  # as the repro ran it
        assert trial.params == space.point_from_knobs(
            {k: v for k, v in knobs.items() if k not in META_KEYS})
    # The measured points are not run again: the one new trial is the next version's point
    # (the other seven versions' points wait in the study's queue).
    frame = load_results(path)
    waiting = [t for t in study.trials if t.state == optuna.trial.TrialState.WAITING]
    assert len(frame) == 1 and len(study.trials) == 10 and len(waiting) == 7
    assert frame.iloc[0]["config/optimizer"] == versions["v2"].knobs["optimizer"]

    space_file = _write(tmp_path / "space.yaml", SMALL_SPACE)
    capsys.readouterr()
    small = search(str(space_file), 1, "rank1", "vitb16", str(repro_path),
                   ExperimentOptions(name="warm-small", storage=str(tmp_path / "ray")),
                   race_top=0)
    assert not [t for t in _study(small).trials if "source" in t.user_attrs]
    log = capsys.readouterr().err
    assert "left out, outside the space" in log and "v1 (" in log and "v5 (" in log, log


def test_a_race_reruns_the_best_and_best_hands_the_choice_on(ray_session, tmp_path, capsys):
    """Two configurations explore, the better is run again with the next seed (not stopped by
    ASHA, not in the study); ``best`` chooses by the mean over its runs and writes a config
    that ``train --config`` takes as it is."""
    # a list-valued choice: what best writes must be what the trials trained with
    space_file = _write(tmp_path / "space.yaml", SMALL_SPACE + """
  prompt_template_list:
    type: categorical
    choices: {two: ["a {ctx} hand.", "the {ctx} of a person."]}
""")
    path = search(str(space_file), 3, "rank1_at_test_size", "vitb16", None,
                  ExperimentOptions(name="race", storage=str(tmp_path / "ray"),
                                    overrides={"seed": 4}),
                  warm_start=False, race_top=1, race_runs=2, race_over="seed")
    frame = load_results(path)
    assert len(frame) == 3
    raced = frame[frame["config/race_of"].notna()]
    assert len(raced) == 1 and raced.iloc[0]["seed"] == 5
    first = frame[frame["trial_id"] == raced.iloc[0]["config/race_of"]].iloc[0]
    explored = frame[frame["config/race_of"].isna()]
    assert (explored["seed"] == 4).all()  # the search's seed, from its base knobs
    metric = "best_val_rank1_at_test_size"
    assert first[metric] == explored[metric].max()
    assert raced.iloc[0]["final"] == 1
    assert len(_study(path).trials) == 2
    assert experiment_meta(path)["race"] == {"top": 1, "runs": 2, "replicate": "seed"}

    capsys.readouterr()
    assert main(["best", str(path), "--out", str(tmp_path / "best.yaml")]) == 0
    printed = capsys.readouterr().out
    assert f"chosen: search-{first['trial_id']}" in printed and "2 runs" in printed
    assert "never used to choose" in printed
    chosen = read_yaml(tmp_path / "best.yaml")
    assert chosen["lr_visual"] == pytest.approx(first["config/lr_visual"])
    assert chosen["epochs_image"] == 3 and chosen["model"] == "vitb16"
    assert chosen["prompt_template_list"] == ["a {ctx} hand.", "the {ctx} of a person."]
    assert chosen["seed"] == 4
    build_config(chosen, "best.yaml")  # what train --config does with it
    assert main(["best", str(tmp_path)]) == 2  # not a search experiment: one line
    assert "no experiment here" in capsys.readouterr().err


def test_asha_leaves_race_runs_alone():
    scheduler = RaceExemptASHA(time_attr="image_epoch", metric="best_val_rank1", mode="max",
                               grace_period=1, reduction_factor=3, max_t=10)
    race_run = SimpleNamespace(config={"race_of": "abc", "lr_visual": 1e-4}, trial_id="r")
    assert scheduler.on_trial_result(None, race_run, {"image_epoch": 1, "best_val_rank1": 0.0}) \
        == TrialScheduler.CONTINUE


def test_data_prepared_for_another_aspect_is_refused_before_any_trial(tmp_path):
    """The versions are stated for 11k dorsal_r: a palmar_r folder stops the experiment at once
    (set aspect: palmar_r with --set to run them there)."""
    src = synthesize(tmp_path / "src", identities=8, images_per_identity=4, image_size=(64, 48),
                     progress=False)
    prepare_11k(src, "palmar_r", tmp_path / "palmar_r", progress=False)
    options = ExperimentOptions(data=str(tmp_path / "palmar_r"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="key 'aspect': dorsal_r, but the folder was prepared "
                                        "for palmar_r"):
        experiment.prepare_shared_data(fixed_trials(["rn50"], ["v1"], "tiny", {}), options)
    assert not (tmp_path / "cache").exists()
    overridden = fixed_trials(["rn50"], ["v1"], "tiny", {"aspect": "palmar_r"})
    assert experiment.prepare_shared_data(overridden, options)["data_dir"] \
        == str((tmp_path / "palmar_r").resolve())


def test_invalid_sampled_configuration_is_recorded_not_a_crash(ray_session, tmp_path):
    space_file = _write(tmp_path / "no_losses.yaml", """
base: {epochs_prompt: 1, epochs_image: 2}
parameters:
  loss_use_id:      {type: categorical, choices: [false]}
  loss_use_triplet: {type: categorical, choices: [false]}
  loss_use_center:  {type: categorical, choices: [false]}
  loss_use_i2t:     {type: categorical, choices: [false]}
""")
    path = search(str(space_file), 2, "rank1", "vitb16", None,
                  ExperimentOptions(name="invalid", storage=str(tmp_path / "ray")), race_top=0)
    frame = load_results(path)
    assert len(frame) == 2
    assert (frame["status"] == "invalid_config").all()
    assert (frame["final"] == 1).all() and (frame["trial_status"] == "TERMINATED").all()
    assert frame["error"].str.contains("every image-stage loss is off").all()
    assert (frame["best_val_rank1"] == 0).all()
    study = _study(path)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    assert [t.values for t in study.trials] == [[0.0], [0.0]]
    # A budget spent by the first trial ends the search there, before its --num-samples.
    path = search(str(space_file), 4, "rank1", "vitb16", None,
                  ExperimentOptions(name="budget", storage=str(tmp_path / "ray"),
                                    max_concurrent=1), budget_trial_seconds=1e-6, race_top=0)
    assert len(load_results(path)) == 1
    assert experiment_meta(path)["budget_trial_seconds"] == 1e-6


# ------------------------------------------------------------------------------------------
# Search spaces (no Ray)


@pytest.mark.parametrize("spec, expected", [
    ("  a_rate: {type: float, low: 0.1, high: 1.0}",
     "parameter 'a_rate': not a configuration key"),
    ("  lr_visual: {type: float, low: 1.0e-3, high: 1.0e-3}", "parameter 'lr_visual': empty range"),
    ("  lr_visual: {type: float, low: 1.0e-2, high: 1.0e-3}", "parameter 'lr_visual': empty range"),
    ("  n_ctx: {type: str, low: 2, high: 4}", "parameter 'n_ctx': type 'str' is not valid"),
    ("  n_ctx: {type: int, low: two, high: 4}", "parameter 'n_ctx': int needs numeric"),
    ("  id_head: {type: categorical, choices: []}", "parameter 'id_head': categorical needs"),
    ("  lr_visual: {type: float, low: 0.0, high: 1.0, log: true}",
     "parameter 'lr_visual': a log range needs low > 0"),
    ("  arcface_scale: {type: float, low: 10, high: 64, when: {id_hed: arcface}}",
     "parameter 'arcface_scale': condition names 'id_hed'"),
    ("  arcface_scale: {type: float, low: 10, high: 64, when: {id_head: arcface}}\n"
     "  id_head: {type: categorical, choices: [linear, arcface]}",
     "parameter 'arcface_scale': condition names 'id_head', which is not an earlier"),
    ("  id_head: {type: categorical, choices: [linear, arcface]}\n"
     "  arcface_scale: {type: float, low: 10, high: 64, when: {id_head: arcfase}}",
     "parameter 'arcface_scale': condition id_head: 'arcfase' is a value 'id_head' never takes"),
    ("  n_ctx: {type: int, low: 2, high: 4, step: 1, choise: [2]}",
     "parameter 'n_ctx': unknown field 'choise'"),
])
def test_space_errors_are_one_line_naming_file_and_parameter(tmp_path, spec, expected):
    path = _write(tmp_path / "space.yaml", f"parameters:\n{spec}\n")
    with pytest.raises(ConfigError) as caught:
        load_space(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") and expected in message, message


@pytest.mark.parametrize("text, expected", [
    ("base: {epochs: 3}\nparameters:\n  n_ctx: {type: int, low: 2, high: 4}\n",
     "base key 'epochs': unknown key"),
    ("parameter:\n  n_ctx: {type: int, low: 2, high: 4}\n", "section 'parameter' is not valid"),
    ("base: {lr: 0.1}\n", "'parameters' is empty"),
    ("parameters:\n  n_ctx: {type: int, low: 2, high: 4}\nprofiles:\n  tiny:\n    parameters:\n"
     "      lr_visual: {type: float, low: 0.1, high: 1.0}\n",
     "profiles.tiny.parameters 'lr_visual' overrides no parameter"),
])
def test_space_file_errors(tmp_path, text, expected):
    path = _write(tmp_path / "space.yaml", text)
    with pytest.raises(ConfigError) as caught:
        load_space(path, profile="tiny")
    assert "\n" not in str(caught.value) and expected in str(caught.value), str(caught.value)
    assert str(caught.value).startswith(str(path))


def test_default_space_overlays():
    """Profile and backbone overlays replace whole parameter definitions and extend the base."""
    def params(profile, backbone):
        return {p.name: p for p in load_space(profile=profile, backbone=backbone).parameters}

    tiny_rn50, full_rn50, full_vit = params("tiny", "rn50"), params("full", "rn50"), \
        params("full", "vitb16")
    assert (tiny_rn50["unfreeze_blocks"].low, tiny_rn50["unfreeze_blocks"].high) == (1, 4)
    assert full_rn50["unfreeze_blocks"].high == 4 and full_vit["unfreeze_blocks"].high == 12
    # the tiny profile keeps the full rates (tiny_lr_scale maps them) and narrows pad-crop to
    # its 64-px images
    assert tiny_rn50["lr_visual"] == full_rn50["lr_visual"] != full_vit["lr_visual"]
    assert (tiny_rn50["aug_pad_crop"].high, full_rn50["aug_pad_crop"].high) == (6, 16)
    # both stages' lengths are searched, the image stage's over a range holding the
    # versions' 30 epochs and tiny_synthetic.yaml's 60
    assert tiny_rn50["epochs_image"].contains(30) and tiny_rn50["epochs_image"].contains(60)
    # the tiny profile's base fixes early stopping (off): not searched there, searched in full
    assert "early_stop_patience" not in tiny_rn50 and "early_stop_patience" in full_rn50
    assert load_space(profile="tiny", backbone="rn50").base["early_stop_patience"] == 0
    # the order of the parameters (and so which conditions are "earlier") is the base file's
    assert list(tiny_rn50) == [name for name in full_vit if name != "early_stop_patience"]


def test_conditional_parameters_and_points():
    space = load_space(profile="full", backbone="vitb16")
    linear = {"loss_use_id": True, "id_head": "linear", "loss_use_triplet": False}
    names = {p.name for p in space.active(linear)}
    assert {"weight_id", "label_smoothing"} <= names
    assert not {"arcface_scale", "arcface_margin", "triplet_margin"} & names
    no_id = {p.name for p in space.active({"loss_use_id": False})}
    assert not {"weight_id", "id_head", "arcface_scale"} & no_id
    # A version's unset group rate is its effective rate (lr) in the point.
    v5 = load_versions(profile="full")["vitb16"]["v5"].knobs
    assert v5["lr_head"] is None
    point = space.point_from_knobs(v5)
    assert point is not None and point["lr_head"] == v5["lr"]
    assert point["arcface_scale"] == 20.0 and "triplet_margin" in point
    assert space.point_from_knobs({**v5, "n_ctx": 99}) is None
    # unfreeze_blocks only counts with unfreeze_mode last_n
    assert "unfreeze_blocks" not in {p.name for p in space.active({"unfreeze_mode": "all"})}
    assert "unfreeze_blocks" in {p.name for p in space.active({"unfreeze_mode": "last_n"})}


@pytest.mark.parametrize("profile, backbone", [
    ("tiny", "vitb16"), ("tiny", "rn50"), ("full", "vitb16"), ("full", "rn50"),
])
def test_every_version_lies_inside_the_default_space(profile, backbone):
    """The space can train every version exactly (so its measured result may warm-start the
    study); its point runs first."""
    space = load_space(profile=profile, backbone=backbone)
    versions = load_versions(profile=profile)[backbone]
    for name, item in versions.items():
        assert space.outside(item.knobs) == [], name
    points = version_points(space, backbone, profile)
    assert len(points) == len(versions)  # ten distinct versions, ten points
    # v1 sets no per-group rate: its point holds its effective rates (lr)
    assert points[0]["lr_visual"] == points[0]["lr_head"] == versions["v1"].knobs["lr"]


def test_the_shipped_tiny_config_lies_inside_the_tiny_space():
    knobs = read_yaml(config_file("tiny_synthetic"))
    space = load_space(profile="tiny", backbone=knobs["model"])
    assert space.outside(knobs) == []
    # what the space cannot train takes a configuration outside, named
    assert space.outside({**knobs, "center_lr": 0.3}) == ["center_lr"]
    assert space.outside({**knobs, "epochs_image": 200}) == ["epochs_image"]
    assert space.outside({**knobs, "n_ctx": 99})[0].startswith("(not a valid configuration")


def test_named_choices_and_fixed_knobs(tmp_path):
    space = load_space(_write(tmp_path / "named.yaml", """
base: {epochs_prompt: 1}
parameters:
  scheduler: {type: categorical, choices: [cosine, onecycle]}
  warmup_epochs: {type: float, low: 0.0, high: 5.0, when: {scheduler: cosine}}
  prompt_template_list:
    type: categorical
    choices: {none: null, two: ["a {ctx} hand.", "the {ctx}."]}
"""))
    knobs = {"scheduler": "cosine", "warmup_epochs": 1.0,
             "prompt_template_list": ["a {ctx} hand.", "the {ctx}."]}
    point = space.point_from_knobs(knobs)
    assert point == {"scheduler": "cosine", "warmup_epochs": 1.0, "prompt_template_list": "two"}
    assert space.knobs(point)["prompt_template_list"] == knobs["prompt_template_list"]
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    returned = space.sample(trial)  # the trial's config takes the knob values of named choices
    assert returned["prompt_template_list"] == space.knobs(trial.params)["prompt_template_list"]
    # --set fixes a knob: not searched, its dependants kept or dropped by its value
    onecycle = space.fixing({"scheduler": "onecycle"})
    assert [p.name for p in onecycle.parameters] == ["prompt_template_list"]
    cosine = space.fixing({"scheduler": "cosine"})
    assert [(p.name, p.when) for p in cosine.parameters][0] == ("warmup_epochs", {})
    assert cosine.base["scheduler"] == "cosine"


# ------------------------------------------------------------------------------------------
# A driver of its own: SIGINT, then --resume (slow)


@pytest.mark.slow
def test_resume_after_sigint_keeps_finished_trials_and_finishes_the_rest(tmp_path, drivers):
    """The search's resume after SIGINT (searcher and study restored). ``reproduce`` after
    SIGKILL: tests/test_reliability.py::test_resume_after_sigkill_gives_the_same_trials_and_
    results."""
    storage, log = tmp_path / "ray", tmp_path / "driver.log"
    space_file = _write(tmp_path / "space.yaml", SMALL_SPACE)
    # 3 version points, then 1 sampled; no race (ASHA is off by default)
    argv = [str(Path(sys.executable).parent / "tune-clipfh"), "search", "--name", "interrupted",
            "--storage", str(storage), "--max-concurrent", "1",
            "--set", "epochs_prompt=1", "--set", "epochs_image=6",
            "--set", "early_stop_patience=0", "--set", "checkpoint_min_interval_s=0",
            "--space", str(space_file), "--backbone", "vitb16", "--num-samples", "4",
            "--race-top", "0", "--mlflow", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    expected = 4
    proc = drivers.start(argv, log)
    try:
        # One trial done, the next one past its first checkpoint (iteration 2), then SIGINT to
        # the driver alone (Ray's processes share its group and must see no signal).
        reached = wait_for(lambda: one_trial_done_another_checkpointed(log), 240, proc)
        assert reached, log.read_text()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
    finally:
        drivers.kill(proc)
    path = storage / "interrupted"
    before = load_results(path)
    # With one trial at a time the pending trials may not exist yet.
    assert 2 <= len(before) <= expected and before["trial_id"].is_unique
    finished = before[before["final"] == 1]
    assert 1 <= len(finished) < len(before), before[["label", "status", "trial_status"]]
    rows_before = {row["trial_id"]: rows_reported(next(path.glob(f"*{row['trial_id']}")))
                   for _, row in finished.iterrows()}

    resumed = drivers.start([*argv, "--resume"], tmp_path / "resume.log")
    try:
        assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()
    finally:
        drivers.kill(resumed)
    assert "resuming experiment" in (tmp_path / "resume.log").read_text()
    after = load_results(path)
    assert len(after) == expected and after["trial_id"].is_unique
    assert set(before["trial_id"]) <= set(after["trial_id"])
    assert (after["final"] == 1).all(), after[["label", "status", "trial_status"]]
    assert after["status"].isin(["completed", "early_stopped"]).all()
    # Finished trials were not run again: the same rows, the same final row.
    for trial_id, rows in rows_before.items():
        assert rows_reported(next(path.glob(f"*{trial_id}"))) == rows
    # The trial that was running went on from its checkpoint instead of starting over.
    running = before[(before["final"] != 1) & before["training_iteration"].notna()]
    assert len(running) == 1, before[["label", "status", "training_iteration"]]
    row = after.set_index("trial_id").loc[running["trial_id"].iloc[0]]
    assert row["iterations_since_restore"] < row["training_iteration"]

    # The search went on with the restored searcher and study: each version point ran once,
    # and the study holds exactly the trials that ran (nothing queued twice or left waiting).
    names = ["lr_visual", "unfreeze_blocks"]
    ran = [_params(row, names) for _, row in after.iterrows()]
    assert all(ran.count(point) == 1 for point in SMALL_SPACE_POINTS), ran
    assert len({tuple(sorted(params.items())) for params in ran}) == expected, ran
    study = _study(path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * expected
    objective = OBJECTIVES[OBJECTIVE][0]
    assert sorted(t.values[0] for t in study.trials) == sorted(after[objective])

    # MLflow: one run per trial, the interrupted trial's included, and no epoch logged twice
    # (its epochs re-run from the checkpoint were skipped).
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("interrupted").experiment_id])
    trial_runs = {r.data.tags["trial_id"]: r for r in runs if "trial_id" in r.data.tags}
    assert len(runs) == expected + 1 and set(trial_runs) == set(after["trial_id"])
    for trial_id, run in trial_runs.items():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_rank1")]
        assert steps == sorted(set(steps)), (trial_id, steps)
        assert run.data.tags["status"] == after.set_index("trial_id").loc[trial_id, "status"]


# ------------------------------------------------------------------------------------------
# Two nodes (slow)

CLUSTER_SCRIPT = """
import json, sys
import ray
from ray.cluster_utils import Cluster

from tune_clipfh.tune.experiment import ExperimentOptions, reproduce
from tune_clipfh.tune.results import load_results

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
try:
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    path = reproduce(["vitb16"], ["v1", "v5"], ExperimentOptions(
        name="two-nodes", storage=sys.argv[1], address=cluster.address,
        overrides={"epochs_prompt": 1, "epochs_image": 3, "early_stop_patience": 0}))
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    frame = load_results(path)
    print("RESULT " + json.dumps({"nodes": nodes, "node_ids": frame["node_id"].tolist(),
                                  "final": frame["final"].tolist()}), flush=True)
finally:
    ray.shutdown()
    cluster.shutdown()
"""


@pytest.mark.slow
def test_trials_spread_over_two_nodes(tmp_path, drivers):
    script = _write(tmp_path / "two_nodes.py", CLUSTER_SCRIPT)
    result, _ = drivers.run_for_result([sys.executable, str(script), str(tmp_path / "ray")],
                                       tmp_path / "cluster.log", 300, "two-node run")
    assert len(result["nodes"]) == 2
    assert result["final"] == [1, 1]
    assert set(result["node_ids"]) == set(result["nodes"])


# ------------------------------------------------------------------------------------------
# GPUs per trial (no GPU needed: the probe is mocked, Ray's GPUs are declared)


def _probe(peak_gib: float, card_gib: float = 80.0):
    calls = []

    def probe() -> ProbeResult:
        calls.append(1)
        return ProbeResult(int(peak_gib * 2**30), int(card_gib * 2**30), "NVIDIA H100")

    probe.calls = calls
    return probe


def _failing_probe() -> ProbeResult:
    raise RuntimeError("CUDA error: out of memory\nmore")


@pytest.mark.parametrize("peak_gib, expected", [
    (60.0, 1.0),  # one fits: a whole card
    (35.0, 1.0),  # 0.85 * 80 / 35 = 1.9: still one
    (30.0, 0.5),
    (20.0, 1 / 3),
    (5.0, 1 / 13),
    (100.0, 1.0),  # does not fit at all: still a whole card (the trial itself will say OOM)
])
def test_gpus_from_memory_shares_a_card_only_when_several_trials_fit(peak_gib, expected):
    assert gpus_from_memory(int(peak_gib * 2**30), 80 * 2**30) == pytest.approx(expected)


def test_auto_gives_no_gpu_without_gpus_and_never_probes():
    probe = _probe(10)
    assert plan_gpus("auto", 0, {"auto"}, probe) == GpuPlan(0.0)
    assert plan_gpus("auto", 4, {"cpu"}, probe) == GpuPlan(0.0)  # configs that ask for the CPU
    assert probe.calls == []


def test_auto_with_gpus_shares_a_card_as_the_probe_measures():
    probe = _probe(20)
    plan = plan_gpus("auto", 8, {"auto", "cuda"}, probe)
    assert plan.gpus_per_trial == pytest.approx(1 / 3) and plan.device is None
    assert "1/3 GPU per trial" in plan.note and "NVIDIA H100" in plan.note
    assert probe.calls == [1]
    assert plan_gpus("auto", 1, {"auto"}, _probe(70)).gpus_per_trial == 1.0


def test_auto_falls_back_to_one_gpu_when_the_probe_cannot_run():
    plan = plan_gpus("auto", 2, {"auto"}, _failing_probe)
    assert plan.gpus_per_trial == 1.0 and plan.device is None
    assert "probe failed (RuntimeError: CUDA error: out of memory)" in plan.note
    assert "\n" not in plan.note


def test_explicit_numbers_are_kept_and_zero_never_shares_a_card_unaccounted():
    probe = _probe(10)
    assert plan_gpus(0.5, 2, {"auto"}, probe) == GpuPlan(0.5)
    assert plan_gpus(2.0, 0, {"cuda"}, probe) == GpuPlan(2.0)
    assert plan_gpus(0.0, 0, {"auto", "cpu"}, probe) == GpuPlan(0.0)
    assert plan_gpus(0.0, 2, {"cpu"}, probe) == GpuPlan(0.0)
    # device: auto on a cluster with GPUs, 0 GPUs per trial: the trials run on the CPU.
    plan = plan_gpus(0.0, 2, {"auto", "cpu"}, probe)
    assert (plan.gpus_per_trial, plan.device) == (0.0, "cpu") and "on the CPU" in plan.note
    # device: cuda with 0 GPUs per trial: refused, one line.
    with pytest.raises(UserError) as caught:
        plan_gpus(0.0, 2, {"cuda"}, probe)
    assert "\n" not in str(caught.value) and "device: cuda" in str(caught.value)
    assert probe.calls == []


@pytest.mark.parametrize("text, expected", [("auto", "auto"), ("AUTO", "auto"), ("0", 0.0),
                                            ("0.25", 0.25), ("2", 2.0)])
def test_gpus_per_trial_option(text, expected):
    assert parse_gpus_per_trial(text) == expected


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "many", ""])
def test_gpus_per_trial_option_refuses_other_values(text):
    with pytest.raises(ValueError, match="valid: auto or a number >= 0"):
        parse_gpus_per_trial(text)


def test_cli_gpus_per_trial_defaults_to_auto_everywhere():
    parser = build_parser()
    for argv in (["reproduce"], ["search"], ["ablate"], ["demo"]):
        assert parser.parse_args(argv).gpus_per_trial == "auto", argv
    assert parser.parse_args(["search", "--gpus-per-trial", "0.5"]).gpus_per_trial == 0.5
    assert ExperimentOptions().gpus_per_trial == "auto"


def test_one_asha_default_for_the_api_and_the_cli():
    assert build_parser().parse_args(["search"]).asha_grace == ASHA_GRACE
    assert build_parser().parse_args(["search"]).asha_reduction == ASHA_REDUCTION
    defaults = inspect.signature(search).parameters
    assert defaults["asha_grace"].default == ASHA_GRACE
    assert defaults["asha_reduction"].default == ASHA_REDUCTION
    parsed = build_parser().parse_args(["search"])
    assert (parsed.asha, parsed.race_top, parsed.race_runs, parsed.race_over) == \
        (defaults["asha"].default, defaults["race_top"].default, defaults["race_runs"].default,
         defaults["race_over"].default)


def test_probe_groups_the_knob_sets_that_set_memory():
    sets = [{"model": "vitb16", "profile": "full", "batch_size": 32, "amp": "auto", "lr": 1},
            {"model": "vitb16", "profile": "full", "batch_size": 32, "amp": "auto", "lr": 2},
            {"model": "rn50", "profile": "full", "batch_size": 32, "amp": "auto"},
            {"model": "vitb16", "profile": "full", "batch_size": 64, "amp": "auto"}]
    assert probe_knob_sets(sets) == [sets[0], sets[2], sets[3]]


@pytest.mark.parametrize("model", ["vitb16", "rn50"])
def test_the_probes_training_step_runs(model):
    """The step the GPU probe measures, on the CPU with the tiny profile (the CUDA memory
    readings around it need a GPU)."""
    knobs = {"model": model, "profile": "tiny", "pretrained": "none", "batch_size": 4,
             "pk_k": 2}
    assert math.isfinite(training_step(knobs, torch.device("cpu")))


def test_plan_trial_gpus_sets_the_trials_device_when_they_must_run_on_the_cpu(monkeypatch):
    monkeypatch.setattr(experiment, "init_ray", lambda options: None)
    monkeypatch.setattr(experiment.ray, "cluster_resources", lambda: {"CPU": 8.0, "GPU": 2.0})
    probed = []
    monkeypatch.setattr(experiment, "ray_probe",
                        lambda sets: probed.append(sets) or _probe(30))
    trials = fixed_trials(["vitb16", "rn50"], ["v1"], "full", {})
    assert {t["device"] for t in trials} == {"auto"}
    assert experiment.plan_trial_gpus(ExperimentOptions(gpus_per_trial="auto"), trials) == 0.5
    assert {t["device"] for t in trials} == {"auto"}
    # The probe gets the trials' training knobs, which the config schema accepts.
    (sets,) = probed
    assert [s["model"] for s in sets] == ["vitb16", "rn50"]
    assert all(build_config(s, "probe").config.profile == "full" for s in sets)
    assert experiment.plan_trial_gpus(ExperimentOptions(gpus_per_trial=0), trials) == 0
    assert {t["device"] for t in trials} == {"cpu"}
    cuda = fixed_trials(["vitb16"], ["v1"], "full", {"device": "cuda"})
    with pytest.raises(UserError, match="device: cuda"):
        experiment.plan_trial_gpus(ExperimentOptions(gpus_per_trial=0), cuda)


def test_backbone_errors_come_from_the_registry():
    with pytest.raises(ConfigError) as caught:
        fixed_trials(["vit"], None, "tiny", {})
    message = str(caught.value)
    assert f"(valid: {', '.join(BACKBONES)};" in message and "versions.yaml: " in message
    without_versions = [key for key in BACKBONES if key not in load_versions(profile="tiny")]
    for backbone in without_versions:
        with pytest.raises(ConfigError, match="has no versions to reproduce"):
            fixed_trials([backbone], None, "tiny", {})


# Two declared GPUs on a CPU machine: Ray accounts for them and sets CUDA_VISIBLE_DEVICES, the
# trials see no real CUDA device.
FAKE_GPU_SCRIPT = """
import json, sys
from tune_clipfh.tune.experiment import ExperimentOptions, reproduce
from tune_clipfh.tune.ray_session import init_ray
from tune_clipfh.tune.results import load_results
from tune_helpers import rows_reported

storage = sys.argv[1]
init_ray(ExperimentOptions(), num_cpus=2, num_gpus=2)
quick = {"epochs_prompt": 1, "epochs_image": 2, "early_stop_patience": 0}
out = {}
for name, gpus, versions, overrides in (
        ("auto", "auto", ["v1", "v5"], quick),
        ("zero", 0, ["v1"], quick),
        ("cuda", 1, ["v1"], {**quick, "device": "cuda"})):
    path = reproduce(["vitb16"], versions, ExperimentOptions(
        name=name, storage=storage, gpus_per_trial=gpus, max_failures=0, overrides=overrides))
    frame = load_results(path)
    spans = [[rows[0]["timestamp"], rows[-1]["timestamp"]]
             for rows in (rows_reported(d) for d in sorted(path.glob("vitb16-*")))]
    out[name] = {"meta": json.loads((path / "tune_clipfh_experiment.json").read_text()),
                 "rows": frame[["label", "status", "device", "gpu_name", "gpu_ids",
                                "config/device"] + (["error"] if "error" in frame else [])]
                 .fillna("").to_dict("records"), "spans": spans}
print("RESULT " + json.dumps(out), flush=True)
"""


@pytest.mark.slow
def test_trials_get_their_own_gpu_and_record_their_device(tmp_path, drivers):
    script = _write(tmp_path / "fake_gpus.py", FAKE_GPU_SCRIPT)
    log = tmp_path / "fake_gpus.log"
    proc = drivers.start([sys.executable, str(script), str(tmp_path / "ray")], log,
                         PYTHONPATH=str(Path(__file__).resolve().parent))
    try:
        assert proc.wait(timeout=400) == 0, log.read_text()[-4000:]
    finally:
        drivers.kill(proc)
    text = log.read_text()
    result = json.loads(next(line for line in text.splitlines()
                             if line.startswith("RESULT "))[len("RESULT "):])

    # auto: the probe cannot measure a declared GPU, so 1 GPU per trial; each trial got one of
    # the two cards, never both the same one while both ran; no CUDA inside: the CPU.
    auto = result["auto"]
    assert auto["meta"]["gpus_per_trial"] == 1.0
    # (its reason: torch sees no CUDA device in the task)
    note = next(line for line in text.splitlines() if "the memory probe failed" in line)
    assert "ConfigError" not in note and "1 GPU per trial" in note, note
    assert all(row["status"] in ("completed", "early_stopped") for row in auto["rows"])
    assert all(row["device"] == "cpu" and row["gpu_ids"] in ("0", "1") for row in auto["rows"])
    (a, b), ids = auto["spans"], [row["gpu_ids"] for row in auto["rows"]]
    if a[0] < b[1] and b[0] < a[1]:
        assert ids[0] != ids[1], auto
    # 0 on a cluster with GPUs: device: auto trials run on the CPU, with no card of their own.
    zero = result["zero"]
    assert zero["meta"]["gpus_per_trial"] == 0
    assert [(r["config/device"], r["device"], r["gpu_ids"]) for r in zero["rows"]] == [
        ("cpu", "cpu", "")]
    assert "the trials run on the CPU (device: cpu)" in text
    # device: cuda and no CUDA device inside the trial: recorded, not run on the CPU.
    (cuda,) = result["cuda"]["rows"]
    assert (cuda["status"], cuda["device"], cuda["gpu_ids"]) == ("device_unavailable", "none", "0")
    assert cuda["error"].startswith("device: cuda requested but this process sees no CUDA")
