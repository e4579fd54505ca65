"""Typed settings from YAML/JSON: the loading shared by every config tree (training, curation, speed switches).

A config is a tree of dataclasses. `build_dataclass` checks a mapping against it: unknown keys are errors with
their dotted path (a typo never falls back to a default silently), Literal fields only take their values, and
numbers written like "1e-3" (a string to YAML 1.1) become floats. `apply_override` applies `a.b=value` from
a command line, the value parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

from flashhead.atomic import atomic_path
from flashhead.errors import ConfigError


class ConfigFile:
    """Reading and writing of a top-level config dataclass (Stage1Config, Stage2Config, CurateConfig)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        return build_dataclass(cls, data)

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None) -> Any:
        """Read a YAML (.yaml/.yml) or JSON file, then apply `key.sub=value` overrides (values parsed as YAML)."""
        data = read_mapping(path)
        for item in overrides or []:
            apply_override(data, item)
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        import yaml

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        return path


def read_mapping(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from e
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:  # yaml and json raise different types; the user needs one line
        raise ConfigError(f"{path}: not valid {'YAML' if path.suffix != '.json' else 'JSON'} ({_one_line(e)})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings")
    return data


def _one_line(error: Exception) -> str:
    """A parser's error in one line: PyYAML's spans several (the problem, then the text with a caret)."""
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is not None and problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def unknown_keys_message(what: str, unknown: list[str], known: list[str]) -> str:
    """"unknown setting(s) a, b (did you mean a -> c?)": for each, the closest known name, or the one known name
    or two that hold it whole (steps -> num_inference_steps or guidance_steps), where there are."""
    import difflib

    def guess(key: str) -> str | None:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        holding = [name for name in known if key.rsplit(".", 1)[-1] in name]
        return close[0] if close else " or ".join(holding) if 0 < len(holding) <= 2 else None

    hints = [f"{k} -> {g}" for k in unknown if (g := guess(k))]
    return f"unknown {what} {', '.join(unknown)}" + (f" (did you mean {'; '.join(hints)}?)" if hints else "")


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (numbers, booleans, lists, null)."""
    import yaml

    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value, got {item!r}")
    *parents, leaf = key.strip().split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a section")
    node[leaf] = yaml.safe_load(raw)


def build_dataclass(cls: type, data: Any, where: str = "") -> Any:
    """`cls(**data)` with every nested dataclass built the same way and every value checked (ConfigError)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(unknown_keys_message("setting(s)", [where + k for k in unknown], [where + n for n in names]))
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = build_dataclass(hint, value or {}, f"{where}{name}.")
        else:
            kwargs[name] = _check_value(hint, value, where + name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def _check_value(hint: Any, value: Any, name: str) -> Any:
    if float in (hint, *typing.get_args(hint)) and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string; ints are fine as floats too
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if int in (hint, *typing.get_args(hint)) and float not in typing.get_args(hint) and value is not None \
            and (isinstance(value, bool) or not isinstance(value, int)):  # fmt: skip
        raise ConfigError(f"{name} must be a whole number, got {value!r}")
    options = [a for a in typing.get_args(hint) if typing.get_origin(a) is Literal] or [hint]
    for option in options:
        if typing.get_origin(option) is Literal:
            allowed = typing.get_args(option)
            if value not in allowed and value is not None:
                raise ConfigError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
    return value
