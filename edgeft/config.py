"""YAML at the edge: parse recipe/profile files and `key=value` overrides into frozen dataclasses.

Unknown keys are errors that list the valid ones; values are coerced to the field's type.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

from edgeft.errors import UserError, short


def opt(default: Any, help: str) -> Any:
    """A config field with its meaning: `name: type = opt(default, "help")` (shown by `edgeft run --help-config`).

    Defaults are immutable (str, numbers, bools, tuples); a list, dict or set gets a copying default_factory.
    """
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def field_help(f: dataclasses.Field) -> str:
    """The help text of a config field ('' when it has none)."""
    return str(f.metadata.get("help", "")).strip()


def format_default(value: Any) -> str:
    """A default as it would be written in YAML or a `key=value` override: true, 0.0002, q8_0,q4_k_m, "", []."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (tuple, list)):
        return ",".join(format_default(v) for v in value) if value else "[]"
    if isinstance(value, str):
        return value if value else '""'
    return str(value)


def help_lines(cls: type, section: str) -> list[str]:
    """One line per field of dataclass `cls`: `SECTION.KEY (type, default X): help`."""
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = format_default(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = format_default(f.default_factory())
        else:
            default = "required"
        typ = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(f"{section}.{f.name} ({typ}, default {default}): {field_help(f) or '(no help)'}")
    return out


def load_yaml(path: Path) -> dict:
    """Read a YAML mapping; a syntax error names the file and line."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(e, 'problem', e)}); fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level, got {type(data).__name__}")
    return data


def from_dict(cls: type, data: dict | None, where: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and mistyped values are UserErrors."""
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise UserError(f"{where}: unknown key '{key}'; valid keys: {', '.join(names)}")
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    return cls(**kwargs)


def coerce(value: Any, typ: Any, where: str) -> Any:
    """Convert a YAML or command-line value to `typ` (str, int, float, bool, tuple[...], Optional)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union or str(origin) == "types.UnionType":
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if origin is tuple:
        items = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {short(value)}")
        return tuple(coerce(v, args[0], where) for v in items)
    if typing.get_origin(typ) is typing.Literal:
        if value not in args:
            raise UserError(f"{where}: {short(value)} is not one of {', '.join(map(str, args))}")
        return value
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise UserError(f"{where}: expected true or false, got {short(value)}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {short(value)}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: expected {typ.__name__}, got {short(value)}") from None
        if typ is int and isinstance(value, float) and value != out:
            raise UserError(f"{where}: expected an integer, got {short(value)}")
        return out
    if typ is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: expected a string, got {type(value).__name__}")
        return str(value)
    return value


def parse_overrides(items: list[str]) -> dict[str, str]:
    """`a.b=value` strings to a flat mapping; a missing '=' is an error."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"override '{item}': expected key=value, e.g. train.epochs=2")
        out[key.strip()] = value
    return out


def apply_overrides(tree: dict, overrides: dict[str, str], sections: dict[str, type], where: str) -> dict:
    """Set `section.key=value` overrides into a raw mapping; unknown sections or keys are errors."""
    tree = {k: (dict(v) if isinstance(v, dict) else v) for k, v in tree.items()}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in sections:
            raise UserError(f"{where}: unknown override key '{dotted}'; valid sections: "
                            f"{', '.join(s + '.*' for s in sections)}")
        cls = sections[section]
        names = [f.name for f in dataclasses.fields(cls)]
        if key not in names:
            raise UserError(f"{where}: unknown override key '{dotted}'; valid keys: "
                            f"{', '.join(section + '.' + n for n in names)}")
        tree.setdefault(section, {})
        if not isinstance(tree[section], dict):
            tree[section] = {}
        tree[section][key] = value
    return tree

