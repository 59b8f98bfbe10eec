"""The one generic mapping between declared settings (training/config.py's `setting` fields) and
the command line, the `--config run.toml` file and the layers of defaults.

Flags are added with `default=SUPPRESS`, so parsing yields only what was given; the help text of
each flag is written here from the layered defaults, naming the paper's value and the small-image
recipe's where a method declares them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from training.config import (
    DEFAULT,
    FILE,
    PAPER,
    SMALL_IMAGE,
    ConfigError,
    coerce,
    field_types,
    flag_of,
    settings_of,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

GROUP_TITLES = {
    "data": "data",
    "backbone": "backbone",
    "optimisation": "optimisation",
    "run": "run",
    "knn": "kNN monitor (weighted kNN, Wu et al. 2018)",
}


def _shown(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, tuple):
        return str([_shown_item(v) for v in value]).replace("'", "")
    return str(value)


def _shown_item(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def default_text(
    name: str,
    default: Any,
    help_text: str,
    paper: Mapping[str, Any],
    small: Mapping[str, Any],
    source: str = PAPER,
) -> str:
    """` (default: V)`, `(default: V, the paper's)`, plus `; images <= 64 px: W` where that differs
    (`source` names where the method's defaults come from: a paper, or a measured recipe)."""
    value = paper.get(name, default)
    if (value == "" and name not in small) or "default:" in help_text:
        return ""
    text = f"default: {_shown(value)}" + (f", the {source}'s" if name in paper else "")
    if name in small and small[name] != value:
        text += f"; images <= 64 px: {_shown(small[name])}"
    return f" ({text})".replace("%", "%%")


def add_settings(
    parser: argparse.ArgumentParser,
    cls: type,
    paper: Mapping[str, Any] | None = None,
    small: Mapping[str, Any] | None = None,
    title: str | None = None,
    description: str | None = None,
    source: str = PAPER,
) -> None:
    """A flag per setting of the dataclass `cls`, grouped as declared (or all under `title`)."""
    paper, small = paper or {}, small or {}
    hints = field_types(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in settings_of(cls):
        group_name = title or GROUP_TITLES.get(f.metadata["group"], f.metadata["group"])
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name, description if title else None)
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata["help"].replace("%%", "%").replace("%", "%%")
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": help_text + default_text(f.name, default, help_text, paper, small, source),
        }
        kind = _without_none(hints[f.name])
        flag = flag_of(f)
        if kind is bool:  # --x / --no-x, or a plain switch for a flag that already says "no"
            kwargs["action"] = "store_true" if flag.startswith("--no-") else argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is tuple:
            item_types = typing.get_args(kind)
            kwargs["type"] = item_types[0]
            kwargs["nargs"] = "*" if item_types[-1] is Ellipsis else len(item_types)
        else:
            kwargs["type"] = kind
        if kind is not bool:
            kwargs["metavar"] = flag.lstrip("-").upper().replace("-", "_")
        if f.metadata.get("choices"):
            kwargs["choices"] = list(f.metadata["choices"])
            kwargs.pop("metavar", None)
        groups[group_name].add_argument(flag, **kwargs)


def _without_none(kind: Any) -> Any:
    args = typing.get_args(kind)
    if type(None) in args:
        return next(a for a in args if a is not type(None))
    return kind


def flag_names(*classes: type) -> dict[str, str]:
    """flag name without dashes (`-` or `_` alike) -> field name, over the classes' settings; two
    classes declaring the same flag or field is a programming error."""
    names: dict[str, str] = {}
    fields: set[str] = set()
    for cls in classes:
        for f in settings_of(cls):
            key = flag_of(f).lstrip("-").replace("-", "_")
            if key in names or f.name in fields:
                raise TypeError(f"setting {f.name!r} ({flag_of(f)}) is declared twice")
            names[key] = f.name
            fields.add(f.name)
    return names


def read_config_file(path: Path, names: Mapping[str, str]) -> dict[str, Any]:
    """A flat TOML table of settings; keys are flag names (without --, `-` or `_`); returns them
    by field name."""
    try:
        values = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(f"--config {path}: no such file") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"--config {path}: not a readable TOML file ({exc})") from exc
    nested = [key for key, value in values.items() if isinstance(value, dict)]
    if nested:
        raise ConfigError(f"--config {path}: settings are top-level keys, not tables ({nested[0]!r})")
    settings = {}
    for key, value in values.items():
        name = names.get(key.replace("-", "_"))
        if name is None:
            raise ConfigError(f"--config {path}: unknown setting {key!r}")
        settings[name] = value
    return settings


def layered(
    layers: list[tuple[str, Mapping[str, Any]]],
    engine_cls: type,
    params_cls: type,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, str]]:
    """(engine values, params values, name -> source) from layers in rising priority; every value
    coerced to its field's type; a name neither class declares is a ConfigError."""
    engine_types, params_types = field_types(engine_cls), field_types(params_cls)
    engine_names = {f.name for f in settings_of(engine_cls)} | {"method"}
    params_names = {f.name for f in dataclasses.fields(params_cls)}
    engine: dict[str, Any] = {}
    params: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, values in layers:
        for name, value in values.items():
            if name in params_names:
                params[name] = coerce(params_types[name], value, _label(name, source))
            elif name in engine_names:
                engine[name] = coerce(engine_types[name], value, _label(name, source))
            else:
                raise ConfigError(f"unknown setting {name!r} ({source})")
            if source != DEFAULT:
                sources[name] = source
    return engine, params, sources


def _label(name: str, source: str) -> str:
    return name if source == FILE else "--" + name.replace("_", "-")


__all__ = ["PAPER", "SMALL_IMAGE", "add_settings", "layered", "read_config_file"]
