"""Configs are dataclasses, read from TOML and adjusted with ``key=value`` overrides.

Nested dataclasses map to TOML tables and to dotted keys (``model.dim=512``). Values in
overrides are parsed as TOML literals (``lr=3e-4``, ``name="x"``, ``flag=true``) and fall
back to plain strings (``out=runs/a``). Unknown keys and wrong types are errors that name
the key and the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, factory: Any = None) -> Any:
    """A config field with its documentation (shown by ``--help``)::

    lr: float = setting(3e-4, "peak learning rate")
    betas: list[float] = setting(doc="AdamW betas", factory=lambda: [0.9, 0.95])
    """
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def field_doc(f: dataclasses.Field) -> str:
    """The documentation given to ``setting`` (empty when none)."""
    return str(f.metadata.get("doc", ""))


def type_name(tp: Any) -> str:
    """A readable name of an annotation: ``int``, ``'a' | 'b'``, ``list[str] | None``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "None"
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        for choice in choices:  # 1 is not True: compare types too
            if value == choice and type(value) is type(choice):
                return choice
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{where}: {value!r} is not one of the allowed values {allowed}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > 2**1023:  # float() would raise OverflowError
            raise ConfigError(f"{where}: {value} is too large for a float")
        return float(value)
    if tp is Path and isinstance(value, str):
        return Path(value)
    if (
        isinstance(tp, type)
        and isinstance(value, tp)
        and not (tp is int and isinstance(value, bool))
    ):
        return value
    raise ConfigError(f"{where}: expected {type_name(tp)}, got {value!r}")


def from_dict(cls: type[T], data: dict[str, Any], where: str = "config", base: Any = None) -> T:
    """An instance of the dataclass ``cls`` from ``data`` (nested dicts for nested
    dataclasses), each value coerced to its field's type. Unknown keys and wrong types are
    a ``ConfigError`` that names ``where`` and the key (``where.key``).

    With ``base`` (an instance of ``cls``), ``data`` changes only the keys it names: every
    other field, nested tables included, keeps ``base``'s value. A command's own section
    defaults (finetuning's optimizer recipe, say) survive a partial TOML table that way."""
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(types_))}"
        )
    if base is None:
        return cls(**{k: _coerce(v, types_[k], f"{where}.{k}") for k, v in data.items()})
    changed = {k: _merged(getattr(base, k), v, types_[k], f"{where}.{k}") for k, v in data.items()}
    return dataclasses.replace(base, **changed)


def _merged(current: Any, value: Any, tp: Any, where: str) -> Any:
    """``value`` for a field now holding ``current``: a table over a dataclass instance
    changes only the keys it names; anything else replaces the value."""
    if (
        isinstance(value, dict)
        and dataclasses.is_dataclass(current)
        and not isinstance(current, type)
    ):
        return from_dict(type(current), value, where, base=current)
    return _coerce(value, tp, where)


def parse_value(text: str) -> Any:
    """An override's value: a TOML literal (``3e-4``, ``true``, ``[1, 2]``, ``"x"``), else
    the text itself as a string (``runs/a``, ``pass@100``)."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: T, overrides: list[str]) -> T:
    """A copy of ``cfg`` with each ``a.b=value`` applied."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        cfg = _set(cfg, key.strip().split("."), parse_value(text.strip()), key)
    return cfg


def _set(obj: Any, path: list[str], value: Any, full: str) -> Any:
    types_ = _field_types(type(obj))
    name = path[0]
    if name not in types_:
        raise ConfigError(
            f"override {full!r}: unknown key {name!r}; allowed: {', '.join(sorted(types_))}"
        )
    if len(path) > 1:
        child = getattr(obj, name)
        if not dataclasses.is_dataclass(child):
            raise ConfigError(f"override {full!r}: {name!r} is not a table")
        return dataclasses.replace(obj, **{name: _set(child, path[1:], value, full)})
    value = _merged(getattr(obj, name), value, types_[name], f"override {full}")
    return dataclasses.replace(obj, **{name: value})


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> T:
    """``cls`` from its defaults, changed by the TOML file at ``path`` and then by
    ``overrides``: a table or a dotted key changes only the keys it names, so a section's
    defaults set by ``cls`` (not by the section's own class) hold for every other key."""
    cfg = cls()
    if path is not None:
        p = Path(path)
        try:
            data = tomllib.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{p}: config file not found") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: invalid TOML ({e})") from None
        cfg = from_dict(cls, data, where=str(p), base=cfg)
    return apply_overrides(cfg, overrides or [])


def to_dict(cfg: Any) -> dict[str, Any]:
    def clean(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return clean(dataclasses.asdict(cfg))


def _shown(value: Any) -> str:
    if isinstance(value, Path):
        value = str(value)
    try:
        return json.dumps(value)
    except TypeError:
        return repr(value)


def describe(cfg: Any, prefix: str = "") -> list[str]:
    """``key = default  # doc`` for every setting of a config dataclass (an instance, or
    the class when all its fields have defaults), nested keys dotted, for ``--help``."""
    if isinstance(cfg, type):
        cfg = cfg()
    rows: list[tuple[str, str]] = []

    def walk(obj: Any, pre: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                walk(value, f"{pre}{f.name}.")
            else:
                rows.append((f"{pre}{f.name} = {_shown(value)}", field_doc(f)))

    walk(cfg, prefix)
    width = min(max((len(k) for k, _ in rows), default=0), 40)
    return [f"{k:<{width}}  # {d}" if d else k for k, d in rows]


def help_text(cls: type, intro: str = "", indent: str = "  ") -> str:
    """The ``--help`` epilog of a config-driven command: ``intro``, then every setting of
    ``cls`` with its default and documentation (for ``add_config_help``, or an argparse
    parser with a formatter that keeps line breaks)."""
    head = intro or "Settings (KEY=VALUE; dotted keys are TOML tables), defaults and meaning:"
    return head + "\n" + "\n".join(indent + line for line in describe(cls))
