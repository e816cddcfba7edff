"""``tune-clipfh bench``: the performance benchmark.

Every figure is a ratio of two things measured side by side in the same run (the machine may be
shared, so absolute times are noisy); the absolute times are reported too, with the machine.

Lines (``--only 1,3`` selects some):

1. Evaluator: ``rank_metrics`` against a per-query NumPy loop of the standard definition on
   random problems (same results checked), and the extra memory of a 20,000 x 20,000
   evaluation through the batched features path.
2. Tune overhead: one tiny training run as a plain function call and as a single Ray Tune
   trial (Ray start reported apart).
3. Input pipeline: share of an image-stage epoch spent producing batches from the decoded-once
   store, and the store's speed-up over decoding the same batches from JPEG.
4. Prompt stage: epoch time with the cached image features against re-encoding every epoch.
5. Concurrency: two 1-CPU trials at once against one 2-CPU trial after the other.
6. Memory: peak RSS of one tiny trial and of the Ray driver during a search, and the driver's
   growth per finished trial.
7. Search efficiency: best validation Rank-1 and compute of the ten fixed versions, random
   search, TPE, and TPE + ASHA on the same budget; compute ASHA saves at equal best result.
8. CUDA (skipped on CPU): stage-2 training-step images/s at 224 px, batch 64, bf16 AMP vs fp32,
   with model FLOP utilisation; feature-extraction images/s.

One function per line returns its rows; :func:`run_bench` runs the selected lines (Ray started
once, on first need, with storage in a temporary folder), prints an aligned table and writes JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCHEMA_VERSION = 1
ALL_LINES = (1, 2, 3, 4, 5, 6, 7, 8)
RAY_LINES = (2, 5, 6, 7)

# The training run every CPU line uses: the tiny random-init ViT on the embedded synthetic
# dataset, pinned to the CPU so a plain call and a Ray trial (which sees no GPU) run alike.
BENCH_KNOBS: dict[str, Any] = {
    "experiment": "bench", "model": "vitb16", "profile": "tiny", "pretrained": "none",
    "device": "cpu", "n_ctx": 4, "stage_mode": "prompt_then_image", "optimizer": "adamw",
    "lr": 1e-3, "lr_visual": 1e-3, "lr_head": 1e-3, "lr_prompt": 5e-3, "scheduler": "cosine",
    "warmup_epochs": 1, "id_head": "linear", "loss_use_id": True, "loss_use_triplet": True,
    "loss_use_center": False, "loss_use_i2t": True, "label_smoothing": 0.1,
    "unfreeze_mode": "all", "unfreeze_blocks": 4, "batch_size": 32, "sampler": "pk", "pk_k": 4,
    "aug_hflip": 0.5, "aug_pad_crop": 4, "seed": 0,
}


# ------------------------------------------------------------------------------------------
# Settings and result rows
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Problem sizes and budgets of one benchmark run (``full``, ``quick`` or a test's own)."""

    mode: str = "full"
    eval_sizes: tuple[int, ...] = (1000, 5000)
    eval_loop_queries: int | None = None  # time the loop on this many queries and scale
    eval_repeats: int = 5
    eval_memory_size: int = 20_000
    eval_feature_dim: int = 512
    overhead_prompt_epochs: int = 3  # line 2; its image epochs are sized by a probe run so
    overhead_seconds: float = 25.0  # that the plain run lasts about this long (>= 20 s)
    overhead_repeats: int = 2  # plain / trial pairs, alternated
    pipeline_epochs: int = 4
    prompt_epochs: int = 4
    concurrency_trials: int = 4
    concurrency_epochs: tuple[int, int] = (2, 6)
    memory_trials: int = 50
    memory_epochs: tuple[int, int] = (1, 1)
    driver_growth_bound_mb: float = 2.0  # MB of driver RSS per finished trial
    search_budget: int = 24
    search_epochs: tuple[int, int, int] = (2, 8, 3)  # prompt, image, early-stop patience
    cuda_batch: int = 64
    cuda_steps: int = 10
    cuda_warmup: int = 3


FULL = Settings()
QUICK = Settings(
    mode="quick", eval_loop_queries=1000, eval_repeats=3, overhead_repeats=1, pipeline_epochs=3,
    prompt_epochs=3, concurrency_trials=2,
    concurrency_epochs=(1, 3), memory_trials=10, search_budget=4, search_epochs=(1, 2, 3),
    cuda_steps=5, cuda_warmup=2)


