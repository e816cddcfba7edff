"""MLflow tracking and the dashboard, against a real local MLflow store (sqlite) and a real
optuna-dashboard server.

A small search with ``--mlflow``: one run per trial with its knobs, per-epoch validation and
final test metrics and its status, under a parent run holding the report; resumed, it adds no
run and no step twice. The tracking callback's statuses (completed, early_stopped, diverged,
stopped by ASHA, errored) and a driver that restarts mid-trial; ``train --mlflow``; the
dashboard answering over HTTP; the one-line errors. The interrupted-and-resumed search with
``--mlflow``: tests/test_tune.py::test_resume_after_sigint_keeps_finished_trials_and_finishes_
the_rest (slow).
"""

from __future__ import annotations

import json
import sys
import threading
import urllib.request
from dataclasses import dataclass, field

import mlflow
import optuna
import pytest
import yaml

from tune_clipfh.cli import build_parser, main
from tune_clipfh.errors import UserError
from tune_clipfh.tune.dashboard import dashboard_server
from tune_clipfh.tune.results import load_results
from tune_clipfh.tune.tracking import TrialTracking

SPACE = """
base: {epochs_prompt: 1, epochs_image: 3, early_stop_patience: 3, unfreeze_mode: last_n}
parameters:
  lr_visual: {type: float, low: 1.0e-6, high: 1.0e-2, log: true}
  unfreeze_blocks: {type: int, low: 1, high: 12}
"""
SEARCHED = ("lr_visual", "unfreeze_blocks")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite MLflow store for the module (creating its tables takes seconds)."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def _runs(uri: str, experiment: str):
    mlflow.set_tracking_uri(uri)
    return mlflow.search_runs(experiment_names=[experiment])


def _trial_runs(uri: str, experiment: str):
    runs = _runs(uri, experiment)
    return runs[runs["tags.tune_clipfh.key"].str.startswith("trial:")].set_index("tags.trial_id")


def _steps(uri: str, run_id: str, metric: str) -> list[int]:
    return [m.step for m in mlflow.MlflowClient(uri).get_metric_history(run_id, metric)]


@pytest.fixture(scope="module")
def tracked(ray_session, store, tmp_path_factory):
    """``search --mlflow`` of two trials at once (the first two version points of the space)."""
    folder = tmp_path_factory.mktemp("tracked")
    (folder / "space.yaml").write_text(SPACE)
    argv = ["search", "--space", str(folder / "space.yaml"), "--backbone", "vitb16",
            "--num-samples", "2", "--race-top", "0", "--max-concurrent", "2",
            "--name", "tracked", "--storage", str(folder / "ray"), "--mlflow", store]
    assert main(argv) == 0
    return argv, folder / "ray" / "tracked"


def test_search_gives_one_run_per_trial_with_knobs_metrics_status_and_the_report(
        tracked, store):
    _, path = tracked
    frame = load_results(path).set_index("trial_id")
    runs = _trial_runs(store, "tracked")
    assert sorted(runs.index) == sorted(frame.index)
    parent = _runs(store, "tracked").query("`tags.tune_clipfh.key` == 'experiment'")
    assert len(parent) == 1 and parent["status"].item() == "FINISHED"
    for trial_id, run in runs.iterrows():
        row = frame.loc[trial_id]
        assert run["tags.mlflow.parentRunId"] == parent["run_id"].item()
        assert run["status"] == "FINISHED" and run["tags.status"] == row["status"]
        for name in SEARCHED:
            assert json.loads(run[f"params.{name}"]) == row[f"config/{name}"]
        for metric in ("test_rank1", "test_mAP", "best_val_rank1"):
            assert run[f"metrics.{metric}"] == pytest.approx(row[metric])
        # One validation value per epoch (the final row's step holds the test, not a copy).
        epochs = int(row["epochs_prompt_run"] + row["epochs_image_run"])
        assert _steps(store, run["run_id"], "val_rank1") == list(range(1, epochs + 1))
        assert _steps(store, run["run_id"], "test_rank1") == [epochs + 1]
    artifacts = {a.path for a in mlflow.MlflowClient(store).list_artifacts(
        parent["run_id"].item())}
    assert {"report.html", "eval_table.csv", "train_table.csv"} <= artifacts


def test_a_resumed_search_adds_no_run_and_no_step_twice(tracked, store):
    argv, _ = tracked
    before = _trial_runs(store, "tracked")
    histories = {r: _steps(store, r, "val_rank1") for r in before["run_id"]}
    assert main([*argv, "--resume"]) == 0
    after = _trial_runs(store, "tracked")
    assert len(_runs(store, "tracked")) == len(before) + 1  # the trials' runs and the parent
    assert sorted(after["run_id"]) == sorted(before["run_id"])
    assert {r: _steps(store, r, "val_rank1") for r in after["run_id"]} == histories


@dataclass(eq=False)
class FakeTrial:
    """What the callback reads of a Ray trial."""

    trial_id: str
    config: dict = field(default_factory=lambda: {"lr_visual": 1e-4})
    last_result: dict = field(default_factory=dict)
    status: str = "TERMINATED"


def _epoch(step: int) -> dict:
    return {"training_iteration": step, "val_rank1": step / 10, "final": 0}


