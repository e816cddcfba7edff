"""Reports: Tune experiments (reproduce and search) -> one offline ``report.html`` + CSV tables.

``build_report(experiment_dirs, out_dir, reference_csv=None)`` reads each experiment through
Ray's result API (``report.data``), builds the tables (``report.tables``) and figures
(``report.figures``), and writes ``report.html`` (``report.page``) with the CSV files beside it.
Missing or partial experiments give a page that says what is missing instead of an error.

Sections of the page:

1. test Rank-1 against mAP, Pareto front, thesis series when the protocol matches;
2. ours against the thesis per version and backbone;
3. learning curves (validation) and the loss breakdown;
4. parallel coordinates, knobs -> best validation Rank-1;
5. parameter importance of each search (fANOVA and PED-ANOVA);
6. optimisation history of each search;
7. CMC curves of the best configurations (chosen on validation);
8. the summary: each search's choice named in words (``tune.selection``, per backbone), the
   claims (what is beyond the seed noise, ``report.claims``) and the summary table.

A configuration is a version with its seeds or a search trial with its race runs
(``tables.configuration_key``) in every table, figure and claim.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd

from ..model.registry import BACKBONES
from ..resources import resource_path
from . import claims, figures, tables
from .data import Experiment, load_experiment, load_zero_shot, param_importances
from .page import Panel, Section, frame_table, render_page, sentence_list
from .reference import load_reference, versus_reference
from .tables import METRIC_NAMES

REFERENCE_CSV = resource_path("analysis", "thesis_clipfh_11k_dorsal_r_eval.csv")
"""The thesis's published per-version table (see analysis/README.md for its source)."""
REPORT_NAME = "report.html"

__all__ = ["REFERENCE_CSV", "build_report"]


def build_report(experiment_dirs: Iterable[str | Path], out_dir: str | Path,
                 reference_csv: str | Path | None = None,
                 log: Callable[[str], None] | None = None,
                 zero_shot_dirs: Iterable[str | Path] = ()) -> Path:
    """Write ``<out_dir>/report.html`` and its CSV tables; return the page's path.

    ``zero_shot_dirs``: zero-shot evaluations (``eval --zero-shot --out``) drawn as reference
    points in figures 1 and 2, beside the thesis's zero-shot CLIP when the protocol matches,
    and compared with the best configurations in the summary's claims."""
    read = _read(experiment_dirs, reference_csv, zero_shot_dirs)
    out = Path(out_dir).expanduser().resolve()  # made once the inputs read: no empty report
    out.mkdir(parents=True, exist_ok=True)
    trials = read.trials
    configs = tables.configurations(trials) if not trials.empty else \
        tables.configurations(pd.DataFrame())
    comparison = versus_reference(configs, read.reference)
    choices = claims.choices(trials, [claims.SearchExperiment.from_meta(e.name, e.meta, e.trials)
                                      for e in read.experiments if e.kind == "search"])
    claim_table, claim_reasons = claims.claims(trials, choices, read.given_zero_shots)
    summary = [_choices_panel(choices), _claims_panel(claim_table, claim_reasons),
               _summary_panel(configs)]
    sections = _sections(read, configs, comparison, summary)
    csvs = {
        "eval_table": tables.eval_table(trials),
        "train_table": tables.train_table(read.history, trials),
        "configurations": configs.drop(columns=["knobs_html"], errors="ignore").round(4),
        "summary": tables.summary_table(configs, top=None),
        "versus_thesis": comparison.round(2),
        "claims": claim_table.round(2),
    }
    files = [p.name for p in tables.write_csvs(out, csvs)]
    page = render_page(
        title="tune-clipfh report: " + ", ".join(e.name for e in read.experiments),
        experiments=[_experiment_row(e) for e in read.experiments], notes=read.notes,
        sections=sections, files=files, generated=time.strftime("%Y-%m-%d %H:%M:%S"))
    path = out / REPORT_NAME
    path.write_text(page, encoding="utf-8")
    if log:
        for note in read.notes:
            log(f"note: {note}")
    return path


@dataclass
class _Read:
    """What the report is made from: the experiments, the thesis's table and the zero-shots."""

    experiments: list[Experiment]
    trials: pd.DataFrame
    history: pd.DataFrame
    notes: list[str]
    reference: pd.DataFrame | None
    comparable: bool  # the thesis's numbers are shown beside ours
    protocol_note: str  # why they are not, when not
    zero_shots: list[dict]  # drawn in figures 1 and 2, the thesis's included
    given_zero_shots: list[dict]  # ours only: what the claims compare (one implementation)