@dataclass
class Row:
    """One benchmark figure: the measured value, its target and whether it is met."""

    line: int
    key: str  # stable identifier, e.g. "1.speedup_5000"
    name: str
    value: float | None
    unit: str
    target: str = "-"  # e.g. ">= 20"
    target_op: str | None = None
    target_value: float | None = None
    passed: bool | None = None  # None: no target (info), skipped or error
    status: str = "info"  # pass | fail | info | skip | error
    note: str = ""
    times: dict[str, float] = field(default_factory=dict)  # absolute seconds / bytes


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda v, b: v >= b, "<=": lambda v, b: v <= b, ">": lambda v, b: v > b,
    "<": lambda v, b: v < b}


def make_row(line: int, key: str, name: str, value: float | None, unit: str,
             target: tuple[str, float] | None = None, note: str = "",
             times: dict[str, float] | None = None) -> Row:
    row = Row(line, f"{line}.{key}", name, value, unit, note=note, times=dict(times or {}))
    if target is not None:
        op, bound = target
        row.target, row.target_op, row.target_value = f"{op} {_number(bound)}", op, bound
        if value is None or (isinstance(value, float) and math.isnan(value)):
            row.passed, row.status = False, "fail"
        else:
            row.passed = _OPS[op](value, bound)
            row.status = "pass" if row.passed else "fail"
    return row


def skipped_row(line: int, key: str, name: str, reason: str) -> Row:
    return Row(line, f"{line}.{key}", name, None, "", status="skip", note=f"skipped: {reason}")


def error_row(line: int, exc: BaseException) -> Row:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return Row(line, f"{line}.error", LINE_TITLES.get(line, f"line {line}"), None, "",
               passed=False, status="error", note=f"error: {text[:300]}")


# ------------------------------------------------------------------------------------------
# Machine, timing and memory helpers
# ------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "numpy": np.__version__, "load_average": list(os.getloadavg()),
            "memory_gb": _total_memory_gb(), "cuda": None,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if torch.cuda.is_available():
        info["cuda"] = torch.cuda.get_device_name(0)
    return info


