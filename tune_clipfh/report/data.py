"""Reading experiments for the report: Ray's result API, the Optuna study, the dataset manifest.

Everything that touches the disk lives here; ``tables`` and ``figures`` only see dataframes.

* Trials: ``tune.results.load_results`` (one row per trial from ``ExperimentAnalysis``: the
  final row's test metrics and the running-best validation metrics).
* Per-epoch history: ``ExperimentAnalysis.trial_dataframes`` (every reported row of every
  trial), kept long with a ``trial_id`` column so runs never mix.
* Search experiments: the Optuna study named in ``tune_clipfh_experiment.json``
  (``optuna_storage``, ``study_name``; ``<experiment>/optuna.db`` when the folder was moved).
* Protocol: whether the thesis's published numbers are comparable (``protocol_check``).

A missing or partial experiment never raises: what could not be read becomes a note.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import yaml
from optuna.importance import (
    FanovaImportanceEvaluator,
    PedAnovaImportanceEvaluator,
    get_param_importances,
)
from ray.tune import ExperimentAnalysis

from ..errors import UserError
from ..loss_table import loss_columns
from ..tune.results import experiment_meta, load_results

STATE_GLOB = "experiment_state-*.json"
REAL_11K_ROWS = 11_000
"""The real 11k HandInfo.csv has 11,076 rows; the synthetic sets have a few thousand."""
THESIS_PROTOCOL = "11k dorsal_r (real images), full profile"
HISTORY_COLUMNS = ("stage", "stage_epoch", "epoch",
                   *(column for column, _, _ in loss_columns()),
                   "lr_visual", "lr_head", "lr_prompt", "lr_text",
                   "val_rank1", "val_mAP", "val_rank5", "val_rank10", "is_best",
                   "epoch_time_s", "time_total_s", "timestamp", "time_this_iter_s",
                   "training_iteration", "final")
MIN_IMPORTANCE_TRIALS = 4


@dataclass
class Experiment:
    """One Tune experiment as read for the report."""

    path: Path
    name: str
    meta: dict[str, Any]
    kind: str  # reproduce | search | unknown
    trials: pd.DataFrame  # one row per trial (load_results + experiment columns)
    history: pd.DataFrame  # one row per reported epoch (final == 0), all trials
    comparable: bool = False
    protocol_note: str = ""
    notes: list[str] = field(default_factory=list)
    study: Any = None  # optuna.Study for search experiments


def load_zero_shot(path: str | Path) -> dict[str, Any]:
    """A zero-shot evaluation folder (``tune-clipfh eval --zero-shot --out DIR``) as one
    reference: label, backbone and test Rank-1 / mAP with their split std (percent)."""
    path = Path(path).expanduser()
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
        config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise UserError(f"--zero-shot {path}: not a zero-shot evaluation folder ({exc}); make "
                        f"one with tune-clipfh eval --config FILE --zero-shot --out DIR") from None
    if not summary.get("zero_shot"):
        raise UserError(f"--zero-shot {path}: summary.json is not a zero-shot evaluation's "
                        f"(make one with tune-clipfh eval --config FILE --zero-shot --out DIR)")
    mean, std = summary["test_mean"], summary["test_std"]
    return {"label": f"zero-shot, ours ({config.get('model')}, {config.get('profile')})",
            "backbone": config.get("model"), "rank1": 100 * mean["rank1"],
            "mAP": 100 * mean["mAP"], "rank1_std": 100 * std["rank1"],
            "mAP_std": 100 * std["mAP"]}


def load_experiment(path: str | Path) -> Experiment:
    """Read one experiment folder; its problems become ``notes`` instead of exceptions, but a
    folder that holds no experiment at all is a user error (a mistyped path, a run folder)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise UserError(f"{path}: folder does not exist (valid: an experiment folder written "
                        f"by tune-clipfh reproduce, search or ablate)")
    try:
        meta = experiment_meta(path)
    except (OSError, ValueError):
        meta = {}
    if not meta and not any(path.glob(STATE_GLOB)):
        raise UserError(f"{path}: not an experiment folder (no readable "
                        f"tune_clipfh_experiment.json, no Tune {STATE_GLOB}; valid: a folder "
                        f"written by tune-clipfh reproduce, search or ablate, under --storage)")
    kind = meta.get("kind", "unknown")
    experiment = Experiment(path=path, name=path.name, meta=meta, kind=kind,
                            trials=pd.DataFrame(), history=pd.DataFrame())
    if not meta:
        experiment.notes.append(f"{path.name}: no tune_clipfh_experiment.json (not an "
                                f"experiment written by tune-clipfh reproduce/search?).")
    if not any(path.glob(STATE_GLOB)):
        experiment.notes.append(f"{path.name}: no Tune experiment state ({STATE_GLOB}): the "
                                f"experiment never started a trial, so it has no results.")
        experiment.protocol_note = "no trials"
        return experiment
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trials = load_results(path)
            history = load_history(path)
    except Exception as exc:  # Ray raises many kinds on a damaged folder
        experiment.notes.append(f"{path.name}: Ray could not read the experiment "
                                f"({type(exc).__name__}: {_one_line(exc)}).")
        return experiment
    experiment.trials = annotate_trials(trials, experiment)
    experiment.history = history
    experiment.notes += trial_notes(experiment.trials, path.name)
    experiment.comparable, experiment.protocol_note = protocol_check(meta, experiment.trials)
    if kind == "search":
        experiment.study, note = load_study(path, meta)
        if note:
            experiment.notes.append(note)
    return experiment


