"""Line 7, search efficiency: does TPE + ASHA, on at most half the versions' compute, find a
configuration at least as good as the best hand-tuned version? Measured with seeds.

* The versions: v1-v10 of one backbone (tiny profile, ``pretrained: synthetic``; a test may
  take fewer, ``search_versions``), each with ``search_seeds`` seeds. The best version is the
  one with the highest mean best validation Rank-1 (selection never looks at the test); its
  test Rank-1 is reported as mean ± std over its seeds.
* The search: TPE + ASHA, warm-started with the versions' measured results (their knobs are
  known points, not rerun), once per search seed (the sampler's and the trials' seed). Its
  budget is ``search_budget_share`` of the versions' trial-seconds per seed (``search
  --budget-share``: no trial starts that would not fit), with ``search_trials`` trials at most;
  the row reports the trial-seconds it used against the versions' (target: at most half).
  Each search's best configuration
  (by best validation Rank-1) contributes its test Rank-1; the row reports mean ± std over the
  search seeds, against the best version's mean, and says whether the difference is beyond
  the seed noise by the report's rule (:func:`tune_clipfh.report.claims.compare`).
"""

from __future__ import annotations

import statistics

from ..report.claims import BEST_VS_BEST, Side, compare
from .harness import Context, Row, make_row, timed

BACKBONE = "rn50"  # the tiny backbone that fine-tunes well (README, "The miniature")
BUDGET_SHARE = 0.5  # of the versions' trial-seconds (one seed): the target's allowance


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def best_version(frame) -> tuple[str, list[float], list[float]]:
    """The version with the best mean validation Rank-1: its name, validation and test Rank-1
    per seed (fractions)."""
    tested = frame[frame["test_rank1"].notna()]
    means = tested.groupby("config/version")["best_val_rank1"].mean()
    name = str(means.idxmax())
    rows = tested[tested["config/version"] == name]
    return name, rows["best_val_rank1"].tolist(), rows["test_rank1"].tolist()


def best_trial(frame) -> tuple[float, float]:
    """The search trial with the best validation Rank-1 among those with test results."""
    tested = frame[frame["test_rank1"].notna()]
    best = tested.loc[tested["best_val_rank1"].idxmax()]
    return float(best["best_val_rank1"]), float(best["test_rank1"])


def search_efficiency(ctx: Context) -> list[Row]:
    from ..tune.experiment import reproduce, search
    from ..tune.results import load_results, trial_seconds_per_seed

    seeds, trials = ctx.settings.search_seeds, ctx.settings.search_trials
    share = ctx.settings.search_budget_share
    overrides = {"device": "cpu"}
    schedule = "stated schedules"
    if ctx.settings.search_epochs:
        prompt, image = ctx.settings.search_epochs
        overrides.update(epochs_prompt=prompt, epochs_image=image)
        schedule = f"{prompt}+{image} epochs"
    ctx.ensure_ray()
    chosen = ctx.settings.search_versions
    seconds, versions_path = timed(lambda: reproduce(
        [BACKBONE], list(chosen) if chosen else None,
        ctx.options("versions", max_concurrent=2, seeds=seeds, overrides=dict(overrides))))
    ctx.log(f"[bench] line 7: versions x {seeds} seeds done in {seconds:.0f}s")
    versions = load_results(versions_path)
    versions_seconds = trial_seconds_per_seed(versions)
    name, _, version_tests = best_version(versions)
    searches = []
    for seed in range(seeds):
        seconds, path = timed(lambda seed=seed: search(
            None, trials, "rank1", BACKBONE, str(versions_path), ctx.options(
                f"search-seed{seed}", max_concurrent=2, overrides={**overrides, "seed": seed}),
            budget_share=share))
        frame = load_results(path)
        searches.append((frame, *best_trial(frame)))
        ctx.log(f"[bench] line 7: search seed {seed} done in {seconds:.0f}s")
    search_tests = [test for _, _, test in searches]
    search_seconds = statistics.mean(float(f["time_total_s"].sum()) for f, _, _ in searches)
    stopped = sum(int((f["status"] == "stopped_by_scheduler").sum()) for f, _, _ in searches)
    version_mean, version_std = _mean_std(version_tests)
    search_mean, search_std = _mean_std(search_tests)
    verdict = compare(BEST_VS_BEST, Side("search", 100 * search_mean, 100 * search_std, seeds),
                      Side(name, 100 * version_mean, 100 * version_std, seeds),
                      "search", name)["claim"]
    setting = (f"tiny {BACKBONE}, {schedule}, "
               f"{versions['config/version'].nunique()} versions x {seeds} seeds")
    return [
        make_row(7, "best_version", f"search: best version's test Rank-1 ({name}, mean over "
                 f"seeds: {seeds})", 100 * version_mean, "%", None,
                 f"± {100 * version_std:.1f} over seeds; chosen by mean validation Rank-1; "
                 f"{setting}", {"std": 100 * version_std}),
        make_row(7, "best_search", f"search: TPE+ASHA best configuration's test Rank-1 (mean "
                 f"over search seeds: {seeds})", 100 * search_mean, "%",
                 (">=", round(100 * version_mean, 2)),
                 f"± {100 * search_std:.1f} over search seeds (per seed: "
                 f"{', '.join(f'{100 * t:.1f}' for t in search_tests)}); "
                 f"{'/'.join(str(len(f)) for f, _, _ in searches)} trials (budget: "
                 f"{100 * share:.0f} % of the versions' trial-s, at most {trials} trials), "
                 f"warm-started with the versions' results; ASHA stopped {stopped} trials; "
                 f"{verdict}",
                 {"std": 100 * search_std}),
        make_row(7, "search_budget", "search: compute against the versions' (one seed)",
                 100 * search_seconds / versions_seconds, "%", ("<=", 100 * BUDGET_SHARE),
                 f"{search_seconds:.0f} vs {versions_seconds:.0f} trial-s per seed",
                 {"search_trial_seconds": search_seconds,
                  "versions_trial_seconds": versions_seconds}),
    ]
