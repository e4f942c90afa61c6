"""The converter contract: one module per Darknet section type, registered by name.

Why a registry: adding a layer type means writing one module that says how Darknet reads the
section (keys, defaults, output shape, which arrays it has in the .weights file) and how it
maps onto stock Caffe layers. Nothing else in d2c switches on section types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from d2c.darknet.cfg import Section
from d2c.errors import CfgError, UnsupportedLayerError

if TYPE_CHECKING:  # pragma: no cover
    from d2c.caffe.emitter import Emitter
    from d2c.darknet.graph import GraphBuilder

Shape = tuple[int, int, int]  # (channels, height, width) of one image


@dataclass(frozen=True)
class ParamArray:
    """One float32 array of a layer in .weights order: its name and Darknet shape."""

    name: str
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class Node:
    """A Darknet layer after shape inference: what every later stage works from."""

    index: int
    kind: str
    section: Section
    inputs: list[int]          # Darknet indices of the layers it reads; -1 is the network input
    in_shapes: list[Shape]
    out_shape: Shape
    attrs: dict[str, Any] = field(default_factory=dict)
    params: list[ParamArray] = field(default_factory=list)

    @property
    def in_shape(self) -> Shape:
        return self.in_shapes[0]

    @property
    def prefix(self) -> str:
        """Caffe name prefix. Zero-padded because Caffe lists net outputs in name order, and the
        head outputs must come out in cfg order."""
        return f"layer{self.index:03d}"

    @property
    def where(self) -> str:
        return f"layer {self.index} {self.section.where}"

    def param_count(self) -> int:
        return sum(p.count for p in self.params)


class LayerConverter:
    """Base class. Subclasses set `section` and implement `build` and `emit`."""

    section: ClassVar[str] = ""
    #: keys the section understands beyond COMMON_KEYS; anything else is reported as unknown
    keys: ClassVar[frozenset[str]] = frozenset()
    #: one line for the generated support table
    summary: ClassVar[str] = ""
    #: the stock Caffe layers it emits, for the support table
    caffe_layers: ClassVar[str] = ""
    #: True when only AlexeyAB's Darknet knows the section
    alexeyab_only: ClassVar[bool] = False

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        """Read the section's keys, resolve inputs, infer the output shape, list the arrays."""
        raise NotImplementedError

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        """Add Caffe layers for `node`; set `em.blob_of[node.index]` to the blob holding its output."""
        raise NotImplementedError


REGISTRY: dict[str, LayerConverter] = {}


def register(cls: type[LayerConverter]) -> type[LayerConverter]:
    """Class decorator: make a converter available under its section name."""
    if not cls.section:
        raise TypeError(f"{cls.__name__} has no section name")
    if cls.section in REGISTRY:
        raise TypeError(f"section [{cls.section}] registered twice")
    REGISTRY[cls.section] = cls()
    return cls


# Converters emit fixed helper weights (reorg one-hot kernels, upsample) and, for [local], layers
# per output cell; bound both so an absurd cfg is refused before anything is allocated.
MAX_FIXED_FLOATS = 1 << 28      # 1 GiB of fixed float32 helper weights in one layer
MAX_CAFFE_LAYERS_PER_NODE = 20000


def check_emitted_size(sec: Section, key: str, floats: int = 0, layers: int = 0) -> None:
    """Refuse a section whose stock-Caffe form would need absurd fixed weights or layer counts."""
    if floats > MAX_FIXED_FLOATS:
        raise UnsupportedLayerError(f"{sec.where_key(key)}: its stock-Caffe form needs {floats:,} fixed weights "
                                    f"({floats * 4 / 2**30:.1f} GiB); refusing (limit {MAX_FIXED_FLOATS:,})")
    if layers > MAX_CAFFE_LAYERS_PER_NODE:
        raise UnsupportedLayerError(f"{sec.where_key(key)}: its stock-Caffe form needs {layers:,} Caffe layers; "
                                    f"refusing (limit {MAX_CAFFE_LAYERS_PER_NODE:,})")


def positive(sec: Section, key: str, value: int) -> int:
    """Reject zero or negative sizes early, naming the key and its line."""
    if value <= 0:
        raise CfgError(f"{sec.where_key(key)}: must be > 0, got {value}")
    return value
