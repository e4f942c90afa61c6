"""[avgpool]: Darknet's global average (C x H x W -> C x 1 x 1), i.e. Pooling AVE global.

Darknet sums each channel's H*W values in order and divides once (the Debian -Ofast build
turns the division into a multiplication by the float reciprocal 1/(H*W), measured bit-exact);
Caffe's AVE pooling with global_pooling sums over a window covering the map and divides, so
results agree to an ulp or two.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.layers.base import LayerConverter, Node, register

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


def avgpool_reference(x: np.ndarray) -> np.ndarray:
    """numpy reference of the Debian build's forward_avgpool_layer on (N, C, H, W): float sums in
    index order, then times the float reciprocal of H*W (-Ofast's -freciprocal-math)."""
    n, c, h, w = x.shape
    flat = x.reshape(n, c, h * w).astype(np.float32)
    total = np.zeros((n, c), np.float32)
    for i in range(h * w):
        total += flat[:, :, i]
    return (total * np.float32(1.0 / (h * w))).reshape(n, c, 1, 1)


@register
class Avgpool(LayerConverter):
    section = "avgpool"
    keys = frozenset()
    summary = "global average over H x W (classifier heads)"
    caffe_layers = "Pooling AVE global_pooling"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(c, 1, 1))

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        name = f"{node.prefix}_avgpool"
        em.add("Pooling", name, [em.blob(node.inputs[0])], [name],
               pooling_param={"pool": "AVE", "global_pooling": True})
        em.blob_of[node.index] = name
