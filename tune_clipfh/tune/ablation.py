"""Path ablation: from a thesis version toward another configuration, one knob group at a time,
to find which knobs make the gap between the two (``tune-clipfh ablate --toward FILE``).

The start is the version's knobs as ``reproduce`` runs them, the end a run config file; the
run's ``--set`` overrides apply to both, and both are written out in full (defaults explicit).
Knobs that change together are grouped in data (``search_spaces/knob_groups.yaml``). A forward
step is the start with one group taken from the end; a backward step is the end with one group
put back as the start has it. :func:`ablation_table` reads such an experiment back: per step,
test Rank-1 over seeds against the start's, judged by the report's seed-noise rule
(:func:`..report.claims.compare`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..config import FIELDS, IGNORED_UPSTREAM_KEYS, ConfigError, build_config, read_yaml, suggest
from ..errors import UserError
from ..report.claims import Side, compare
from ..resources import SEARCH_SPACES, config_file, resource_path
from ._yaml import read_sections
from .experiment import ExperimentOptions, fixed_trials, run_fixed_trials
from .results import experiment_meta, load_results
from .trainable import META_KEYS
from .versions import scaled_to_overlay

# Shipped in the package (search_spaces/ in a checkout links there).
KNOB_GROUPS_FILE = resource_path(SEARCH_SPACES, "knob_groups.yaml")
GROUP_KEYS = ("knobs", "why")
RUN_KNOBS = ("experiment", "seed", "output_dir", "data_dir", "cache_dir", "device", "variant")
"""Knobs that describe the run rather than train it: never ablated; every trial has the
start's."""
DIRECTIONS = ("both", "forward", "backward")
DEFAULT_DIRECTION = DIRECTIONS[0]
TABLE_COLUMNS = ["label", "step", "changes", "seeds", "rank1", "rank1_std", "mAP", "delta",
                 "noise", "verdict"]


@dataclass(frozen=True)
class KnobGroup:
    name: str
    knobs: tuple[str, ...]
    why: str


def load_knob_groups(path: str | Path | None = None) -> list[KnobGroup]:
    """The knob groups of ``path`` (default: the shipped knob_groups.yaml), in file order; a bad
    entry is a one-line error naming the file, the group and the key."""
    path = KNOB_GROUPS_FILE if path is None else Path(path)
    groups = read_sections(path, ("groups",)).get("groups")
    if not isinstance(groups, dict) or not groups:
        raise ConfigError(f"{path}: 'groups' must map each group's name to its knobs and why")
    owner: dict[str, str] = {}
    parsed = []
    for name, entry in groups.items():
        where = f"{path}: group '{name}'"
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"{where}: not a valid name (letters, digits and _, not starting "
                              f"with a digit)")
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with 'knobs' and 'why'")
        for key in entry:
            if key not in GROUP_KEYS:
                raise ConfigError(f"{where}: unknown key '{key}'{suggest(str(key), GROUP_KEYS)}"
                                  f" (valid: {', '.join(GROUP_KEYS)})")
        knobs, why = entry.get("knobs"), entry.get("why")
        if not isinstance(knobs, list) or not knobs:
            raise ConfigError(f"{where}: 'knobs' must be a non-empty list of configuration keys")
        if not isinstance(why, str) or not why.strip():
            raise ConfigError(f"{where}: 'why' must say in one line what couples its knobs")
        for knob in knobs:
            if not isinstance(knob, str) or knob not in FIELDS:
                raise ConfigError(f"{where}: knob '{knob}': not a configuration key"
                                  f"{suggest(str(knob), FIELDS)}")
            if knob in RUN_KNOBS:
                raise ConfigError(f"{where}: knob '{knob}' describes the run and is never "
                                  f"ablated")
            if knob in owner:
                raise ConfigError(f"{where}: knob '{knob}' is already in group '{owner[knob]}'")
            owner[knob] = name
        parsed.append(KnobGroup(name, tuple(knobs), " ".join(why.split())))
    return parsed


def toward_file(toward: str | Path) -> Path:
    """``--toward``: a config file, or a shipped config by name (``tiny_synthetic``)."""
    path = config_file(toward)
    if not path.is_file():
        raise UserError(f"--toward {toward}: file not found")
    return path


