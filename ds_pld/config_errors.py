"""One error type for every config problem, and the pydantic plumbing the config blocks share.

Each block is a frozen pydantic dataclass (so `dataclasses.replace`/`asdict` keep working for its users) that
forbids unknown keys. `parse_block` validates a JSON block into one and turns pydantic's multi-line
ValidationError into a one-line ConfigError that names the dotted key ('training.max_steps'): the launchers print
that one line, and a user fixing a file needs the key, not pydantic's report.
"""
from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import fields
from typing import Annotated, Any, TypeVar

from pydantic import BeforeValidator, ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or out of range; the message names the key."""


def _one_or_many(value: Any) -> Any:
    """A lone string is one name, not a sequence of one-letter names ('pld' must not become ('p', 'l', 'd'))."""
    return (value,) if isinstance(value, str) else value


# Strict scalars: JSON `true` is not the integer 1 and "0.5" is not a number (lax pydantic would accept both).
Int = Annotated[int, Strict()]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # an int is accepted (1 -> 1.0); NaN/inf are not
Bool = Annotated[bool, Strict()]
Str = Annotated[str, Strict()]
Names = Annotated[tuple[Str, ...], BeforeValidator(_one_or_many)]  # a list of strings, or one string


def config_block(cls: type[T]) -> type[T]:
    """Make `cls` a frozen pydantic dataclass that refuses unknown keys (a typo would otherwise be a silent no-op)."""
    return pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid"))(cls)


_KINDS = {"int": "an integer", "float": "a number", "finite": "a finite number", "bool": "true or false",
          "string": "a string", "tuple": "a list", "list": "a list", "dict": "a JSON object",
          "dataclass": "a JSON object", "model": "a JSON object"}
_BOUNDS = {"greater_than": (">", "gt"), "greater_than_equal": (">=", "ge"), "less_than": ("<", "lt"),
           "less_than_equal": ("<=", "le")}
_UNKNOWN = ("unexpected_keyword_argument", "extra_forbidden")


def did_you_mean(unknown: Iterable[str], allowed: Iterable[str]) -> str:
    """" ('gradient_clippin': did you mean 'gradient_clipping'?)" for the keys with a close match, else ""."""
    allowed = sorted(allowed)
    hints = [f"{key!r}: did you mean {match[0]!r}?" for key in sorted(unknown)
             if (match := difflib.get_close_matches(key, allowed, n=1))]
    return f" ({'; '.join(hints)})" if hints else ""


def unknown_keys(unknown: Iterable[str], where: str, allowed: Iterable[str]) -> str:
    """The message for keys a block does not have, with the closest allowed key as a hint."""
    unknown, allowed = sorted(unknown), sorted(allowed)
    return f"unknown key(s) {unknown} in '{where}'{did_you_mean(unknown, allowed)}; allowed: {allowed}"


def _describe_one(error: Mapping[str, Any], where: str) -> str:
    key = ".".join([where, *map(str, error["loc"])])
    kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
    if kind in _BOUNDS:
        op, name = _BOUNDS[kind]
        return f"'{key}' = {value!r} must be {op} {ctx[name]}"
    if kind == "literal_error":
        return f"'{key}' = {value!r} must be one of ({ctx['expected'].replace(' or ', ', ')})"
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        return f"'{key}' = {value!r} {message}" if error["loc"] else f"'{where}': {message}"
    if kind in ("missing", "missing_keyword_argument"):
        return f"missing required key '{key}'"
    if kind == "too_short":
        return f"'{key}' must hold at least {ctx.get('min_length')} item(s), got {value!r}"
    noun = _KINDS.get(kind.split("_")[0])
    return f"'{key}' must be {noun}, got {value!r}" if noun else f"'{key}': {error['msg']}"


def _describe(err: ValidationError, where: str, allowed: Iterable[str]) -> str:
    """pydantic's report as one line: unknown keys together (with `allowed` and a did-you-mean), then the rest."""
    errors = err.errors()
    unknown = [".".join(map(str, e["loc"])) for e in errors if e["type"] in _UNKNOWN]
    parts = [unknown_keys(unknown, where, allowed)] if unknown else []
    parts += [_describe_one(e, where) for e in errors if e["type"] not in _UNKNOWN]
    return "; ".join(parts)


@contextmanager
def in_source(where: str) -> Iterator[None]:
    """Prefix a ConfigError raised inside with the config's source ('ds_configs/pld.json: ...')."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def parse_block(cls: type[T], block: Any, where: str, *, required: Iterable[str] = (),
                derived: Mapping[str, Any] | None = None, also_allowed: Iterable[str] = ()) -> T:
    """Validate the JSON block at `where` (None: every default) into `cls`. `derived` holds attributes the caller
    computed from other keys (not keys of the block itself); `also_allowed` names keys the caller consumed."""
    block = {} if block is None else block
    if not isinstance(block, Mapping):
        raise ConfigError(f"'{where}' must be a JSON object, got {type(block).__name__}")
    derived = derived or {}
    allowed = [f.name for f in fields(cls) if f.name not in derived] + list(also_allowed)
    clash = set(block) & set(derived)
    if clash:
        raise ConfigError(unknown_keys(clash, where, allowed))
    missing = [key for key in required if key not in block]
    if missing:
        raise ConfigError(f"missing required key(s) {missing} in '{where}'")
    try:
        return TypeAdapter(cls).validate_python({**block, **derived})
    except ValidationError as err:
        raise ConfigError(_describe(err, where, allowed)) from None


def one_of(choices: Iterable[Any]) -> Callable[[Any], Any]:
    """A validator for a value that must be one of `choices` (for choices owned by another module)."""
    choices = tuple(choices)

    def check(value: Any) -> Any:
        if value not in choices:
            raise ValueError(f"must be one of {choices}")
        return value

    return check
