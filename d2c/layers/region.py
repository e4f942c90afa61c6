"""[region] (YOLOv2 head): no Caffe layer in deploy; the raw input blob is a net output."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError, UnsupportedLayerError
from d2c.head_params import REGION_MAX_TRUTHS, region_default
from d2c.layers.base import LayerConverter, Node, positive, register
from d2c.layers.common import emit_head

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


@register
class Region(LayerConverter):
    section = "region"
    alexeyab_clears_delta = True
    keys = frozenset({"coords", "classes", "num", "softmax", "background", "log", "sqrt", "max", "jitter",
                      "rescore", "thresh", "classfix", "absolute", "random", "coord_scale", "object_scale",
                      "noobject_scale", "mask_scale", "class_scale", "bias_match", "tree", "map", "anchors"})
    summary = "YOLOv2 head: anchors in grid units, softmax or logistic classes; loss with warm-up, rescore, bias_match"
    caffe_layers = "none in deploy (raw output blob); Python loss layer in train nets"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        coords = positive(sec, "coords", sec.get_int("coords", region_default("coords")))
        classes = positive(sec, "classes", sec.get_int("classes", 20))
        num = positive(sec, "num", sec.get_int("num", 1))
        for key in ("tree", "map"):
            if sec.get_str(key) is not None:
                raise UnsupportedLayerError(f"{sec.where_key(key)}: hierarchical softmax ('{key}', "
                                            f"YOLO9000) is not supported")
        if coords != 4:
            raise UnsupportedLayerError(f"{sec.where_key('coords')}: only coords=4 is supported")
        anchors = sec.get_float_list("anchors", [0.5] * (2 * num))
        if len(anchors) < 2 * num:
            raise CfgError(f"{sec.where_key('anchors')}: num={num} needs {2 * num} values, got {len(anchors)}")
        if c != num * (coords + classes + 1):
            raise CfgError(f"{sec.where}: input has {c} channels but num {num} x (coords {coords} + classes "
                           f"{classes} + 1) = {num * (coords + classes + 1)}")
        flag = lambda key: sec.get_int(key, int(region_default(key)))  # noqa: E731
        number = lambda key: sec.get_float(key, region_default(key))  # noqa: E731
        attrs = {
            "classes": classes, "coords": coords, "num": num, "anchors": anchors[: 2 * num],
            "softmax": flag("softmax"), "background": flag("background"),
            "log": flag("log"), "sqrt": flag("sqrt"), "max_boxes": REGION_MAX_TRUTHS,
            "jitter": sec.get_float("jitter", 0.2), "rescore": flag("rescore"),
            "thresh": number("thresh"), "classfix": sec.get_int("classfix", 0),
            "absolute": sec.get_int("absolute", 0), "random": sec.get_int("random", 0),
            "coord_scale": number("coord_scale"), "object_scale": number("object_scale"),
            "noobject_scale": number("noobject_scale"),
            "mask_scale": sec.get_float("mask_scale", 1.0), "class_scale": number("class_scale"),
            "bias_match": flag("bias_match"),
        }
        sec.get_int("max", REGION_MAX_TRUTHS)  # parsed by Darknet but the loops hard-code 30
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(c, h, w), attrs=attrs)

    def engine_arrays(self, l: Any, updates: bool, flavor: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """The anchors (l.biases; not in .weights)."""
        return [] if updates else [("anchors", "biases", (2 * int(l.n),))]

    def backward_note(self, node: Node, engine: str) -> str:
        """Debian's backward_region_layer is empty on the CPU (its loss layer's darknet_compat flag)."""
        return "Debian's CPU backward passes no gradient" if engine == "pjreddie" else ""

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        emit_head(em, node)