def _read(experiment_dirs: Iterable[str | Path], reference_csv: str | Path | None,
          zero_shot_dirs: Iterable[str | Path]) -> _Read:
    experiments = [load_experiment(path) for path in experiment_dirs]
    notes = [note for exp in experiments for note in exp.notes]
    notes += _coverage_notes(experiments)
    reference, reference_note = _reference(reference_csv)
    if reference_note:
        notes.append(reference_note)
    comparable, protocol_note = _comparability(experiments, reference)
    if not comparable and protocol_note:
        notes.append(f"The thesis's numbers are not shown: {protocol_note}")
    given_zero_shots = [load_zero_shot(path) for path in zero_shot_dirs]
    zero_shots = list(given_zero_shots)
    if comparable and reference is not None:
        zero_shots += _thesis_zero_shots(reference_csv)
    notes += _miniature_notes(experiments)
    return _Read(experiments=experiments,
                 trials=_concat([tables.with_miniature(e.trials, e.meta.get("profile"))
                                 for e in experiments]),
                 history=_concat([e.history.assign(experiment=e.name) for e in experiments
                                  if not e.history.empty]),
                 notes=notes, reference=reference, comparable=comparable,
                 protocol_note=protocol_note, zero_shots=zero_shots,
                 given_zero_shots=given_zero_shots)


def _sections(read: _Read, configs: pd.DataFrame, comparison: pd.DataFrame,
              summary: list[Panel]) -> list[Section]:
    """The page's sections, in the order of the module doc."""
    protocol = [f"Thesis numbers not comparable: {read.protocol_note}"] \
        if not read.comparable and read.protocol_note else []
    labels = trial_labels(read.trials)
    return [
        Section("Rank-1 against mAP (test)", [Panel(
            figures.pareto_figure(configs, read.reference, read.comparable,
                                  read.protocol_note, read.zero_shots),
            caption=figures.CAPTIONS["pareto"], notes=protocol,
            missing="no trial has test metrics yet.")]),
        Section("Ours against the thesis, per version and backbone", [Panel(
            figures.versus_figure(comparison, read.comparable, read.zero_shots),
            caption=figures.CAPTIONS["versus"], notes=protocol,
            missing="no fixed trial (v1-v10) with test metrics: read a reproduce experiment.")]),
        Section("Learning curves and loss breakdown", [
            Panel(figures.learning_curves_figure(read.history, labels),
                  caption=figures.CAPTIONS["curves"], missing="no trial reported an epoch."),
            Panel(figures.loss_figure(read.history, labels), caption=figures.CAPTIONS["losses"],
                  missing="no trial reported an epoch.")]),
        Section("Parallel coordinates: knobs -> validation Rank-1",
                _parallel_panels(read.experiments)),
        Section("Parameter importance (search)", _importance_panels(read.experiments)),
        Section("Optimisation history (search)", _history_panels(read.experiments)),
        Section("CMC curves of the best configurations", [Panel(
            figures.cmc_figure(configs), caption=figures.CAPTIONS["cmc"],
            missing="no trial has a test CMC yet.")]),
        Section("Summary: the searches' choices, claims and top configurations", summary),
    ]


def trial_labels(trials: pd.DataFrame) -> dict[tuple[str, str], str]:
    """``(experiment, trial_id)`` -> a short legend label (``vitb16 v1 s0``, ``search 1a2b``,
    ``search 1a2b s1`` for a race run of search 1a2b)."""
    labels = {}
    for _, row in trials.iterrows():
        if row.get("kind") == "fixed":
            label = f"{row.get('backbone')} {row.get('version')} s{int(row.get('seed') or 0)}"
        elif tables.first_run_id(row) != str(row["trial_id"]):
            label = f"search {tables.first_run_id(row)} {_replicate(row)}"
        else:
            label = f"search {row['trial_id']}"
        labels[(row["experiment"], row["trial_id"])] = tables.marked(label, row)
    return labels


