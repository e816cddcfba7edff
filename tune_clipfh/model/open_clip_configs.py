"""The tiny open_clip configs (``configs/<tiny_arch>.json``), registered with open_clip when
this module is imported: every module that names a tiny architecture to open_clip imports it."""

from __future__ import annotations

from pathlib import Path

import open_clip

CONFIG_DIR = Path(__file__).parent / "configs"
open_clip.add_model_config(CONFIG_DIR)
