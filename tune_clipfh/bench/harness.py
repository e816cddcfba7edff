"""What every benchmark line shares: settings, result rows and their pass/fail, the machine,
timing and memory sampling, the run context (data, Ray, temporary storage), the table and the JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import math
import os
import platform
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..jsonable import jsonable

SCHEMA_VERSION = 1
ALL_LINES = (1, 2, 3, 4, 5, 6, 7, 8, 9)
RAY_LINES = (2, 5, 6, 7)

LINE_TITLES = {1: "evaluator", 2: "Tune overhead", 3: "input pipeline", 4: "prompt stage",
               5: "concurrency", 6: "memory", 7: "search efficiency", 8: "CUDA throughput",
               9: "learning-rate transfer"}

# The training run every CPU line uses: the tiny synthetic-pretrained ViT on the embedded
# synthetic dataset, pinned to the CPU so a plain call and a Ray trial (which sees no GPU) run
# alike. Rates as stated for the full model (the tiny profile scales the image tower's).
BENCH_KNOBS: dict[str, Any] = {
    "experiment": "bench", "model": "vitb16", "profile": "tiny", "pretrained": "synthetic",
    "device": "cpu", "n_ctx": 4, "stage_mode": "prompt_then_image", "optimizer": "adamw",
    "lr": 1e-3, "lr_visual": 1e-4, "lr_head": 1e-3, "lr_prompt": 5e-3, "scheduler": "cosine",
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
    overhead_trials: int = 6  # line 2: short trials on two slots, to count the worker starts
    pipeline_epochs: int = 4
    pipeline_batch: int = 64  # the 224-px rows of line 3
    pipeline_store_images: int = 512
    pipeline_repeats: int = 20
    pipeline_steps: int = 30  # training steps per epoch of the CUDA wait share
    pipeline_cuda_repeats: int = 3
    prompt_epochs: int = 4
    concurrency_trials: int = 4
    concurrency_epochs: tuple[int, int] = (2, 6)
    memory_trials: int = 50
    memory_epochs: tuple[int, int] = (1, 1)
    driver_growth_bound_mb: float = 2.0  # MB of driver RSS per finished trial
    search_seeds: int = 3  # line 7: seeds of the versions and of the search
    search_trials: int = 60  # per search seed, at most; the budget ends it sooner
    # shares of the versions' trial-seconds per seed a search may spend (the targets' two)
    search_budget_shares: tuple[float, ...] = (0.5, 1.0)
    # synthetic datasets: (identities, generator seed); (None, 0) is the embedded default
    search_datasets: tuple[tuple[int | None, int], ...] = ((None, 0), (120, 1))
    # line 7's prompt and image epochs; None: the stated schedules (30 + 30; shorter ones end
    # before the tiny models gain). Early stopping is the tiny profile's: off
    search_epochs: tuple[int, int] | None = None
    search_versions: tuple[str, ...] | None = None  # line 7's hand-tuned versions; None: all
    search_race_top: int | None = None  # line 7's race; None: the search's default
    cuda_batch: int = 64
    cuda_steps: int = 10
    cuda_warmup: int = 3
    lr_transfer_steps: int = 3  # AdamW steps per model (full-size ones on the CPU: ~20 s each)


    def search_race(self) -> dict[str, Any]:
        """Line 7's race options for ``search``: the default unless ``search_race_top``."""
        return {} if self.search_race_top is None else {"race_top": self.search_race_top}


FULL = Settings()
QUICK = Settings(
    mode="quick", eval_loop_queries=1000, eval_repeats=3, overhead_repeats=1,
    overhead_trials=4, pipeline_epochs=3,
    pipeline_store_images=256, pipeline_repeats=10, pipeline_steps=20, pipeline_cuda_repeats=2,
    prompt_epochs=3, concurrency_trials=2,
    concurrency_epochs=(1, 3), memory_trials=10, search_seeds=1, search_trials=3,
    search_budget_shares=(1.0,), search_datasets=((None, 0),), search_epochs=(1, 2),
    search_race_top=1, cuda_steps=5, cuda_warmup=2, lr_transfer_steps=2)


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
        row.target, row.target_op, row.target_value = f"{op} {format_number(bound)}", op, bound
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


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def format_number(value: float) -> str:
    if value == 0 or 0.01 <= abs(value) < 1e5:
        return f"{value:.4g}"
    return f"{value:.3g}"


def quiet(_: str) -> None:
    pass


def format_seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}s"


# ------------------------------------------------------------------------------------------
# The run context: data, Ray, temporary storage
# ------------------------------------------------------------------------------------------


class Context:
    """What the lines share: settings, cache and temp folders, the prepared data, Ray."""

    def __init__(self, settings: Settings, cache_dir: str | None = None,
                 log: Callable[[str], None] = quiet):
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
        from ..config import build_config

        return build_config(self.knobs(**overrides), "bench").config

    def data(self, config):
        """The prepared synthetic dataset (decoded once; later calls reuse it)."""
        from ..train.run import prepare_data

        key = (config.data_dir, config.cache_dir, config.model, config.profile)
        if key not in self._data:
            self._data[key] = prepare_data(config, log=self.log, progress=False)
        return self._data[key]

    def options(self, name: str, **kwargs: Any):
        from ..tune.experiment import ExperimentOptions

        return ExperimentOptions(name=name, storage=str(self.workdir / "ray"), profile="tiny",
                                 cache_dir=self.cache_dir, max_failures=0, **kwargs)

    # -- Ray
    def ensure_ray(self) -> None:
        import ray

        from ..tune.ray_session import init_ray

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

            shutdown_s, _ = timed(ray.shutdown)
            self._ray_started_here = False
        shutil.rmtree(self.workdir, ignore_errors=True)
        return shutdown_s


def _fixed_trial(knobs: dict[str, Any]) -> dict[str, Any]:
    return {**knobs, "version": "bench", "backbone": knobs["model"], "kind": "fixed"}


def run_fixed(ctx: Context, name: str, knobs: dict[str, Any], *, seeds: int = 1,
              cpus: float = 1.0, max_concurrent: int | None = None) -> tuple[float, Any]:
    """Fixed trials (seeds x one configuration) through the product's reproduce path;
    returns the wall time of the experiment (Ray already running) and its result rows."""
    from ..tune.experiment import run_fixed_trials
    from ..tune.results import load_results

    ctx.ensure_ray()
    options = ctx.options(name, seeds=seeds, cpus_per_trial=cpus, max_concurrent=max_concurrent)
    trial = _fixed_trial({k: v for k, v in knobs.items() if k != "cache_dir"})
    seconds, path = timed(lambda: run_fixed_trials([trial], options, "bench", {"bench": True}))
    return seconds, load_results(path)


# ------------------------------------------------------------------------------------------
# Table and JSON
# ------------------------------------------------------------------------------------------


def format_header(machine: dict[str, Any], settings: Settings, lines: list[int]) -> str:
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
    return f"{format_number(value)} {unit}"


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


def write_json(report: dict[str, Any], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(jsonable(report), indent=1))


def settings_for(quick: bool) -> Settings:
    return QUICK if quick else FULL
