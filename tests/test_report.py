"""The report layer: tables, figures and the page, built from a real tiny experiment.

One module fixture runs a real (tiny) reproduce experiment (vitb16 v1 and v4) and a 3-trial
search warm-started from it, and builds the report once; the figure tests rebuild single
figures from the same dataframes. The browser test renders ``report.html`` in headless
Chromium and keeps a screenshot under ``tests/artifacts/``.
"""

from __future__ import annotations

import html
import json
import math
import os
import random
import re
import shutil
import subprocess
import types
from pathlib import Path

import optuna
import pandas as pd
import pytest

import tune_clipfh.report as report_module
from tune_clipfh.cli import main
from tune_clipfh.errors import UserError
from tune_clipfh.evaluation import UPSTREAM_COLUMNS
from tune_clipfh.report import (
    REFERENCE_CSV,
    build_report,
    claims,
    figures,
    tables,
    trial_labels,
)
from tune_clipfh.report.data import (
    MIN_IMPORTANCE_TRIALS,
    load_experiment,
    load_zero_shot,
    param_importances,
    protocol_check,
    trial_notes,
)
from tune_clipfh.tune.experiment import ExperimentOptions, reproduce
from tune_clipfh.tune.search import search

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
# Random init: in two epochs the synthetic-pretrained model seldom beats its own start, so
# every trial would tie at its zero-shot validation score and leave nothing to rank.
QUICK = {"epochs_prompt": 1, "epochs_image": 2, "pretrained": "none"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--enable-unsafe-swiftshader",
                  "--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000"]


# ------------------------------------------------------------------------------------------
# Fixtures: one real tiny experiment pair and its report


@pytest.fixture(scope="module")
def experiments(ray_session, tmp_path_factory):
    storage = tmp_path_factory.mktemp("ray-report")
    options = dict(storage=str(storage), profile="tiny", max_concurrent=2, overrides=QUICK)
    repro = reproduce(["vitb16"], ["v1", "v4"], ExperimentOptions(name="r", **options))
    # 5 samples: with ASHA pruning some, the study keeps the 4 complete trials that parameter
    # importance needs (the 2 measured versions count)
    searched = search(None, 5, "rank1", "vitb16", str(repro),
                      ExperimentOptions(name="s", **options), asha=True, asha_grace=1,
                      asha_reduction=2, race_top=0)
    return repro, searched


@pytest.fixture(scope="module")
def loaded(experiments):
    """The experiments as the report reads them, and the pooled configurations."""
    read = [load_experiment(path) for path in experiments]
    trials = pd.concat([e.trials for e in read], ignore_index=True)
    history = pd.concat([e.history.assign(experiment=e.name) for e in read],
                        ignore_index=True)
    return read, trials, history, tables.configurations(trials)