def _total_memory_gb() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | str = "self") -> int | None:
    """Resident set size of a process, from /proc (None when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def _release_free_memory() -> None:
    """Return freed heap pages to the OS, so an RSS baseline holds no reusable slack."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRss:
    """Samples this process's RSS in a thread; ``peak - baseline`` is the extra memory."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        _release_free_memory()
        self.baseline = self.peak = rss_bytes() or 0
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes() or 0)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes() or 0)
            time.sleep(self.interval_s)

    @property
    def extra(self) -> int:
        return self.peak - self.baseline


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    return children


def _descendants(root: int) -> list[int]:
    children, found, todo = _children_by_parent(), [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace").strip()
    except OSError:
        return ""


class ProcessSampler:
    """RSS of this (driver) process and of every Ray process it started, sampled in a thread.

    A process whose title names the function trainable (``ray::ImplicitFunc``) is a trial.
    """

    TRIAL_MARK = "ImplicitFunc"

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self.driver: list[tuple[float, int]] = []
        self.trial_peaks: dict[int, int] = {}
        self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ProcessSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            driver = rss_bytes() or 0
            self.driver.append((time.time(), driver))
            total = driver
            for pid in _descendants(me):
                rss = rss_bytes(pid)
                if rss is None:
                    continue
                total += rss
                if self.TRIAL_MARK in _cmdline(pid):
                    self.trial_peaks[pid] = max(self.trial_peaks.get(pid, 0), rss)
            self.total_peak = max(self.total_peak, total)
            self._stop.wait(self.interval_s)

    def driver_rss_at(self, when: float) -> int | None:
        """The first driver sample at or after ``when`` (unix seconds)."""
        for stamp, rss in self.driver:
            if stamp >= when:
                return rss
        return self.driver[-1][1] if self.driver else None


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def _number(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3g}"


def _quiet(_: str) -> None:
    pass


# ------------------------------------------------------------------------------------------
# The run context: data, Ray, temporary storage
# ------------------------------------------------------------------------------------------


class Context:
    """What the lines share: settings, cache and temp folders, the prepared data, Ray."""

    def __init__(self, settings: Settings, cache_dir: str | None = None,
                 log: Callable[[str], None] = _quiet):
        self.settings = settings
        self.cache_dir = cache_dir
        self.log = log
        self.workdir = Path(tempfile.mkdtemp(prefix="tune-clipfh-bench-"))
        self.ray_start_s: float | None = None
        self._ray_started_here = False
        self._data: dict[tuple, Any] = {}

    # -- training configuration and data
    def knobs(self, **overrides: Any) -> dict[str, Any]:
        return {**BENCH_KNOBS, "cache_dir": self.cache_dir, **overrides}

    def config(self, **overrides: Any):
        from .config import build_config

        return build_config(self.knobs(**overrides), "bench").config

    def data(self, config):
        """The prepared synthetic dataset (decoded once; later calls reuse it)."""
        from .train.run import prepare_data

        key = (config.data_dir, config.cache_dir, config.model, config.profile)
        if key not in self._data:
            self._data[key] = prepare_data(config, log=self.log, progress=False)
        return self._data[key]

    def options(self, name: str, **kwargs: Any):
        from .tune.experiment import ExperimentOptions

        return ExperimentOptions(name=name, storage=str(self.workdir / "ray"), profile="tiny",
                                 cache_dir=self.cache_dir, max_failures=0, **kwargs)

    # -- Ray
    def ensure_ray(self) -> None:
        import ray

        from .tune.experiment import init_ray

        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        started = time.perf_counter()
        init_ray(self.options("init"))
        self.ray_start_s = time.perf_counter() - started
        self._ray_started_here = True
        self.log(f"[bench] Ray started in {self.ray_start_s:.1f}s")

    def close(self) -> float | None:
        """Shut Ray down (if started here) and remove the temporary folder; returns the
        shutdown time."""
        shutdown_s = None
        if self._ray_started_here:
            import ray

            shutdown_s, _ = _timed(ray.shutdown)
            self._ray_started_here = False
        shutil.rmtree(self.workdir, ignore_errors=True)
        return shutdown_s


# ------------------------------------------------------------------------------------------
# Line 1: evaluator
# ------------------------------------------------------------------------------------------


def reference_rank_metrics(distance: np.ndarray, query_ids: np.ndarray,
                           gallery_ids: np.ndarray) -> dict[str, Any]:
    """The standard CMC/AP/INP definition as a straightforward per-query NumPy loop.

    Ranking uses ``np.argsort(kind="stable")``: ties go to the lower gallery index, the rule
    ``rank_metrics`` documents (an unstable sort could order tied items differently).
    """
    first_hits = np.zeros(distance.shape[1], dtype=np.int64)
    average_precisions, inverse_penalties = [], []
    for row, query_id in enumerate(query_ids):
        order = np.argsort(distance[row], kind="stable")
        hits = np.flatnonzero(gallery_ids[order] == query_id)
        if hits.size == 0:
            continue
        first_hits[hits[0]] += 1
        average_precisions.append(np.mean(np.arange(1, hits.size + 1) / (hits + 1)))
        inverse_penalties.append(hits.size / (hits[-1] + 1))
    cmc = np.cumsum(first_hits) / len(average_precisions)
    return {"cmc": cmc, "rank1": cmc[0], "mAP": float(np.mean(average_precisions)),
            "mINP": float(np.mean(inverse_penalties)), "num_valid_queries": len(average_precisions)}


def random_problem(size: int, positives: str, seed: int = 0):
    """A float32 ``size x size`` distance matrix with query and gallery identities.

    ``single``: the hand protocol (one gallery image per identity, queries of those
    identities); ``multi``: size/4 identities drawn at random for both sides (about four
    positives per query, some queries with none).
    """
    rng = np.random.default_rng(seed)
    distance = rng.random((size, size), dtype=np.float32)
    if positives == "single":
        gallery_ids = rng.permutation(size)
        query_ids = rng.integers(0, size, size)
    else:
        identities = max(1, size // 4)
        gallery_ids = rng.integers(0, identities, size)
        query_ids = rng.integers(0, identities, size)
    return distance, query_ids, gallery_ids


def _agreement(expected: dict, got: dict) -> float:
    """Largest absolute difference over CMC, mAP and mINP."""
    return float(max(np.abs(np.asarray(expected["cmc"]) - np.asarray(got["cmc"])).max(),
                     abs(expected["mAP"] - got["mAP"]), abs(expected["mINP"] - got["mINP"])))


def evaluator_speed(ctx: Context, size: int, positives: str = "single") -> Row:
    """``rank_metrics`` vs the per-query loop on one random problem (results must agree)."""
    from .evaluation import rank_metrics

    s = ctx.settings
    distance, query_ids, gallery_ids = random_problem(size, positives)
    loop_queries = min(size, s.eval_loop_queries or size)
    loop_s, expected = _timed(lambda: reference_rank_metrics(
        distance[:loop_queries], query_ids[:loop_queries], gallery_ids))
    loop_total_s = loop_s * size / loop_queries
    check = rank_metrics(distance[:loop_queries], query_ids[:loop_queries], gallery_ids)
    difference = _agreement(expected, check)
    runs = [_timed(lambda: rank_metrics(distance, query_ids, gallery_ids))[0]
            for _ in range(s.eval_repeats)]
    fast_s = statistics.median(runs)
    ratio = loop_total_s / fast_s
    same = difference <= 1e-12
    note = (f"{'one positive per query (hand protocol)' if positives == 'single' else '~4 positives per query'}; "
            f"results {'identical' if same else 'DIFFER'} (max |diff| {difference:.1e}); "
            f"rank_metrics median of {s.eval_repeats}")
    if loop_queries < size:
        note += f"; loop timed on {loop_queries} of {size} queries and scaled x{size / loop_queries:g}"
    key = f"speedup_{size}" + ("" if positives == "single" else "_multi")
    target = (">=", 20.0) if positives == "single" else None
    row = make_row(1, key, f"evaluator speed-up {size}x{size}"
                   + ("" if positives == "single" else " (multi-positive)"), ratio, "x",
                   target, note, {"loop_s": loop_total_s, "loop_measured_s": loop_s,
                                  "rank_metrics_s": fast_s, "max_abs_diff": difference})
    if not same:
        row.passed, row.status = False, "fail"
    return row


def evaluator_memory(ctx: Context) -> Row:
    """Extra RSS of a Q x G evaluation through ``rank_metrics_from_features`` (chunked)."""
    import torch

    from .evaluation import rank_metrics_from_features

    size, dim = ctx.settings.eval_memory_size, ctx.settings.eval_feature_dim
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(size, dim, generator=generator)
    gallery = torch.randn(size, dim, generator=generator)
    gallery_ids = np.random.default_rng(0).permutation(size)
    query_ids = np.random.default_rng(1).integers(0, size, size)
    with PeakRss() as peak:
        seconds, _ = _timed(lambda: rank_metrics_from_features(query, gallery, query_ids,
                                                                gallery_ids))
    extra_gb = peak.extra / 2**30
    inputs_mb = (query.numel() + gallery.numel()) * 4 / 2**20
    full_matrix_gb = size * size * 4 / 2**30
    return make_row(
        1, "memory", f"evaluator extra RSS {size}x{size} (features path)", extra_gb, "GB",
        ("<", 2.0),
        f"{dim}-d float32 features ({inputs_mb:.0f} MB of inputs, not counted); the full "
        f"distance matrix alone would be {full_matrix_gb:.1f} GB; RSS sampled every 1 ms",
        {"seconds": seconds, "baseline_rss_bytes": peak.baseline, "peak_rss_bytes": peak.peak})


def line_evaluator(ctx: Context) -> list[Row]:
    rows = [evaluator_memory(ctx)]  # first: no freed memory of the other problems to reuse
    rows += [evaluator_speed(ctx, size) for size in ctx.settings.eval_sizes]
    rows += [evaluator_speed(ctx, size, "multi") for size in ctx.settings.eval_sizes]
    return rows


# ------------------------------------------------------------------------------------------
# Line 2: Tune overhead
# ------------------------------------------------------------------------------------------


def _fixed_trial(knobs: dict[str, Any]) -> dict[str, Any]:
    return {**knobs, "version": "bench", "backbone": knobs["model"], "kind": "fixed"}


def run_fixed(ctx: Context, name: str, knobs: dict[str, Any], *, seeds: int = 1,
              cpus: float = 1.0, max_concurrent: int | None = None) -> tuple[float, Any]:
    """Fixed trials (seeds x one configuration) through the product's reproduce path;
    returns the wall time of the experiment (Ray already running) and its result rows."""
    from .tune.experiment import run_fixed_trials
    from .tune.results import load_results

    ctx.ensure_ray()
    options = ctx.options(name, seeds=seeds, cpus_per_trial=cpus, max_concurrent=max_concurrent)
    trial = _fixed_trial({k: v for k, v in knobs.items() if k != "cache_dir"})
    seconds, path = _timed(lambda: run_fixed_trials([trial], options, "bench", {"bench": True}))
    return seconds, load_results(path)


def image_epochs_for(ctx: Context, seconds: float, prompt_epochs: int) -> tuple[int, float]:
    """Image epochs that make a plain 1-thread run last about ``seconds`` on this machine
    now, from a short probe run; returns (epochs, probe seconds)."""
    from .train.stages import Trainer

    config = ctx.config(epochs_prompt=1, epochs_image=2, early_stop_patience=0)
    data = ctx.data(config)
    with torch_threads(1):
        trainer = Trainer(config, data, log=_quiet, progress=False)
        probe_s, result = _timed(trainer.run)
    image = [row["epoch_time_s"] for row in result.history if row["stage"] == "image"]
    prompt = [row["epoch_time_s"] for row in result.history if row["stage"] == "prompt"]
    fixed = probe_s - sum(image) - sum(prompt)
    per_epoch = max(statistics.mean(image), 1e-3)
    epochs = math.ceil((seconds - fixed - prompt_epochs * statistics.mean(prompt)) / per_epoch)
    return max(2, min(epochs, 500)), probe_s


def tune_overhead(ctx: Context) -> list[Row]:
    from .train.run import train_run

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
            plain_s, _ = _timed(lambda run_dir=run_dir: train_run(config, run_dir, log=_quiet,
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
            f"(setup, trial, results); Ray start excluded ({_seconds(ctx.ray_start_s)}); "
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


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}s"


# ------------------------------------------------------------------------------------------
# Line 3: input pipeline
# ------------------------------------------------------------------------------------------


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
    """Count store reads, normalisation and augmentation (everything between the sampler
    and the model) into ``clock["data"]`` while the trainer runs."""
    from .train import stages

    def timed(fn):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                clock["data"] += time.perf_counter() - started
        return wrapper

    originals = {"normalize": stages.normalize, "augment": stages.augment}
    store = trainer.data.store
    trainer.data.store = _TimedStore(store, clock)
    for name, fn in originals.items():
        setattr(stages, name, timed(fn))
    try:
        yield
    finally:
        trainer.data.store = store
        for name, fn in originals.items():
            setattr(stages, name, fn)


def data_wait_share(ctx: Context) -> tuple[Row, dict[str, Any]]:
    """Share of each image-stage epoch (training and validation) spent producing batches."""
    from .train.stages import Trainer

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
        trainer = Trainer(config, data, log=_quiet, progress=False)
        with _timed_data_path(trainer, clock):
            trainer.run(on_epoch)
    share = statistics.median(shares)
    row = make_row(3, "data_share", "input pipeline: data wait share of an epoch", 100 * share,
                   "%", ("<=", 10.0),
                   f"decoded-once store + per-batch normalise/augment (pad-crop, flip, erasing) "
                   f"on the training thread, validation reads included; median of {epochs} "
                   f"image-stage epochs, 1 thread",
                   {"epoch_s": statistics.median(epoch_times),
                    "data_s": statistics.median(data_times)})
    return row, {"epoch_s": statistics.median(epoch_times), "config": config, "data": data}


def decode_speedup(ctx: Context, epoch_s: float, config, data) -> Row:
    """Producing one epoch's batches from the store vs decoding the JPEGs each time."""
    import torch

    from .data.sampler import PKSampler
    from .data.store import _decode_resized

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
    store_s, store_batches = _timed(from_store)
    jpeg_s, jpeg_batches = _timed(from_jpeg)
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