@pytest.mark.parametrize("final, failed, status", [
    ({"status": "completed"}, False, "completed"),
    ({"status": "early_stopped"}, False, "early_stopped"),
    ({"status": "diverged"}, False, "diverged"),
    (None, False, "stopped_by_scheduler"),  # ASHA: no final row
    (None, True, "errored"),
])
def test_each_trials_status_is_its_runs_tag(store, tmp_path, final, failed, status):
    callback = TrialTracking(store, tmp_path / f"statuses-{status}", {"model": "rn50"})
    callback.setup()
    trial = FakeTrial(f"t-{status}")
    callback.log_trial_start(trial)
    rows = [_epoch(1), _epoch(2)]
    if final is not None:
        rows.append({"training_iteration": 3, "final": 1, "test_rank1": 0.5, **final})
    for row in rows:
        trial.last_result = row
        callback.log_trial_result(row["training_iteration"], trial, row)
    callback.log_trial_end(trial, failed=failed)
    (run,) = [r for _, r in _runs(store, f"statuses-{status}").iterrows()
              if r["tags.tune_clipfh.key"] == f"trial:t-{status}"]
    assert run["tags.status"] == status
    assert run["status"] == ("FAILED" if failed else "FINISHED")
    assert run["params.model"] == "rn50" and json.loads(run["params.lr_visual"]) == 1e-4


def test_a_restarted_driver_reuses_the_trials_run_and_skips_epochs_logged(store, tmp_path):
    """A driver that restarts (``--resume``) re-sends the epochs after the trial's checkpoint."""
    path = tmp_path / "restarted"
    first = TrialTracking(store, path, {})
    first.setup()
    trial = FakeTrial("t-restarted")
    first.log_trial_start(trial)
    for step in (1, 2, 3):
        first.log_trial_result(step, trial, _epoch(step))
    second = TrialTracking(store, path, {})  # the resumed driver, from its checkpoint at 2
    second.setup()
    second.log_trial_start(trial)
    for step in (3, 4):
        second.log_trial_result(step, trial, _epoch(step))
    runs = _runs(store, "restarted")
    assert len(runs) == 2  # the trial's and the parent
    run_id = runs.query("`tags.tune_clipfh.key` == 'trial:t-restarted'")["run_id"].item()
    assert _steps(store, run_id, "val_rank1") == [1, 2, 3, 4]


def test_another_tune_experiment_of_the_same_name_is_refused(store, tmp_path):
    TrialTracking(store, tmp_path / "a" / "same-name", {}).setup()
    with pytest.raises(UserError, match="tracks the Tune experiment"):
        TrialTracking(store, tmp_path / "b" / "same-name", {}).setup()


def test_train_becomes_one_run_and_again_adds_nothing(store, tmp_path, capsys):
    knobs = {"profile": "tiny", "pretrained": "none", "model": "rn50", "epochs_prompt": 1,
             "epochs_image": 1, "early_stop_patience": 0, "n_ctx": 4,
             "experiment": "tracked-train"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(knobs))
    argv = ["train", "--config", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "run"),
            "--no-progress", "--mlflow", store]
    assert main(argv) == 0
    assert main(["train", "--resume", str(tmp_path / "run"), "--no-progress",
                 "--mlflow", store]) == 0  # a finished run: nothing to train, nothing new
    (run,) = [r for _, r in _runs(store, "tracked-train").iterrows()]
    assert run["tags.status"] == "completed" and run["params.model"] == "rn50"
    assert _steps(store, run["run_id"], "val_rank1") == [1, 2]
    assert _steps(store, run["run_id"], "test_rank1") == [3]


@pytest.mark.parametrize("extra, argv", [
    ("mlflow", ["train", "--config", "tiny_synthetic", "--mlflow", "sqlite:///x.db"]),
    ("dashboard", ["dashboard", "STUDY"]),
])
def test_a_missing_extra_is_one_line_naming_its_install(monkeypatch, capsys, tmp_path,
                                                          extra, argv):
    optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    monkeypatch.setitem(sys.modules, {"mlflow": "mlflow", "dashboard": "optuna_dashboard"}[extra],
                        None)  # as if not installed: importing it raises ImportError
    assert main([str(tmp_path) if a == "STUDY" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install 'tune-clipfh[{extra}]'" in err, err


def test_the_dashboard_serves_the_study_on_localhost(tmp_path, capsys):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}",
                                study_name="served")
    study.add_trial(optuna.trial.create_trial(
        params={"x": 1.0}, distributions={"x": optuna.distributions.FloatDistribution(0, 2)},
        value=0.5))
    server, url = dashboard_server(tmp_path, 0)
    assert url.startswith("http://127.0.0.1:") and server.server_address[0] == "127.0.0.1"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with urllib.request.urlopen(f"{url}api/studies", timeout=30) as answer:
            studies = json.loads(answer.read())["study_summaries"]
    finally:
        server.shutdown()
        server.server_close()
    assert [s["study_name"] for s in studies] == ["served"]


def test_the_dashboard_refuses_a_folder_without_a_study(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no optuna.db" in err, err


def test_mlflow_defaults_to_the_environment(monkeypatch):
    monkeypatch.setenv("TUNE_CLIPFH_MLFLOW_URI", "sqlite:///env.db")
    for verb in (["train", "--config", "c"], ["search"], ["reproduce"], ["ablate"]):
        assert build_parser().parse_args(verb).mlflow == "sqlite:///env.db"
    assert build_parser().parse_args(["search", "--mlflow", ""]).mlflow == ""
