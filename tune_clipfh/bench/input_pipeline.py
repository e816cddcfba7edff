"""Line 3, input pipeline: share of an image-stage epoch spent producing batches from the
decoded-once store, and the store's speed-up over decoding the same batches from JPEG; at 224 px
with every transform on, the host's work per 64-image batch on the device path, the batched path
against the old per-image one on this CPU, and (CUDA only) the share of an epoch spent waiting for
data."""

from __future__ import annotations

import contextlib
import itertools
import math
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .harness import Context, Row, make_row, quiet, skipped_row, timed, torch_threads


class _TimedStore:
    """Wraps an ImageStore; accumulates the time spent in ``batch``."""

    def __init__(self, store, clock: dict[str, float]):
        self._store, self._clock = store, clock

    def __getattr__(self, name: str):
        return getattr(self._store, name)

    def batch(self, rows):
        started = time.perf_counter()
        try:
            return self._store.batch(rows)
        finally:
            self._clock["data"] += time.perf_counter() - started


@contextlib.contextmanager
def _timed_data_path(trainer, clock: dict[str, float]) -> Iterator[None]:
    """Count everything between the sampler and the model into ``clock["data"]`` while the
    trainer runs: store reads and the normalise/augment calls of the trainer's own loop, and the
    time spent waiting on a :class:`~tune_clipfh.data.loader.BatchLoader` (its ``epoch`` and
    ``evaluation`` iterators, ``plain``), whichever path the trainer takes."""
    from ..data.loader import BatchLoader
    from ..train import stages

    def counted(fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock["data"] += time.perf_counter() - started
        return wrapper

    def counted_iterator(fn):
        def wrapper(*args, **kwargs):
            iterator = fn(*args, **kwargs)
            try:
                while True:
                    started = time.perf_counter()
                    try:
                        item = next(iterator)
                    except StopIteration:
                        return
                    finally:
                        clock["data"] += time.perf_counter() - started
                    yield item
            finally:
                iterator.close()
        return wrapper

    patches = [(stages, name, counted) for name in ("normalize", "augment")
               if hasattr(stages, name)]
    patches += [(BatchLoader, "epoch", counted_iterator),
                (BatchLoader, "evaluation", counted_iterator), (BatchLoader, "plain", counted)]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    store = trainer.data.store
    trainer.data.store = _TimedStore(store, clock)
    for owner, name, wrap in patches:
        setattr(owner, name, wrap(getattr(owner, name)))
    try:
        yield
    finally:
        trainer.data.store = store
        for owner, name, original in originals:
            setattr(owner, name, original)


def data_wait_share(ctx: Context) -> tuple[Row, dict[str, Any]]:
    """Share of each image-stage epoch (training and validation) spent producing batches."""
    from ..train.stages import Trainer

    epochs = ctx.settings.pipeline_epochs
    config = ctx.config(epochs_prompt=1, epochs_image=epochs, early_stop_patience=0,
                        aug_random_erasing=0.5)
    data = ctx.data(config)
    clock = {"data": 0.0}
    shares: list[float] = []
    epoch_times: list[float] = []
    data_times: list[float] = []

    def on_epoch(record) -> None:
        if record.stage == "image":
            shares.append(clock["data"] / record.metrics["epoch_time_s"])
            epoch_times.append(record.metrics["epoch_time_s"])
            data_times.append(clock["data"])
        clock["data"] = 0.0

    with torch_threads(1):
        trainer = Trainer(config, data, log=quiet, progress=False)
        with _timed_data_path(trainer, clock):
            trainer.run(on_epoch)
    share = statistics.median(shares)
    row = make_row(3, "data_share", "input pipeline: data wait share of an epoch", 100 * share,
                   "%", ("<=", 10.0),
                   f"decoded-once store + batched normalise/augment (pad-crop, flip, erasing) "
                   f"on the training thread, validation reads included; median of {epochs} "
                   f"image-stage epochs, 1 thread",
                   {"epoch_s": statistics.median(epoch_times),
                    "data_s": statistics.median(data_times)})
    return row, {"epoch_s": statistics.median(epoch_times), "config": config, "data": data}


def decode_speedup(ctx: Context, epoch_s: float, config, data) -> Row:
    """Producing one epoch's batches from the store vs decoding the JPEGs each time."""
    import torch

    from ..data.sampler import PKSampler
    from ..data.store import _decode_resized

    sampler = PKSampler(data.train_labels, p=min(config.pk_p, len(data.identities)),
                        k=config.pk_k, seed=config.seed)
    batches = list(sampler)
    root = Path(data.manifest.root)
    paths = [sample.path for sample in data.manifest.train]
    size = data.image_size

    def from_store() -> list[torch.Tensor]:
        return [data.store.batch(data.train_rows[batch]) for batch in batches]

    def from_jpeg() -> list[torch.Tensor]:
        out = []
        for batch in batches:
            pixels = np.stack([_decode_resized(root / paths[i], size) for i in batch])
            out.append(torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous())
        return out

    from_store()  # page the memory map in, as every epoch after the first finds it
    store_s, store_batches = timed(from_store)
    jpeg_s, jpeg_batches = timed(from_jpeg)
    same = all(torch.equal(a, b) for a, b in zip(store_batches, jpeg_batches, strict=True))
    images = sum(len(b) for b in batches)
    jpeg_share = jpeg_s / (epoch_s - store_s + jpeg_s)
    return make_row(
        3, "cache_speedup", "input pipeline: store vs JPEG decode", jpeg_s / store_s, "x",
        (">", 1.0),
        f"{len(batches)} batches / {images} images of one epoch, {size}px; pixels "
        f"{'identical' if same else 'DIFFER'}; decoding JPEGs every epoch would take "
        f"{100 * jpeg_share:.0f}% of a training epoch's time (uint8 batches only)",
        {"store_s": store_s, "jpeg_s": jpeg_s, "epoch_s": epoch_s})


# ------------------------------------------------------------------------------------------
# The 224-px pipeline: host work per batch, the CPU path against the old one, CUDA wait share
# ------------------------------------------------------------------------------------------

PIPELINE_MODEL = "vitb16"  # its full-profile input size (224 px) sizes the 224-px rows


def pipeline_augment():
    """The augmentation the 224-px rows apply: every transform on (upstream pads 10 px)."""
    from ..data.store import Augment

    return Augment(hflip=0.5, pad_crop=10, random_erasing=0.5)


def synthetic_store(count: int, size: int, seed: int = 0):
    """An in-memory ImageStore of random uint8 images (the pipeline does not look at them)."""
    from ..data.store import ImageStore

    images = np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), np.uint8)
    return ImageStore(images, {}, Path("synthetic"))


