"""[sam] (AlexeyAB, YOLOv4 spatial attention): out = act(prev * from), elementwise.

forward_sam_layer multiplies the previous layer's output by layer `from`'s output element by
element (shapes must be equal: make_sam_layer asserts it) and then applies the activation,
which is Eltwise PROD followed by the activation's layer. The product of two floats is exact
to the rounding, in either operand order.
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


@register
class Sam(LayerConverter):
    section = "sam"
    keys = frozenset({"from", "activation"})
    summary = "spatial attention: previous ⊙ `from` (same shape), then activation"
    caffe_layers = "Eltwise PROD + activation"
    alexeyab_only = True

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, prev_shape = graph.previous(sec)
        refs = sec.get_int_list("from", required=True)
        if len(refs) != 1:
            raise CfgError(f"{sec.where_key('from')}: [sam] reads exactly one layer, got {len(refs)}")
        source = graph.resolve(sec, "from", refs[0])
        shape = graph.shape_of(source)
        if shape != prev_shape:
            raise CfgError(f"{sec.where_key('from')}: layer {source} is {'x'.join(map(str, shape))} but the "
                           f"previous layer is {'x'.join(map(str, prev_shape))}; [sam] needs equal shapes")
        refuse_zeroing_activation(sec, sec.get_str("activation", "linear"), graph.flavor)
        warnings: list[str] = []
        act = read_activation(sec, "linear", graph.flavor, warnings)
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev, source],
                    in_shapes=[prev_shape, shape], out_shape=shape,
                    attrs={"activation": act, "warnings": warnings})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        name = f"{node.prefix}_sam"
        em.add("Eltwise", name, [em.blob(node.inputs[0]), em.blob(node.inputs[1])], [name],
               eltwise_param={"operation": "PROD"})
        em.blob_of[node.index] = emit_activation(em, node, name, node.attrs["activation"])
