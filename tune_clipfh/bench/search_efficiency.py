"""Line 7, search efficiency: does the search, on a share of the versions' compute, choose a
configuration that beats the best hand-tuned version on test, and is its choice the best it
trained? Measured with seeds, on more than one synthetic dataset.

Per dataset (the embedded default, and others drawn with another generator seed and size):

* The versions: v1-v10 of one backbone (tiny profile, ``pretrained: synthetic``; a test may
  take fewer, ``search_versions``), each with ``search_seeds`` seeds. The best version is the
  one with the best mean validation metric, the search's own selection metric (selection never
  looks at the test); its test Rank-1 is reported as mean ± std over its seeds.
* The searches: the product's default search (sampler, ASHA, race, objective), warm-started
  with the versions' measured results, once per search seed and budget share (``search
  --budget-share``: a share of the versions' trial-seconds per seed, its race included). Each
  search's choice is :func:`tune_clipfh.tune.selection.select`'s; its test Rank-1 is the mean
  over the chosen configuration's runs.
* Rows per dataset and share: the choices' test Rank-1 (mean ± std over search seeds) against
  the best version's, with the report's seed-noise verdict; the target is a margin of 5 points
  at half the versions' compute and 10 at all of it, beyond the seed noise. The compute used
  against the versions', and the selection regret: the best test Rank-1 among the
  configurations a search trained minus its choice's (target: at most 2 points on average).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..report.claims import BEST_VS_BEST, BEYOND, Side, compare
from .harness import Context, Row, make_row, timed

BACKBONE = "rn50"  # the tiny backbone that fine-tunes well (README, "The miniature")
MARGINS = {0.5: 5.0, 1.0: 10.0}
"""Test Rank-1 points the choice must beat the best version by, per share of its compute."""
MAX_REGRET = 2.0


@dataclass
class SearchOutcome:
    seed: int
    share: float
    path: Path
    chosen: str
    chosen_runs: int
    chosen_test: float  # percent, mean over the chosen configuration's runs
    best_tried_test: float  # percent, the best configuration the search trained
    trials: int
    trial_seconds: float


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


def dataset_dir(ctx: Context, identities: int | None, seed: int) -> str | None:
    """The prepared synthetic dataset of ``identities`` drawn with ``seed`` (None, 0: the
    embedded default, which the experiments make themselves)."""
    from ..data.prepared import SYNTHETIC_DEFAULT, default_cache_dir, synthetic_dataset

    if identities is None and seed == SYNTHETIC_DEFAULT["seed"]:
        return None
    cache = Path(ctx.cache_dir) if ctx.cache_dir else default_cache_dir()
    return str(synthetic_dataset(
        cache, identities=identities or SYNTHETIC_DEFAULT["identities"],
        images_per_identity=SYNTHETIC_DEFAULT["images_per_identity"], seed=seed,
        aspect=SYNTHETIC_DEFAULT["aspect"], log=ctx.log))


def search_outcome(path: Path, seed: int, share: float) -> SearchOutcome:
    """What one search chose and what it could have chosen, from its experiment folders."""
    from ..tune.best import choose

    selection, _ = choose(path)
    winner = selection.winner
    tried = [c.test_mean for c in selection.configurations
             if c.kind == "search" and c.test_rank1] + [winner.test_mean]
    searched = [c for c in selection.configurations if c.kind == "search"]
    return SearchOutcome(
        seed=seed, share=share, path=path, chosen=winner.label, chosen_runs=winner.runs,
        chosen_test=100 * winner.test_mean, best_tried_test=100 * max(tried),
        trials=sum(c.runs for c in searched), trial_seconds=_search_seconds(path))


def _search_seconds(path: Path) -> float:
    from ..tune.results import load_results

    frame = load_results(path)
    return float(frame["time_total_s"].fillna(0).sum()) if "time_total_s" in frame else 0.0


def best_version_side(versions, metric: str) -> tuple[str, list[float]]:
    """The best version by mean validation ``metric`` (of a ``load_results`` frame): its label
    and test Rank-1 per seed (percent)."""
    from ..tune.selection import configurations

    fixed = [c for c in configurations(versions, metric, BACKBONE) if c.kind == "fixed"]
    version = max(fixed, key=lambda c: c.val_mean)
    return version.label, [100 * t for t in version.test_rank1]


def dataset_rows(label: str, versions, outcomes: list[SearchOutcome], metric: str,
                 setting: str) -> list[Row]:
    """The rows of one dataset (``versions``: its versions' ``load_results`` frame): per budget
    share, the choice against the best version, the compute used, the selection regret."""
    from ..tune.results import trial_seconds_per_seed

    versions_seconds = trial_seconds_per_seed(versions)
    name, version_tests = best_version_side(versions, metric)
    version_mean, version_std = _mean_std(version_tests)
    rows = [make_row(7, f"{label}.best_version", f"search [{label}]: best version's test "
                     f"Rank-1 ({name}, over {len(version_tests)} seeds)", version_mean, "%",
                     None, f"± {version_std:.1f}; chosen by mean validation {metric}; "
                     f"{setting}", {"std": version_std})]
    for share in sorted({o.share for o in outcomes}):
        done = [o for o in outcomes if o.share == share]
        tests = [o.chosen_test for o in done]
        mean, std = _mean_std(tests)
        verdict = compare(BEST_VS_BEST, Side("search", mean, std, len(tests)),
                          Side(name, version_mean, version_std, len(version_tests)),
                          "the search's choice", name)
        margin = MARGINS.get(share, 0.0)
        key = f"{label}.share{share:g}"
        passed_noise = verdict["verdict"] == BEYOND
        rows.append(make_row(
            7, f"{key}.choice", f"search [{label}, {100 * share:.0f} % budget]: the choice's "
            f"test Rank-1 minus the best version's", mean - version_mean, "points",
            (">=", margin), f"{mean:.1f} ± {std:.1f} over {len(tests)} search seeds (per seed: "
            f"{', '.join(f'{o.chosen} {o.chosen_test:.1f} ({o.chosen_runs} runs)' for o in done)}"
            f"); {verdict['claim']}"
            + ("" if passed_noise else " The target also needs the margin beyond the noise."),
            {"choice_mean": mean, "choice_std": std, "beyond_noise": float(passed_noise)}))
        if not passed_noise and rows[-1].status == "pass":
            rows[-1].status, rows[-1].passed = "fail", False
        used = statistics.mean(o.trial_seconds for o in done)
        rows.append(make_row(
            7, f"{key}.compute", f"search [{label}, {100 * share:.0f} % budget]: compute "
            f"against the versions' (one seed), race included", 100 * used / versions_seconds,
            "%", ("<=", 100 * share), f"{used:.0f} vs {versions_seconds:.0f} trial-s; "
            f"{'/'.join(str(o.trials) for o in done)} trials",
            {"search_trial_seconds": used, "versions_trial_seconds": versions_seconds}))
        regrets = [o.best_tried_test - o.chosen_test for o in done]
        rows.append(make_row(
            7, f"{key}.regret", f"search [{label}, {100 * share:.0f} % budget]: selection "
            f"regret (best trained minus chosen, test Rank-1)", statistics.mean(regrets),
            "points", ("<=", MAX_REGRET), "per seed: " + ", ".join(f"{r:.1f}" for r in regrets)))
    return rows


def search_efficiency(ctx: Context) -> list[Row]:
    settings = ctx.settings
    overrides: dict[str, Any] = {"device": "cpu"}
    schedule = "stated schedules"
    if settings.search_epochs:
        prompt, image = settings.search_epochs
        overrides.update(epochs_prompt=prompt, epochs_image=image)
        schedule = f"{prompt}+{image} epochs"
    ctx.ensure_ray()
    rows: list[Row] = []
    for identities, data_seed in settings.search_datasets:
        rows += _dataset(ctx, identities, data_seed, overrides, schedule)
    return rows


def _dataset(ctx: Context, identities: int | None, data_seed: int, overrides: dict[str, Any],
             schedule: str) -> list[Row]:
    """The versions on one dataset, then every search seed at every budget share."""
    from ..tune.defaults import OBJECTIVE, OBJECTIVES
    from ..tune.experiment import reproduce
    from ..tune.results import load_results
    from ..tune.search import search

    settings = ctx.settings
    seeds, chosen = settings.search_seeds, settings.search_versions
    label = f"{identities or 'default'} ids, seed {data_seed}"
    tag = f"{identities or 'default'}-{data_seed}"
    data = dataset_dir(ctx, identities, data_seed)
    seconds, versions_path = timed(lambda: reproduce(
        [BACKBONE], list(chosen) if chosen else None,
        ctx.options(f"versions-{tag}", data=data, max_concurrent=2, seeds=seeds,
                    overrides=dict(overrides))))
    ctx.log(f"[bench] line 7 [{label}]: versions x {seeds} seeds done in {seconds:.0f}s")
    outcomes = []
    for share in settings.search_budget_shares:
        for seed in range(seeds):
            options = ctx.options(f"search-{tag}-share{share:g}-seed{seed}", data=data,
                                  max_concurrent=2, overrides={**overrides, "seed": seed})
            seconds, path = timed(lambda options=options, share=share: search(
                None, settings.search_trials, OBJECTIVE, BACKBONE, str(versions_path),
                options, budget_share=share, **settings.search_race()))
            outcomes.append(search_outcome(path, seed, share))
            ctx.log(f"[bench] line 7 [{label}]: search share {share:g} seed {seed} done in "
                    f"{seconds:.0f}s")
    setting = (f"tiny {BACKBONE}, {schedule}, {label}, "
               f"{len(chosen) if chosen else 10} versions x {seeds} seeds")
    return dataset_rows(label, load_results(versions_path), outcomes,
                        OBJECTIVES[OBJECTIVE][0], setting)
