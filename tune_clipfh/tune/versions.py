"""The thesis's hand-tuned Stage-2 versions (v1-v10) per backbone, read from a YAML data file.

The file (default: the shipped ``search_spaces/versions.yaml``, see :mod:`tune_clipfh.resources`)
has three sections: ``common`` knobs, ``profiles`` (overlays per profile) and ``backbones`` (per
backbone, the versions in order, each with ``inherits``, ``thesis_run``, ``note`` and the knobs
it ``set``s). A version resolves to
RunConfig defaults <- common <- the ``set`` of every version on its inheritance chain, root first
<- its model and run name <- the profile overlay, and is validated by :func:`build_config`, so an
invalid value is reported with the file, backbone and version named.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import (
    BACKBONES,
    FIELDS,
    IGNORED_UPSTREAM_KEYS,
    ConfigError,
    RunConfig,
    build_config,
    suggest,
)
from ..resources import SEARCH_SPACES, resource_path
from ._yaml import read_sections

# Shipped in the package (search_spaces/ in a checkout links there).
VERSIONS_FILE = resource_path(SEARCH_SPACES, "versions.yaml")
VERSIONS_AS_RUN_FILE = resource_path(SEARCH_SPACES, "versions_as_run.yaml")
SECTIONS = ("extends", "common", "correct_mode", "profiles", "backbones")
CORRECT_MODE_KEYS = ("note", "set", "unless")
ENTRY_KEYS = ("inherits", "thesis_run", "note", "set")
RESERVED_KNOBS = {"model": "the backbone section names the model",
                  "experiment": "each version runs as <backbone>-<version>"}
# Upstream aliases of id_head that build_config derives from it: left out of the resolved knobs
# so that an override of id_head does not contradict them.
DERIVED_KNOBS = ("use_arcface", "loss_use_arcface")
# Knobs counted in a stage's epochs: an overlay or override that shortens the stage (the
# demo's 8 image epochs for the stated 30) shortens them in proportion, so that a 5-epoch
# warm-up does not take 5 of 8 epochs.
EPOCH_COUNTED = {"epochs_image": ("warmup_epochs", "step_milestones"),
                 "epochs_prompt": ("prompt_warmup_epochs",)}
FORMATS = ("table", "yaml", "json")
TABLE_WIDTH = 100


@dataclass
class ResolvedVersion:
    """One version of one backbone, ready to run as a fixed trial."""

    backbone: str
    version: str
    thesis_run: bool  # false: the thesis never ran it on this backbone (defined by analogy)
    note: str
    knobs: dict[str, Any]  # the full validated flat config, inert and derived keys left out
    delta: dict[str, tuple[Any, Any]]  # vs the previous version of the backbone: (old, new)
    stated: list[str]  # knobs the versions file sets for it; the rest are RunConfig defaults
    correct_mode: dict[str, Any] = field(default_factory=dict)  # what the correct mode adds


def load_versions(path: str | Path | None = None,
                  profile: str = "full") -> dict[str, dict[str, ResolvedVersion]]:
    """backbone -> version (file order) -> resolved version, in ``profile``."""
    path = _path(path)
    data = read_sections(path, SECTIONS)
    common = _knobs(data.get("common") or {}, f"{path} [common]")
    additions = _correct_mode(data.get("correct_mode") or [], f"{path} [correct_mode]")
    profiles = _mapping(data.get("profiles") or {}, f"{path} [profiles]")
    if profile not in profiles:
        raise ConfigError(f"{path}: profile '{profile}' is not defined{suggest(profile, profiles)}"
                          f" (valid: {', '.join(map(str, profiles)) or 'none defined'})")
    overlay = _knobs(profiles[profile], f"{path} [profile {profile}]")
    backbones = _mapping(data.get("backbones"), f"{path} [backbones]")
    # `extends: other.yaml`: each version starts from the same version of that file, resolved.
    base = load_versions(path.parent / data["extends"], profile) if data.get("extends") else {}
    return {str(backbone): _resolve_backbone(path, str(backbone), versions, common, overlay,
                                             base.get(str(backbone)), additions)
            for backbone, versions in backbones.items()}


def version_config(backbone: str, version: str, profile: str = "full",
                   overrides: dict[str, Any] | None = None,
                   path: str | Path | None = None) -> RunConfig:
    """The validated config of one version, with ``overrides`` (seed, data_dir, ...) applied last."""
    path = _path(path)
    versions = load_versions(path, profile)
    if backbone not in versions:
        raise ConfigError(f"{path}: backbone '{backbone}' is not defined"
                          f"{suggest(backbone, versions)} (defined: {', '.join(versions)})")
    if version not in versions[backbone]:
        raise ConfigError(f"{path} [{backbone}]: version '{version}' is not defined"
                          f"{suggest(version, versions[backbone])} "
                          f"(defined: {', '.join(versions[backbone])})")
    source = f"{path} [{backbone} {version}]" + (" with overrides" if overrides else "")
    knobs = {**versions[backbone][version].knobs, **(overrides or {})}
    return build_config(knobs, source).config


def format_versions(resolved: list[ResolvedVersion], fmt: str = "table") -> str:
    """``table``: per backbone, the knobs the file sets, one column per version, and the changes
    vs the previous version; ``yaml`` / ``json``: everything resolved."""
    if fmt not in FORMATS:
        raise ConfigError(f"format '{fmt}' is not valid (valid: {', '.join(FORMATS)})")
    if fmt == "table":
        backbones = dict.fromkeys(item.backbone for item in resolved)
        return "\n\n".join(_table([item for item in resolved if item.backbone == backbone])
                           for backbone in backbones)
    records: dict[str, dict[str, Any]] = {}
    for item in resolved:
        records.setdefault(item.backbone, {})[item.version] = {
            "thesis_run": item.thesis_run,
            "note": item.note,
            "delta": {key: [old, new] for key, (old, new) in item.delta.items()},
            "correct_mode_adds": item.correct_mode,
            "knobs": item.knobs,
        }
    if fmt == "json":
        return json.dumps(records, indent=2)
    return yaml.safe_dump(records, sort_keys=False, width=TABLE_WIDTH)


# ------------------------------------------------------------------------------------------
# Resolution


def _path(path: str | Path | None) -> Path:
    return VERSIONS_FILE if path is None else Path(path)


def _mapping(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _knobs(values: Any, where: str) -> dict[str, Any]:
    """A block of knobs: every key a RunConfig field that the file may set."""
    values = _mapping(values, where)
    for key in values:
        if key in RESERVED_KNOBS:
            raise ConfigError(f"{where}: key '{key}' cannot be set here: {RESERVED_KNOBS[key]}")
        if key not in FIELDS:
            raise ConfigError(f"{where}: key '{key}': unknown key{suggest(str(key), FIELDS)} "
                              f"(see `tune-clipfh config keys`)")
    return dict(values)


def _entry(entry: Any, where: str) -> dict[str, Any]:
    entry = _mapping(entry, where)
    for key in entry:
        if key not in ENTRY_KEYS:
            raise ConfigError(f"{where}: unknown entry key '{key}'{suggest(str(key), ENTRY_KEYS)}"
                              f" (valid: {', '.join(ENTRY_KEYS)})")
    thesis_run, note, inherits = entry.get("thesis_run"), entry.get("note"), entry.get("inherits")
    if not isinstance(thesis_run, bool):
        raise ConfigError(f"{where}: 'thesis_run' must be true or false, got {thesis_run!r}")
    if not isinstance(note, str) or not note.strip():
        raise ConfigError(f"{where}: 'note' must quote the change the thesis states "
                          f"(a non-empty string), got {note!r}")
    if inherits is not None and not isinstance(inherits, str):
        raise ConfigError(f"{where}: 'inherits' must name a version, got {inherits!r}")
    return {"inherits": inherits, "thesis_run": thesis_run, "note": " ".join(note.split()),
            "set": _knobs(entry.get("set") or {}, where)}


def _correct_mode(entries: Any, where: str) -> list[dict[str, Any]]:
    """``correct_mode``: knobs the correct implementation adds to every version's stated ones
    (the spec's B8 fix adds a warm-up), each entry skipped for versions matching ``unless``."""
    if not isinstance(entries, list):
        raise ConfigError(f"{where}: expected a list of {{note, set, unless}} entries")
    parsed = []
    for index, entry in enumerate(entries):
        here = f"{where} entry {index + 1}"
        entry = _mapping(entry, here)
        for key in entry:
            if key not in CORRECT_MODE_KEYS:
                raise ConfigError(f"{here}: unknown key '{key}'{suggest(str(key), CORRECT_MODE_KEYS)}"
                                  f" (valid: {', '.join(CORRECT_MODE_KEYS)})")
        if not isinstance(entry.get("note"), str):
            raise ConfigError(f"{here}: 'note' must say why the correct mode adds this")
        parsed.append({"set": _knobs(entry.get("set") or {}, here),
                       "unless": _knobs(entry.get("unless") or {}, here)})
    return parsed


def _added_knobs(additions: list[dict[str, Any]], values: dict[str, Any],
                 stated: set[str]) -> dict[str, Any]:
    """The correct-mode knobs that apply to a version: never over a knob it states itself."""
    added: dict[str, Any] = {}
    for entry in additions:
        if any(values.get(key) == value for key, value in entry["unless"].items()):
            continue
        added.update({k: v for k, v in entry["set"].items() if k not in stated})
    return added


def _resolve_backbone(path: Path, backbone: str, versions: Any, common: dict[str, Any],
                      overlay: dict[str, Any],
                      base: dict[str, ResolvedVersion] | None = None,
                      additions: list[dict[str, Any]] | None = None
                      ) -> dict[str, ResolvedVersion]:
    where = f"{path} [{backbone}]"
    if backbone not in BACKBONES:
        raise ConfigError(f"{where}: unknown backbone{suggest(backbone, BACKBONES)} "
                          f"(valid: {', '.join(BACKBONES)})")
    entries = {str(version): _entry(entry, f"{path} [{backbone} {version}]")
               for version, entry in _mapping(versions, where).items()}
    resolved: dict[str, ResolvedVersion] = {}
    previous: dict[str, Any] | None = None
    for version, entry in entries.items():
        start = {}
        if base is not None:
            if version not in base:
                raise ConfigError(f"{path} [{backbone} {version}]: not defined in the extended "
                                  f"file (defined: {', '.join(base)})")
            start = base[version].knobs
        values = {**start, "model": backbone, "experiment": f"{backbone}-{version}", **common}
        stated = set(common) | set(overlay) | set(base[version].stated if base else ())
        for ancestor in _lineage(path, backbone, entries, version):
            values.update(entries[ancestor]["set"])
            stated |= set(entries[ancestor]["set"])
        added = _added_knobs(additions or [], values, stated - set(common))
        values.update(added)
        values.update({**scaled_to_overlay(values, overlay), **overlay})
        config = build_config(values, f"{path} [{backbone} {version}]").config
        knobs = {key: value for key, value in config.to_dict().items()
                 if key not in IGNORED_UPSTREAM_KEYS and key not in DERIVED_KNOBS}
        delta = {} if previous is None else {
            key: (previous[key], value) for key, value in knobs.items()
            if key != "experiment" and previous[key] != value}
        if base is not None and not added:  # an extending file keeps what its base added
            added = {k: knobs[k] for k in base[version].correct_mode if k not in stated}
        resolved[version] = ResolvedVersion(backbone, version, entry["thesis_run"], entry["note"],
                                            knobs, delta, [key for key in FIELDS if key in stated],
                                            {k: knobs[k] for k in added})
        previous = knobs
    return resolved


def scaled_to_overlay(values: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """The epoch-counted knobs of ``values`` (EPOCH_COUNTED) rescaled to the stage lengths the
    overlay sets; knobs the overlay sets itself are left to it."""
    defaults = RunConfig()
    scaled: dict[str, Any] = {}
    for stage_epochs, knobs in EPOCH_COUNTED.items():
        if stage_epochs not in overlay:
            continue
        ratio = overlay[stage_epochs] / values.get(stage_epochs, getattr(defaults, stage_epochs))
        for knob in knobs:
            value = values.get(knob, getattr(defaults, knob))
            in_effect = knob != "step_milestones" or values.get("scheduler") == "step"
            if knob in overlay or not value or not in_effect:
                continue
            if isinstance(value, list):  # milestones: whole epochs, increasing, >= 1
                scaled[knob] = sorted({max(1, round(v * ratio)) for v in value})
            else:
                scaled[knob] = round(value * ratio, 3)
    return scaled


def _lineage(path: Path, backbone: str, entries: dict[str, dict[str, Any]],
             version: str) -> list[str]:
    """The version and its ancestors, root first."""
    chain = [version]
    while (parent := entries[chain[-1]]["inherits"]) is not None:
        if parent not in entries:
            raise ConfigError(f"{path} [{backbone} {chain[-1]}]: inherits '{parent}', which is "
                              f"not defined{suggest(parent, entries)} "
                              f"(defined: {', '.join(entries)})")
        if parent in chain:
            cycle = " -> ".join([*chain[chain.index(parent):], parent])
            raise ConfigError(f"{path} [{backbone} {parent}]: inheritance cycle {cycle}")
        chain.append(parent)
    return chain[::-1]


# ------------------------------------------------------------------------------------------
# Table


def _cell(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return f"[{len(value)} items]"
    if isinstance(value, str) and len(value.split()) > 1:
        return repr(value)
    return str(value)


def _table(items: list[ResolvedVersion]) -> str:
    """Rows: the stated knobs that differ between the versions shown (all of them for one
    version); the ones they share follow on one wrapped line."""
    stated = [key for key in FIELDS if any(key in item.stated for item in items)]
    varying = [key for key in stated
               if len(items) == 1 or len({repr(item.knobs[key]) for item in items}) > 1]
    shared = [key for key in stated if key not in varying]
    header = ["knob", *(item.version for item in items)]
    rows = [["thesis_run", *(_cell(item.thesis_run) for item in items)],
            *([key, *(_cell(item.knobs[key]) for item in items)] for key in varying)]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]
    lines = [f"{items[0].backbone}: {len(items)} version(s), profile {items[0].knobs['profile']}"]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip() for row in [header, *rows]]
    if shared:
        lines.append(textwrap.fill(
            "same in every version: " + ", ".join(f"{key} {_cell(items[0].knobs[key])}"
                                                  for key in shared),
            width=TABLE_WIDTH, subsequent_indent="  "))
    if any(item.correct_mode for item in items):
        lines.append("the correct mode adds (spec B8 fix; not stated by the thesis):")
        name_width = max(len(item.version) for item in items)
        for item in items:
            added = "; ".join(f"{key} {_cell(value)}" for key, value in item.correct_mode.items())
            lines.append(f"  {item.version.ljust(name_width)}  {added or '-'}")
    lines.append("changes vs previous:")
    name_width = max(len(item.version) for item in items)
    for item in items:
        changes = "; ".join(f"{key} {_cell(old)} -> {_cell(new)}"
                            for key, (old, new) in item.delta.items()) or "-"
        lines.append(textwrap.fill(changes, width=TABLE_WIDTH,
                                   initial_indent=f"  {item.version.ljust(name_width)}  ",
                                   subsequent_indent=" " * (name_width + 4)))
    return "\n".join(lines)