def _replicate(race_run: pd.Series) -> str:
    """What a race run varied: ``s1`` (its seed) or ``fold 1`` (its validation fold; a
    seed race keeps the prepared fold, 0)."""
    fold = race_run.get(tables.FOLD_COLUMN)
    if fold is not None and not pd.isna(fold) and int(fold):
        return f"fold {int(fold)}"
    return f"s{int(race_run.get('seed') or 0)}"


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if not f.empty]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _coverage_notes(experiments: list[Experiment]) -> list[str]:
    kinds = {e.kind for e in experiments}
    notes = []
    if not experiments:
        notes.append("No experiment folder was given.")
        return notes
    if "reproduce" not in kinds:
        notes.append("No reproduce experiment read: the fixed versions v1-v10 are absent, so "
                     "figures 1-2 hold search trials only (add a `tune-clipfh reproduce` "
                     "folder to compare).")
    if "search" not in kinds:
        notes.append("No search experiment read: parameter importance and optimisation "
                     "history (sections 5-6) are empty.")
    return notes


def _miniature_notes(experiments: list[Experiment]) -> list[str]:
    """One note per tiny-profile backbone whose miniature is mechanics only."""
    found = sorted({str(b) for e in experiments if e.meta.get("profile") == "tiny"
                    and "backbone" in e.trials for b in e.trials["backbone"].dropna().unique()
                    if b in BACKBONES and BACKBONES[b].miniature == tables.MECHANICS_ONLY})
    return [f"{BACKBONES[b].label} ({b}), tiny profile: {tables.MECHANICS_ONLY}. On the "
            f"embedded default its fine-tuning does not move test Rank-1 beyond its zero-shot "
            f"level and the seed noise (README, 'The miniature, measured'), so its numbers "
            f"here show that the path runs, not what a knob is worth; its labels are marked "
            f"'({tables.MECHANICS_ONLY})'." for b in found]


def _reference(path: str | Path | None) -> tuple[pd.DataFrame | None, str]:
    path = Path(path) if path else REFERENCE_CSV
    if not path.is_file():
        return None, f"Reference table {path} not found: the thesis's numbers are not shown."
    try:
        return load_reference(path), ""
    except (OSError, ValueError, KeyError) as exc:
        return None, f"Reference table {path} could not be read ({exc}); thesis not shown."


def _thesis_zero_shots(path: str | Path | None) -> list[dict]:
    """The thesis's zero-shot CLIP (frozen, image features; spec 4.3) per backbone."""
    rows = load_reference(Path(path) if path else REFERENCE_CSV, stage="stage0")
    return [{"label": f"zero-shot CLIP, thesis ({row.backbone})", "backbone": row.backbone,
             "rank1": row.rank1, "mAP": row.mAP, "rank1_std": row.rank1_std,
             "mAP_std": row.mAP_std} for row in rows.itertuples()]


def _comparability(experiments: list[Experiment],
                   reference: pd.DataFrame | None) -> tuple[bool, str]:
    with_trials = [e for e in experiments if not e.trials.empty]
    if reference is None:
        return False, "no reference table"
    if not with_trials:
        return False, "no experiment has trials"
    by_reason: dict[str, list[str]] = {}
    for exp in with_trials:
        if not exp.comparable:
            by_reason.setdefault(exp.protocol_note, []).append(exp.name)
    if by_reason:
        return False, ("the thesis ran the full models on real 11k dorsal-right images; here "
                       + "; ".join(f"{', '.join(names)}: {reason}"
                                   for reason, names in by_reason.items()))
    return True, ""


def _parallel_panels(experiments: list[Experiment]) -> list[Panel]:
    panels = []
    for exp in experiments:
        if exp.trials.empty:
            continue
        what = "sampled knobs" if exp.kind == "search" else "knobs that differ between versions"
        panels.append(Panel(
            figures.parallel_figure(exp.trials, f"Parallel coordinates, {exp.name} ({what})"),
            caption=figures.CAPTIONS["parallel"],
            missing=f"{exp.name}: fewer than two trials with a validation metric, or no knob "
                    f"differs between them."))
    return panels or [Panel(missing="no experiment has trials.")]


def _objectives(exp: Experiment) -> list[str]:
    return list(exp.meta.get("metrics") or ["best_val_rank1"])


def _importance_panels(experiments: list[Experiment]) -> list[Panel]:
    panels = []
    for exp in (e for e in experiments if e.kind == "search"):
        for index, metric in enumerate(_objectives(exp)):
            importances, notes = param_importances(exp.study, index)
            count = _complete_trials(exp.study)
            title = (f"Parameter importance for {METRIC_NAMES.get(metric, metric)}, study "
                     f"{exp.meta.get('study_name', exp.name)} ({count} complete trials, "
                     f"warm-start versions included)")
            panels.append(Panel(figures.importance_figure(importances, title),
                                caption=figures.CAPTIONS["importance"],
                                notes=[f"{exp.name}: {n}" for n in notes],
                                missing=f"{exp.name}: no importance could be computed."))
    return panels or [Panel(missing="no search experiment read.")]