def load_history(path: str | Path) -> pd.DataFrame:
    """Every per-epoch row (``final == 0``) of every trial, long, with its ``trial_id``."""
    analysis = ExperimentAnalysis(str(Path(path).resolve()))
    frames = []
    for trial_id, frame in analysis.trial_dataframes.items():
        if frame is None or frame.empty:
            continue
        keep = [c for c in HISTORY_COLUMNS if c in frame.columns]
        part = frame[keep].copy()
        part["trial_id"] = trial_id
        frames.append(part)
    if not frames:
        return pd.DataFrame(columns=["trial_id", *HISTORY_COLUMNS])
    history = pd.concat(frames, ignore_index=True)
    if "final" in history.columns:
        history = history[history["final"].fillna(0) == 0]
    return history.reset_index(drop=True)


def annotate_trials(trials: pd.DataFrame, experiment: Experiment) -> pd.DataFrame:
    """Add ``experiment``, ``experiment_kind``, ``backbone`` and ``version`` columns."""
    if trials.empty:
        return trials
    trials = trials.copy()
    trials["experiment"] = experiment.name
    trials["experiment_kind"] = experiment.kind
    backbone = trials.get("config/backbone")
    default = experiment.meta.get("backbone") or (trials.get("config/model").iloc[0]
                                                  if "config/model" in trials else None)
    if backbone is None:
        trials["backbone"] = default
    else:
        trials["backbone"] = backbone if default is None else backbone.fillna(default)
    version = trials.get("config/version")
    trials["version"] = version if version is not None else None
    return trials


def trial_notes(trials: pd.DataFrame, name: str) -> list[str]:
    """What is missing: no trials, errored, unfinished, without test metrics."""
    if trials.empty:
        return [f"{name}: the experiment has no trials."]
    notes = []
    status = trials["status"].fillna("unfinished")
    for label, what in (("errored", "raised an error (see error.txt in its trial folder)"),
                        ("unfinished", "never reported a final row (interrupted; resume "
                                       "with --resume)"),
                        ("invalid_config", "had an invalid sampled configuration (scored 0)"),
                        ("device_unavailable", "asked for device: cuda but saw no CUDA device "
                                               "(not run; scored 0)"),
                        ("diverged", "diverged (non-finite loss)")):
        ids = trials.loc[status == label, "trial_id"].tolist()
        if ids:
            notes.append(f"{name}: {len(ids)} trial(s) {what}: {', '.join(map(str, ids))}.")
    if "test_rank1" not in trials or trials["test_rank1"].isna().all():
        notes.append(f"{name}: no trial has test metrics yet (no trial finished), so the "
                     f"test-set figures have nothing from this experiment.")
    return notes


def protocol_check(meta: dict[str, Any], trials: pd.DataFrame) -> tuple[bool, str]:
    """Whether the thesis's published numbers are comparable, and why (not).

    Comparable only for the full profile on a prepared manifest of the real 11k dataset,
    dorsal_r aspect. The dataset folder comes from the experiment metadata (``data_dir``) or
    the trials' ``config/data_dir``; none recorded means the default synthetic dataset.
    """
    profile = meta.get("profile")
    reasons = []
    if profile != "full":
        reasons.append(f"profile {profile or 'unknown'!r} (tiny models, few epochs), "
                       f"not 'full'")
    dirs = {str(d) for d in (meta.get("data_dir"), meta.get("data")) if d}
    if "config/data_dir" in trials:
        dirs |= {str(d) for d in trials["config/data_dir"].dropna().unique() if d}
    caveat = ""
    if not dirs:
        reasons.append("no dataset folder recorded: the default is the embedded synthetic "
                       "dataset")
    for data_dir in sorted(dirs):
        ok, why, caveat = _manifest_check(Path(data_dir))
        if not ok:
            reasons.append(why)
    if reasons:
        return False, "; ".join(reasons)
    return True, f"{THESIS_PROTOCOL}{caveat}"


