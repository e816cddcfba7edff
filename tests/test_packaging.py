"""The data files ship in the package (``tune_clipfh/resources``) and a built wheel works alone.

* The checkout's top-level ``search_spaces/``, ``configs/`` and ``analysis/`` table are
  symlinks to the package's files: one copy, never out of sync.
* The package reads them through ``importlib.resources``, never by a path out of the package.
* (slow) A wheel built from the checkout, installed in a fresh venv that cannot see the checkout,
  runs ``versions``, ``versions --as-run``, ``config check`` and ``data synth`` from an
  unrelated folder.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import tune_clipfh
import tune_clipfh.resources as resources
from tune_clipfh.cli import main
from tune_clipfh.demo import DEMO_CONFIG
from tune_clipfh.report import REFERENCE_CSV
from tune_clipfh.tune.space import DEFAULT_SPACE
from tune_clipfh.tune.versions import VERSIONS_AS_RUN_FILE, VERSIONS_FILE

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "tune_clipfh"
SHIPPED = PACKAGE / "resources"
# Files of the top-level folders that are not shipped data (they stay real files there).
CHECKOUT_ONLY = {"analysis/README.md"}


def _shipped_files() -> list[Path]:
    """Every data file under tune_clipfh/resources, relative to it (``configs/x.yaml``)."""
    return sorted(path.relative_to(SHIPPED) for folder in resources.FOLDERS
                  for path in (SHIPPED / folder).rglob("*") if path.is_file())


def test_top_level_folders_are_links_to_the_shipped_files():
    """Each shipped file is reachable under the same name from the top-level folder, as the
    same file (a symlink, never a copy); nothing else sits there but CHECKOUT_ONLY."""
    shipped = _shipped_files()
    assert {path.parts[0] for path in shipped} == set(resources.FOLDERS)
    for relative in shipped:
        top = REPO / relative
        assert top.exists(), f"{relative}: shipped but missing from the checkout's folder"
        assert os.path.samefile(top, SHIPPED / relative), \
            f"{relative}: a copy, not a link to tune_clipfh/resources/{relative}"
    for folder in resources.FOLDERS:
        top = REPO / folder
        if top.is_symlink():  # the whole folder links to the package's
            target = os.readlink(top)
            assert not os.path.isabs(target), f"{folder} -> {target}: links must be relative"
            assert os.path.samefile(top, SHIPPED / folder)
            continue
        for entry in top.rglob("*"):
            relative = entry.relative_to(REPO).as_posix()
            if relative in CHECKOUT_ONLY or entry.is_dir():
                continue
            assert entry.is_symlink(), (f"{relative} is a real file: move it to tune_clipfh/"
                                        f"resources/{relative} and link it from here")
            assert not os.path.isabs(os.readlink(entry)), f"{relative}: link must be relative"
            assert os.path.samefile(entry, SHIPPED / relative)


def test_run_time_paths_are_the_shipped_files():
    for path in (VERSIONS_FILE, VERSIONS_AS_RUN_FILE, DEFAULT_SPACE, DEMO_CONFIG, REFERENCE_CSV):
        assert path.is_file(), path
        assert path.is_relative_to(Path(resources.__file__).parent), path
    assert {"rn50_11k_dorsal_r", "tiny_synthetic", "vitb16_11k_dorsal_r"} <= \
        set(resources.shipped_configs())


def test_no_module_reads_files_outside_the_package():
    """``Path(__file__).parents[N]`` reaches the checkout, which a wheel does not have."""
    found = [f"{path.relative_to(REPO)}:{number}"
             for path in PACKAGE.rglob("*.py")
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if "__file__" in line and re.search(r"\.parents\[|\.parent\.parent", line)]
    assert not found, f"use tune_clipfh.resources.resource_path instead: {found}"


@pytest.mark.parametrize("name", ["vitb16_11k_dorsal_r", "tiny_synthetic.yaml"])
def test_config_check_takes_a_shipped_config_by_name(tmp_path, monkeypatch, capsys, name):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "check", name]) == 0
    assert capsys.readouterr().err.splitlines()[-1] == f"# {name}: valid"


def test_config_check_names_an_unknown_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["config", "check", "tiny_synthtic"]) == 2
    assert capsys.readouterr().err == ("error: tiny_synthtic: file not found, and not a shipped "
                                       f"config (shipped: {', '.join(resources.shipped_configs())})"
                                       "\n")
    assert main(["config", "check", "nowhere/tiny_synthetic.yaml"]) == 2  # a path: never shipped
    assert capsys.readouterr().err == "error: nowhere/tiny_synthetic.yaml: file not found\n"
    (tmp_path / "tiny_synthetic.yaml").write_text("epochs_image: 3\nprofile: tiny\n")
    assert main(["config", "check", "tiny_synthetic.yaml"]) == 0  # an existing file wins
    assert "epochs_image: 3\n" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------
# The wheel


def _copy_sources(dest: Path) -> Path:
    """The files a build reads (top-level files and the package), without build/ or
    *.egg-info leftovers: a build in the checkout itself would write there, and setuptools
    reuses build/lib, so a deleted module could ship."""
    dest.mkdir()
    for entry in REPO.iterdir():
        if entry.is_file() and not entry.is_symlink():
            shutil.copy2(entry, dest / entry.name)
    shutil.copytree(PACKAGE, dest / PACKAGE.name,
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


@pytest.mark.slow
def test_wheel_works_without_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(HF_HUB_OFFLINE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    # 1. Build: no network, no build isolation (setuptools comes from this venv).
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
          str(wheels), str(_copy_sources(tmp_path / "src"))], tmp_path, env, timeout=300)
    (wheel,) = wheels.glob("tune_clipfh-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for relative in _shipped_files():
            member = f"tune_clipfh/resources/{relative.as_posix()}"
            assert member in names, f"{member} is not in the wheel (package-data?)"
            assert archive.read(member) == (SHIPPED / relative).read_bytes(), member
    # 2. A fresh venv: the wheel installed first (so pip sees nothing else), then a path entry
    # to this venv's site-packages for torch & co. A .pth path line does not run the .pth files
    # of that folder, so the checkout's editable finder stays out.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
          "--no-compile", str(wheel)], tmp_path, env, timeout=300)
    purelib = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path("
                         "'purelib'), end='')"], tmp_path, env))
    (purelib / "deps-from-test-venv.pth").write_text(sysconfig.get_path("purelib") + "\n")
    # 3. From an unrelated folder: the package, its data and the console script are the wheel's.
    work = tmp_path / "elsewhere"
    work.mkdir()
    where = _run([str(python), "-c", "import sys, tune_clipfh, tune_clipfh.tune.versions as v; "
                  "print(tune_clipfh.__file__, v.VERSIONS_FILE, "
                  "any('editable' in name for name in sys.modules))"], work, env).split()
    assert where[2] == "False", "the checkout's editable finder was loaded"
    for path in where[:2]:
        assert Path(path).is_relative_to(purelib / "tune_clipfh"), path
    tool = str(venv / "bin" / "tune-clipfh")
    assert "vitb16: 10 version(s), profile full" in _run([tool, "versions"], work, env)
    assert "rn50: 10 version(s)" in _run([tool, "versions", "--as-run", "--backbone", "rn50"],
                                         work, env)
    assert "# tiny_synthetic: valid" in _run([tool, "config", "check", "tiny_synthetic"],
                                             work, env)
    _run([tool, "data", "synth", "synth", "--identities", "4", "--images-per-identity", "2"],
         work, env)
    assert (work / "synth" / "HandInfo.csv").is_file()
    assert tune_clipfh.__file__.startswith(str(REPO))  # this process is untouched