def line_input_pipeline(ctx: Context) -> list[Row]:
    share, extra = data_wait_share(ctx)
    return [share, decode_speedup(ctx, extra["epoch_s"], extra["config"], extra["data"])]


# ------------------------------------------------------------------------------------------
# Line 4: prompt stage
# ------------------------------------------------------------------------------------------


def prompt_cache(ctx: Context) -> list[Row]:
    """Prompt-stage epoch time with the cached frozen image features vs encoding the images
    again every epoch (what an uncached loop does)."""
    from .train.stages import Trainer

    epochs = ctx.settings.prompt_epochs
    config = ctx.config(stage_mode="prompt_only", epochs_prompt=epochs)
    data = ctx.data(config)
    times: dict[str, list[float]] = {"cached": [], "reencode": []}
    with torch_threads(1):
        for variant in ("cached", "reencode"):
            trainer = Trainer(config, data, log=_quiet, progress=False)
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


# ------------------------------------------------------------------------------------------
# Line 5: concurrency
# ------------------------------------------------------------------------------------------


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


# ------------------------------------------------------------------------------------------
# Line 6: memory of trials and of the driver
# ------------------------------------------------------------------------------------------


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
    from .tune.experiment import search
    from .tune.results import load_results

    trials = ctx.settings.memory_trials
    prompt, image = ctx.settings.memory_epochs
    ctx.ensure_ray()
    options = ctx.options("memory", max_concurrent=2, overrides={
        "epochs_prompt": prompt, "epochs_image": image, "early_stop_patience": 0,
        "device": "cpu"})
    with ProcessSampler() as sampler:
        seconds, path = _timed(lambda: search(None, trials, "rank1", "vitb16", None, options,
                                              warm_start=False))
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


