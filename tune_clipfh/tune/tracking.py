"""MLflow tracking (``--mlflow URI``) of Tune experiments and of ``train`` runs.

One MLflow experiment per Tune experiment, named after its folder: a parent run for the
experiment (the report's HTML and CSVs as its artifacts) and one child run per trial, with the
trial's knobs as params, each reported row's validation, loss and test metrics at Ray's
``training_iteration`` as the step, and its status (completed, early_stopped, diverged,
stopped_by_scheduler, errored, ...) as the ``status`` tag. A ``train`` run becomes one run of
the MLflow experiment named after its config's ``experiment``.

Ray's ``MLflowLoggerCallback`` connects to the tracking server and creates the experiment; what
it lacks is written here. Runs are keyed by a tag (the Tune trial id, a run folder), so that a
resumed experiment finds a trial's run instead of starting a second one; the last step logged
is a tag too, and rows at steps already logged are skipped, so that epochs re-run from a
checkpoint are not logged twice. Each row is one ``log_batch`` (Ray's logs one write per value:
a few hundred per trial against a sqlite store).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import TRAINING_ITERATION

from ..errors import UserError
from ..extras import require
from .progress import trial_folder_name
from .results import trial_outcome
from .trainable import META_KEYS, trial_knobs

KEY_TAG = "tune_clipfh.key"
"""What a run stands for: ``experiment`` (the parent), ``trial:<id>``, ``run:<folder>``."""
LAST_STEP_TAG = "tune_clipfh.last_step"
PATH_TAG = "tune_clipfh.experiment_path"
PARENT_TAG = "mlflow.parentRunId"
METRIC_PREFIXES = ("val_", "best_val_", "test_", "loss_", "prompt_loss_", "lr_")
METRIC_KEYS = ("epoch", "image_epoch", "epoch_time_s", "time_total_s")
FINAL_PREFIXES = ("best_val_", "test_")
"""A final row's own metrics: the rest of it repeats the last epoch's row."""


class TrackingStore:
    """One MLflow experiment at a tracking URI, and its runs keyed by ``KEY_TAG``."""

    def __init__(self, uri: str, name: str, path: str | None = None):
        mlflow = require("mlflow")
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        self.experiment_id = _experiment(self.client, uri, name, path)

    def run(self, key: str, name: str, tags: dict[str, str] | None = None) -> tuple[str, int]:
        """The run keyed ``key`` (created when new) and the last step it logged (0: none)."""
        found = self.client.search_runs([self.experiment_id],
                                        filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                                        max_results=1)
        if found:
            return found[0].info.run_id, int(found[0].data.tags.get(LAST_STEP_TAG, 0))
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={KEY_TAG: key, **(tags or {})})
        return run.info.run_id, 0

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        """Params as text; a reused run is given the same values again, which MLflow allows."""
        from mlflow.entities import Param

        self.client.log_batch(run_id, params=[Param(k, _text(v)) for k, v in params.items()])

    def log_row(self, run_id: str, step: int, row: dict[str, Any]) -> None:
        """The row's metrics at ``step``, and ``step`` as the run's last step logged."""
        from mlflow.entities import Metric, RunTag

        stamp = int(time.time() * 1000)
        metrics = [Metric(k, float(v), stamp, step) for k, v in metric_values(row).items()]
        self.client.log_batch(run_id, metrics=metrics, tags=[RunTag(LAST_STEP_TAG, str(step))])

    def finish(self, run_id: str, status: str | None, failed: bool) -> None:
        self.client.set_tag(run_id, "status", str(status))
        self.client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def _experiment(client, uri: str, name: str, path: str | None) -> str:
    """The id of the MLflow experiment ``name``, created when new (a local sqlite store keeps
    its artifacts beside its database file, not in the working folder). It must track the
    Tune experiment at ``path`` when one is given: two Tune experiments of one name in other
    storages would otherwise mix their runs."""
    found = client.get_experiment_by_name(name)
    if found is None:
        artifacts = None
        if uri.startswith("sqlite:///"):
            artifacts = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" /
                         name).resolve().as_uri()
        return client.create_experiment(name, artifact_location=artifacts,
                                        tags={PATH_TAG: path} if path else None)
    tracked = found.tags.get(PATH_TAG)
    if path and tracked and tracked != path:
        raise UserError(f"--mlflow: the MLflow experiment {name!r} at {uri} tracks the Tune "
                        f"experiment {tracked}, not {path}; give this one another --name")
    return found.experiment_id


def metric_values(row: dict[str, Any]) -> dict[str, float]:
    """An epoch row's validation, loss and rate metrics and its epoch counts; a final row's
    test and kept-epoch validation metrics. Finite numbers only: some stores refuse NaN, and a
    value not measured is better left out."""
    final = bool(row.get("final"))
    return {k: float(v) for k, v in row.items()
            if (k.startswith(FINAL_PREFIXES) if final else
                (k.startswith(METRIC_PREFIXES) or k in METRIC_KEYS))
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


class TrialTracking(MLflowLoggerCallback):
    """Ray Tune's MLflow callback, each trial's run keyed by its trial id under the
    experiment's parent run (see the module's docstring)."""

    def __init__(self, uri: str, path: Path, base_knobs: dict[str, Any]):
        require("mlflow")  # Ray's callback imports it unchecked
        super().__init__(tracking_uri=uri, experiment_name=path.name)
        self.path = str(path)
        self.base_knobs = dict(base_knobs)

    def setup(self, *args, **kwargs) -> None:
        # The experiment is created first, with its artifact location and path tag; Ray's set-up
        # then finds it by name.
        self.store = TrackingStore(self.tracking_uri, self.experiment_name, self.path)
        super().setup(*args, **kwargs)
        self.parent, _ = self.store.run("experiment", self.experiment_name)
        self.store.client.update_run(self.parent, status="RUNNING")  # a resume, too
        self._last_step: dict[Any, int] = {}

    def log_trial_start(self, trial) -> None:
        if trial in self._trial_runs:  # a retry after a crash: the same run goes on
            return
        config = trial.config or {}
        described = {**(config.get("fixed") or {}), **config}
        tags = {PARENT_TAG: self.parent, "trial_id": trial.trial_id,
                **{k: str(described[k]) for k in META_KEYS if k in described}}
        run_id, last = self.store.run(f"trial:{trial.trial_id}", trial_folder_name(trial), tags)
        self.store.log_params(run_id, trial_knobs(config, self.base_knobs))
        self._trial_runs[trial], self._last_step[trial] = run_id, last

    def log_trial_result(self, iteration: int, trial, result: dict) -> None:
        step = int(result[TRAINING_ITERATION])
        if step <= self._last_step[trial]:  # re-run from a checkpoint: logged already
            return
        self.store.log_row(self._trial_runs[trial], step, result)
        self._last_step[trial] = step

    def log_trial_end(self, trial, failed: bool = False) -> None:
        status = trial_outcome(trial.last_result or {}, errored=failed, ended=not failed)
        self.store.finish(self._trial_runs[trial], status, failed)

    def on_experiment_end(self, trials, **info) -> None:
        # Ray calls this on an interrupt too: then the parent run is KILLED until a resume.
        ended = all(trial.status in ("TERMINATED", "ERROR") for trial in trials)
        self.store.client.set_terminated(self.parent, "FINISHED" if ended else "KILLED")


def tracking_callbacks(uri: str | None, path: Path, base_knobs: dict[str, Any]) -> list:
    """The experiment's tracking callback: none without a URI."""
    return [TrialTracking(uri, path, base_knobs)] if uri else []


