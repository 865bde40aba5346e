"""The registry of classes `efffeat.save` / `efffeat.load` may write and rebuild.

A class registers itself where it is defined (``@register``), so the registry never names classes of
higher modules. A savable class implements::

    def to_state(self) -> tuple[dict[str, Tensor], dict]: ...      # tensors, JSON-able metadata
    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict): ...

and, to have its files checked before anything is built, ``validate_state(tensors, meta)`` (`efffeat.io`).

Its tag in a save file is its import path ``"package.module:Class"``; `load` imports modules of efffeat
itself by that path (which registers their classes) and nothing else, so classes of other packages must be
registered before loading their files.
"""

from __future__ import annotations

import importlib
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

_CLASSES: dict[str, type] = {}
_PATHS: set[str] = set()  # registered by import path before their module is imported


def tag_of(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def register(target: T) -> T:
    """Make a class savable: use as a class decorator, or pass the import path ``"package.module:Class"``."""
    if isinstance(target, str):
        module, _, name = target.partition(":")
        if not module or not name:
            raise ConfigError(f"register takes a class or an import path 'package.module:Class', got {target!r}")
        _PATHS.add(target)
        return target
    if not isinstance(target, type):
        raise ConfigError(f"register takes a class or an import path 'package.module:Class', got {target!r}")
    if not (callable(getattr(target, "to_state", None)) and callable(getattr(target, "from_state", None))):
        raise ConfigError(f"{target.__name__} does not implement to_state()/from_state(), so it cannot be saved")
    _CLASSES[tag_of(target)] = target
    return target


def _import(tag: str) -> Any:
    module, _, name = tag.partition(":")
    obj: Any = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def class_for(tag: str) -> type | None:
    """The registered class of a tag, importing efffeat's own module of it when needed; None if unknown."""
    if tag not in _CLASSES and (tag in _PATHS or tag.startswith("efffeat.")):
        try:
            obj = _import(tag)
        except (ImportError, AttributeError):
            return None
        if tag in _PATHS and isinstance(obj, type):
            register(obj)
    return _CLASSES.get(tag)


def tag_for(obj: Any) -> str | None:
    """The tag of an object's class if it is registered (by decorator or import path), else None."""
    tag = tag_of(type(obj))
    if tag in _CLASSES:
        return tag
    if tag in _PATHS:
        register(type(obj))
        return tag
    return None
