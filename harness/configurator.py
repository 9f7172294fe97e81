"""
--key=value overrides for the settings dataclass of a script (as nanoGPT's configurator, without exec).

    python train.py --preset=cpu --beta=0.2 --out_dir=out/beta02

Every value is checked against the type of the default; an unknown key stops with the list of valid keys.
"""

import dataclasses
import math
import typing

from data import UserError


class ConfigError(UserError):
    """A bad command line: the message is one line for the user."""


def _convert(key, text, default, annotation):
    kind = annotation
    if typing.get_origin(kind) is typing.Union:  # Optional[int]: "none" or an int
        if text.lower() == "none":
            return None
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    elif default is not None:
        kind = type(default)
    try:
        if kind is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
    except ValueError:
        pass
    raise ConfigError(f"--{key}={text}: expected {getattr(kind, '__name__', kind)}")


def parse_overrides(argv):
    """['--a=1', '--b=x'] -> {'a': '1', 'b': 'x'}."""
    overrides = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, value = arg[2:].split("=", 1)
        overrides[key] = value
    return overrides


def apply_overrides(settings, overrides):
    """A copy of the dataclass `settings` with the string overrides converted to each field's type."""
    fields = {f.name: f for f in dataclasses.fields(settings)}
    hints = typing.get_type_hints(type(settings))
    changes = {}
    for key, text in overrides.items():
        if key not in fields:
            raise ConfigError(f"unknown setting --{key}; valid settings: {', '.join(fields)}")
        changes[key] = _convert(key, text, getattr(settings, key), hints[key])
    return dataclasses.replace(settings, **changes)


def check_rules(settings, rules):
    """rules: [(names separated by spaces, rule, what the rule asks)]. Every float must also be finite: nan
    slips through most comparisons, and inf through all of the `> 0` ones."""
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{field.name} must be a finite number, got {value}")
    for names, rule, what in rules:
        for name in names.split():
            value = getattr(settings, name)
            if not rule(value):
                raise ConfigError(f"--{name} must be {what}, got {value!r}")