def log_experiment_artifacts(uri: str, path: Path, folder: Path) -> None:
    """``folder``'s files (the report) as artifacts of the Tune experiment's parent run; a
    later call replaces them."""
    store = TrackingStore(uri, path.name, str(path))
    parent, _ = store.run("experiment", path.name)
    store.client.log_artifacts(parent, str(folder))


def track_run_folder(uri: str, run_dir: Path) -> str:
    """A ``train`` run folder as one MLflow run: config.yaml's knobs as params, each
    metrics.jsonl row at its iteration, the test's mean and std at the step after, the status
    from summary.json and the folder's small files as artifacts. Returns the run's id."""
    import yaml

    run_dir = run_dir.resolve()
    knobs = yaml.safe_load((run_dir / "config.yaml").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    store = TrackingStore(uri, str(knobs.get("experiment") or "train"))
    run_id, last = store.run(f"run:{run_dir}", run_dir.name)
    store.log_params(run_id, knobs)
    rows = [json.loads(line) for line in
            (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        if int(row["iteration"]) > last:
            store.log_row(run_id, int(row["iteration"]), row)
    test = {f"test_{k}": v for k, v in (summary.get("test_mean") or {}).items()}
    test.update({f"test_{k}_std": v for k, v in (summary.get("test_std") or {}).items()})
    test_step = max((int(row["iteration"]) for row in rows), default=0) + 1
    if test and test_step > last:
        store.log_row(run_id, test_step, {**test, "final": 1})
    for name in ("config.yaml", "summary.json", "test_results.csv"):
        if (run_dir / name).is_file():
            store.client.log_artifact(run_id, str(run_dir / name))
    store.finish(run_id, summary.get("status"), failed=False)
    return run_id
