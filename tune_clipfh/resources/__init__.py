"""Data files shipped inside the package: search spaces, run configs and the thesis table.

``tune_clipfh/resources/`` holds the only copy of each file. In a checkout, the top-level
``search_spaces/`` and ``configs/`` are symlinks to the folders here and
``analysis/thesis_clipfh_11k_dorsal_r_eval.csv`` is a symlink to the table here
(``tests/test_packaging.py`` checks it), so a file edited through either path is the one a built
wheel carries. The package reads them with :mod:`importlib.resources`, never by a path relative
to the checkout. This module imports nothing from the rest of the package but ``errors``.
"""

from __future__ import annotations

import atexit
from contextlib import ExitStack
from importlib.resources import as_file, files
from pathlib import Path

from ..errors import UserError

SEARCH_SPACES = "search_spaces"
CONFIGS = "configs"
ANALYSIS = "analysis"
FOLDERS = (SEARCH_SPACES, CONFIGS, ANALYSIS)

_extracted = ExitStack()
atexit.register(_extracted.close)


def resource_path(*parts: str) -> Path:
    """A real file-system path of a shipped file (or folder), e.g.
    ``resource_path("configs", "tiny_synthetic.yaml")``.

    An installed package (a wheel, an editable checkout) is on disk and its own path comes
    back. From a zip archive the file is extracted to a temporary place that lasts until the
    interpreter exits (folders need Python >= 3.12 there).
    """
    return _extracted.enter_context(as_file(files(__name__).joinpath(*parts)))


def shipped_configs() -> list[str]:
    """The names of the shipped run configs (``tiny_synthetic``, ...), sorted."""
    return sorted(entry.name.removesuffix(".yaml") for entry in files(__name__).joinpath(CONFIGS)
                  .iterdir() if entry.name.endswith(".yaml"))


def config_file(name: str | Path) -> Path:
    """A config path as given, or a shipped config named bare (``tiny_synthetic`` or
    ``tiny_synthetic.yaml``). An existing file or a name with a folder part is returned as it
    is, so a missing path is reported by the reader; a bare name that is neither an existing
    file nor a shipped config is a one-line error listing the shipped ones."""
    path = Path(name)
    if path.exists() or len(path.parts) != 1:
        return path
    shipped = resource_path(CONFIGS, f"{path.name.removesuffix('.yaml')}.yaml")
    if shipped.is_file():
        return shipped
    raise UserError(f"{name}: file not found, and not a shipped config "
                    f"(shipped: {', '.join(shipped_configs())})")
