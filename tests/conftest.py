"""Shared test set-up: offline, Ray token authentication on with a token of the test session's
own, one synthetic-data cache and one Ray session.

* ``HF_HUB_OFFLINE`` is set at import, before anything imports open_clip.
* Ray's token authentication is on for every cluster the tests start (``RAY_AUTH_MODE=token``,
  set at import: Ray reads it when imported), with a private token file in a temporary folder
  (``RAY_AUTH_TOKEN_PATH``), so the tests never read or write the user's ``~/.ray``. Driver
  subprocesses inherit both and so attach with the token.
* ``TUNE_CLIPFH_CACHE`` points at one temporary folder for the whole test session, so the
  synthetic dataset and its decoded image stores are built once per session (and never in the
  user's own cache).
* ``TUNE_CLIPFH_SYNTHETIC_IDENTITIES=80``: the embedded dataset at half its size (40 training
  identities of which 8 validate, 40 test identities), so that every training test's epoch
  costs half; the learning tests' margins are measured at this size.
* ``ray_session``: one local Ray instance (2 CPUs), started as the project starts one
  (``init_ray``), shared by every test that runs trials in this process; tests that need a
  cluster or a driver of their own run it in a subprocess (``drivers`` below).
"""

from __future__ import annotations

import atexit
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["TUNE_CLIPFH_SYNTHETIC_IDENTITIES"] = "80"


def _session_token() -> Path:
    """A random token in a folder only this user can open, removed when the session ends."""
    folder = Path(tempfile.mkdtemp(prefix="tune-clipfh-ray-auth-"))  # mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "auth_token"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(secrets.token_hex(32))
    return path


os.environ["RAY_AUTH_MODE"] = "token"
os.environ.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over the file
os.environ["RAY_AUTH_TOKEN_PATH"] = str(_session_token())

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """One cache folder (synthetic dataset + image stores) for the whole session."""
    previous = os.environ.get("TUNE_CLIPFH_CACHE")
    cache = tmp_path_factory.mktemp("tune-clipfh-cache")
    os.environ["TUNE_CLIPFH_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("TUNE_CLIPFH_CACHE", None)
    else:
        os.environ["TUNE_CLIPFH_CACHE"] = previous


@pytest.fixture(scope="session")
def ray_session(session_cache):
    """One local Ray instance for the test run, started by ``init_ray`` (which is a no-op once
    Ray is up, so every experiment of the session uses it).

    Started after ``TUNE_CLIPFH_CACHE`` is set: Ray's workers inherit the environment of the
    moment Ray starts. (Imported here, not at the top: tests that use no Ray load no Ray.)
    """
    import ray

    from tune_clipfh.tune.experiment import ExperimentOptions, init_ray

    started = not ray.is_initialized()
    if started:
        init_ray(ExperimentOptions(), num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


def subprocess_env(drop: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """The environment for a driver of its own: never attached to the shared Ray session;
    without the variables in ``drop``, with ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", *drop)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _start_time(pid: int) -> str | None:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _descendants(pid: int) -> list[tuple[int, str]]:
    """Every live descendant of ``pid`` with its start time (to never signal a reused PID)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            started = _start_time(child)
            if started is not None:
                found.append((child, started))
            todo.append(child)
    return found


class Drivers:
    """Driver processes of their own (a CLI run, a cluster script), each in a new session.

    ``kill`` stops one and everything it started (Ray's gcs, raylet and workers inherit the
    driver's process group): SIGTERM to the group, then SIGKILL to the group and to every
    descendant recorded before. Never ``ray stop``: that would end the shared session too.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], log: Path, cwd: Path | None = None,
              drop: tuple[str, ...] = (), **env: str) -> subprocess.Popen:
        """Start ``argv`` in ``subprocess_env(drop, **env)``, its output to ``log``."""
        with open(log, "ab") as handle:
            proc = subprocess.Popen(argv, stdout=handle, stderr=subprocess.STDOUT,
                                    cwd=str(cwd or REPO), env=subprocess_env(drop, **env),
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def run_for_result(self, argv: list[str], log: Path, timeout: float,
                       what: str) -> tuple[dict, str]:
        """Run a driver script to its end; return the JSON of its last ``RESULT {...}`` line
        and its whole log. Fails the test on a timeout, a non-zero exit or no result."""
        proc = self.start(argv, log)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what} timed out:\n{log.read_text()[-4000:]}")
        finally:
            self.kill(proc)
        text = log.read_text()
        lines = [line for line in text.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and lines, text[-4000:]
        return json.loads(lines[-1][len("RESULT "):]), text

    def kill(self, proc: subprocess.Popen, grace: float = 10.0) -> None:
        pids = _descendants(proc.pid)
        pgid = proc.pid  # start_new_session: the group id is the driver's pid
        if proc.poll() is None:
            _signal_group(pgid, signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(pgid, signal.SIGKILL)
        for pid, started in pids:
            if _start_time(pid) != started:
                continue  # gone (or the PID now names another process)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass

    def kill_all(self) -> None:
        for proc in self.procs:
            self.kill(proc)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
def drivers():
    """Start drivers of their own; whatever a test left running is killed at teardown."""
    started = Drivers()
    try:
        yield started
    finally:
        started.kill_all()

