"""How a setting is declared, read and documented, for the model config and the training recipe.

    kind: str = setting("tiny", "which tower makes patch features", choices=VISION_KINDS)

A setting is a dataclass field with a one-line doc and, where the values are a fixed set, its
choices. `build` makes a dataclass from a dict (a recipe section, a config.json part): each value
is checked against the field's type, unknown keys and wrong values raise `ConfigError` naming the
key and what it accepts, and old key names are mapped to new ones by the class's `upgrade`.
`markdown_table` writes the tables of docs/settings.md from the same fields.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
import warnings

from .errors import ConfigError


def setting(default=dataclasses.MISSING, doc: str = "", choices: tuple | None = None, factory=None):
    """A dataclass field with its doc (and accepted values); `factory` for mutable defaults."""
    metadata = {"doc": doc, "choices": tuple(choices) if choices else None}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check_choices(obj, prefix: str = "") -> None:
    """Raise ConfigError for the first field whose value is not one of its choices."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        value = getattr(obj, f.name)
        if choices and isinstance(value, (str, bool, int)) and value not in choices:
            raise ConfigError(f"{prefix}{f.name}={value!r}: use one of {', '.join(map(str, choices))}")


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def check_type(key: str, value, hint):
    """`value` converted to `hint` (int -> float, list -> tuple allowed), or ConfigError."""
    origin = typing.get_origin(hint)
    if _is_union(hint):
        for arm in typing.get_args(hint):
            try:
                return check_type(key, value, arm)
            except ConfigError as err:
                if dataclasses.is_dataclass(arm) and isinstance(value, dict):
                    raise err  # the section's own message (a wrong key inside it) says more
        raise ConfigError(f"{key}={value!r}: expected {type_name(hint)}")
    if hint is typing.Any:
        return value
    if dataclasses.is_dataclass(hint) and isinstance(value, (dict, hint)):
        return value if isinstance(value, hint) else build(hint, value, key + ".")
    if hint is type(None):
        if value is None:
            return None
    elif hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif hint in (str, bool) and type(value) is hint:
        return value
    elif origin is list and isinstance(value, (list, tuple)):
        (arm,) = typing.get_args(hint) or (typing.Any,)
        return [check_type(f"{key}[{i}]", v, arm) for i, v in enumerate(value)]
    elif origin is tuple and isinstance(value, (list, tuple)):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(check_type(f"{key}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(args) == len(value):
            return tuple(check_type(f"{key}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    elif (origin is dict or hint is dict) and isinstance(value, dict):
        args = typing.get_args(hint)
        return {k: check_type(f"{key}.{k}", v, args[1]) for k, v in value.items()} if args else dict(value)
    raise ConfigError(f"{key}={value!r}: expected {type_name(hint)}, got {type(value).__name__}")


def upgrade(cls, data: dict, prefix: str = "", warn: bool = False) -> dict:
    """`data` with the old key names of `cls` (its `upgrade` static method) mapped to the new
    ones; with `warn`, a FutureWarning says what to write instead."""
    fix = getattr(cls, "upgrade", None)
    if fix is None:
        return data
    try:
        data, changes = fix(dict(data))
    except ConfigError as err:
        raise ConfigError(f"{prefix}{err}") from None
    if warn and changes:
        warnings.warn(f"old setting names: {'; '.join(prefix + c for c in changes)} (docs/settings.md)",
                      FutureWarning, stacklevel=3)
    return data


def build(cls, data, prefix: str = "", warn: bool = False, merge_sections: bool = False):
    """`cls` from a dict: old names upgraded, every value type-checked, ConfigError naming the key.
    With `merge_sections`, a nested section starts from the default instance's section (a
    recipe's phase 1 defaults differ from phase 2's)."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: expected an object, got {type(data).__name__}")
    data = upgrade(cls, data, prefix, warn)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"unknown key '{prefix}{key}'; valid keys: {', '.join(prefix + n for n in names)}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            if merge_sections:
                value = {**dataclasses.asdict(getattr(cls(), key)), **upgrade(hint, value, f"{prefix}{key}.", warn)}
            kwargs[key] = build(hint, value, f"{prefix}{key}.", warn)
        else:
            kwargs[key] = check_type(prefix + key, value, hint)
    try:
        return cls(**kwargs)
    except ConfigError as err:  # __post_init__ names fields after the class's own PREFIX ("moe.")
        own, text = getattr(cls, "PREFIX", ""), str(err)
        raise ConfigError(prefix + text[len(own):] if prefix and text.startswith(own) else text) from None
    except TypeError as err:  # a required field left out
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ConfigError(f"{prefix}{missing[0]} is required") from None
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {err}") from None


# ----- the table of docs/settings.md ---------------------------------------------------------------

def type_name(hint) -> str:
    if _is_union(hint):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if dataclasses.is_dataclass(hint):
        return "object"
    origin = typing.get_origin(hint)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"list[{type_name(args[0])}]" if args and len(set(args)) == 1 else "list"
    if origin is dict or hint is dict:
        return "object"
    return getattr(hint, "__name__", str(hint))


def _default_text(f) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if dataclasses.is_dataclass(value):
        if len(dataclasses.fields(value)) > 4:
            return "its section's defaults"
        value = dataclasses.asdict(value)
    return f"`{json.dumps(value)}`".replace("|", "\\|")


def rows(cls, prefix: str = "", skip=None) -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for each field of `cls`, less those of the dataclass `skip` (a base)."""
    hints = typing.get_type_hints(cls)
    inherited = {f.name for f in dataclasses.fields(skip)} if skip else set()
    out = []
    for f in [f for f in dataclasses.fields(cls) if f.name not in inherited]:
        choices = f.metadata.get("choices")
        kind = " or ".join(json.dumps(c) for c in choices) if choices else type_name(hints[f.name])
        out.append((f"`{prefix}{f.name}`", kind.replace("|", "\\|"), _default_text(f),
                    f.metadata.get("doc", "").replace("|", "\\|")))
    return out


def markdown_table(cls, prefix: str = "", skip=None) -> str:
    """The markdown table of `cls`'s settings (see `rows`)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows(cls, prefix, skip)]
    return "\n".join(lines)

