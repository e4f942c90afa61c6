"""[upsample]: nearest neighbour x stride (times `scale`), or sum-pooling for negative stride.

A depthwise Deconvolution with kernel = stride = s and every weight equal to `scale` writes
exactly scale*x into each output cell (one product, no sum), which is Darknet's upsample_cpu.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError
from d2c.layers.base import LayerConverter, Node, register

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


@register
class Upsample(LayerConverter):
    section = "upsample"
    keys = frozenset({"stride", "scale"})
    summary = "nearest neighbour with scale; negative stride (sum-pool)"
    caffe_layers = "Deconvolution (depthwise, fixed weights) | Convolution for negative stride"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        stride = sec.get_int("stride", 2)
        scale = sec.get_float("scale", 1.0)
        if stride == 0:
            raise CfgError(f"{sec.where_key('stride')}: must not be 0")
        if stride > 0:
            out = (c, h * stride, w * stride)
        else:
            if h % -stride or w % -stride:
                raise CfgError(f"{sec.where_key('stride')}: {h}x{w} is not divisible by {-stride}")
            out = (c, h // -stride, w // -stride)
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=out, attrs={"stride": stride, "scale": scale})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        c = node.in_shape[0]
        s = abs(node.attrs["stride"])
        name = f"{node.prefix}_upsample"
        weights = np.full((c, 1, s, s), node.attrs["scale"], np.float32)
        param = {"num_output": c, "kernel_size": [s], "stride": [s], "group": c, "bias_term": False}
        layer_type = "Deconvolution" if node.attrs["stride"] > 0 else "Convolution"
        em.add(layer_type, name, [em.blob(node.inputs[0])], [name], [weights],
               convolution_param=param, param=em.frozen(1))
        em.blob_of[node.index] = name
