"""Search spaces as data: a YAML file -> validated parameters -> an Optuna define-by-run function.

A parameter may carry ``when: {earlier_param: value | [values]}``; it is sampled only when the
condition holds (ArcFace scale/margin only with the ArcFace head, ...), otherwise the knob keeps
its base value. Profile and backbone overlays replace whole parameter definitions; a knob an
overlay's ``base`` sets is fixed there: it is no longer searched (as is a knob a search's
``--set`` fixes, :meth:`SearchSpace.fixing`). A categorical parameter's ``choices`` may map
names to values (a template list is not an Optuna choice; its name is).

A configuration (a version, a shipped config) *lies inside* the space when the space can train
it exactly: its values of the active parameters are in their ranges and every other knob it
trains with is the base's (:meth:`SearchSpace.outside` names the knobs where it is not). Only
such configurations' measured results may warm-start a study; a version outside is still run
first as its projection (its values of the searched knobs, the base elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna

from ..config import FIELDS, ConfigError, build_config, suggest, training_knobs
from ..resources import SEARCH_SPACES, resource_path
from ._yaml import read_sections

# Shipped in the package (search_spaces/ in a checkout links there).
SEARCH_SPACES_DIR = resource_path(SEARCH_SPACES)
DEFAULT_SPACE = SEARCH_SPACES_DIR / "beyond_v10.yaml"
PARAM_TYPES = ("float", "int", "categorical")
SECTIONS = ("base", "parameters", "profiles", "backbones")


@dataclass
class Parameter:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    choices: list[Any] = field(default_factory=list)
    """The values a categorical takes (as Optuna sees them: the names, when ``named``)."""
    named: dict[str, Any] | None = None
    """A categorical's name -> knob value, when its choices are given as a mapping."""
    when: dict[str, list[Any]] = field(default_factory=dict)

    def knob_value(self, sampled: Any) -> Any:
        return self.named[sampled] if self.named is not None else sampled

    def sampled_value(self, knob_value: Any) -> Any:
        """The choice (name) whose knob value this is; the value itself when not named."""
        if self.named is None:
            return knob_value
        return next((name for name, value in self.named.items() if value == knob_value),
                    _NOT_A_CHOICE)

    def distribution(self) -> optuna.distributions.BaseDistribution:
        if self.type == "float":
            return optuna.distributions.FloatDistribution(self.low, self.high, log=self.log)
        if self.type == "int":
            return optuna.distributions.IntDistribution(int(self.low), int(self.high),
                                                        log=self.log, step=self.step or 1)
        return optuna.distributions.CategoricalDistribution(self.choices)

    def contains(self, value: Any) -> bool:
        if self.type == "categorical":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.low <= value <= self.high


@dataclass
class SearchSpace:
    source: str
    base: dict[str, Any]
    parameters: list[Parameter]

    def active(self, values: dict[str, Any]) -> list[Parameter]:
        """The parameters whose conditions hold for ``values`` (in file order)."""
        return [p for p in self.parameters
                if all(values.get(name) in allowed for name, allowed in p.when.items())]

    def sample(self, trial: optuna.Trial) -> dict[str, Any]:
        """Define-by-run: every value comes from ``trial.suggest_*`` (so seeded points apply);
        returns the knob values of named choices, which the trial's config takes."""
        chosen: dict[str, Any] = {}
        for param in self.parameters:
            if not all(chosen.get(name) in allowed for name, allowed in param.when.items()):
                continue
            if param.type == "float":
                chosen[param.name] = trial.suggest_float(param.name, param.low, param.high,
                                                         log=param.log)
            elif param.type == "int":
                chosen[param.name] = trial.suggest_int(param.name, int(param.low),
                                                       int(param.high), step=param.step or 1,
                                                       log=param.log)
            else:
                chosen[param.name] = trial.suggest_categorical(param.name, param.choices)
        return {p.name: p.knob_value(chosen[p.name]) for p in self.parameters
                if p.named is not None and p.name in chosen}

    def knobs(self, point: dict[str, Any]) -> dict[str, Any]:
        """The knobs a point trains with: the base, then the point's knob values."""
        by_name = {p.name: p for p in self.parameters}
        return {**self.base, **{name: by_name[name].knob_value(value)
                                for name, value in point.items()}}

    def point_from_knobs(self, knobs: dict[str, Any]) -> dict[str, Any] | None:
        """The searched values of a configuration (its projection onto the space), or None when
        one is out of its range or the knobs are not a valid configuration."""
        point, _, out_of_range = self._project(knobs)
        return None if out_of_range else point

    def _project(self, knobs: dict[str, Any]) -> tuple[dict[str, Any], dict | None, list[str]]:
        """(projection, the configuration's training knobs, the parameters out of range)."""
        try:
            config = build_config(knobs, "configuration").config
        except ConfigError as exc:
            return {}, None, [f"(not a valid configuration: {exc})"]
        effective = training_knobs(config)
        point: dict[str, Any] = {}
        out_of_range = []
        for param in self.parameters:
            if not all(point.get(name) in allowed for name, allowed in param.when.items()):
                continue
            value = effective[param.name] if param.name in effective else \
                getattr(config, param.name)
            if param.type == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            point[param.name] = param.sampled_value(value)
            if not param.contains(point[param.name]):
                out_of_range.append(param.name)
        return point, effective, out_of_range

    def outside(self, knobs: dict[str, Any]) -> list[str]:
        """The knobs where a configuration trains otherwise than its projection does (empty:
        it lies inside the space); a value out of its range counts as such a knob."""
        point, given, out_of_range = self._project(knobs)
        if out_of_range:
            return out_of_range
        here = {k: knobs[k] for k in ("model", "profile", "pretrained") if k in knobs}
        projected = training_knobs(build_config({**self.knobs(point), **here}, "point").config)
        inactive = {p.name for p in self.parameters} - set(point)
        return sorted(name for name in given if name not in inactive
                      and not _same(given[name], projected[name]))

    def fixing(self, knobs: dict[str, Any]) -> SearchSpace:
        """This space with ``knobs`` fixed (as ``--set`` fixes them in every trial): they join
        the base and are no longer searched; a parameter conditioned on one of them is kept
        (unconditioned) when the fixed value meets its condition, dropped otherwise."""
        kept = []
        for param in self.parameters:
            if param.name in knobs:
                continue
            when = {}
            for name, allowed in param.when.items():
                if name not in knobs:
                    when[name] = allowed
                elif knobs[name] not in [by.knob_value(a) for by in self.parameters
                                         if by.name == name for a in allowed]:
                    break
            else:
                kept.append(replace(param, when=when))
        kept_names = {p.name for p in kept}
        kept = [p for p in kept if all(name in kept_names for name in p.when)]
        return SearchSpace(self.source, {**self.base, **knobs}, kept)


