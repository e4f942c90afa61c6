"""Converters, one module per Darknet section type; importing this package registers them all."""
from __future__ import annotations

import importlib
import pkgutil

from d2c.darknet.node import Node, ParamArray, Shape
from d2c.layers.base import REGISTRY, LayerConverter, register

_INFRA = {"base", "common"}
for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in _INFRA:
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["REGISTRY", "LayerConverter", "Node", "ParamArray", "Shape", "register"]
