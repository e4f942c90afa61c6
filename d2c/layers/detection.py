"""[detection] (YOLOv1 head): no Caffe layer in deploy; the raw input blob is a net output.

Darknet's forward_detection_layer copies its flat input (side*side*((1+coords)*num + classes)
values: class probabilities per cell, then confidences, then boxes) and, with softmax=1,
normalises each cell's class block. Decoding (and that softmax) belongs to the decoder, from
the attributes recorded here and in the JSON sidecar, as for [yolo] and [region].
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError, UnsupportedLayerError
from d2c.layers.base import LayerConverter, Node, positive, register
from d2c.layers.common import emit_head

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


@register
class Detection(LayerConverter):
    section = "detection"
    alexeyab_clears_delta = True
    keys = frozenset({"coords", "classes", "rescore", "num", "side", "softmax", "sqrt", "max", "coord_scale",
                      "forced", "object_scale", "noobject_scale", "class_scale", "jitter", "random", "reorg"})
    summary = "YOLOv1 head: raw output recorded with side/num/coords/classes for decoding"
    caffe_layers = "none in deploy (raw output blob)"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        coords = positive(sec, "coords", sec.get_int("coords", 1))
        classes = positive(sec, "classes", sec.get_int("classes", 1))
        num = positive(sec, "num", sec.get_int("num", 1))
        side = positive(sec, "side", sec.get_int("side", 7))
        expected = side * side * ((1 + coords) * num + classes)
        if c * h * w != expected:
            raise CfgError(f"{sec.where}: input has {c * h * w} values ({c}x{h}x{w}) but side {side}^2 x "
                           f"((1 + coords {coords}) x num {num} + classes {classes}) = {expected}")
        if sec.get_int("reorg", 0):
            raise UnsupportedLayerError(f"{sec.where_key('reorg')}: detection 'reorg' is not supported")
        attrs = {
            "coords": coords, "classes": classes, "num": num, "side": side,
            "rescore": sec.get_int("rescore", 0), "softmax": sec.get_int("softmax", 0),
            "sqrt": sec.get_int("sqrt", 0), "max_boxes": sec.get_int("max", 90),
            "coord_scale": sec.get_float("coord_scale", 1.0), "forced": sec.get_int("forced", 0),
            "object_scale": sec.get_float("object_scale", 1.0),
            "noobject_scale": sec.get_float("noobject_scale", 1.0),
            "class_scale": sec.get_float("class_scale", 1.0), "jitter": sec.get_float("jitter", 0.2),
            "random": sec.get_int("random", 0),
        }
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(c, h, w), attrs=attrs)

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        if em.training:
            raise UnsupportedLayerError(f"{node.where}: training a YOLOv1 [detection] head is not supported")
        emit_head(em, node)
