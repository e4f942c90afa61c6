"""The Darknet layer after shape inference (Node) and its parameter arrays (ParamArray).

Why a module of its own: the graph builder creates nodes and the converters (d2c.layers) read
them; both import this module, neither imports the other at load time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from d2c.darknet.cfg import Section

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
