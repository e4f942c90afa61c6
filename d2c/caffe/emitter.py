"""Collects the Caffe layers the converters emit, and the bookkeeping between them.

Why a shared emitter: converters only say "this Darknet layer is these Caffe layers"; naming,
blob lookup, training-vs-deploy parameter specs and the head list live in one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from d2c.caffe.proto import CaffeLayer, CaffeNet

DEPLOY = "deploy"
TRAIN = "train"


@dataclass
class ConvertOptions:
    """What kind of Caffe model to write."""

    flavor: str = "pjreddie"     # which Darknet's numerics to reproduce
    fold_bn: bool = False        # fold BatchNorm+Scale into the convolution (deploy only)
    mode: str = DEPLOY           # deploy: Input -> raw head outputs; train: + truth input and loss layers
    bn: str = "exact"            # train mode BN: exact (Darknet BN Python layer), stock (Caffe BatchNorm), frozen
    batch: int = 1
    darknet_compat: bool = False  # train mode: emulate Debian Darknet's CPU gradient defects
    target: str = "caffe"        # deploy toolchain the net is rewritten for (d2c.targets)


@dataclass
class Head:
    """A [yolo] or [region] head: which blob carries its input, and how to decode it."""

    index: int
    kind: str
    blob: str
    shape: tuple[int, int, int]
    attrs: dict[str, Any]


@dataclass
class Emitter:
    net_name: str
    options: ConvertOptions
    input_shape: tuple[int, int, int]
    layers: list[CaffeLayer] = field(default_factory=list)
    blob_of: dict[int, str] = field(default_factory=lambda: {-1: "data"})   # -1: the network input
    heads: list[Head] = field(default_factory=list)
    extra_inputs: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)  # e.g. ("truth", (b, 450))
    origin: dict[str, int] = field(default_factory=dict)   # Caffe layer name -> Darknet layer index
    _names: set[str] = field(default_factory=set)

    @property
    def training(self) -> bool:
        return self.options.mode == TRAIN

    def blob(self, index: int) -> str:
        """The Caffe blob that holds Darknet layer `index`'s output (-1: the input)."""
        return self.blob_of[index]

    def add(self, type_: str, name: str, bottom: list[str], top: list[str],
            blobs: list[np.ndarray] | None = None, **params: Any) -> CaffeLayer:
        """Append one Caffe layer; names must be unique."""
        if name in self._names:
            raise ValueError(f"duplicate Caffe layer name {name}")
        self._names.add(name)
        layer = CaffeLayer(name=name, type=type_, bottom=list(bottom), top=list(top),
                           params={k: v for k, v in params.items() if v is not None},
                           blobs=[np.ascontiguousarray(b, dtype=np.float32) for b in (blobs or [])])
        self.layers.append(layer)
        return layer

    def learnable(self, lr_mult: float, with_bias: bool) -> list[dict[str, float]] | None:
        """ParamSpecs for a learnable weight (+bias): Darknet decays weights only, never biases."""
        bias = [{"lr_mult": lr_mult, "decay_mult": 0.0}] if with_bias else []
        return [{"lr_mult": lr_mult, "decay_mult": 1.0}, *bias] if self.training else None

    def frozen(self, count: int) -> list[dict[str, float]] | None:
        """ParamSpecs for fixed helper weights (upsample, reorg): never learned, never decayed."""
        return [{"lr_mult": 0.0, "decay_mult": 0.0}] * count if self.training else None

    def net(self) -> CaffeNet:
        c, h, w = self.input_shape
        inputs: list[tuple[str, tuple[int, ...]]] = [("data", (self.options.batch, c, h, w)), *self.extra_inputs]
        return CaffeNet(name=self.net_name, inputs=inputs, layers=list(self.layers))