# ------------------------------------------------------------------------------------------
# Line 7: search efficiency
# ------------------------------------------------------------------------------------------


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
    from .tune.experiment import reproduce, search
    from .tune.results import load_results

    budget = ctx.settings.search_budget
    prompt, image, patience = ctx.settings.search_epochs
    epochs = {"epochs_prompt": prompt, "epochs_image": image, "early_stop_patience": patience,
              "device": "cpu"}
    ctx.ensure_ray()
    grace = prompt + 1  # ASHA counts reported epochs; its first rung after one image epoch

    def run(name: str, fn: Callable[[Any], Path]) -> tuple[Any, float]:
        seconds, path = _timed(lambda: fn(ctx.options(name, max_concurrent=2,
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
         f"trial-s until a trial first reached {100 * level:.1f}%: {_seconds(tpe_cost)} "
         f"without ASHA, {_seconds(asha_cost)} with; whole budget ")
        + f"{tpe.trial_seconds:.0f} vs {asha.trial_seconds:.0f} trial-s, {tpe.epochs} vs "
        f"{asha.epochs} epochs; budget {budget} trials of {prompt}+{image} epochs (patience "
        f"{patience}), ASHA grace {grace}, reduction 3"
        + (" (quick: smaller budget)" if ctx.settings.mode == "quick" else ""),
        {"tpe_seconds_to_level": tpe_cost or 0.0, "asha_seconds_to_level": asha_cost or 0.0,
         "total_saved_percent": total_saved or 0.0,
         "to_level_saved_percent": to_level_saved if to_level_saved is not None else 0.0}))
    return rows


