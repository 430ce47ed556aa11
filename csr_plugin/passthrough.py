"""`openrlhf:` in a recipe section: OpenRLHF's own dotted flags, passed verbatim to the trainer that runs.

    dpo:
      lr: 5.0e-7
      openrlhf:
        ds.adam_offload: true
        adam.betas: [0.9, 0.99]

Our named keys (`dpo.lr`, `ppo.actor_lr`, `search.temperature`, ...) set the flags CSR itself
needs or that most recipes touch; everything else OpenRLHF offers goes through `openrlhf:`.
A flag has one owner: a passthrough flag that a named key sets is refused with both names,
since CSR reads its own keys too (`dpo.batch` sizes the schedule, `search.temperature` the
search) and a second, silent value would make the two disagree. Which named key sets which
flag is not a table kept by hand: it is found by changing each key alone and seeing which
flags move, so it cannot drift from the flag builders.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Callable, Literal

from csr_plugin.config import EXPONENT_NUMBER, ConfigError, field_key

Builder = Callable[[dict[str, Any]], dict[str, Any]]


def flatten(mapping: dict, where: str, prefix: str = "") -> dict[str, Any]:
    """``{adam: {lr: 1}}`` and ``{adam.lr: 1}`` alike -> ``{"adam.lr": 1}`` (overrides on the command line
    split at dots, YAML keeps them: both spellings must mean the same flag)."""
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}".removeprefix("--")
        if isinstance(value, dict):
            flat.update(flatten(value, where, name + "."))
        elif name in flat:
            raise ConfigError(f"`{where}` sets {name!r} twice (dotted and nested); keep one.")
        else:
            flat[name] = value
    return flat


def _alternatives(value: Any, annotation: Any) -> list[Any]:
    """Other values of a key's type, to see which flags it moves."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        return [v for v in typing.get_args(annotation) if v != value]
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        return _alternatives(value, inner) if value is not None else _alternatives(_sample(inner), inner) + [
            _sample(inner)]
    if annotation is bool:
        return [not value]
    if annotation is int:
        return [value + 1]
    if annotation is float:
        return [value + 0.5]
    if annotation is str:
        return [value + "_other"]
    if annotation is list:
        return [[*value, "other"]]
    return []


def _sample(annotation: Any) -> Any:
    return {int: 1, float: 1.0, str: "x", bool: True, list: ["x"]}.get(annotation)


def controlled_flags(build: Builder, sections: dict[str, Any]) -> dict[str, str]:
    """flag -> the named key(s) (``section.key``, joined by " and ") that set it."""
    base = build(sections)
    owners: dict[str, list[str]] = {}
    for name, section in sections.items():
        hints = typing.get_type_hints(type(section))
        for f in dataclasses.fields(section):
            if f.name == "openrlhf":
                continue
            for value in _alternatives(getattr(section, f.name), hints[f.name]):
                try:
                    moved = build({**sections, name: dataclasses.replace(section, **{f.name: value})})
                except (ConfigError, ValueError, TypeError, ZeroDivisionError):
                    continue   # a value the builder refuses tells nothing; another alternative may
                key = f"{name}.{field_key(f.name)}"
                for flag in moved.keys() | base.keys():
                    if moved.get(flag) != base.get(flag) and key not in owners.setdefault(flag, []):
                        owners[flag].append(key)
    return {flag: " and ".join(keys) for flag, keys in owners.items()}


def _coerced(value: Any, default: Any, where: str) -> Any:
    """A passthrough value of the type the flag already has (numbers typed as YAML strings included)."""
    if isinstance(default, bool) or default is None:
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"`{where}` is a switch: give true or false, got {value!r}.")
        return value
    if isinstance(default, (int, float)):
        if isinstance(value, str) and EXPONENT_NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{where}` must be a number, got {value!r}.")
        if isinstance(default, int) and not float(value).is_integer():
            raise ConfigError(f"`{where}` must be an integer, got {value!r}.")
        return type(default)(value)
    if isinstance(default, (list, tuple)) and not isinstance(value, (list, tuple)):
        raise ConfigError(f"`{where}` must be a list, got {value!r}.")
    return value


def merge(flags: dict[str, Any], passthrough: dict, where: str, build: Builder, sections: dict[str, Any],
          reserved: dict[str, str], not_read: dict[str, str] | None = None,
          worker: str = "csr's DPO worker", runs: str = "OpenRLHF's strategy and DPOTrainer",
          listed: str = "`csr recipe show` lists the flags it passes") -> dict[str, Any]:
    """``flags`` with the section's ``openrlhf:`` mapping applied.

    ``reserved``: flag (or ``prefix.``) -> why CSR sets it itself. ``not_read``: for an entry point of
    ours (DPO, the reward model), the flags of its namespace that it does not act on, with the reason; with
    it, a flag outside ``flags`` is refused too. Without it (PPO) unknown flags are left to OpenRLHF's own
    parser (`csr recipe show --check`, and `csr train-ppo` before it submits). ``worker``, ``runs``,
    ``listed``: that entry point, what of OpenRLHF it runs and where its flags are listed, for the refusals.
    """
    extra = flatten(passthrough, where)
    if not extra:
        return flags
    owners = controlled_flags(build, sections)
    merged = dict(flags)
    for flag, value in extra.items():
        at = f"{where}.{flag}"
        reason = next((why for key, why in reserved.items() if flag == key or key.endswith(".") and
                       flag.startswith(key)), None)
        if reason:
            raise ConfigError(f"`{at}`: {flag} is set by csr itself ({reason}); remove it from {where}.")
        if flag in owners:
            named = " and ".join(f"`{key}`" for key in owners[flag].split(" and "))
            raise ConfigError(f"`{at}` and {named} both set OpenRLHF's --{flag}; set {named} and remove {flag} "
                              f"from {where}.")
        if not_read is not None:
            if flag in not_read:
                raise ConfigError(f"`{at}`: {worker} does not act on --{flag} ({not_read[flag]}).")
            if flag not in flags:
                raise ConfigError(f"`{at}`: --{flag} is not a flag {worker} reads (it runs {runs} in its own "
                                  f"loop); {listed}.")
        merged[flag] = _coerced(value, flags.get(flag), at)
    return merged
