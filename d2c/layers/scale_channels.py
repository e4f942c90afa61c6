"""[scale_channels] (AlexeyAB, squeeze-excitation): out = act(from ⊙ broadcast(prev)).

forward_scale_channels_layer, default: the previous layer is C x 1 x 1 (asserted) and
out[c][y][x] = prev[c] * from[c][y][x]. With scale_wh=1 the previous layer is 1 x H x W and
out[c][y][x] = prev[y][x] * from[c][y][x]. Output shape is `from`'s.

Caffe forms (each a single float product per element, so exact):
  per channel: Flatten(prev) to N x C, then Scale with two bottoms (from, scale) and axis 0,
               which multiplies from[n][c][:, :] by scale[n][c];
  scale_wh:    a fixed 1x1 Convolution with C all-ones filters copies the 1 x H x W map into
               C channels (one product by 1.0 each), then Eltwise PROD with `from`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError
from d2c.layers.activation import refuse_zeroing_activation
from d2c.layers.base import LayerConverter, Node, register
from d2c.layers.common import emit_activation, read_activation

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


def scale_channels_reference(prev: np.ndarray, source: np.ndarray, scale_wh: bool) -> np.ndarray:
    """numpy reference on (N, ., ., .) arrays: the product AlexeyAB computes, before activation."""
    if scale_wh:
        return (source * prev[:, :1, :, :]).astype(np.float32)
    return (source * prev.reshape(prev.shape[0], -1, 1, 1)).astype(np.float32)


@register
class ScaleChannels(LayerConverter):
    section = "scale_channels"
    keys = frozenset({"from", "scale_wh", "activation"})
    summary = "squeeze-excitation: `from` ⊙ per-channel C×1×1 (or per-pixel 1×H×W with scale_wh), then activation"
    caffe_layers = "Flatten + Scale (2 bottoms, axis 0) | 1x1 all-ones Convolution + Eltwise PROD; + activation"
    alexeyab_only = True

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        refs = sec.get_int_list("from", required=True)
        if len(refs) != 1:
            raise CfgError(f"{sec.where_key('from')}: [scale_channels] reads exactly one layer, got {len(refs)}")
        source = graph.resolve(sec, "from", refs[0])
        c2, h2, w2 = graph.shape_of(source)
        scale_wh = bool(sec.get_int("scale_wh", 0))
        if not scale_wh and not (h == 1 and w == 1 and c == c2):
            raise CfgError(f"{sec.where_key('from')}: the previous layer must be {c2}x1x1 (one scale per "
                           f"channel of layer {source}), got {c}x{h}x{w}")
        if scale_wh and not (c == 1 and (h, w) == (h2, w2)):
            raise CfgError(f"{sec.where_key('scale_wh')}: the previous layer must be 1x{h2}x{w2} (one scale "
                           f"per pixel of layer {source}), got {c}x{h}x{w}")
        refuse_zeroing_activation(sec, sec.get_str("activation", "linear"), graph.flavor)
        warnings: list[str] = []
        act = read_activation(sec, "linear", graph.flavor, warnings)
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev, source],
                    in_shapes=[(c, h, w), (c2, h2, w2)], out_shape=(c2, h2, w2),
                    attrs={"scale_wh": scale_wh, "activation": act, "warnings": warnings})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        prev, source = em.blob(node.inputs[0]), em.blob(node.inputs[1])
        name = f"{node.prefix}_scale_channels"
        c2 = node.in_shapes[1][0]
        if node.attrs["scale_wh"]:
            tiled = f"{node.prefix}_broadcast"
            em.add("Convolution", tiled, [prev], [tiled], [np.ones((c2, 1, 1, 1), np.float32)],
                   convolution_param={"num_output": c2, "kernel_size": [1], "bias_term": False},
                   param=em.frozen(1))
            em.add("Eltwise", name, [source, tiled], [name], eltwise_param={"operation": "PROD"})
        else:
            flat = f"{node.prefix}_scales"
            em.add("Flatten", flat, [prev], [flat], flatten_param={"axis": 1})
            em.add("Scale", name, [source, flat], [name], scale_param={"axis": 0})
        em.blob_of[node.index] = emit_activation(em, node, name, node.attrs["activation"])
