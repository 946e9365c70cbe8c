"""Frozen, typed, self-validating configs that serialise to JSON with a type name and version.

Every config class registers itself with :func:`register`; :func:`config_from_dict` rebuilds it
from the JSON a checkpoint stores, refusing unknown types, newer versions and unknown fields.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")

_REGISTRY: dict[str, type] = {}


class ConfigError(ValueError):
    """A config (or the JSON it came from) is invalid; the message says which field and how to fix it."""


def register(cls: type[C]) -> type[C]:
    """Class decorator: make a frozen dataclass loadable by its ``TYPE`` name."""
    if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"{cls.__name__} must be a frozen dataclass")
    for attr in ("TYPE", "VERSION"):
        if not hasattr(cls, attr):
            raise TypeError(f"{cls.__name__} needs a class attribute {attr}")
    _REGISTRY[cls.TYPE] = cls  # type: ignore[attr-defined]
    return cls


def require(condition: bool, cls_name: str, field: str, message: str) -> None:
    """Raise a :class:`ConfigError` naming the config class and field when ``condition`` is false."""
    if not condition:
        raise ConfigError(f"{cls_name}.{field}: {message}")


def config_to_dict(config: Any) -> dict[str, Any]:
    """Serialise a registered config: ``{"type", "version", **fields}`` (tuples become lists)."""
    body = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        body[f.name] = list(value) if isinstance(value, tuple) else value
    return {"type": config.TYPE, "version": config.VERSION, **body}


def config_from_dict(data: dict[str, Any], *, source: str = "<dict>") -> Any:
    """Rebuild a registered config; ``source`` (a file name) is named in every error."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
    type_name = data.get("type")
    if type_name not in _REGISTRY:
        raise ConfigError(
            f"{source}: field 'type' is {type_name!r}; known config types: {sorted(_REGISTRY)}"
        )
    cls = _REGISTRY[type_name]
    version = data.get("version")
    if not isinstance(version, int) or version > cls.VERSION:
        raise ConfigError(
            f"{source}: field 'version' is {version!r} but this toolkit reads {type_name} "
            f"up to version {cls.VERSION}; upgrade adm-edge or re-save the config"
        )
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names) - {"type", "version"})
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {unknown} for {type_name}")
    kwargs = {}
    for name, value in data.items():
        if name in ("type", "version"):
            continue
        kwargs[name] = tuple(value) if isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def save_config(config: Any, path: Path) -> None:
    path.write_text(json.dumps(config_to_dict(config), indent=2) + "\n")


def load_config(path: Path) -> Any:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    return config_from_dict(data, source=str(path))
