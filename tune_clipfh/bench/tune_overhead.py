"""Line 2, Tune overhead: what Tune adds to a training run, and where.

The cause is known and fixed in size: a fresh worker process importing torch, open_clip and Ray
(about 6.6 s here), paid once per concurrent trial slot because trial actors are reused. So the
line measures that fixed cost per slot (target: at most 7 s) and that an experiment pays it once
per slot, not once per trial (six trials on two slots: about two starts). A single trial against
the same run as a plain call is kept as information; its ratio depends only on how long the run
is (the fixed cost over its length), so it is not a target.
"""

from __future__ import annotations

import math
import statistics
import time

from .harness import (
    Context,
    Row,
    format_seconds,
    make_row,
    quiet,
    run_fixed,
    timed,
    torch_threads,
)


def image_epochs_for(ctx: Context, seconds: float, prompt_epochs: int) -> tuple[int, float]:
    """Image epochs that make a plain 1-thread run last about ``seconds`` on this machine
    now, from a short probe run; returns (epochs, probe seconds)."""
    from ..train.stages import Trainer

    config = ctx.config(epochs_prompt=1, epochs_image=2, early_stop_patience=0)
    data = ctx.data(config)
    with torch_threads(1):
        trainer = Trainer(config, data, log=quiet, progress=False)
        probe_s, result = timed(trainer.run)
    image = [row["epoch_time_s"] for row in result.history if row["stage"] == "image"]
    prompt = [row["epoch_time_s"] for row in result.history if row["stage"] == "prompt"]
    fixed = probe_s - sum(image) - sum(prompt)
    per_epoch = max(statistics.mean(image), 1e-3)
    epochs = math.ceil((seconds - fixed - prompt_epochs * statistics.mean(prompt)) / per_epoch)
    return max(2, min(epochs, 500)), probe_s


def tune_overhead(ctx: Context) -> list[Row]:
    from ..train.run import train_run

    prompt = ctx.settings.overhead_prompt_epochs
    image, probe_s = image_epochs_for(ctx, ctx.settings.overhead_seconds, prompt)
    knobs = ctx.knobs(epochs_prompt=prompt, epochs_image=image, early_stop_patience=0)
    config = ctx.config(epochs_prompt=prompt, epochs_image=image, early_stop_patience=0)
    ctx.ensure_ray()
    plain_runs, tune_runs, trial_runs = [], [], []
    for repeat in range(ctx.settings.overhead_repeats):
        run_dir = ctx.workdir / f"plain-{repeat}"
        # One CPU each: a Ray trial with cpus_per_trial=1 runs torch on one thread.
        with torch_threads(1):
            plain_s, _ = timed(lambda run_dir=run_dir: train_run(config, run_dir, log=quiet,
                                                                  progress=False))
        plain_runs.append(plain_s)
        tune_s, frame = run_fixed(ctx, f"overhead-{repeat}", knobs)
        tune_runs.append(tune_s)
        trial_runs.append(float(frame["time_total_s"].iloc[0]))
        ctx.log(f"[bench] line 2: plain {plain_s:.1f}s, Tune trial {tune_s:.1f}s")
    plain_s, tune_s = statistics.median(plain_runs), statistics.median(tune_runs)
    trial_s = statistics.median(trial_runs)
    note = (f"{prompt}+{image} epochs (sized by a {probe_s:.0f}s probe for a "
            f"~{ctx.settings.overhead_seconds:.0f}s run), 1 CPU each; Tune = whole experiment "
            f"(setup, trial, results); Ray start excluded ({format_seconds(ctx.ray_start_s)}); "
            f"outside the trial's own run: {tune_s - trial_s:.1f}s, the worker start below")
    if len(plain_runs) > 1:
        note += f"; median of {len(plain_runs)} alternated pairs"
    times = {"plain_s": plain_s, "tune_s": tune_s, "trial_time_total_s": trial_s,
             "ray_start_s": ctx.ray_start_s or 0.0}
    return [
        make_row(2, "ratio", "Tune overhead: one trial / plain call (information)",
                 tune_s / plain_s, "x", None, note, times),
        make_row(2, "in_trial", "Tune overhead: trial's own run / plain call",
                 trial_s / plain_s, "x", None,
                 "the trial's time_total_s (trainable start to last report: data, model, "
                 "epochs with tune.report and checkpoints, test) over the plain call; what a "
                 "trial costs once its worker is warm (reused actors)", times),
    ]


def starts_per_experiment(ctx: Context, worker_start_s: float) -> Row:
    """How many worker starts an experiment of ``overhead_trials`` short trials on two slots
    pays: its slot time (wall x slots) beyond its trials' own time, in worker starts."""
    trials, slots = ctx.settings.overhead_trials, 2
    knobs = ctx.knobs(epochs_prompt=1, epochs_image=1, early_stop_patience=0)
    wall_s, frame = run_fixed(ctx, "overhead-slots", knobs, seeds=trials,
                              max_concurrent=slots)
    own_s = float(frame["time_total_s"].sum())
    starts = max(0.0, slots * wall_s - own_s) / worker_start_s
    return make_row(2, "starts", f"Tune overhead: worker starts paid by {trials} trials on "
                    f"{slots} slots", starts, "starts", ("<=", slots + 1),
                    f"({slots} x {wall_s:.1f}s wall - {own_s:.1f}s of the trials' own runs) / "
                    f"{worker_start_s:.1f}s per start: about one per slot, not one per trial "
                    f"(the rest is Tune's scheduling between trials)",
                    {"wall_s": wall_s, "trials_s": own_s})


def worker_start(ctx: Context) -> Row:
    """A fresh 1-CPU Ray actor importing the trainable's module (torch, open_clip, Ray Tune):
    the fixed cost an experiment pays once per concurrent trial slot (actors are reused)."""
    import ray

    ctx.ensure_ray()

    @ray.remote(num_cpus=1)
    class ImportProbe:
        def import_seconds(self) -> float:
            import importlib

            started = time.perf_counter()
            importlib.import_module("tune_clipfh.tune.trainable")
            return time.perf_counter() - started

    started = time.perf_counter()
    probe = ImportProbe.remote()
    import_s = ray.get(probe.import_seconds.remote())
    total_s = time.perf_counter() - started
    ray.kill(probe)
    return make_row(2, "worker_start", "Tune overhead: fresh trial worker start + imports "
                    "(the fixed cost per slot)", total_s, "s", ("<=", 7.0),
                    f"{import_s:.1f}s of it importing the trainable's module in the new "
                    f"process (torch alone is ~2.3s); paid once per concurrent slot, not per "
                    f"trial", {"total_s": total_s, "import_s": import_s})


def line_tune_overhead(ctx: Context) -> list[Row]:
    start = worker_start(ctx)
    return [*tune_overhead(ctx), start, starts_per_experiment(ctx, start.value)]
