"""Line 7, search efficiency: best validation Rank-1 and compute of the ten fixed versions, random
search, TPE, and TPE + ASHA on the same budget; compute ASHA saves at equal best result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import Context, Row, format_seconds, make_row, timed


@dataclass
class SearchOutcome:
    label: str
    best: float
    trials: int
    trial_seconds: float  # sum of each trial's own time_total_s
    epochs: int  # epochs trained over all trials
    wall_s: float
    seconds_to_target: float | None = None


def summarize_search(label: str, frame, wall_s: float) -> SearchOutcome:
    best = float(frame["best_val_rank1"].max())
    iterations = frame["training_iteration"].fillna(0).astype(int)
    finals = frame["final"].fillna(0).astype(int) if "final" in frame else 0
    epochs = int((iterations - finals).clip(lower=0).sum())
    return SearchOutcome(label, best, len(frame), float(frame["time_total_s"].sum()), epochs,
                         wall_s)


def compute_to_reach(frame, target: float) -> float | None:
    """Trial-seconds spent until the first trial reaching ``target`` finished (trials ordered
    by completion; everything that finished before it counts)."""
    ordered = frame.sort_values("timestamp")
    spent = 0.0
    for _, trial in ordered.iterrows():
        spent += float(trial["time_total_s"])
        if float(trial["best_val_rank1"]) >= target - 1e-12:
            return spent
    return None


def search_efficiency(ctx: Context) -> list[Row]:
    from ..tune.experiment import reproduce, search
    from ..tune.results import load_results

    budget = ctx.settings.search_budget
    prompt, image, patience = ctx.settings.search_epochs
    epochs = {"epochs_prompt": prompt, "epochs_image": image, "early_stop_patience": patience,
              "device": "cpu"}
    ctx.ensure_ray()
    grace = prompt + 1  # ASHA counts reported epochs; its first rung after one image epoch

    def run(name: str, fn: Callable[[Any], Path]) -> tuple[Any, float]:
        seconds, path = timed(lambda: fn(ctx.options(name, max_concurrent=2,
                                                       overrides=dict(epochs))))
        ctx.log(f"[bench] line 7: {name} done in {seconds:.0f}s")
        return load_results(path), seconds

    runs = {
        "versions": run("versions", lambda o: reproduce(["vitb16"], None, o)),
        "random": run("random", lambda o: search(None, budget, "rank1", "vitb16", None, o,
                                                 warm_start=False, sampler="random",
                                                 asha=False)),
        "tpe": run("tpe", lambda o: search(None, budget, "rank1", "vitb16", None, o,
                                           warm_start=False, sampler="tpe", asha=False)),
        "tpe_asha": run("tpe_asha", lambda o: search(None, budget, "rank1", "vitb16", None, o,
                                                     warm_start=False, sampler="tpe",
                                                     asha=True, asha_grace=grace,
                                                     asha_reduction=3)),
    }
    outcomes = {k: summarize_search(k, frame, wall) for k, (frame, wall) in runs.items()}
    labels = {"versions": "(a) ten fixed versions", "random": "(b) random search",
              "tpe": "(c) TPE", "tpe_asha": "(d) TPE + ASHA"}
    rows = []
    for key, outcome in outcomes.items():
        rows.append(make_row(
            7, key, f"search: best val Rank-1, {labels[key]}", 100 * outcome.best, "%", None,
            f"{outcome.trials} trials, {outcome.epochs} epochs, {outcome.trial_seconds:.0f} "
            f"trial-s of compute, {outcome.wall_s:.0f}s wall",
            {"trial_seconds": outcome.trial_seconds, "epochs": outcome.epochs,
             "wall_s": outcome.wall_s}))
    tpe, asha = outcomes["tpe"], outcomes["tpe_asha"]
    total_saved = 100 * (1 - asha.trial_seconds / tpe.trial_seconds) if tpe.trial_seconds else None
    level = min(tpe.best, asha.best)
    tpe_cost = compute_to_reach(runs["tpe"][0], level)
    asha_cost = compute_to_reach(runs["tpe_asha"][0], level)
    to_level_saved = (None if not tpe_cost or asha_cost is None
                      else 100 * (1 - asha_cost / tpe_cost))
    # Equal (or better) best with ASHA: the saving is the whole budget's compute. Otherwise
    # compare the compute each needed to reach the best ASHA found.
    equal_best = asha.best >= tpe.best - 1e-12
    saved = total_saved if equal_best else to_level_saved
    rows.append(make_row(
        7, "asha_saving", "search: compute ASHA saves at equal best (TPE vs TPE+ASHA)", saved,
        "%", None,
        (f"same best val Rank-1 ({100 * level:.1f}%) with and without ASHA: whole budget "
         if equal_best else
         f"ASHA's best ({100 * asha.best:.1f}%) is below TPE's ({100 * tpe.best:.1f}%): "
         f"trial-s until a trial first reached {100 * level:.1f}%: {format_seconds(tpe_cost)} "
         f"without ASHA, {format_seconds(asha_cost)} with; whole budget ")
        + f"{tpe.trial_seconds:.0f} vs {asha.trial_seconds:.0f} trial-s, {tpe.epochs} vs "
        f"{asha.epochs} epochs; budget {budget} trials of {prompt}+{image} epochs (patience "
        f"{patience}), ASHA grace {grace}, reduction 3"
        + (" (quick: smaller budget)" if ctx.settings.mode == "quick" else ""),
        {"tpe_seconds_to_level": tpe_cost or 0.0, "asha_seconds_to_level": asha_cost or 0.0,
         "total_saved_percent": total_saved or 0.0,
         "to_level_saved_percent": to_level_saved if to_level_saved is not None else 0.0}))
    return rows
