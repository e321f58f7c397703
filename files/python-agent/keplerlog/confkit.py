"""Validation helpers shared by the agent, consumer and prune configurations.

One set of rules and messages: every problem is one `ConfigError` whose message names the key
(`where`) and fits on one line, so each program can print it and exit 2 at start instead of
failing later. Unknown keys are errors: a typo in a log shipper's config otherwise shows up
weeks later as missing logs.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration is unusable; the message says what and where, on one line."""


def read_yaml(path: str | Path) -> Any:
    """Load a YAML file; unreadable or invalid YAML is a ConfigError with line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "syntax error"
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None


def overlay(
    raw: dict[str, Any], env: Mapping[str, str], variables: Mapping[str, tuple[str, ...]]
) -> dict[str, Any]:
    """Return a copy of `raw` with the set environment variables written at their key paths.

    `variables` maps a variable to its key path, e.g. `KEPLERLOG_TOPIC` -> `("kafka", "topic")`;
    empty values are ignored. A section that is not a mapping is left for `section()` to reject.
    """
    out = dict(raw)
    for var, keys in variables.items():
        value = env.get(var)
        if not value:
            continue
        target = out
        for key in keys[:-1]:
            current = target.get(key)
            if current is None:
                current = {}
            elif not isinstance(current, Mapping):
                break
            target[key] = dict(current)
            target = target[key]
        else:
            target[keys[-1]] = value
    return out


def section(raw: Any, where: str, allowed: set[str]) -> dict[str, Any]:
    """Return a mapping (None: empty) that has only `allowed` keys."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}")
    return dict(raw)


def string(value: Any, where: str, *, empty: bool = False) -> str:
    """Return a non-empty string (numbers are accepted as text)."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{where}: expected a string")
    text = str(value)
    if not empty and not text.strip():
        raise ConfigError(f"{where}: must not be empty")
    return text


def integer(value: Any, where: str, low: int, high: int | None = None) -> int:
    """Return an integer in [low, high]; bools and fractional floats are rejected."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected an integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if isinstance(value, float) and number != value:
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if number < low or (high is not None and number > high):
        bound = f">= {low}" if high is None else f"between {low} and {high}"
        raise ConfigError(f"{where}: must be {bound}, got {number}")
    return number


def number(value: Any, where: str, low: float) -> float:
    """Return a number >= low."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if number < low:
        raise ConfigError(f"{where}: must be >= {low}, got {number}")
    return number


def boolean(value: Any, where: str) -> bool:
    """Return true or false, nothing else."""
    if not isinstance(value, bool):
        raise ConfigError(f"{where}: expected true or false")
    return value


def choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    """Return one of `choices`, compared case-insensitively."""
    text = string(value, where).lower()
    if text not in choices:
        raise ConfigError(f"{where}: must be one of {', '.join(choices)}, got {text!r}")
    return text