# ------------------------------------------------------------------------------------------
# Line 8: CUDA throughput
# ------------------------------------------------------------------------------------------

# Dense peak throughput (FLOP/s) by device-name fragment: (bf16 tensor core, fp32 non-tensor).
PEAK_FLOPS: dict[str, tuple[float, float]] = {
    "H200": (989e12, 67e12), "H100 PCIe": (756e12, 51e12), "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12), "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12),
    "A10": (125e12, 31.2e12), "RTX 4090": (165e12, 82.6e12), "RTX 3090": (71e12, 35.6e12),
}


def peak_flops(device_name: str) -> tuple[float, float] | None:
    for fragment, peaks in PEAK_FLOPS.items():
        if fragment in device_name:
            return peaks
    return None


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds_per_step(step: Callable[[], None], device, steps: int) -> float:
    """Mean wall time of ``steps`` calls, with the device's queue drained before and after."""
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - started) / steps


def _build_image_model(model: str, profile: str, device, classes: int):
    import torch

    from .model import ReIDHead, configure_visual_trainable, create_backbone

    backbone = create_backbone(model, profile, "none")
    configure_visual_trainable(backbone, len(backbone.visual_blocks), "all")
    head = ReIDHead(backbone.embed_dim, classes)
    backbone.to(device)
    head.to(device)
    if device.type == "cuda" and model == "rn50":
        backbone.to(memory_format=torch.channels_last)
    return backbone, head


