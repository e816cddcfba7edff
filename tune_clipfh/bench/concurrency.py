"""Line 5, concurrency: two 1-CPU trials at once against one 2-CPU trial after the other."""

from __future__ import annotations

from .harness import Context, Row, make_row, run_fixed


def concurrency(ctx: Context) -> list[Row]:
    """Trials/hour of two 1-CPU trials at once vs 2-CPU trials one after the other.

    The value is the steady-state ratio, from the trials' own run times (what a long search
    sees); each experiment's one-off worker start is left out of it and reported in the note.
    """
    trials = ctx.settings.concurrency_trials
    prompt, image = ctx.settings.concurrency_epochs
    knobs = ctx.knobs(epochs_prompt=prompt, epochs_image=image, early_stop_patience=0)
    ctx.data(ctx.config(**{k: v for k, v in knobs.items() if k != "cache_dir"}))
    sequential_s, sequential = run_fixed(ctx, "concurrency-2cpu", knobs, seeds=trials, cpus=2.0)
    concurrent_s, concurrent = run_fixed(ctx, "concurrency-1cpu", knobs, seeds=trials, cpus=1.0,
                                         max_concurrent=2)
    # Steady state: 2 trials run at a time with 1 CPU each, 1 at a time with 2 CPUs.
    per_trial_concurrent = float(concurrent["time_total_s"].mean())
    per_trial_sequential = float(sequential["time_total_s"].mean())
    per_hour_concurrent = 2 * 3600 / per_trial_concurrent
    per_hour_sequential = 3600 / per_trial_sequential
    ratio = per_hour_concurrent / per_hour_sequential
    wall_ratio = sequential_s / concurrent_s
    # Within 10% it is a tie, and 1-CPU trials win it: one torch thread each needs no OpenMP
    # hand-offs (which the driver or any other process can stall), and ASHA sees two trials
    # progress side by side.
    choice = ("--cpus-per-trial 1 --max-concurrent 2" if ratio >= 0.9
              else "--cpus-per-trial 2 --max-concurrent 1")
    return [make_row(
        5, "ratio", "concurrency: trials/h, 2 x 1-CPU at once / 1 x 2-CPU in turn", ratio, "x",
        None,
        f"{trials} trials of {prompt}+{image} epochs each way; a trial runs "
        f"{per_trial_concurrent:.1f}s with 1 CPU beside another, {per_trial_sequential:.1f}s "
        f"alone with 2 CPUs: {per_hour_concurrent:.0f} vs {per_hour_sequential:.0f} trials/h; "
        f"whole experiments incl. worker start: {concurrent_s:.0f}s vs {sequential_s:.0f}s "
        f"({wall_ratio:.2f}x); best default here: {choice}",
        {"concurrent_s": concurrent_s, "sequential_s": sequential_s,
         "trial_concurrent_s": per_trial_concurrent, "trial_sequential_s": per_trial_sequential,
         "trials_per_hour_concurrent": per_hour_concurrent,
         "trials_per_hour_sequential": per_hour_sequential})]
