"""The optional extras, imported in one place: a missing one is a one-line user error that
says how to install it, instead of an ImportError deep inside a run."""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType

from .errors import UserError


def _mlflow() -> ModuleType:
    import mlflow

    return mlflow


def _optuna_dashboard() -> ModuleType:
    import optuna_dashboard

    return optuna_dashboard


EXTRAS: dict[str, tuple[Callable[[], ModuleType], str]] = {
    "mlflow": (_mlflow, "MLflow tracking (--mlflow)"),
    "dashboard": (_optuna_dashboard, "the dashboard")}
"""extra name -> (the import of the module it installs, what needs it); literal imports, so
no module name is ever computed (tests/test_reliability.py checks the package for that)."""
MLFLOW_ENV = "TUNE_CLIPFH_MLFLOW_URI"
"""The environment variable whose tracking URI is ``--mlflow``'s default."""


def require(extra: str) -> ModuleType:
    """The module of ``extra`` (``mlflow``, ``dashboard``), or a UserError naming the install."""
    load, what = EXTRAS[extra]
    try:
        return load()
    except ImportError:
        raise UserError(f"{what} needs the {extra} extra: pip install "
                        f"'tune-clipfh[{extra}]'") from None