def legacy_batch(store, rows, aug, generator, normalize: bool = True):
    """The input path before the batched loader, kept as the reference of the speed-up: float
    normalisation on the host, flip by boolean indexing, then one slice copy per image for the
    pad-crop and one Python step per image for random erasing."""
    import torch
    import torch.nn.functional as F

    from ..data.store import CLIP_MEAN, CLIP_STD, ERASE_AREA, ERASE_ASPECT

    pixels = store.batch(rows).to(torch.float32).div_(255)
    if normalize:
        pixels.sub_(torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        pixels.div_(torch.tensor(CLIP_STD).view(1, 3, 1, 1))
    out = pixels.clone()
    count, _, height, width = out.shape
    flip = torch.rand(count, generator=generator) < aug.hflip
    out[flip] = out[flip].flip(-1)
    pad = aug.pad_crop
    padded = F.pad(out, (pad, pad, pad, pad))
    offsets = torch.randint(0, 2 * pad + 1, (2, count), generator=generator)
    cropped = torch.empty_like(out)
    for image, (top, left) in enumerate(offsets.T.tolist()):
        cropped[image] = padded[image, :, top:top + height, left:left + width]
    log_low, log_high = math.log(ERASE_ASPECT[0]), math.log(ERASE_ASPECT[1])
    for image, (chance, area_u, aspect_u, top_u, left_u) in enumerate(
            torch.rand(count, 5, generator=generator).tolist()):
        if chance >= aug.random_erasing:
            continue
        area = height * width * (ERASE_AREA[0] + area_u * (ERASE_AREA[1] - ERASE_AREA[0]))
        aspect = math.exp(log_low + aspect_u * (log_high - log_low))
        box_h = min(height, max(1, round(math.sqrt(area * aspect))))
        box_w = min(width, max(1, round(math.sqrt(area / aspect))))
        top, left = int(top_u * (height - box_h + 1)), int(left_u * (width - box_w + 1))
        cropped[image, :, top:top + box_h, left:left + box_w] = 0
    return cropped


def _median_s(fn, repeats: int) -> float:
    fn()  # warm: allocator, page cache
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def pipeline_224(ctx: Context) -> list[Row]:
    """Per 64-image batch at 224 px with flip, pad-crop and erasing: the host's work on the
    device path (draw, gather the uint8 rows, pack, and on CUDA pin and launch the copies), and
    the whole batch computed on this CPU against the old per-image path, side by side."""
    import torch

    from ..model.registry import backbone_spec

    s = ctx.settings
    size = backbone_spec(PIPELINE_MODEL).input_size("full")
    batch = s.pipeline_batch
    aug = pipeline_augment()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t = _time_224(s, size, aug, device)
    where = "CUDA (pinned, non-blocking copies)" if device.type == "cuda" else "this CPU"
    return [
        make_row(3, "host_224", f"input pipeline: host ms per {batch}-image batch, {size} px",
                 1e3 * t["host_s"], "ms", ("<=", 5.0),
                 f"device path on {where}: draw the parameters, gather the uint8 rows of the "
                 f"store into one buffer, pack the per-image numbers, launch the copies; the "
                 f"transforms run on the device (flip, pad-crop {aug.pad_crop} px, erasing "
                 f"p={aug.random_erasing}); with the store resident on the device "
                 f"{1e3 * t['resident_host_s']:.2f} ms; median of {s.pipeline_repeats}, "
                 f"1 thread", {"host_s": t["host_s"], "resident_host_s": t["resident_host_s"]}),
        make_row(3, "cpu_speedup_224",
                 f"input pipeline: batched vs per-image path on the CPU, {batch} x {size} px",
                 t["legacy_s"] / t["cpu_s"], "x", (">", 1.0),
                 f"whole batch (gather, flip, pad-crop, erasing, normalise) computed on this "
                 f"CPU: {1e3 * t['cpu_s']:.0f} ms batched vs {1e3 * t['legacy_s']:.0f} ms the "
                 f"old way (float normalise first, one slice copy and one erasing step per "
                 f"image); median of {t['cpu_repeats']}, 1 thread; most of the rest is writing "
                 f"the 38 MB float batch (page faults of fresh memory included)",
                 {"batched_s": t["cpu_s"], "legacy_s": t["legacy_s"]}),
    ]


def _store_and_batches(s, size: int, count: int, seed: int):
    """A synthetic store of ``size`` px images and ``count`` batches of distinct rows of it."""
    store = synthetic_store(s.pipeline_store_images, size)
    rng = np.random.default_rng(seed)
    return store, [rng.choice(len(store), s.pipeline_batch, replace=False) for _ in range(count)]


def _time_224(s, size: int, aug, device) -> dict[str, float]:
    """The medians behind ``pipeline_224``'s rows, in seconds per batch (one thread)."""
    import torch

    from ..data.loader import BatchLoader
    from ..data.store import draw_augment

    store, batches = _store_and_batches(s, size, count=8, seed=0)
    generator = torch.Generator().manual_seed(0)
    cycle = itertools.cycle(batches)

    def next_rows():
        return next(cycle)

    with torch_threads(1):
        staged = BatchLoader(store, np.arange(len(store)), device, aug, on_device=False,
                             prefetch=False)
        resident = BatchLoader(store, np.arange(len(store)), device, aug, on_device=True,
                               prefetch=False)

        def host(loader) -> None:
            rows = next_rows()
            loader._send(rows, draw_augment(generator, len(rows), aug, size, size))

        host_s = _median_s(lambda: host(staged), s.pipeline_repeats)
        resident_host_s = _median_s(lambda: host(resident), s.pipeline_repeats)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        on_cpu = BatchLoader(store, np.arange(len(store)), "cpu", aug, prefetch=False)
        repeats = max(3, s.pipeline_repeats // 4)
        cpu_s = _median_s(lambda: next(on_cpu.epoch([next_rows()])), repeats)
        legacy_s = _median_s(lambda: legacy_batch(store, next_rows(), aug, generator), repeats)
    return {"host_s": host_s, "resident_host_s": resident_host_s, "cpu_s": cpu_s,
            "legacy_s": legacy_s, "cpu_repeats": repeats}


def cuda_wait_share(ctx: Context, device=None, profile: str = "full",
                    model: str = PIPELINE_MODEL) -> list[Row]:
    """Share of a training epoch spent waiting for data on CUDA: the stage-2 step fed by the
    BatchLoader (store on the device, and staged from the host) against the same steps on one
    ready batch. Skipped without CUDA; the test runs it on the CPU with the tiny profile."""
    import torch

    from ..data.loader import BatchLoader
    from ..model.registry import backbone_spec
    from .cuda import channels_last, make_train_step

    if device is None:
        if not torch.cuda.is_available():
            return [skipped_row(3, "cuda_wait", "input pipeline on CUDA: data wait share",
                                "no CUDA device")]
        device = torch.device("cuda")
    s = ctx.settings
    size = backbone_spec(model).input_size(profile)
    batch = s.pipeline_batch
    store, batches = _store_and_batches(s, size, count=s.pipeline_steps, seed=1)
    amp = device.type == "cuda"
    step, labels = make_train_step(model, profile, device, amp, batch)
    aug = pipeline_augment()
    layout = channels_last(model, device)
    loaders = {name: BatchLoader(store, np.arange(len(store)), device, aug,
                                 channels_last=layout, on_device=resident)
               for name, resident in (("resident", True), ("staged", False))}
    ready, _ = next(loaders["resident"].epoch(batches[:1]))

    def fixed() -> None:
        for _ in batches:
            step(ready, labels)

    def fed(loader) -> None:
        for images, _ in loader.epoch(batches, seed=0):
            step(images, labels)

    for _ in range(max(1, s.cuda_warmup)):
        step(ready, labels)
    fed(loaders["resident"])  # warm: allocator, worker thread, side stream
    fixed_s, resident_s, staged_s = _alternated_medians(
        device, s.pipeline_cuda_repeats,
        (fixed, lambda: fed(loaders["resident"]), lambda: fed(loaders["staged"])))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    note = (f"{name}; {backbone_spec(model).label} stage-2 step, {'bf16' if amp else 'fp32'}, "
            f"batch {batch}, {size} px, {len(batches)} steps per epoch: "
            f"{1e3 * fixed_s / len(batches):.1f} ms/step on one ready batch; 1 - that / the "
            f"epoch fed by the BatchLoader (flip, pad-crop, erasing; prefetch one ahead on a "
            f"side stream); median of {s.pipeline_cuda_repeats} alternated runs")
    return [
        make_row(3, "cuda_wait", "input pipeline on CUDA: data wait share, store on device",
                 100 * max(0.0, 1 - fixed_s / resident_s), "%", ("<=", 5.0), note,
                 {"fixed_s": fixed_s, "fed_s": resident_s}),
        make_row(3, "cuda_wait_staged",
                 "input pipeline on CUDA: data wait share, store on the host",
                 100 * max(0.0, 1 - fixed_s / staged_s), "%", None,
                 note + "; uint8 rows gathered on the host into pinned memory",
                 {"fixed_s": fixed_s, "fed_s": staged_s}),
    ]


def _alternated_medians(device, repeats: int, runs) -> list[float]:
    """Each run's median wall time over ``repeats`` rounds, the runs alternated in each."""
    from .cuda import sync

    def run(fn) -> float:
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - started

    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for measured, fn in zip(times, runs, strict=True):
            measured.append(run(fn))
    return [statistics.median(measured) for measured in times]


def line_input_pipeline(ctx: Context) -> list[Row]:
    share, extra = data_wait_share(ctx)
    return [share, decode_speedup(ctx, extra["epoch_s"], extra["config"], extra["data"]),
            *pipeline_224(ctx), *cuda_wait_share(ctx)]
