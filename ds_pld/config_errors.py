"""Validation helpers shared by every config block: one error type that names the key."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


def check_keys(block: Mapping[str, Any], where: str, allowed: Iterable[str], required: Iterable[str] = ()) -> None:
    """Reject unknown keys (typos would otherwise be silent no-ops) and missing required ones."""
    if not isinstance(block, Mapping):
        raise ConfigError(f"'{where}' must be a JSON object, got {type(block).__name__}")
    allowed = set(allowed)
    unknown = sorted(set(block) - allowed)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in '{where}'; allowed: {sorted(allowed)}")
    missing = [k for k in required if k not in block]
    if missing:
        raise ConfigError(f"missing required key(s) {missing} in '{where}'")


def number(block: Mapping[str, Any], key: str, where: str, default: Any = None, *, integer: bool = False,
           low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False) -> Any:
    """Read a number and check its range; bools are not numbers here."""
    value = block.get(key, default)
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"'{where}.{key}' must be {'an integer' if integer else 'a number'}, got {value!r}")
    if low is not None and (value <= low if low_open else value < low):
        raise ConfigError(f"'{where}.{key}' = {value} must be {'>' if low_open else '>='} {low}")
    if high is not None and (value >= high if high_open else value > high):
        raise ConfigError(f"'{where}.{key}' = {value} must be {'<' if high_open else '<='} {high}")
    return float(value) if not integer else int(value)


def boolean(block: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    value = block.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"'{where}.{key}' must be true or false, got {value!r}")
    return value
