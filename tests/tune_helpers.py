"""Helpers of the tests that drive Tune experiments from a process of their own
(``test_tune.py``, ``test_reliability.py``): waiting on a driver, reading its progress lines and
a trial's reported rows."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def wait_for(predicate: Callable[[], bool], timeout: float,
             proc: subprocess.Popen | None = None) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` seconds pass (False); stop early
    when ``proc`` has exited (then the predicate's last answer counts)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return bool(predicate())
        time.sleep(0.3)
    return False


def tune_lines(log: Path, marker: str) -> list[str]:
    """The driver's ``[tune] ...`` progress lines in ``log`` that contain ``marker``."""
    if not log.is_file():
        return []
    return [line for line in log.read_text(errors="replace").splitlines()
            if line.startswith("[tune]") and marker in line]


def rows_reported(trial_dir: Path) -> list[dict]:
    """Every row a trial reported, from its ``result.json``."""
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()
            if line.strip()]


def one_trial_done_another_checkpointed(log: Path) -> bool:
    """The driver logged one trial done and another trial past image epoch 2, so at least its
    first checkpoint: the moment the interruption tests stop a driver."""
    done = tune_lines(log, " done: ")
    if not done:
        return False
    first = done[0].split()[1]
    return any(line.split()[1] != first for line in tune_lines(log, " image epoch 2:"))
