"""Loading and validating a training run's configuration: YAML and ``--set`` overrides in, a
checked :class:`RunConfig` out (the schema itself is :mod:`.schema`).

Values are checked against each knob's type and bounds, upstream spellings are translated,
ignored upstream keys are noted, and the rules that tie knobs together are checked
(``_check_consistency``). User errors raise :class:`ConfigError` with one line naming the file,
the key and what is valid. The schema's names are re-exported here, where most modules import
them from.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from .errors import UserError
from .names import CTX_PLACEHOLDER
from .schema import (
    AS_RUN_SWITCHES,
    BACKBONES,
    FAULT_PATTERN,
    FIELDS,
    GROUP_KNOBS,
    IGNORED_UPSTREAM_KEYS,
    KNOB_TYPES,
    NOT_TRAINING_KNOBS,
    PRETRAINED_GROUPS,
    RATE_GROUPS,
    UPSTREAM_RENAMED_KEYS,
    RunConfig,
    knob,
    training_knobs,
)

__all__ = ["AS_RUN_SWITCHES", "BACKBONES", "FAULT_PATTERN", "FIELDS", "GROUP_KNOBS",
           "IGNORED_UPSTREAM_KEYS", "KNOB_TYPES", "NOT_TRAINING_KNOBS", "PRETRAINED_GROUPS",
           "RATE_GROUPS", "UPSTREAM_RENAMED_KEYS", "ConfigError", "LoadedConfig", "RunConfig", "build_config",
           "UPSTREAM_IDENTITY_PLACEHOLDER", "describe_keys", "knob", "load_config",
           "parse_overrides", "read_yaml", "suggest", "training_knobs"]

UPSTREAM_IDENTITY_PLACEHOLDER = "{}"


class ConfigError(UserError):
    """A user error in a configuration: one line, naming the source, the key and what is valid."""


@dataclass
class LoadedConfig:
    config: RunConfig
    notes: list[str]  # ignored upstream keys and translations, one human line each


def _where(source: str, key: str) -> str:
    return f"{source}: key '{key}'"


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    return tp.__name__


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check (and gently coerce) a YAML value against a schema type."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not valid (valid: "
                              f"{', '.join(str(a) for a in allowed)})")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, get_args(tp)[0], where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise TypeError(f"unsupported schema type {tp!r}")  # a bug in the schema, not user input


def _check_bounds(name: str, value: Any, where: str) -> None:
    meta = FIELDS[name].metadata
    values = value if isinstance(value, list) else [value]
    for v in values:
        if v is None or isinstance(v, (bool, str)):
            continue
        low, high = meta["low"], meta["high"]
        too_low = low is not None and (v <= low if meta["low_open"] else v < low)
        too_high = high is not None and (v >= high if meta["high_open"] else v > high)
        if too_low or too_high:
            left = "(" if meta["low_open"] else "["
            right = ")" if meta["high_open"] else "]"
            raise ConfigError(f"{where}: {v!r} is out of range (valid: {left}"
                              f"{_fmt(low)}, {_fmt(high)}{right})")


def _fmt(x: float | None) -> str:
    if x is None:
        return "inf"
    if isinstance(x, float) and abs(x - math.pi / 2) < 1e-12:
        return "pi/2"
    return f"{x:g}"


def suggest(key: str, valid: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _translate_upstream(values: dict[str, Any], source: str, notes: list[str]) -> None:
    """Map upstream spellings onto ours, recording what was translated or ignored.

    Upstream spelt the identity context two ways: ``{}`` in ``prompt_template`` (never
    formatted, so tokenized literally: B3) and a run of ``X`` words in its template list
    (``"A photo of a X X X X hand."``: CoOp / CLIP-ReID's spelling, the one B3's correct
    implementation uses). Both become ``{ctx}``, which always stands for ``n_ctx`` tokens.
    """
    _other_scripts_keys(values, source, notes)
    x_run = re.compile(r"(?<!\S)X(?: X)*(?!\S)")  # standalone X words: "X", "X X X X"

    def placeholder(template: Any, spelt: set[str]) -> Any:
        if not isinstance(template, str) or CTX_PLACEHOLDER in template:
            return template
        if template.count(UPSTREAM_IDENTITY_PLACEHOLDER) == 1:
            spelt.add(repr(UPSTREAM_IDENTITY_PLACEHOLDER))
            return template.replace(UPSTREAM_IDENTITY_PLACEHOLDER, CTX_PLACEHOLDER)
        if UPSTREAM_IDENTITY_PLACEHOLDER not in template and len(x_run.findall(template)) == 1:
            spelt.add(repr(x_run.search(template).group()))
            return x_run.sub(lambda _: CTX_PLACEHOLDER, template)
        return template

    def read_as_ctx(key: str, spelt: set[str]) -> None:
        if spelt:
            notes.append(f"{source}: '{key}': upstream's {' and '.join(sorted(spelt))} read as "
                         f"the identity context placeholder {CTX_PLACEHOLDER}, n_ctx learnable "
                         f"tokens (upstream tokenized its placeholders literally: B3)")

    if "prompt_template" in values:
        spelt: set[str] = set()
        values["prompt_template"] = placeholder(values["prompt_template"], spelt)
        read_as_ctx("prompt_template", spelt)
    templates = values.get("prompt_template_list")
    if isinstance(templates, list):
        spelt = set()
        values["prompt_template_list"] = [placeholder(t, spelt) for t in templates]
        read_as_ctx("prompt_template_list", spelt)
        if spelt:
            notes.append(f"{source}: 'prompt_template_list': upstream's list had no effect in "
                         f"any run (only the base template was used: spec 2.2); here each "
                         f"template's features are averaged with prompt_template's (set "
                         f"prompt_template_list: null to match upstream)")
    ctx_init, n_ctx = values.get("ctx_init"), values.get("n_ctx", FIELDS["n_ctx"].default)
    if isinstance(ctx_init, str) and isinstance(n_ctx, int) and len(ctx_init.split()) != n_ctx:
        notes.append(f"{source}: 'ctx_init' {ctx_init!r} accepted and ignored: upstream never "
                     f"used it (spec 2.2), and its {len(ctx_init.split())} word(s) cannot "
                     f"initialise n_ctx {n_ctx} context tokens, so the context starts random")
        values["ctx_init"] = None


def _other_scripts_keys(values: dict[str, Any], source: str, notes: list[str]) -> None:
    """Note every ignored upstream key with its reason, dropping those that are no knob of
    ours (keys of upstream's eval and archived scripts), and move renamed keys onto their knob."""
    for key, reason in IGNORED_UPSTREAM_KEYS.items():
        if key in values:
            notes.append(f"{source}: '{key}' accepted and ignored: {reason}")
            if key not in FIELDS:
                del values[key]
    for key, (knob_name, meaning) in UPSTREAM_RENAMED_KEYS.items():
        if key not in values:
            continue
        value = values.pop(key)
        if knob_name in values and values[knob_name] != value:
            raise ConfigError(f"{_where(source, key)}: {value!r} contradicts '{knob_name}': "
                              f"{values[knob_name]!r}, which it stands for (set only one)")
        values[knob_name] = value
        notes.append(f"{source}: '{key}' read as '{knob_name}': {meaning}")


def build_config(values: dict[str, Any], source: str = "<config>") -> LoadedConfig:
    """Validate a flat mapping of knobs into a RunConfig (unknown keys, types, ranges, logic)."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: expected a mapping of key: value at the top level, "
                          f"got {type(values).__name__}")
    values = dict(values)
    notes: list[str] = []
    for key in values:
        known = key in FIELDS or key in IGNORED_UPSTREAM_KEYS or key in UPSTREAM_RENAMED_KEYS
        if not isinstance(key, str) or not known:
            raise ConfigError(f"{_where(source, str(key))}: unknown key{suggest(str(key), FIELDS)}"
                              f" (see `tune-clipfh config keys`)")
    _translate_upstream(values, source, notes)
    checked = {}
    for key, value in values.items():
        where = _where(source, key)
        checked[key] = _coerce(value, KNOB_TYPES[key], where)
        _check_bounds(key, checked[key], where)
    config = RunConfig(**checked)
    _resolve_aliases(config, source, notes)
    _check_consistency(config, source, values)
    return LoadedConfig(config, notes)


def _resolve_aliases(config: RunConfig, source: str, notes: list[str]) -> None:
    aliases = {k: getattr(config, k) for k in ("use_arcface", "loss_use_arcface")
               if getattr(config, k) is not None}
    wanted = {v for v in aliases.values()}
    if len(wanted) > 1:
        raise ConfigError(f"{source}: key 'loss_use_arcface': {aliases['loss_use_arcface']} "
                          f"contradicts 'use_arcface': {aliases['use_arcface']} "
                          f"(set both alike, or set id_head)")
    if wanted:
        implied = "arcface" if wanted.pop() else "linear"
        if config.id_head is not None and config.id_head != implied:
            raise ConfigError(f"{source}: key 'id_head': {config.id_head!r} contradicts "
                              f"{'/'.join(aliases)} (which select {implied!r})")
        if config.id_head is None:
            notes.append(f"{source}: {'/'.join(aliases)} -> id_head: {implied} "
                         f"(the ArcFace head is trained and in the ID loss: B4, B5)")
        config.id_head = implied
    if config.id_head is None:
        config.id_head = "linear"
    config.use_arcface = config.loss_use_arcface = config.id_head == "arcface"


def _check_consistency(c: RunConfig, source: str, given: dict[str, Any]) -> None:
    def fail(key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{_where(source, key)}: {message}")

    if c.unfreeze_blocks > c.blocks:
        fail("unfreeze_blocks", f"{c.unfreeze_blocks} is out of range for model {c.model}, "
             f"whose image tower has {c.blocks} blocks (valid: 0..{c.blocks})")
    if c.sampler == "pk" and c.batch_size % c.pk_k:
        fail("pk_k", f"P x K sampling needs batch_size divisible by pk_k "
             f"(batch_size {c.batch_size}, pk_k {c.pk_k})")
    if c.sampler == "pk" and c.pk_p < 2:
        fail("pk_k", f"P x K sampling needs at least 2 identities per batch "
             f"(batch_size {c.batch_size} / pk_k {c.pk_k} = {c.pk_p})")
    runs_prompt = c.stage_mode in ("prompt_then_image", "prompt_only")
    runs_image = c.stage_mode in ("prompt_then_image", "image_only")
    if runs_prompt and c.epochs_prompt == 0:
        fail("epochs_prompt", f"stage_mode {c.stage_mode} runs the prompt stage, which needs "
             f"epochs_prompt >= 1")
    if runs_image and c.epochs_image == 0:
        fail("epochs_image", f"stage_mode {c.stage_mode} runs the image stage, which needs "
             f"epochs_image >= 1")
    # The table's functions need torch; `config keys` and the CLI's parser stay torch-free.
    from .loss_table import active_terms, stage_terms

    for stage, runs, hint in (("prompt", runs_prompt, "or use stage_mode: image_only"),
                              ("image", runs_image, "")):
        if runs and not active_terms(c, stage):
            toggles = list(dict.fromkeys(term.toggle for term in stage_terms(stage)))
            fail(toggles[0], f"every {stage}-stage loss is off ({', '.join(toggles)}): turn at "
                 f"least one on{' ' + hint if hint else ''}")
    if c.template_error():
        fail("prompt_template", c.template_error())
    for template in c.prompt_template_list or []:
        if template.count(CTX_PLACEHOLDER) != 1:
            fail("prompt_template_list", f"{template!r} must contain {CTX_PLACEHOLDER} once")
    # each profile has its own named weights; a file path works in both
    named = {"full": "openai", "tiny": "synthetic"}
    for profile, name in named.items():
        if c.profile != profile and c.resolved_pretrained == name:
            fail("pretrained", f"{name} weights exist only for the {profile} profile (valid in "
                 f"the {c.profile} profile: {named[c.profile]}, none or a weights file path)")
    if c.schedule_mode != "per_stage" and not c.shared_optimizer_across_stages:
        fail("schedule_mode", f"{c.schedule_mode} replays upstream schedulers on one shared "
             f"optimizer: set shared_optimizer_across_stages: true (or schedule_mode: per_stage)")
    if c.fault_injection is not None and not FAULT_PATTERN.fullmatch(c.fault_injection):
        fail("fault_injection", f"{c.fault_injection!r} is not valid (valid: nan@STAGE:EPOCH "
             f"or raise@STAGE:EPOCH, STAGE prompt or image, e.g. nan@image:2)")
    if c.scheduler == "step" and sorted(c.step_milestones) != c.step_milestones:
        fail("step_milestones", f"{c.step_milestones} must be increasing")


def parse_overrides(pairs: typing.Sequence[str], source: str = "--set") -> dict[str, Any]:
    """``key=value`` strings -> mapping, values parsed as YAML scalars (``lr=1e-5``, ``x=null``)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{source}: {pair!r} is not of the form key=value")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            out[key] = raw
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Safe-load a YAML mapping; malformed YAML names the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{line}: malformed YAML: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level, "
                          f"got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = (),
                extra: dict[str, Any] | None = None) -> LoadedConfig:
    """YAML file (optional) + ``extra`` mapping + ``--set`` overrides -> validated config."""
    values = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    # upstream ships empty files (0 bytes, one newline): valid YAML meaning "all defaults"
    empty = [f"{path}: holds no keys; every knob takes its default"] \
        if path is not None and not values else []
    values.update(extra or {})
    override_values = parse_overrides(overrides)
    for key in override_values:
        if key not in FIELDS:
            raise ConfigError(f"--set: key '{key}': unknown key{suggest(key, FIELDS)}")
    values.update(override_values)
    if override_values:
        source = f"{source} (with --set)"
    loaded = build_config(values, source)
    loaded.notes[:0] = empty
    return loaded


def describe_keys() -> str:
    """One line per knob: name, type, default, help (for `tune-clipfh config keys`)."""
    lines = []
    for f in fields(RunConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"{f.name:24s} {_type_name(KNOB_TYPES[f.name]):40s} "
                     f"default {default!r:28s} {f.metadata['help']}")
    return "\n".join(lines)