def train_step_throughput(model: str, profile: str, device, amp: bool, batch_size: int,
                          steps: int, warmup: int = 2) -> dict[str, float]:
    """Images/s of the stage-2 training step (image tower + BNNeck/ID head, ID + triplet
    losses, AdamW) on synthetic tensors; FLOPs of one step counted by torch."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from .losses import batch_hard_triplet

    torch.manual_seed(0)
    classes = max(2, batch_size // 4)
    backbone, head = _build_image_model(model, profile, device, classes)
    backbone.train()
    head.train()
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    size = backbone.image_size
    images = torch.randn(batch_size, 3, size, size, device=device)
    if device.type == "cuda" and model == "rn50":
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.arange(batch_size, device=device) % classes

    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            features = backbone.encode_image(images)
            _, logits = head(features, labels)
        loss = F.cross_entropy(logits.float(), labels) + batch_hard_triplet(features.float(),
                                                                            labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    with FlopCounterMode(display=False) as counter:
        step()
    step_s = _seconds_per_step(step, device, steps)
    return {"images_per_s": batch_size / step_s, "step_s": step_s,
            "flops_per_step": float(counter.get_total_flops()), "image_size": size}


def extract_throughput(model: str, profile: str, device, amp: bool, batch_size: int,
                       steps: int, warmup: int = 2) -> dict[str, float]:
    """Images/s of evaluation feature extraction (eval mode, no grad) on synthetic tensors."""
    import torch

    backbone, head = _build_image_model(model, profile, device, 2)
    backbone.eval()
    images = torch.randn(batch_size, 3, backbone.image_size, backbone.image_size, device=device)
    if device.type == "cuda" and model == "rn50":
        images = images.contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def step() -> None:
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            backbone.encode_image(images)

    for _ in range(warmup):
        step()
    return {"images_per_s": batch_size / _seconds_per_step(step, device, steps),
            "image_size": backbone.image_size}


def cuda_throughput(ctx: Context, device=None, profile: str = "full") -> list[Row]:
    """Line 8 on ``device`` (default: CUDA, else one skipped row). The test runs it with the
    CPU and the tiny profile, so this code runs even where no GPU is."""
    import torch

    if device is None:
        if not torch.cuda.is_available():
            return [skipped_row(8, "cuda", "CUDA stage-2 throughput", "no CUDA device")]
        device = torch.device("cuda")
    s = ctx.settings
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peaks = peak_flops(name)
    rows = []
    for model in ("vitb16", "rn50"):
        fp32 = train_step_throughput(model, profile, device, False, s.cuda_batch, s.cuda_steps,
                                     s.cuda_warmup)
        bf16 = train_step_throughput(model, profile, device, True, s.cuda_batch, s.cuda_steps,
                                     s.cuda_warmup)
        for label, result, peak_index in (("fp32", fp32, 1), ("bf16 AMP", bf16, 0)):
            achieved = result["flops_per_step"] / result["step_s"]
            mfu = None if peaks is None else 100 * achieved / peaks[peak_index]
            note = (f"{name}; batch {s.cuda_batch}, {result['image_size']} px, AdamW; "
                    f"{result['flops_per_step'] / 1e12:.2f} TFLOP/step, "
                    f"{achieved / 1e12:.1f} TFLOP/s; MFU "
                    + ("n/a (unknown peak)" if mfu is None else
                       f"{mfu:.1f}% of the {'bf16' if peak_index == 0 else 'fp32'} dense peak"))
            if label == "bf16 AMP":
                note += f"; {bf16['images_per_s'] / fp32['images_per_s']:.2f}x fp32"
            rows.append(make_row(
                8, f"train_{model}_{'bf16' if peak_index == 0 else 'fp32'}",
                f"CUDA {model} train step, {label}", result["images_per_s"], "img/s",
                (">", fp32["images_per_s"]) if label == "bf16 AMP" else None, note,
                {"step_s": result["step_s"], "flops_per_step": result["flops_per_step"],
                 "mfu_percent": mfu if mfu is not None else float("nan")}))
        extract = extract_throughput(model, profile, device, True, 4 * s.cuda_batch,
                                     s.cuda_steps, s.cuda_warmup)
        rows.append(make_row(8, f"extract_{model}", f"CUDA {model} feature extraction (bf16)",
                             extract["images_per_s"], "img/s", None,
                             f"{name}; batch {4 * s.cuda_batch}, {extract['image_size']} px, "
                             f"eval mode, no grad"))
    return rows


# ------------------------------------------------------------------------------------------
# Runner, table, JSON
# ------------------------------------------------------------------------------------------

LINE_TITLES = {1: "evaluator", 2: "Tune overhead", 3: "input pipeline", 4: "prompt stage",
               5: "concurrency", 6: "memory", 7: "search efficiency", 8: "CUDA throughput"}
LINES: dict[int, Callable[[Context], list[Row]]] = {
    1: line_evaluator, 2: line_tune_overhead, 3: line_input_pipeline, 4: prompt_cache,
    5: concurrency, 6: search_memory, 7: search_efficiency, 8: cuda_throughput}


def parse_lines(text: str | None) -> list[int]:
    if not text:
        return list(ALL_LINES)
    chosen = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) not in LINES:
            from .errors import UserError

            raise UserError(f"--only: {part!r} is not a benchmark line (valid: 1-8)")
        chosen.append(int(part))
    return sorted(set(chosen))


def run_bench(lines: list[int] | None = None, settings: Settings = FULL,
              json_path: str | Path | None = None, cache_dir: str | None = None,
              out: Callable[[str], None] = print,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the selected lines, print the table and write the JSON report; returns the report."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    lines = list(lines or ALL_LINES)
    started = time.perf_counter()
    machine = machine_info()
    out(_header(machine, settings, lines))
    ctx = Context(settings, cache_dir, log)
    rows: list[Row] = []
    timings: dict[str, float] = {}
    try:
        for line in lines:
            log(f"[bench] line {line}: {LINE_TITLES[line]} ...")
            line_started = time.perf_counter()
            try:
                # Ray Tune prints an experiment banner to stdout; keep stdout for the table.
                with contextlib.redirect_stdout(sys.stderr):
                    rows += LINES[line](ctx)
            except Exception as exc:  # noqa: BLE001 - one failing line must not end the run
                rows.append(error_row(line, exc))
            timings[str(line)] = time.perf_counter() - line_started
            log(f"[bench] line {line} done in {timings[str(line)]:.0f}s")
    finally:
        shutdown_s = ctx.close()
    wall = time.perf_counter() - started
    report = {
        "schema": SCHEMA_VERSION, "tool": "tune-clipfh bench", "mode": settings.mode,
        "lines": lines, "machine": machine, "settings": asdict(settings),
        "load_average_end": list(os.getloadavg()), "wall_s": wall, "line_s": timings,
        "ray_start_s": ctx.ray_start_s, "ray_shutdown_s": shutdown_s,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rows": [asdict(row) for row in rows],
    }
    out(format_table(rows))
    out(f"\nwall time {wall:.0f}s; Ray start {_seconds(ctx.ray_start_s)}, shutdown "
        f"{_seconds(shutdown_s)}; load average at end "
        f"{' '.join(f'{x:.2f}' for x in report['load_average_end'])}")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(_jsonable(report), indent=1))
        out(f"JSON written to {json_path}")
    return report


def _header(machine: dict[str, Any], settings: Settings, lines: list[int]) -> str:
    load = " ".join(f"{x:.2f}" for x in machine["load_average"])
    return (f"tune-clipfh bench ({settings.mode}; lines {','.join(map(str, lines))})\n"
            f"machine: {machine['cpu']}, {machine['cores']} cores, "
            f"{machine['memory_gb']} GB, torch {machine['torch']} "
            f"({machine['torch_threads']} threads, OMP_WAIT_POLICY="
            f"{machine['omp_wait_policy'] or 'unset'}), "
            f"CUDA: {machine['cuda'] or 'none'}; load average at start {load}")


_STATUS = {"pass": "PASS", "fail": "FAIL", "info": "info", "skip": "skip", "error": "ERROR"}


def _format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit in ("x",):
        return f"{value:.2f}x"
    if unit == "%":
        return f"{value:.1f} %"
    return f"{_number(value)} {unit}"


def _format_times(times: dict[str, float]) -> str:
    parts = []
    for key, value in times.items():
        if key.endswith("_s") and isinstance(value, (int, float)) and math.isfinite(value):
            parts.append(f"{key[:-2]} {value:.3g}s")
    return ", ".join(parts[:4])


def format_table(rows: list[Row]) -> str:
    header = ("#", "benchmark", "value", "target", "result", "absolute times")
    body = [(str(r.line), r.name, _format_value(r.value, r.unit),
             r.target if r.target_op is None else f"{r.target_op} "
             f"{_format_value(r.target_value, r.unit).replace('.00x', 'x')}",
             _STATUS.get(r.status, r.status), _format_times(r.times)) for r in rows]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(cells) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True))

    lines = ["", fmt(header), fmt(["-" * w for w in widths])]
    lines += [fmt(row) for row in body]
    lines.append("\nnotes:")
    lines += [f"  {r.key}: {r.note}" for r in rows if r.note]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def settings_for(quick: bool) -> Settings:
    return QUICK if quick else FULL


__all__ = ["FULL", "QUICK", "Row", "Settings", "run_bench", "settings_for"]