@pytest.fixture(scope="module")
def report(experiments, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report(experiments, out)


@pytest.fixture(scope="module")
def reference():
    return tables.load_reference(REFERENCE_CSV)


# ------------------------------------------------------------------------------------------
# Pareto front


def brute_force_front(points):
    def dominated(p, q):
        return q[0] >= p[0] and q[1] >= p[1] and (q[0] > p[0] or q[1] > p[1])

    valid = [i for i, p in enumerate(points) if not any(map(math.isnan, p))]
    return sorted(i for i in valid if not any(dominated(points[i], points[j]) for j in valid))


def test_pareto_front_equals_brute_force_on_random_points_with_ties():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(0, 25)
        points = [(float(rng.randint(0, 6)), float(rng.randint(0, 6))) for _ in range(n)]
        if n and rng.random() < 0.3:
            points[rng.randrange(n)] = (math.nan, 1.0)
        assert tables.pareto_front(points) == brute_force_front(points), points
    assert tables.pareto_front([]) == []
    assert tables.pareto_front([(1, 1), (1, 1), (0, 2)]) == [0, 1, 2]  # equal points both stay


def test_pareto_trace_is_the_brute_force_front_of_the_real_experiment(loaded):
    _, _, _, configs = loaded
    tested = configs.dropna(subset=["rank1", "mAP"])
    assert len(tested) >= 4  # 2 versions + at least 2 finished search trials
    fig = figures.pareto_figure(configs)
    front = next(t for t in fig.data if t.name.startswith("Pareto front"))
    points = list(zip(tested["mAP"], tested["rank1"], strict=True))
    expected = {points[i] for i in brute_force_front(points)}
    assert set(zip(front.x, front.y, strict=True)) == expected
    fixed = next(t for t in fig.data if t.name == "fixed versions (vitb16)")
    assert sorted(fixed.text) == ["v1", "v4"]
    search_trace = next(t for t in fig.data if t.name == "search trials")
    assert search_trace.marker.symbol == "diamond"
    assert all("lr_visual=" in h for h in search_trace.hovertext)  # hover shows the knobs
    assert not any(tables.THESIS_LABEL in t.name for t in fig.data)  # tiny: not comparable
    assert fig.layout.title.text and "(%)" in fig.layout.xaxis.title.text
    assert "(%)" in fig.layout.yaxis.title.text


def test_thesis_series_is_drawn_only_when_comparable(loaded, reference):
    _, _, _, configs = loaded
    fig = figures.pareto_figure(configs, reference, comparable=True)
    thesis = [t for t in fig.data if tables.THESIS_LABEL in t.name]
    assert [t.name for t in thesis] == [f"{tables.THESIS_LABEL} (vitb16)"]  # backbone read
    raw = pd.read_csv(REFERENCE_CSV)
    raw = raw[(raw["stage"] == "stage2") & (raw["backbone"] == "vitb16")]
    assert list(thesis[0].y) == list(raw["mean_R1"]) and list(thesis[0].x) == list(
        raw["mean_mAP"])
    hidden = figures.pareto_figure(configs, reference, comparable=False, note="tiny")
    assert not any(tables.THESIS_LABEL in t.name for t in hidden.data)
    assert any("not shown" in a.text for a in hidden.layout.annotations)


# ------------------------------------------------------------------------------------------
# Ours against the thesis


def pooled_percent(trials: pd.DataFrame, version: str, metric: str) -> float:
    row = trials[trials["config/version"] == version].iloc[0]
    values = [row[f"test_split{i}_{metric}"] for i in range(1, 11)]
    return 100 * sum(values) / len(values)


def test_bars_hold_the_dataframe_and_reference_numbers(loaded, reference):
    _, trials, _, configs = loaded
    comparison = tables.versus_reference(configs, reference)
    assert list(comparison["label"]) == ["vitb16 v1", "vitb16 v4"]
    fig = figures.versus_figure(comparison, comparable=True)
    bars = {(t.name, t.xaxis): t for t in fig.data}
    expected_thesis = {("v1", "rank1"): 62.11, ("v4", "rank1"): 74.07,
                       ("v1", "mAP"): 71.34, ("v4", "mAP"): 81.93}
    for axis, metric in (("x", "rank1"), ("x2", "mAP")):
        ours = bars[("ours", axis)]
        assert list(ours.x) == ["vitb16 v1", "vitb16 v4"]
        assert list(ours.y) == pytest.approx(
            [pooled_percent(trials, v, metric) for v in ("v1", "v4")])
        thesis = bars[(tables.THESIS_LABEL, axis)]
        assert list(thesis.y) == [expected_thesis[(v, metric)] for v in ("v1", "v4")]
    ours_only = figures.versus_figure(comparison, comparable=False)
    assert {t.name for t in ours_only.data} == {"ours"}


# ------------------------------------------------------------------------------------------
# CSV tables and the page


def test_report_writes_the_upstream_tables_and_one_offline_page(report, loaded):
    _, trials, history, _ = loaded
    out = report.parent
    evals = pd.read_csv(out / "eval_table.csv")
    assert list(evals.columns) == ["version", *UPSTREAM_COLUMNS, *tables.RUN_COLUMNS]
    finished = trials[trials["test_rank1"].notna()]
    assert len(evals) == len(finished) and set(evals["trial_id"]) == set(finished["trial_id"])
    v1 = finished[finished["config/version"] == "v1"].iloc[0]
    row = evals[evals["version"] == "v1"].iloc[0]
    assert row["final_R1"] == round(100 * v1["test_rank1"], 2)
    assert row["split3_mAP"] == round(100 * v1["test_split3_mAP"], 2)
    assert evals["version"].str.match(r"^(v\d+|search-\w+)$").all()

    train = pd.read_csv(out / "train_table.csv")
    assert list(train.columns) == [*tables.TRAIN_COLUMNS, *tables.RUN_COLUMNS]
    blocks = (train["trial_id"] != train["trial_id"].shift()).cumsum()
    assert blocks.nunique() == train["trial_id"].nunique()  # one contiguous group per run
    for _, run in train.groupby("trial_id"):
        assert list(run["epoch"]) == list(range(1, len(run) + 1))
    assert train["loss_t2i"].isna().all() and train["is_best"].isin(["yes", "no"]).all()
    image = history[history["stage"] == "image"]
    assert len(train) == len(image)
    assert train["rank1"].between(0, 100).all()

    page = report.read_text()
    assert page.count("Plotly.newPlot") == page.count('id="figure-') >= 8
    assert "<script src=" not in page  # the library is embedded once, nothing fetched
    assert len(re.findall(r"plotly\.js v\d", page)) == 1
    for title in ("Rank-1 against mAP", "Learning curves", "Parallel coordinates",
                  "Parameter importance", "Optimisation history", "CMC curves", "Summary"):
        assert title in page, title
    assert "not comparable" in page and "synthetic" in page


def test_every_trial_says_where_it_ran_and_the_report_shows_it(loaded, report):
    _, trials, _, configs = loaded
    assert (trials["device"] == "cpu").all() and (trials["gpu_name"] == "").all()
    assert set(configs["device"]) == {"cpu"}
    assert set(tables.summary_table(configs)["device"]) == {"cpu"}
    fig = figures.pareto_figure(configs)
    search_trace = next(t for t in fig.data if t.name == "search trials")
    assert all("ran on cpu" in h for h in search_trace.hovertext)
    assert "<th>device</th>" in report.read_text()
    assert pd.read_csv(report.parent / "summary.csv")["device"].eq("cpu").all()
    # A GPU trial: its card's name and the node's card index Ray gave it.
    gpu = pd.Series({"device": "cuda:0", "gpu_name": "NVIDIA H200", "gpu_ids": "3"})
    assert tables.device_text(gpu) == "NVIDIA H200 #3"
    assert tables.device_text(pd.Series({"device": "none"})) == "no device"
    assert tables.device_text(pd.Series({"label": "recorded before devices were"})) == ""


def fake_11k_manifest(folder: Path, **fields) -> str:
    """A manifest.json as ``data prepare`` writes it for the real 11k (only the keys read)."""
    folder.mkdir(parents=True)
    data = {"dataset": "11k", "aspect": "dorsal_r", "protocol": {"identity_split": "upstream"},
            "report": {"rows": {"total": 11076}}, **fields}
    (folder / "manifest.json").write_text(json.dumps(data))
    return str(folder)


def test_a_full_profile_real_11k_experiment_is_compared_with_the_thesis(experiments,
                                                                        tmp_path):
    repro, _ = experiments
    copy = tmp_path / "full-run"
    shutil.copytree(repro, copy)
    meta = json.loads((copy / "tune_clipfh_experiment.json").read_text())
    meta.update(profile="full", data_dir=fake_11k_manifest(tmp_path / "data"))
    (copy / "tune_clipfh_experiment.json").write_text(json.dumps(meta))
    page = build_report([copy], tmp_path / "out").read_text()
    assert tables.THESIS_LABEL in page and "Thesis numbers not comparable" not in page
    versus = pd.read_csv(tmp_path / "out" / "versus_thesis.csv")
    assert list(versus["thesis_rank1"]) == [62.11, 74.07]
    assert list(versus["thesis_mAP"]) == [71.34, 81.93]
    # the thesis's zero-shot CLIP is drawn beside it: what fine-tuning has to beat
    assert "zero-shot CLIP, thesis (vitb16)" in page


def test_missing_and_partial_experiments_give_a_report_that_says_so(experiments, tmp_path):
    _, searched = experiments
    never_started = tmp_path / "never"
    never_started.mkdir()
    (never_started / "tune_clipfh_experiment.json").write_text(json.dumps({"kind": "search"}))
    path = build_report([searched, never_started], tmp_path / "out")
    page = path.read_text()
    assert "No reproduce experiment read" in page
    assert "never started a trial" in page
    assert page.count('id="figure-') >= 5
    # the claims say why they are absent: the search's versions were not read
    assert "The choice of search s (vitb16) vs the best version: no vitb16 version (v1-v10) " \
           "trained to its end among the experiments read." in page
    empty = build_report([], tmp_path / "empty").read_text()
    assert "No experiment folder was given" in empty
    assert "Not drawn: no claim to make: " in empty and "no zero-shot evaluation given" in empty


def test_cli_report_verb_prints_the_page_path(experiments, tmp_path, capsys):
    assert main(["report", *map(str, experiments), "--out", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'cli' / 'report.html'}" in out
    assert (tmp_path / "cli" / "eval_table.csv").is_file()


def test_errored_and_unfinished_trials_are_noted_not_fatal(loaded):
    read, trials, _, _ = loaded
    broken = trials.copy()
    broken.loc[0, ["status", "test_rank1", "test_mAP"]] = ["errored", math.nan, math.nan]
    for column in [c for c in broken.columns if c.startswith("test_split")]:
        broken.loc[0, column] = math.nan
    notes = trial_notes(broken, "x")
    assert any("raised an error" in n and str(broken.loc[0, "trial_id"]) in n for n in notes)
    configs = tables.configurations(broken)
    assert figures.pareto_figure(configs) is not None
    assert tables.eval_table(broken)["trial_id"].tolist().count(broken.loc[0, "trial_id"]) == 0


def test_importance_with_too_few_trials_says_so():
    study = optuna.create_study(direction="maximize")
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    values, notes = param_importances(study)
    assert values == {} and "needs at least" in notes[0]
    assert figures.importance_figure(values, "t") is None


def test_importance_of_the_real_search_has_both_evaluators_or_says_why(loaded):
    read, _, _, _ = loaded
    searched = next(e for e in read if e.kind == "search")
    values, notes = param_importances(searched.study)
    complete = [t for t in searched.study.get_trials(deepcopy=False)
                if t.state == optuna.trial.TrialState.COMPLETE]
    # how many trials ASHA lets finish depends on timing (a loaded machine prunes more)
    if len(complete) < MIN_IMPORTANCE_TRIALS:
        assert values == {} and "needs at least" in notes[0], notes
        return
    assert "PED-ANOVA" in values, notes
    assert "fANOVA" in values or any("scikit-learn" in n or "could not run" in n
                                     for n in notes), notes


def test_protocol_check_compares_only_real_11k_dorsal_r_in_the_full_profile(tmp_path):
    manifest = fake_11k_manifest
    real = manifest(tmp_path / "real")
    frame = pd.DataFrame({"config/data_dir": [real]})
    assert protocol_check({"profile": "full"}, frame)[0]
    assert protocol_check({"profile": "full", "data_dir": real}, pd.DataFrame())[0]
    ok, why = protocol_check({"profile": "tiny"}, frame)
    assert not ok and "tiny" in why
    ok, why = protocol_check({"profile": "full"}, pd.DataFrame())
    assert not ok and "synthetic" in why
    synthetic = manifest(tmp_path / "s", report={"rows": {"total": 3200}})
    assert not protocol_check({"profile": "full", "data_dir": synthetic}, pd.DataFrame())[0]
    palmar = manifest(tmp_path / "p", aspect="palmar_r")
    assert not protocol_check({"profile": "full", "data_dir": palmar}, pd.DataFrame())[0]


# ------------------------------------------------------------------------------------------
# A real browser


def chromium() -> str:
    found = shutil.which("chromium") or ("/usr/bin/chromium"
                                         if os.path.exists("/usr/bin/chromium") else None)
    if found:
        return found
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=600)
        done = subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode == 0 and shutil.which("chromium"):
            return shutil.which("chromium")
        pytest.skip(f"chromium is absent and apt-get could not install it: "
                    f"{done.stderr.strip()[-300:]}")
    pytest.skip("chromium is absent and cannot be installed here (not root or no apt-get)")


def test_every_figure_draws_in_headless_chromium(report, tmp_path):
    binary = chromium()
    ARTIFACTS.mkdir(exist_ok=True)
    screenshot = ARTIFACTS / "report.png"
    screenshot.unlink(missing_ok=True)
    shutil.copy(report, ARTIFACTS / "report.html")
    run = subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={screenshot}", "--window-size=1400,7600", "--dump-dom",
         report.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    errors = [line for line in run.stderr.splitlines()
              if "Uncaught" in line or ("CONSOLE" in line and "Error" in line)]
    assert not errors, errors
    figure_ids = re.findall(r'id="(figure-\d+)"', report.read_text())
    assert len(figure_ids) >= 8
    chunks = re.split(r'(?=<div id="figure-\d+")', run.stdout)[1:]
    assert len(chunks) == len(figure_ids)
    for figure_id, chunk in zip(figure_ids, chunks, strict=True):
        assert chunk.startswith(f'<div id="{figure_id}"')
        opening = chunk[:chunk.index(">")]
        assert "js-plotly-plot" in opening, f"{figure_id} was not drawn"
        assert chunk.count('class="main-svg"') >= 1, f"{figure_id} has no SVG"
        if 'class="parcoords"' in chunk:
            assert "<canvas" in chunk, f"{figure_id}: parallel coordinates drew no canvas"
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_figure_has_one_panel_per_logged_loss_of_the_table(monkeypatch):
    """A loss added to the table gets its own panel; the grid grows past 2 x 3 rows."""
    from tune_clipfh import loss_table

    extra = [(f"loss_extra{i}", f"extra {i}", "image") for i in range(3)]
    monkeypatch.setattr(figures, "loss_columns", lambda: [*loss_table.loss_columns(), *extra])
    columns = [column for column, _, _ in figures.loss_columns()]
    history = pd.DataFrame([{"experiment": "e", "trial_id": "t", "stage": stage,
                             "stage_epoch": epoch, **{c: 1.0 / epoch for c in columns}}
                            for stage in ("prompt", "image") for epoch in (1, 2)])
    fig = figures.loss_figure(history, {})
    titles = [a.text for a in fig.layout.annotations]
    assert len(columns) > 6 and titles == [title for _, title, _ in figures.loss_columns()]
    assert "extra 2" in titles and "SupCon text-to-image" in titles


def test_parallel_coordinates_need_a_knob_that_differs(loaded):
    """One version over seeds has no knob axis to draw: no figure (the panel says why)."""
    _, trials, _, _ = loaded
    fixed = trials[trials["kind"] == "fixed"]
    assert fixed["config/version"].nunique() == 2
    assert figures.parallel_figure(fixed, "versions") is not None
    seeds = pd.concat([fixed.iloc[:1]] * 2).assign(**{"config/seed": [0, 1]})
    assert seeds["best_val_rank1"].notna().all()
    assert figures.parallel_figure(seeds, "one version, two seeds") is None


def test_zero_shot_evaluations_are_reference_points_in_figures_1_and_2(experiments, loaded,
                                                                       tmp_path):
    folder = tmp_path / "zs"
    folder.mkdir()
    (folder / "config.yaml").write_text("model: vitb16\nprofile: tiny\n")
    (folder / "summary.json").write_text(json.dumps({
        "zero_shot": True, "test_mean": {"rank1": 0.2, "mAP": 0.35},
        "test_std": {"rank1": 0.01, "mAP": 0.02}}))
    zero_shot = load_zero_shot(folder)
    assert (zero_shot["rank1"], zero_shot["mAP"]) == pytest.approx((20.0, 35.0))
    configs = loaded[3]
    pareto = figures.pareto_figure(configs, zero_shots=[zero_shot])
    assert zero_shot["label"] in [trace.name for trace in pareto.data]
    versus = figures.versus_figure(tables.versus_reference(configs, None), False, [zero_shot])
    assert sorted(shape.y0 for shape in versus.layout.shapes) == pytest.approx([20.0, 35.0])
    # one label for the two lines, and no plotly placeholder ("new text") on the other
    texts = [a.text for a in versus.layout.annotations]
    assert None not in texts and texts.count(zero_shot["label"]) == 1, texts
    page = build_report(experiments, tmp_path / "out", zero_shot_dirs=[folder]).read_text()
    assert zero_shot["label"] in page
    # The summary names the search's choice, then the claims: one seed everywhere, so the
    # sentences say "not a claim".
    read, trials = loaded[0], loaded[1]
    searched = next(e for e in read if e.kind == "search")
    (choice,) = claims.choices(trials, [claims.SearchExperiment.from_meta(
        searched.name, searched.meta, searched.trials)])
    assert choice.selection.winner is not None and choice.versions_from == ("r",)
    assert html.escape(claims.choice_sentence(choice)) in page
    expected, reasons = claims.claims(trials, [choice], [zero_shot])
    written = pd.read_csv(tmp_path / "out" / "claims.csv")
    assert list(written.columns) == claims.CLAIM_COLUMNS
    assert list(written["claim"]) == list(expected["claim"])
    # the search's choice may be a version it was warm-started with (then said once)
    assert set(written["comparison"]) <= {claims.BEST_VS_BEST, claims.VERSUS_ZERO_SHOT}
    assert written["comparison"].tolist().count(claims.VERSUS_ZERO_SHOT) >= 1
    assert set(written["verdict"]) == {claims.UNKNOWN}
    for sentence in [*expected["claim"], *reasons]:
        assert html.escape(sentence) in page, sentence
    assert "no backbone has two consecutive versions" in page  # v1 and v4 only
    with pytest.raises(UserError, match="not a zero-shot evaluation folder"):
        load_zero_shot(tmp_path / "out")


# ------------------------------------------------------------------------------------------
# Claims: signal or seed noise, from hand-made trials (no Ray)


def fake_trials(*runs, experiment: str = "e") -> pd.DataFrame:
    """Trials of configurations ``(name, backbone, validation Rank-1, [test Rank-1 per run])``
    in percent: ``v<N>`` names a version (one trial per seed), anything else a search
    configuration: its first run (trial id ``name``, seed 0) and, with more tests, its race
    runs (seeds 1, 2, ..., ``race_of: name``). The validation Rank-1 is one number for every
    run or a list, one per run; a None test is a trial without test results (stopped by
    ASHA)."""
    rows = []
    for name, backbone, val, tests in runs:
        fixed = re.fullmatch(r"v\d+", name) is not None
        vals = val if isinstance(val, list) else [val] * len(tests)
        for seed, (run_val, test) in enumerate(zip(vals, tests, strict=True)):
            rows.append({
                "experiment": experiment, "kind": "fixed" if fixed else "search",
                "backbone": backbone, "version": name if fixed else None, "seed": seed,
                "trial_id": f"{experiment}-{backbone}-{name}-{seed}" if fixed
                else name if seed == 0 else f"{name}-race{seed}",
                "config/backbone": backbone if fixed else None,
                "config/version": name if fixed else None,
                "config/race_of": name if not fixed and seed else None,
                "config/lr_visual": 1e-5 if fixed else 3e-5,
                "status": "stopped_by_scheduler" if test is None else "completed",
                "final": 0 if test is None else 1, "time_total_s": 10.0,
                "best_val_rank1": run_val / 100, "best_val_mAP": run_val / 100,
                "test_rank1": math.nan if test is None else test / 100})
    return pd.DataFrame(rows)


def searches_in(trials: pd.DataFrame) -> list[claims.SearchExperiment]:
    """Each experiment with search trials as a search on their backbone, with no warm start."""
    if trials.empty:
        return []
    searched = trials[trials["kind"] == "search"].groupby("experiment", sort=False)
    return [claims.SearchExperiment(name, rows["backbone"].iloc[0], "best_val_rank1")
            for name, rows in searched]


def claims_of(trials: pd.DataFrame, zero_shots=(),
              searches=None) -> tuple[pd.DataFrame, list[str]]:
    made = claims.choices(trials, searches_in(trials) if searches is None else searches)
    return claims.claims(trials, made, zero_shots)


def test_a_version_step_beyond_the_seed_noise_is_hand_computed():
    trials = fake_trials(("v1", "rn50", 50, [30, 31, 32]), ("v2", "rn50", 60, [40, 42, 44]))
    values = claims.seed_values(trials).set_index("label")
    assert values.loc["rn50-v2", ["value", "std", "seeds"]].tolist() == pytest.approx(
        [42.0, 2.0, 3])
    table, reasons = claims_of(trials)
    assert len(table) == 1
    step = table.iloc[0]
    assert (step["comparison"], step["a"], step["b"]) == (claims.VERSION_STEP, "rn50-v2",
                                                          "rn50-v1")
    assert step["delta"] == pytest.approx(11.0)
    assert step["noise"] == pytest.approx(math.sqrt(2.0**2 + 1.0**2))  # 2.236
    assert step["verdict"] == claims.BEYOND
    assert step["claim"] == ("rn50-v2 vs rn50-v1: +11.0 ± 2.2 test Rank-1 points (3 seeds "
                             "each): beyond the seed noise.")
    assert reasons == [
        "Search choice vs best version: no search experiment read.",
        "Against zero-shot: no zero-shot evaluation given (report --zero-shot DIR)."]


def test_a_difference_smaller_than_the_seed_noise_is_within_it():
    trials = fake_trials(("v1", "rn50", 50, [40, 42, 44]), ("v2", "rn50", 60, [41, 45, 49]))
    step = claims_of(trials)[0].iloc[0]
    # delta 45 - 42 = 3; noise sqrt(4² + 2²) = 4.47
    assert (step["delta"], step["noise"]) == pytest.approx((3.0, math.sqrt(20)))
    assert step["verdict"] == claims.WITHIN
    assert step["claim"] == ("rn50-v2 vs rn50-v1: +3.0 ± 4.5 test Rank-1 points (3 seeds "
                             "each): within the seed noise.")


def test_a_single_seed_search_configuration_borrows_the_versions_seed_noise():
    trials = fake_trials(
        ("v1", "rn50", 50, [30, 31, 32]),  # std 1
        ("v2", "rn50", 60, [40, 42, 44]),  # std 2, the best version by validation
        ("v1", "vitb16", 55, [60, 70]),  # std sqrt(50): another backbone, not borrowed
        ("abc", "rn50", 80, [47]),  # the search's choice: zzz did not train to its end
        ("zzz", "rn50", 90, [None]))  # best validation, but stopped by ASHA before the test
    values = claims.seed_values(trials)
    assert "search-zzz" not in set(values["label"])
    assert claims.borrowed_std(values, "rn50") == pytest.approx(1.5)  # same backbone first
    assert claims.borrowed_std(values, "vitb16") == pytest.approx(math.sqrt(50))
    assert claims.borrowed_std(values, "rn101") == pytest.approx(  # then any backbone
        (1 + 2 + math.sqrt(50)) / 3)
    best = claims_of(trials)[0].iloc[0]
    assert (best["comparison"], best["a"], best["b"]) == (claims.BEST_VS_BEST, "search-abc",
                                                          "rn50-v2")
    # delta 47 - 42 = 5; noise sqrt(1.5² + 2²) = 2.5
    assert (best["delta"], best["noise"]) == pytest.approx((5.0, 2.5))
    assert best["noise_borrowed"] == "search-abc"
    assert best["claim"] == (
        "The choice of search e (search-abc) vs the best version (rn50-v2): +5.0 ± 2.5 "
        "test Rank-1 points (1 seed vs 3 seeds; seed noise of search-abc borrowed from the "
        "versions): beyond the seed noise.")


def test_one_seed_everywhere_is_not_a_claim():
    trials = fake_trials(("v1", "rn50", 50, [30]), ("v2", "rn50", 60, [35]),
                         ("s", "rn50", 70, [40]))
    table, _ = claims_of(trials)
    assert list(table["comparison"]) == [claims.BEST_VS_BEST, claims.VERSION_STEP]
    assert set(table["verdict"]) == {claims.UNKNOWN} and table["noise"].isna().all()
    assert table.iloc[0]["claim"] == (
        "The choice of search e (search-s) vs the best version (rn50-v2): +5.0 test "
        "Rank-1 points (1 seed each): noise unknown (one seed): not a claim.")
    nothing, reasons = claims_of(pd.DataFrame())
    assert nothing.empty and list(nothing.columns) == claims.CLAIM_COLUMNS
    assert len(reasons) == 3 and "no backbone has two consecutive versions" in reasons[2]


def test_each_version_is_compared_with_the_previous_one_per_backbone():
    trials = pd.concat([
        fake_trials(("v1", "rn50", 50, [30, 31, 32]), ("v2", "rn50", 60, [40, 42, 44]),
                    ("v3", "rn50", 65, [None, None]),  # no test results: v4 has no step
                    ("v4", "rn50", 70, [50, 51, 52]),
                    ("v9", "rn50", 70, [50, 52]), ("v10", "rn50", 70, [53, 55]),
                    ("v1", "vitb16", 50, [60, 62]), ("v2", "vitb16", 60, [59, 61]),
                    experiment="r1"),
        fake_trials(("v1", "rn50", 50, [20, 22]), ("v2", "rn50", 60, [25, 27]),
                    experiment="r2")], ignore_index=True)
    table, _ = claims_of(trials)
    steps = table[table["comparison"] == claims.VERSION_STEP]
    assert list(zip(steps["a"], steps["b"], strict=True)) == [
        ("rn50-v2 (r1)", "rn50-v1 (r1)"), ("rn50-v10", "rn50-v9"),
        ("vitb16-v2", "vitb16-v1"), ("rn50-v2 (r2)", "rn50-v1 (r2)")]
    assert list(steps["delta"]) == pytest.approx([11.0, 3.0, -1.0, 5.0])
    vit = steps.iloc[2]
    assert vit["noise"] == pytest.approx(2.0) and vit["verdict"] == claims.WITHIN
    assert vit["claim"] == ("vitb16-v2 vs vitb16-v1: -1.0 ± 2.0 test Rank-1 points (2 seeds "
                            "each): within the seed noise.")


def test_the_best_configurations_against_zero_shot_have_no_zero_shot_seed_noise():
    trials = fake_trials(("v1", "rn50", 50, [30, 31, 32]), ("v2", "rn50", 60, [40, 42, 44]),
                         ("s", "rn50", 80, [47]))
    zero_shots = [{"label": "zero-shot, ours (rn50, tiny)", "backbone": "rn50", "rank1": 20.0,
                   "rank1_std": 3.0},  # std over splits: not seed noise, not used
                  {"label": "zero-shot, ours (vitb16, tiny)", "backbone": "vitb16",
                   "rank1": 25.0, "rank1_std": 3.0}]
    table, reasons = claims_of(trials, zero_shots)
    versus = table[table["comparison"] == claims.VERSUS_ZERO_SHOT]
    assert list(versus["a"]) == ["search-s", "rn50-v2"]
    assert set(versus["b"]) == {"zero-shot, ours (rn50, tiny)"}
    assert list(versus["seeds_b"]) == [0, 0]
    assert list(versus["delta"]) == pytest.approx([27.0, 22.0])
    assert list(versus["noise"]) == pytest.approx([1.5, 2.0])  # borrowed 1.5; v2's own 2
    assert versus.iloc[1]["claim"] == (
        "The best version (rn50-v2) vs zero-shot, ours (rn50, tiny): +22.0 ± 2.0 test Rank-1 "
        "points (3 seeds vs a seedless zero-shot evaluation): beyond the seed noise.")
    assert reasons == ["Against zero-shot: zero-shot, ours (vitb16, tiny): no configuration "
                       "of backbone vitb16 has test results."]


# ------------------------------------------------------------------------------------------
# Claims per backbone: each search's choice (tune.selection) against its own backbone


def test_the_choice_is_compared_with_the_best_version_of_its_own_backbone_only():
    trials = pd.concat([
        fake_trials(("v1", "rn50", 50, [30, 31, 32]), ("v2", "rn50", 60, [40, 42, 44]),
                    # better by validation than any rn50 version: not the rn50 search's match
                    ("v1", "vitb16", 95, [70, 72]), experiment="r"),
        fake_trials(("abc", "rn50", 80, [47]), experiment="s")], ignore_index=True)
    (choice,) = claims.choices(trials, searches_in(trials))
    assert choice.versions_from == ("r",)
    assert (choice.selection.winner.label, choice.selection.best_version.label) == (
        "search-abc", "rn50-v2")
    table, _ = claims_of(trials)
    best = table[table["comparison"] == claims.BEST_VS_BEST]
    assert list(zip(best["a"], best["b"], strict=True)) == [("search-abc", "rn50-v2")]
    assert best.iloc[0]["delta"] == pytest.approx(5.0)


def test_a_search_without_a_version_of_its_backbone_says_so_and_crosses_no_backbone():
    trials = pd.concat([fake_trials(("v1", "vitb16", 55, [60, 70]), experiment="r"),
                        fake_trials(("abc", "rn50", 80, [47]), experiment="s")],
                       ignore_index=True)
    table, reasons = claims_of(trials)
    assert claims.BEST_VS_BEST not in set(table["comparison"])
    assert reasons[0] == (
        "The choice of search s (rn50) vs the best version: no rn50 version (v1-v10) trained "
        "to its end among the experiments read (only vitb16 versions were read: another "
        "backbone is no comparison).")
    (choice,) = claims.choices(trials, searches_in(trials))
    assert claims.choice_sentence(choice) == (
        "Search s (rn50) chose search-abc: validation Rank-1 80.0 over 1 run (seed 0), test "
        "Rank-1 47.0; no rn50 version competed. The search ran 1 trial in 10 trial-s.")


def test_the_versions_of_the_warm_start_experiment_compete_when_it_was_read():
    trials = pd.concat([fake_trials(("v2", "rn50", 70, [50, 52]), experiment="r1"),
                        fake_trials(("v2", "rn50", 60, [40, 42, 44]), experiment="r2"),
                        fake_trials(("abc", "rn50", 80, [47]), experiment="s")],
                       ignore_index=True)
    meta = {"kind": "search", "backbone": "rn50", "metrics": ["best_val_mAP", "best_val_rank1"],
            "from_experiment": "/somewhere/runs/ray/r2"}
    search = claims.SearchExperiment.from_meta("s", meta, trials)
    assert (search.metric, search.from_experiment) == ("best_val_mAP", "r2")
    (choice,) = claims.choices(trials, [search])
    assert choice.versions_from == ("r2",)
    assert choice.selection.best_version.test_mean == pytest.approx(0.42)
    unread = claims.choices(trials, [claims.SearchExperiment("s", "rn50", "best_val_rank1",
                                                             from_experiment="gone")])
    assert unread[0].versions_from == ("r1", "r2")  # not read: the versions that are there


def raced_search() -> pd.DataFrame:
    """rn50 versions and a search whose best configuration by one run, abc, was raced over
    two more seeds; lucky's one run beats abc's mean but was not raced."""
    return pd.concat([
        fake_trials(("v1", "rn50", 50, [30, 31, 32]), ("v2", "rn50", 60, [40, 42, 44]),
                    experiment="r"),
        fake_trials(("abc", "rn50", [88, 84, 86], [50, 53, 56]), ("lucky", "rn50", 87, [45]),
                    experiment="s")], ignore_index=True)


def test_race_runs_are_seeds_of_their_configuration_in_tables_and_claims():
    trials = raced_search()
    configs = tables.configurations(trials)
    searched = configs[configs["kind"] == "search"].set_index("label")
    assert list(searched.index) == ["search-abc", "search-lucky"]
    abc = searched.loc["search-abc"]
    assert (abc["n_trials"], abc["tested"], abc["seeds"]) == (3, 3, "0, 1, 2")
    assert abc["trial_ids"] == "abc, abc-race1, abc-race2" and abc["folds"] == ""
    assert (abc["val_rank1"], abc["rank1"], abc["rank1_std"]) == pytest.approx((86, 53, 3))
    assert abc["knobs"] == "lr_visual=3e-05"  # race_of is no knob
    summary = tables.summary_table(configs, top=None)
    assert list(summary["configuration"]).count("search-abc") == 1
    assert trial_labels(trials)[("s", "abc-race2")] == "search abc s2"
    values = claims.seed_values(trials).set_index("label")
    assert values.loc["search-abc", ["value", "std", "seeds"]].tolist() == pytest.approx(
        [53, 3, 3])
    # the raced choice has its own seed std: nothing borrowed
    best = claims_of(trials)[0].iloc[0]
    assert (best["comparison"], best["a"], best["b"]) == (claims.BEST_VS_BEST, "search-abc",
                                                          "rn50-v2")
    assert (best["delta"], best["noise"]) == pytest.approx((11.0, math.sqrt(13)))
    assert best["noise_borrowed"] == "" and best["verdict"] == claims.BEYOND


def test_a_race_over_validation_folds_names_its_folds():
    trials = raced_search()
    trials["config/val_fold"] = 0  # every trial config names the prepared fold
    race = trials["config/race_of"].notna()
    trials.loc[race, ["config/val_fold", "seed"]] = [[1, 0], [2, 0]]
    folds = tables.configurations(trials).set_index("label")["folds"]
    assert (folds["search-abc"], folds["v2"], folds["search-lucky"]) == ("0, 1, 2", "", "")
    assert trial_labels(trials)[("s", "abc-race2")] == "search abc fold 2"
    (choice,) = claims.choices(trials, searches_in(trials))
    assert "over 3 runs (folds 0, 1, 2)" in claims.choice_sentence(choice)


def test_the_summary_names_each_search_choice_in_words():
    (choice,) = claims.choices(raced_search(), [claims.SearchExperiment(
        "s", "rn50", "best_val_rank1")])
    assert choice.selection.min_runs == 3  # elitist: lucky's one run does not compete
    assert claims.choice_sentence(choice) == (
        "Search s (rn50) chose search-abc: validation Rank-1 86.0 ± 2.0 over 3 runs (seeds 0, "
        "1, 2), test Rank-1 53.0 ± 3.0; the best version in r, rn50-v2: validation Rank-1 "
        "60.0 ± 0.0 over 3 runs (seeds 0, 1, 2), test Rank-1 42.0 ± 2.0; search-abc differs "
        "from rn50-v2 in lr_visual 3e-05 instead of 1e-05. The search ran 4 trials, 2 of them "
        "race runs, in 40 trial-s; after the race only configurations with 3 runs or more "
        "competed.")


def test_a_search_that_kept_the_best_version_compares_its_best_challenger_with_it():
    trials = pd.concat([fake_trials(("v2", "rn50", 60, [40, 42, 44]), experiment="r"),
                        fake_trials(("abc", "rn50", 40, [47]), ("low", "rn50", 30, [60]),
                                    experiment="s")],
                       ignore_index=True)
    zero_shot = {"label": "zero-shot, ours (rn50, tiny)", "backbone": "rn50", "rank1": 20.0}
    table, _ = claims_of(trials, [zero_shot])
    # the best challenger by validation (abc), not the best on test (low)
    kept = table[table["comparison"] == claims.CHALLENGER_VS_KEPT].iloc[0]
    assert (kept["a"], kept["b"], kept["delta"]) == ("search-abc", "rn50-v2", pytest.approx(5))
    assert kept["claim"].startswith("Search s's best challenger by validation (search-abc, "
                                    "not chosen) vs the version it kept (rn50-v2): +5.0")
    zero = table[table["comparison"] == claims.VERSUS_ZERO_SHOT]
    assert list(zero["a"]) == ["rn50-v2"]  # against zero-shot once, as the version
    (choice,) = claims.choices(trials, searches_in(trials))
    assert claims.choice_sentence(choice).startswith(
        "Search s (rn50) chose rn50-v2: validation Rank-1 60.0 ± 0.0 over 3 runs (seeds 0, 1, "
        "2), test Rank-1 42.0 ± 2.0 (the best version). The search ran 2 trials")


def test_zero_shot_is_compared_with_its_own_backbone_only():
    trials = pd.concat([
        fake_trials(("v1", "rn50", 50, [30, 31, 32]), ("v1", "vitb16", 70, [60, 62]),
                    experiment="r"),
        fake_trials(("abc", "rn50", 80, [47]), experiment="s"),
        fake_trials(("xyz", "vitb16", 85, [66]), experiment="t")], ignore_index=True)
    zero_shot = {"label": "zero-shot, ours (vitb16, tiny)", "backbone": "vitb16",
                 "rank1": 25.0}
    table, reasons = claims_of(trials, [zero_shot])
    best = table[table["comparison"] == claims.BEST_VS_BEST]
    assert list(zip(best["a"], best["b"], strict=True)) == [("search-abc", "rn50-v1"),
                                                            ("search-xyz", "vitb16-v1")]
    versus = table[table["comparison"] == claims.VERSUS_ZERO_SHOT]
    assert list(versus["a"]) == ["search-xyz", "vitb16-v1"]
    assert versus.iloc[0]["claim"] == (
        "The choice of search t (search-xyz) vs zero-shot, ours (vitb16, tiny): +41.0 ± 1.4 "
        "test Rank-1 points (1 seed vs a seedless zero-shot evaluation; seed noise of "
        "search-xyz borrowed from the versions): beyond the seed noise.")
    assert not any("Against zero-shot" in reason for reason in reasons)


def test_optimisation_history_counts_race_runs_in_compute_not_in_the_best_so_far():
    trials = pd.DataFrame({
        "trial_id": ["a", "b", "c"], "best_val_rank1": [0.5, 0.6, 0.9],
        "status": ["completed"] * 3, "time_total_s": [10.0, 20.0, 30.0],
        tables.RACE_COLUMN: [None, None, "b"]})  # c re-runs b: a lucky second run
    frame = tables.optimisation_history(trials, pd.DataFrame())
    assert frame["value"].tolist() == [50.0, 60.0, 90.0]
    assert frame["best_by_number"].tolist() == [50.0, 60.0, 60.0]
    assert frame["compute_s"].tolist() == [10.0, 30.0, 60.0]
    no_race = tables.optimisation_history(trials.drop(columns=[tables.RACE_COLUMN]),
                                          pd.DataFrame())
    assert no_race["best_by_number"].tolist() == [50.0, 60.0, 90.0]


@pytest.mark.parametrize("what", ["missing", "run folder", "empty"])
def test_cli_report_refuses_a_folder_that_holds_no_experiment(what, tmp_path, capsys):
    folder = tmp_path / what
    if what != "missing":
        folder.mkdir()
    if what == "run folder":
        (folder / "config.yaml").write_text("model: rn50\n")
        (folder / "test_results.json").write_text("{}")
    assert main(["report", str(folder), "--out", str(tmp_path / "out")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    reason = "folder does not exist" if what == "missing" else "not an experiment folder"
    assert captured.err.startswith(f"error: {folder}: {reason} (")
    assert not (tmp_path / "out").exists()


def test_a_mechanics_only_miniature_is_marked_wherever_its_numbers_are_shown():
    """A tiny-profile backbone whose miniature the registry finds mechanics only (ViT-L/14:
    not measured) is marked in the legends, the claims' values and a page note; RN50's
    miniature is meaningful, and the full profile has no miniature at all."""
    trials = pd.DataFrame({"experiment": ["e", "e"], "trial_id": ["a", "b"],
                           "kind": ["fixed", "fixed"], "backbone": ["rn50", "vitl14"],
                           "version": ["v1", "v1"], "seed": [0, 0], "test_rank1": [0.5, 0.4]})
    tiny = tables.with_miniature(trials, "tiny")
    labels = trial_labels(tiny)
    assert labels[("e", "a")] == "rn50 v1 s0"
    assert labels[("e", "b")] == "vitl14 v1 s0 (mechanics only)"
    assert list(claims.seed_values(tiny)["label"]) == ["rn50-v1", "vitl14-v1 (mechanics only)"]
    assert trial_labels(tables.with_miniature(trials, "full"))[("e", "b")] == "vitl14 v1 s0"
    notes = report_module._miniature_notes([types.SimpleNamespace(meta={"profile": "tiny"},
                                                                   trials=trials)])
    assert len(notes) == 1 and notes[0].startswith("ViT-L/14 (vitl14), tiny profile: "
                                                   "mechanics only.")
