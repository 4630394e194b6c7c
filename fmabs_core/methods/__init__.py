"""Training methods: one file per method family, each class registering itself with ``@register``.

Adding a method is one new file in this folder (plus its test): a :class:`~fmabs_core.methods.base.Method`
subclass with a ``name``, a docstring whose first line describes it, a ``Config`` dataclass of its
options (each field declared with ``option(default, help)`` becomes a ``fmabs train`` option) and the hooks it
needs. The files are found by scanning this folder, so nothing else is edited: ``fmabs train
--method``, its options and ``--help``, ``fmabs methods`` and the Slicer Train panel list it.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import MISSING, fields
from typing import TYPE_CHECKING, Any, Mapping, TypeVar

from fmabs_core.errors import InputError

if TYPE_CHECKING:
    from fmabs_core.methods.base import Method

M = TypeVar("M", bound=type)

_REGISTRY: dict[str, type] = {}
_DISCOVERED: list[bool] = []  # set once this folder was scanned (a method module may be imported before)
_NOT_METHODS = {"base", "losses"}  # modules of this folder that define no method


def register(cls: M) -> M:
    """Class decorator: make a Method subclass available under its ``name``."""
    name = getattr(cls, "name", "")
    if not name or not isinstance(name, str):
        raise TypeError(f"{cls.__qualname__}: a registered method needs a non-empty 'name'")
    other = _REGISTRY.get(name)
    if other is not None and other is not cls and other.__qualname__ != cls.__qualname__:
        raise TypeError(f"method name '{name}' is taken by {other.__module__}.{other.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def _discover() -> None:
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_") and info.name not in _NOT_METHODS:
            importlib.import_module(f"{__name__}.{info.name}")


def available() -> dict[str, type["Method"]]:
    """Every registered method by name (importing this folder's method files once)."""
    if not _DISCOVERED:
        _discover()
        _DISCOVERED.append(True)
    return dict(sorted(_REGISTRY.items()))


def get_method(name: str, options: Mapping[str, Any] | None = None) -> "Method":
    """A fresh instance of method ``name`` with its options (unknown or ill-typed ones are refused by name)."""
    methods = available()
    if name not in methods:
        raise InputError(f"unknown method '{name}' (choose from {', '.join(methods)})")
    cls = methods[name]
    return cls(cls.make_config(options or {}))


def describe() -> list[dict[str, Any]]:
    """Name, description, label kind, default iterations and options of every method (``fmabs methods --json``)."""
    from fmabs_core.training.config import default_iterations

    out = []
    for name, cls in available().items():
        options = []
        for f in fields(cls.Config):
            default = f.default if f.default is not MISSING else None
            options.append({"name": f.name, "type": str(f.type), "default": default,
                            "help": f.metadata.get("help", "")})
        out.append({"name": name, "description": cls.describe(), "supervision": cls.supervision,
                    "uses_unlabelled": cls.uses_unlabelled, "iterations": default_iterations(name),
                    "options": options})
    return out
