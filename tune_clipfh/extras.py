"""The optional extras, imported in one place: a missing one is a one-line user error that
says how to install it, instead of an ImportError deep inside a run."""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserError

EXTRAS = {"mlflow": ("mlflow", "MLflow tracking (--mlflow)"),
          "dashboard": ("optuna_dashboard", "the dashboard")}
"""extra name -> (the module it installs, what needs it)."""
MLFLOW_ENV = "TUNE_CLIPFH_MLFLOW_URI"
"""The environment variable whose tracking URI is ``--mlflow``'s default."""


def require(extra: str) -> ModuleType:
    """The module of ``extra`` (``mlflow``, ``dashboard``), or a UserError naming the install."""
    module, what = EXTRAS[extra]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{what} needs the {extra} extra: pip install "
                        f"'tune-clipfh[{extra}]'") from None