def _complete_trials(study) -> int:
    if study is None:
        return 0
    return sum(t.state == optuna.trial.TrialState.COMPLETE
               for t in study.get_trials(deepcopy=False))


def _history_panels(experiments: list[Experiment]) -> list[Panel]:
    panels = []
    for exp in (e for e in experiments if e.kind == "search"):
        histories = {METRIC_NAMES.get(m, m): tables.optimisation_history(exp.trials,
                                                                         exp.history, m)
                     for m in _objectives(exp)} if not exp.trials.empty else {}
        panels.append(Panel(
            figures.history_figure(histories, f"Optimisation history, {exp.name}"),
            caption=figures.CAPTIONS["history"],
            missing=f"{exp.name}: no search trial has reported yet."))
    return panels or [Panel(missing="no search experiment read.")]


def _choices_panel(made: list[claims.Choice]) -> Panel:
    return Panel(html=sentence_list([claims.choice_sentence(c) for c in made]) if made else "",
                 caption=claims.CHOICES_CAPTION,
                 missing="no search experiment read: no choice to name.")


def _claims_panel(claim_table: pd.DataFrame, reasons: list[str]) -> Panel:
    """The claims as sentences; the reasons for the claims not made as notes (or, with no
    claim at all, as the panel's missing reason)."""
    return Panel(html=sentence_list(list(claim_table["claim"])) if len(claim_table) else "",
                 caption=claims.CAPTION, notes=reasons if len(claim_table) else [],
                 missing="no claim to make: " + " ".join(reasons))


def _summary_panel(configs: pd.DataFrame) -> Panel:
    summary = tables.summary_table(configs, top=10)
    if summary.empty:
        return Panel(missing="no configuration to summarise.")
    shown = pd.DataFrame({
        "rank": summary["rank"], "configuration": summary["configuration"],
        "kind": summary["kind"], "backbone": summary["backbone"],
        "experiment": summary["experiment"], "seeds": summary["seeds"],
        **({"folds": summary["folds"]} if summary["folds"].fillna("").astype(bool).any()
           else {}),
        "status": summary["status"], "val R1 (%)": summary["val_rank1"],
        "val mAP (%)": summary["val_mAP"],
        "test R1 (%)": [_plus_minus(m, s) for m, s in zip(
            summary["test_rank1"], summary["test_rank1_std"], strict=True)],
        "test mAP (%)": [_plus_minus(m, s) for m, s in zip(
            summary["test_mAP"], summary["test_mAP_std"], strict=True)],
        "test R5 (%)": summary["test_rank5"], "test R10 (%)": summary["test_rank10"],
        "time (s)": summary["time_total_s"], "device": summary["device"],
        "trained on": summary["trained_on"], "knobs": summary["knobs"]})
    return Panel(html=frame_table(shown, folded=("knobs",)),
                 caption="The ten best configurations by best validation Rank-1 (ties by "
                         "mAP): seeds (a search configuration's race runs among them, with "
                         "their validation folds when the race varied the fold), validation "
                         "(mean over the seeds) and test metrics (test as mean ± std over "
                         "splits and seeds), total trial time, the device its trials ran on "
                         "(cpu, or the GPU and the node's card index), the identities it "
                         "trained on (the training identities minus the validation ones, or, "
                         "as upstream did for its test-selected runs, all of them) and knobs "
                         "(click to open); "
                         "every configuration, with its trial ids, is in summary.csv.")


def _plus_minus(mean: float, std: float) -> str:
    if pd.isna(mean):
        return ""
    return f"{mean:.2f}\u00a0±\u00a0{std:.2f}" if not pd.isna(std) else f"{mean:.2f}"


def _experiment_row(exp: Experiment) -> dict:
    counts = exp.trials["status"].fillna("unfinished").value_counts().to_dict() \
        if not exp.trials.empty and "status" in exp.trials else {}
    return {
        "experiment": exp.name, "kind": exp.kind, "profile": exp.meta.get("profile", ""),
        "trials": ", ".join(f"{n} {s}" for s, n in counts.items()) or "none",
        "thesis comparable": "yes: " + exp.protocol_note if exp.comparable
        else f"no: {exp.protocol_note}" if exp.protocol_note else "no",
        "folder": str(exp.path),
    }