_NOT_A_CHOICE = object()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _parse_parameter(name: str, spec: Any, source: str,
                     earlier: dict[str, Parameter]) -> Parameter:
    where = f"{source}: parameter '{name}'"
    if name not in FIELDS:
        raise ConfigError(f"{where}: not a configuration key{suggest(name, FIELDS)}")
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: expected a mapping with 'type'")
    kind = spec.get("type")
    if kind not in PARAM_TYPES:
        raise ConfigError(f"{where}: type {kind!r} is not valid (valid: {', '.join(PARAM_TYPES)})")
    unknown = set(spec) - {"type", "low", "high", "log", "step", "choices", "when"}
    if unknown:
        raise ConfigError(f"{where}: unknown field '{sorted(unknown)[0]}' (valid: type, low, "
                          f"high, log, step, choices, when)")
    when = {}
    for cond_name, allowed in (spec.get("when") or {}).items():
        if cond_name not in earlier:
            raise ConfigError(f"{where}: condition names '{cond_name}', which is not an earlier "
                              f"parameter of this space{suggest(cond_name, earlier)}")
        when[cond_name] = allowed if isinstance(allowed, list) else [allowed]
        never = [v for v in when[cond_name] if not earlier[cond_name].contains(v)]
        if never:  # a typo would silently never sample this parameter
            raise ConfigError(f"{where}: condition {cond_name}: {never[0]!r} is a value "
                              f"'{cond_name}' never takes in this space")
    choices = spec.get("choices") or []
    named = None
    if isinstance(choices, dict):  # name -> knob value (values Optuna cannot take, e.g. lists)
        named, choices = dict(choices), [str(name) for name in choices]
    param = Parameter(name=name, type=kind, low=spec.get("low"), high=spec.get("high"),
                      log=bool(spec.get("log", False)), step=spec.get("step"),
                      choices=list(choices), named=named, when=when)
    if kind == "categorical":
        if not param.choices:
            raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list (or a "
                              f"mapping of names to values)")
        for value in named.values() if named is not None else param.choices:
            try:
                build_config({name: value}, where)
            except ConfigError as exc:
                if f"key '{name}'" in str(exc):
                    raise ConfigError(f"{where}: choice {value!r} is not a valid {name} "
                                      f"({str(exc).split(': ', 2)[-1]})") from None
    else:
        try:
            low, high = float(param.low), float(param.high)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {kind} needs numeric 'low' and 'high'") from None
        if not low < high:
            raise ConfigError(f"{where}: empty range (low {param.low} must be below high "
                              f"{param.high})")
        if param.log and low <= 0:
            raise ConfigError(f"{where}: a log range needs low > 0 (got {param.low})")
        param.low, param.high = (low, high) if kind == "float" else (int(low), int(high))
    return param


def load_space(path: str | Path | None = None, profile: str = "full",
               backbone: str = "vitb16") -> SearchSpace:
    """Read and validate a search-space file with its profile and backbone overlays."""
    path = Path(path) if path is not None else DEFAULT_SPACE
    source = str(path)
    data = read_sections(path, SECTIONS)
    base = dict(data.get("base") or {})
    specs: dict[str, Any] = dict(data.get("parameters") or {})
    # Backbone first, then profile: a profile's ranges (tiny: train from scratch) win.
    for section, key in (("backbones", backbone), ("profiles", profile)):
        overlay = (data.get(section) or {}).get(key) or {}
        fixed = overlay.get("base") or {}
        base.update(fixed)
        for name in fixed:
            specs.pop(name, None)
        for name, spec in (overlay.get("parameters") or {}).items():
            if name not in specs:
                raise ConfigError(f"{source}: {section}.{key}.parameters '{name}' overrides no "
                                  f"parameter of the space{suggest(name, specs)}")
            specs[name] = spec
    for key in base:
        if key not in FIELDS:
            raise ConfigError(f"{source}: base key '{key}': unknown key{suggest(key, FIELDS)}")
    if not specs:
        raise ConfigError(f"{source}: 'parameters' is empty: nothing to search")
    parameters: list[Parameter] = []
    for name, spec in specs.items():
        parameters.append(_parse_parameter(name, spec, source,
                                            {p.name: p for p in parameters}))
    return SearchSpace(source=source, base=base, parameters=parameters)
