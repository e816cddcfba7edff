"""Line 6, memory: peak RSS of one tiny trial and of the Ray driver during a search, and the
driver's growth per finished trial."""

from __future__ import annotations

import numpy as np

from .harness import Context, ProcessSampler, Row, make_row, timed


def _completion_times(frame) -> list[float]:
    """Unix time of each trial's last report, in order."""
    return sorted(float(t) for t in frame["timestamp"].dropna())


def driver_growth_per_trial(sampler: ProcessSampler, completions: list[float],
                            skip_fraction: float = 0.25) -> float | None:
    """Least-squares slope of driver RSS against the number of finished trials (bytes per
    trial), leaving out the first ``skip_fraction`` of trials (imports, Optuna warm-up)."""
    points = [(index + 1, sampler.driver_rss_at(when))
              for index, when in enumerate(completions)]
    points = [(n, rss) for n, rss in points if rss is not None]
    points = points[int(len(points) * skip_fraction):]
    if len(points) < 3:
        return None
    xs = np.array([n for n, _ in points], dtype=float)
    ys = np.array([rss for _, rss in points], dtype=float)
    return float(np.polyfit(xs, ys, 1)[0])


def search_memory(ctx: Context) -> list[Row]:
    from ..tune.results import load_results
    from ..tune.search import search

    trials = ctx.settings.memory_trials
    prompt, image = ctx.settings.memory_epochs
    ctx.ensure_ray()
    options = ctx.options("memory", max_concurrent=2, overrides={
        "epochs_prompt": prompt, "epochs_image": image, "early_stop_patience": 0,
        "device": "cpu"})
    with ProcessSampler() as sampler:
        seconds, path = timed(lambda: search(None, trials, "rank1", "vitb16", None, options,
                                              warm_start=False, race_top=0))
    frame = load_results(path)
    growth = driver_growth_per_trial(sampler, _completion_times(frame))
    driver_peak = max((rss for _, rss in sampler.driver), default=0)
    driver_start = sampler.driver[0][1] if sampler.driver else 0
    trial_peak = max(sampler.trial_peaks.values(), default=0)
    quick = " (quick: fewer trials)" if ctx.settings.mode == "quick" else ""
    bound = ctx.settings.driver_growth_bound_mb
    return [
        make_row(6, "trial_peak", "memory: peak RSS of one tiny trial", trial_peak / 2**20,
                 "MB", ("<", 2048.0),
                 f"largest trial process (ray::ImplicitFunc) RSS, sampled every 0.25 s; "
                 f"{len(sampler.trial_peaks)} processes ran the {len(frame)} trials (actors "
                 f"reused); includes torch, open_clip and Ray in the process",
                 {"processes": len(sampler.trial_peaks)}),
        make_row(6, "driver_growth", f"memory: driver growth per trial, {trials}-trial search"
                 + quick, None if growth is None else growth / 2**20, "MB/trial",
                 ("<=", bound),
                 f"slope of driver RSS vs finished trials (first quarter left out); driver "
                 f"RSS {driver_start / 2**20:.0f} MB at start, {driver_peak / 2**20:.0f} MB "
                 f"peak; all Ray processes together peaked at {sampler.total_peak / 2**30:.2f} "
                 f"GB; TPE + ASHA, {prompt}+{image}-epoch trials, {seconds:.0f}s",
                 {"search_s": seconds, "driver_start_bytes": driver_start,
                  "driver_peak_bytes": driver_peak, "ray_total_peak_bytes": sampler.total_peak}),
    ]
