"""Search spaces as data: a YAML file -> validated parameters -> an Optuna define-by-run function.

A parameter may carry ``when: {earlier_param: value | [values]}``; it is sampled only when the
condition holds (ArcFace scale/margin only with the ArcFace head, ...), otherwise the knob keeps
its base value. Profile and backbone overlays replace whole parameter definitions; a knob an
overlay's ``base`` sets is fixed there: it is no longer searched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from ..config import FIELDS, ConfigError, suggest
from ..resources import SEARCH_SPACES, resource_path
from ._yaml import read_sections

# Shipped in the package (search_spaces/ in a checkout links there).
SEARCH_SPACES_DIR = resource_path(SEARCH_SPACES)
DEFAULT_SPACE = SEARCH_SPACES_DIR / "beyond_v10.yaml"
PARAM_TYPES = ("float", "int", "categorical")
SECTIONS = ("base", "parameters", "profiles", "backbones")
# A per-group rate or decay left unset (None) falls back to the shared knob (RunConfig.group_lr).
GROUP_FALLBACKS = {f"{shared}_{group}": shared for shared in ("lr", "weight_decay")
                   for group in ("visual", "prompt", "text", "head")}


@dataclass
class Parameter:
    name: str
    type: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: int | None = None
    choices: list[Any] = field(default_factory=list)
    when: dict[str, list[Any]] = field(default_factory=dict)

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

    def sample(self, trial: optuna.Trial) -> None:
        """Define-by-run: every value comes from ``trial.suggest_*`` (so seeded points apply)."""
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

    def point_from_knobs(self, knobs: dict[str, Any]) -> dict[str, Any] | None:
        """The searched values a fixed configuration corresponds to, or None if outside."""
        point: dict[str, Any] = {}
        for param in self.parameters:
            if not all(point.get(name) in allowed for name, allowed in param.when.items()):
                continue
            value = knobs.get(param.name)
            if value is None and param.name in GROUP_FALLBACKS:
                value = knobs.get(GROUP_FALLBACKS[param.name])  # the effective group value
            if param.type == "int" and isinstance(value, float) and value.is_integer():
                value = int(value)
            if not param.contains(value):
                return None
            point[param.name] = value
        return point


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
    param = Parameter(name=name, type=kind, low=spec.get("low"), high=spec.get("high"),
                      log=bool(spec.get("log", False)), step=spec.get("step"),
                      choices=list(spec.get("choices") or []), when=when)
    if kind == "categorical":
        if not param.choices:
            raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list")
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
