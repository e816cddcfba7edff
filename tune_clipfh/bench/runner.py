"""The line registry and the run: :func:`run_bench` runs the selected lines (Ray started once, on
first need, with storage in a temporary folder), prints an aligned table and writes JSON."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .concurrency import concurrency
from .cuda import cuda_throughput
from .evaluator import line_evaluator
from .harness import (
    ALL_LINES,
    FULL,
    LINE_TITLES,
    SCHEMA_VERSION,
    Context,
    Row,
    Settings,
    error_row,
    format_header,
    format_seconds,
    format_table,
    machine_info,
    write_json,
)
from .input_pipeline import line_input_pipeline
from .lr_transfer import line_lr_transfer
from .memory import search_memory
from .prompt_cache import prompt_cache
from .search_efficiency import search_efficiency
from .tune_overhead import line_tune_overhead

LINES: dict[int, Callable[[Context], list[Row]]] = {
    1: line_evaluator, 2: line_tune_overhead, 3: line_input_pipeline, 4: prompt_cache,
    5: concurrency, 6: search_memory, 7: search_efficiency, 8: cuda_throughput,
    9: line_lr_transfer}


def parse_lines(text: str | None) -> list[int]:
    if not text:
        return list(ALL_LINES)
    chosen = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        if not part.isdigit() or int(part) not in LINES:
            from ..errors import UserError

            raise UserError(f"--only: {part!r} is not a benchmark line "
                            f"(valid: {min(LINES)}-{max(LINES)})")
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
    out(format_header(machine, settings, lines))
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
            except Exception as exc:  # any failure of one line is recorded; the others still run
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
    out(f"\nwall time {wall:.0f}s; Ray start {format_seconds(ctx.ray_start_s)}, shutdown "
        f"{format_seconds(shutdown_s)}; load average at end "
        f"{' '.join(f'{x:.2f}' for x in report['load_average_end'])}")
    if json_path:
        write_json(report, json_path)
        out(f"JSON written to {json_path}")
    return report


