"""User-facing model errors: one line, which the CLI prints without a traceback."""

from __future__ import annotations

from ..errors import UserError


class ModelLoadError(UserError):
    """A backbone that cannot be built or loaded, explained in one user-facing line."""
