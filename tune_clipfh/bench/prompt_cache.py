"""Line 4, prompt stage: epoch time with the cached image features against re-encoding every
epoch."""

from __future__ import annotations

import statistics

from .harness import Context, Row, make_row, quiet, torch_threads


def prompt_cache(ctx: Context) -> list[Row]:
    """Prompt-stage epoch time with the cached frozen image features vs encoding the images
    again every epoch (what an uncached loop does)."""
    from ..train.stages import Trainer

    epochs = ctx.settings.prompt_epochs
    config = ctx.config(stage_mode="prompt_only", epochs_prompt=epochs)
    data = ctx.data(config)
    times: dict[str, list[float]] = {"cached": [], "reencode": []}
    with torch_threads(1):
        for variant in ("cached", "reencode"):
            trainer = Trainer(config, data, log=quiet, progress=False)
            if variant == "reencode":
                cached_epoch = trainer._prompt_epoch

                def reencode_epoch(epoch, bar, trainer=trainer, cached_epoch=cached_epoch):
                    trainer._cache_prompt_features()  # frozen encoder: same features again
                    return cached_epoch(epoch, bar)

                trainer._prompt_epoch = reencode_epoch
            trainer.run(lambda record, v=variant: times[v].append(
                record.metrics["epoch_time_s"]))
    # The first epoch of the cached run is preceded by the one-time encoding (not in it).
    cached = statistics.median(times["cached"])
    reencode = statistics.median(times["reencode"])
    return [make_row(4, "speedup", "prompt stage: cached features vs re-encoding",
                     reencode / cached, "x", (">=", 1.5),
                     f"median epoch of {epochs}; {len(data.train_rows)} training images, tiny "
                     f"ViT image tower, 1 thread; the cache is built once per run",
                     {"cached_epoch_s": cached, "reencode_epoch_s": reencode})]