def _every_knob(values: dict[str, Any], source: str) -> dict[str, Any]:
    """The validated knobs, defaults included; the upstream keys that train nothing left out
    (a difference in them would be a step that changes nothing)."""
    config = build_config(values, source).config.to_dict()
    return {key: value for key, value in config.items() if key not in IGNORED_UPSTREAM_KEYS}


def start_knobs(backbone: str, version: str, profile: str,
                overrides: dict[str, Any]) -> dict[str, Any]:
    """The version's knobs as ``reproduce`` runs it in ``profile``, with the overrides."""
    trial = fixed_trials([backbone], [version], profile, overrides)[0]
    return _every_knob({k: v for k, v in trial.items() if k not in META_KEYS},
                       f"{backbone} {version}")


def end_knobs(path: Path, start: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The config file's knobs with the run's overrides applied as to the start (a shorter
    stage shortens its warm-ups); its model and profile must be the start's."""
    values = read_yaml(path)
    knobs = _every_knob({**values, **scaled_to_overlay(values, overrides), **overrides},
                        f"{path} (with --set)" if overrides else str(path))
    for key, option in (("model", "--backbone"), ("profile", "--profile")):
        if knobs[key] != start[key]:
            raise UserError(f"{path}: key '{key}': {knobs[key]} is not the ablated {key} "
                            f"{start[key]} ({option}): a path joins two configurations of one "
                            f"{key}")
    return knobs


def path_steps(start: dict[str, Any], end: dict[str, Any],
               groups: list[KnobGroup]) -> list[KnobGroup]:
    """The groups in which a knob differs (file order), then each differing knob of no group
    as a group of its own (schema order)."""
    differing = [key for key in start if key not in RUN_KNOBS and start[key] != end[key]]
    grouped = {knob for group in groups for knob in group.knobs}
    steps = [group for group in groups if any(knob in differing for knob in group.knobs)]
    steps += [KnobGroup(key, (key,), "in no group") for key in differing if key not in grouped]
    return steps


def path_ablation_trials(backbone: str, version: str, toward: str | Path, profile: str = "tiny",
                         overrides: dict[str, Any] | None = None,
                         direction: str = DEFAULT_DIRECTION,
                         groups_file: str | Path | None = None) -> list[dict[str, Any]]:
    """Fixed trials: the start (labelled ``version``), the end (the file's stem), then per
    differing group, forward ``<version>+<group>`` and/or backward ``<stem>-<group>``."""
    if direction not in DIRECTIONS:
        raise ConfigError(f"--direction: {direction!r} is not valid (valid: "
                          f"{', '.join(DIRECTIONS)})")
    overrides = overrides or {}
    path = toward_file(toward)
    end_label = path.stem
    if end_label == version:
        raise UserError(f"--toward {path}: its name is the version's ({version}); rename it, "
                        f"the end's trials are labelled by it")
    start = start_knobs(backbone, version, profile, overrides)
    end = {**end_knobs(path, start, overrides), **{key: start[key] for key in RUN_KNOBS}}
    steps = path_steps(start, end, load_knob_groups(groups_file))
    trials = [_trial(backbone, version, start), _trial(backbone, end_label, end)]
    if direction in ("both", "forward"):
        trials += [_trial(backbone, f"{version}+{group.name}",
                          {**start, **{knob: end[knob] for knob in group.knobs}})
                   for group in steps]
    if direction in ("both", "backward"):
        trials += [_trial(backbone, f"{end_label}-{group.name}",
                          {**end, **{knob: start[knob] for knob in group.knobs}})
                   for group in steps]
    return trials


def _trial(backbone: str, label: str, knobs: dict[str, Any]) -> dict[str, Any]:
    knobs = {**knobs, "experiment": f"{backbone}-{label}"}
    # a step the schema refuses means a coupling knob_groups.yaml lacks: fail before Ray starts
    build_config(knobs, f"path ablation {label}")
    return {"version": label, "backbone": backbone, "kind": "fixed", "behaviour": "correct",
            "thesis_run": False, **knobs}


def ablate_toward(backbone: str, version: str, toward: str | Path, options: ExperimentOptions,
                  direction: str = DEFAULT_DIRECTION) -> Path:
    """One Tune experiment of the path's trials x seeds; returns its folder."""
    path = toward_file(toward)
    trials = path_ablation_trials(backbone, version, path, options.profile, options.overrides,
                                  direction)
    return run_fixed_trials(trials, options, f"ablation-path-{backbone}-{version}",
                            {"backbones": [backbone], "versions": [version], "ablation": "path",
                             "toward": str(path), "direction": direction})


# ------------------------------------------------------------------------------------------
# Reading a path ablation back


def ablation_table(frame: pd.DataFrame, start_label: str) -> pd.DataFrame:
    """One row per label with test results (``TABLE_COLUMNS``): the start, the forward steps,
    the end, the backward steps. Test Rank-1 and mAP are means over seeds in percent; Rank-1's
    seed std is the sample std (NaN with one seed); delta, noise and verdict compare each row
    with the start as the report's claims do.

    Labels say what each trial is: ``<start>+<group>`` forward; the end is the shortest other
    label and ``<end>-<group>`` a backward step (another label is listed last, as it is)."""
    tested = frame[frame["test_rank1"].notna()] if "test_rank1" in frame else frame.iloc[:0]
    sides = {} if tested.empty else {
        label: _side(str(label), group)
        for label, group in tested.groupby("config/version", sort=False)}
    if start_label not in sides:
        raise UserError(f"the start {start_label} has no trial with test results: no step can "
                        f"be compared with it")
    forward = [label for label in sides if label.startswith(f"{start_label}+")]
    rest = [label for label in sides if label != start_label and label not in forward]
    end = min(rest, key=len) if rest else None
    backward = [label for label in rest if end and label.startswith(f"{end}-")]
    other = [label for label in rest if label != end and label not in backward]
    rows = [_row(sides, start_label, start_label, "start", "")]
    rows += [_row(sides, label, start_label, "forward", label[len(start_label) + 1:])
             for label in forward]
    if end is not None:
        rows.append(_row(sides, end, start_label, "end", "every group" if forward or backward
                         else "none"))
    rows += [_row(sides, label, start_label, "backward", label[len(end) + 1:])
             for label in backward]
    rows += [_row(sides, label, start_label, "", "") for label in other]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _side(label: str, trials: pd.DataFrame) -> tuple[Side, float]:
    """A label's test Rank-1 over seeds (percent) as one side of a claim, and its mAP."""
    rank1 = 100 * trials["test_rank1"].astype(float)
    return (Side(label, rank1.mean(), rank1.std(ddof=1), len(trials)),
            100 * float(trials["test_mAP"].astype(float).mean()))


def _row(sides: dict[str, tuple[Side, float]], label: str, start_label: str, step: str,
         changes: str) -> dict[str, Any]:
    side, mean_map = sides[label]
    row = {"label": label, "step": step, "changes": changes, "seeds": side.seeds,
           "rank1": side.value, "rank1_std": side.std, "mAP": mean_map,
           "delta": math.nan, "noise": math.nan, "verdict": ""}
    if label != start_label:
        claim = compare("path ablation step", side, sides[start_label][0], label, start_label)
        row.update({key: claim[key] for key in ("delta", "noise", "verdict")})
    return row


def format_ablation_table(table: pd.DataFrame, start_label: str) -> str:
    """The table as markdown, percent with one decimal, and a line saying how to read it."""
    header = ["step", "label", "changes", "seeds", "test Rank-1 %", "seed std", "test mAP %",
              f"delta vs {start_label}", "noise", "verdict"]
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * 6 + ["---"]) + "|"]
    for row in table.to_dict("records"):
        cells = [row["step"], row["label"], row["changes"], str(row["seeds"]),
                 _number(row["rank1"]), _number(row["rank1_std"]), _number(row["mAP"]),
                 _number(row["delta"], "+.1f"), _number(row["noise"]), row["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"Means over seeds of each trial's test metrics (the mean over the test "
                 f"splits); delta = Rank-1 - {start_label}'s, noise = sqrt(std² + "
                 f"{start_label}'s std²): beyond the seed noise when |delta| > noise.")
    return "\n".join(lines)


def _number(value: float, spec: str = ".1f") -> str:
    return "" if math.isnan(value) else format(value, spec)


def ablation_summary(path: str | Path) -> str:
    """The table of an existing path ablation (``ablate --summary``), as markdown."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"--summary {path}: folder does not exist")
    meta = experiment_meta(folder)
    if meta.get("ablation") != "path":
        raise UserError(f"--summary {path}: not a path ablation (an experiment of "
                        f"`tune-clipfh ablate --toward`)")
    start_label = meta["versions"][0]
    return format_ablation_table(ablation_table(load_results(folder), start_label), start_label)
