"""[softmax]: Darknet's softmax over the flattened C·H·W vector, in `groups` equal chunks.

forward_softmax_layer runs softmax_cpu(input, n = inputs/groups, ..., groups, group_offset =
inputs/groups, stride 1, temperature): each contiguous chunk of the channel-major buffer is one
softmax, i.e. over channels *and* positions, not per pixel. On a C x 1 x 1 input with one
group that is Caffe's Softmax over axis 1; otherwise the blob is reshaped to N x groups x
(inputs/groups), normalised over axis 2 and reshaped back. A temperature t becomes a Power
layer (scale 1/t) first: exp(x/t - max/t) in Darknet vs exp(x*(1/t) - max) in Caffe, equal to
a few ulps. Hierarchical softmax (`tree`, YOLO9000) has no stock form.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError, UnsupportedLayerError
from d2c.layers.base import LayerConverter, Node, positive, register
from d2c.numerics import softmax_darknet

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


def softmax_reference(x: np.ndarray, groups: int = 1, temperature: float = 1.0) -> np.ndarray:
    """numpy reference of Darknet's softmax layer on (N, C, H, W): one softmax per flat chunk."""
    chunks = np.asarray(x, np.float32).reshape(x.shape[0], groups, -1)
    return softmax_darknet(chunks, axis=2, temperature=temperature).reshape(x.shape)


@register
class Softmax(LayerConverter):
    section = "softmax"
    keys = frozenset({"groups", "temperature", "tree", "spatial", "noloss"})
    summary = "softmax over the flat C·H·W vector in `groups` chunks, with temperature (no `tree`)"
    caffe_layers = "Softmax (axis 1) | Reshape + [Power] + Softmax (axis 2) + Reshape"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        if sec.get_str("tree") is not None:
            raise UnsupportedLayerError(f"{sec.where_key('tree')}: hierarchical softmax (YOLO9000 word tree) "
                                        f"has no stock-Caffe equivalent")
        groups = positive(sec, "groups", sec.get_int("groups", 1))
        inputs = c * h * w
        if inputs % groups:
            raise CfgError(f"{sec.where_key('groups')}: {inputs} inputs ({c}x{h}x{w}) do not split into "
                           f"{groups} equal groups")
        temperature = sec.get_float("temperature", 1.0)
        if temperature <= 0.0:
            raise CfgError(f"{sec.where_key('temperature')}: must be > 0, got {temperature}")
        sec.get_float("spatial", 0.0)   # read by Darknet, used only by its GPU path
        sec.get_int("noloss", 0)        # loss bookkeeping only
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(c, h, w), attrs={"groups": groups, "temperature": temperature})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        c, h, w = node.in_shape
        groups, temperature = node.attrs["groups"], node.attrs["temperature"]
        bottom = em.blob(node.inputs[0])
        name = f"{node.prefix}_softmax"
        simple = groups == 1 and h == 1 and w == 1
        blob = bottom
        if not simple:
            blob = f"{name}_chunks"
            em.add("Reshape", blob, [bottom], [blob],
                   reshape_param={"shape": {"dim": [0, groups, c * h * w // groups]}})
        if temperature != 1.0:
            scaled = f"{name}_scaled"
            em.add("Power", scaled, [blob], [scaled], power_param={"scale": 1.0 / temperature})
            blob = scaled
        if simple:
            em.add("Softmax", name, [blob], [name], softmax_param={"axis": 1})
        else:
            normed = f"{name}_flat"
            em.add("Softmax", normed, [blob], [normed], softmax_param={"axis": 2})
            em.add("Reshape", name, [normed], [name], reshape_param={"shape": {"dim": [0, c, h, w]}})
        em.blob_of[node.index] = name
