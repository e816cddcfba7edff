"""Line 2, Tune overhead: one tiny training run as a plain function call and as a single Ray Tune
trial (Ray start reported apart), and the start of a fresh trial worker."""

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
            f"outside the trial's own run: {tune_s - trial_s:.1f}s (mostly a fresh worker "
            f"process importing torch/open_clip)")
    fixed_s = tune_s - trial_s
    if tune_s / plain_s > 1.15 and fixed_s > 0:
        note += (f"; at this fixed cost 1.15x needs a run of about {fixed_s / 0.15:.0f}s, or "
                 f"several trials per worker (each later trial costs the in-trial ratio)")
    if plain_s < 20:
        note += f"; the plain run took {plain_s:.0f}s, under the 20 s the target assumes"
    if len(plain_runs) > 1:
        note += f"; median of {len(plain_runs)} alternated pairs"
    times = {"plain_s": plain_s, "tune_s": tune_s, "trial_time_total_s": trial_s,
             "ray_start_s": ctx.ray_start_s or 0.0}
    return [
        make_row(2, "ratio", "Tune overhead: one trial / plain call", tune_s / plain_s, "x",
                 ("<=", 1.15), note, times),
        make_row(2, "in_trial", "Tune overhead: trial's own run / plain call",
                 trial_s / plain_s, "x", None,
                 "the trial's time_total_s (trainable start to last report: data, model, "
                 "epochs with tune.report and checkpoints, test) over the plain call; what a "
                 "trial costs once its worker is warm (reused actors)", times),
    ]


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
    return make_row(2, "worker_start", "Tune overhead: fresh trial worker start + imports",
                    total_s, "s", None,
                    f"{import_s:.1f}s of it importing the trainable's module in the new "
                    f"process (torch alone is ~2.3s); paid once per concurrent slot, not per "
                    f"trial", {"total_s": total_s, "import_s": import_s})


def line_tune_overhead(ctx: Context) -> list[Row]:
    return [*tune_overhead(ctx), worker_start(ctx)]
