"""The tune layer's sectioned YAML files (versions, search spaces): read, with one section check."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, read_yaml, suggest


def read_sections(path: str | Path, sections: Sequence[str]) -> dict[str, Any]:
    """The top-level mapping of ``path``; a key that is not one of ``sections`` is a one-line
    error naming the file and the valid sections."""
    data = read_yaml(path)
    for key in data:
        if key not in sections:
            raise ConfigError(f"{path}: section '{key}' is not valid{suggest(str(key), sections)}"
                              f" (valid: {', '.join(sections)})")
    return data