def _manifest_check(data_dir: Path) -> tuple[bool, str, str]:
    manifest = data_dir if data_dir.name == "manifest.json" else data_dir / "manifest.json"
    if any(part.startswith("synthetic-") for part in manifest.parts):
        return False, f"data {data_dir} is the embedded synthetic dataset", ""
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False, f"data {data_dir}: no readable manifest.json", ""
    dataset, aspect = data.get("dataset"), data.get("aspect")
    if dataset != "11k" or aspect != "dorsal_r":
        return False, f"data {data_dir} is {dataset} {aspect}, not 11k dorsal_r", ""
    total = ((data.get("report") or {}).get("rows") or {}).get("total")
    if not isinstance(total, int) or total < REAL_11K_ROWS:
        return False, (f"data {data_dir} has {total} HandInfo.csv rows (the real 11k has "
                       f"11,076): synthetic"), ""
    split = (data.get("protocol") or {}).get("identity_split")
    caveat = "" if split == "upstream" else (
        f" (identity split {split!r}: the thesis used the upstream thresholds, 72 training "
        f"identities, so read the comparison as indicative)")
    return True, "", caveat


def load_study(path: Path, meta: dict[str, Any]):
    """The search's Optuna study, or None and a note saying why not."""
    name = meta.get("study_name") or path.name
    local = path / "optuna.db"
    url = f"sqlite:///{local}" if local.is_file() else meta.get("optuna_storage")
    if not url:
        return None, f"{path.name}: no Optuna storage recorded and no optuna.db in the folder."
    try:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        return optuna.load_study(study_name=name, storage=url), ""
    except Exception as exc:  # a missing study (KeyError), a damaged or foreign database
        # (SQLAlchemy's errors), a newer schema (RuntimeError): the report goes on without it
        return None, (f"{path.name}: Optuna study {name!r} could not be loaded from {url} "
                      f"({type(exc).__name__}: {_one_line(exc)}).")


def param_importances(study, objective: int = 0) -> tuple[dict[str, dict[str, float]], list[str]]:
    """fANOVA and PED-ANOVA importances side by side (``{evaluator: {param: share}}``).

    With too few complete trials, or an evaluator that cannot run (fANOVA needs scikit-learn),
    that evaluator is left out and a note says why.
    """
    notes: list[str] = []
    if study is None:
        return {}, ["no Optuna study to compute importances from."]
    complete = [t for t in study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        return {}, [f"study {study.study_name!r} has {len(complete)} complete trial(s); "
                    f"parameter importance needs at least {MIN_IMPORTANCE_TRIALS}."]
    if objective >= len(study.directions):
        return {}, [f"study {study.study_name!r} has {len(study.directions)} objective(s), "
                    f"not {objective + 1}."]
    target = None
    if len(study.directions) > 1:
        # A target has no direction: PED-ANOVA then looks for LOW values, so flip maximised ones
        # (fANOVA, a variance decomposition, does not care about the sign).
        sign = -1.0 if study.directions[objective] == optuna.study.StudyDirection.MAXIMIZE \
            else 1.0

        def target(trial):
            return sign * trial.values[objective]
    result: dict[str, dict[str, float]] = {}
    makers = (("fANOVA", lambda: FanovaImportanceEvaluator(seed=0)),
              ("PED-ANOVA", lambda: PedAnovaImportanceEvaluator()))
    for label, make in makers:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                values = get_param_importances(study, evaluator=make(), target=target,
                                               normalize=True)
            result[label] = {k: float(v) for k, v in values.items()
                             if not math.isnan(float(v))}
            caught = [w for w in caught if "modify target" not in str(w.message)]
            if caught:
                notes.append(f"{label}: {_one_line(caught[0].message)} (read it as indicative "
                             f"with {len(complete)} trials).")
        except ImportError as exc:
            notes.append(f"{label} could not run: {_one_line(exc)} (install scikit-learn).")
        except Exception as exc:  # the evaluators raise what their models raise on
            # degenerate studies (one distinct value, constant objective): a note, not a crash
            notes.append(f"{label} could not run on {len(complete)} complete trials "
                         f"({type(exc).__name__}: {_one_line(exc)}).")
    return result, notes


def _one_line(value: Any) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= 300 else text[:297] + "..."
