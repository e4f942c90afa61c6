"""[yolo] (v3/v4/v7 heads): no Caffe layer in deploy; the raw input blob is a net output.

Decoding (logistic, anchors, scale_x_y, new_coords) happens in `d2c detect` or in the
training loss layer, both from the attributes recorded here and in the JSON sidecar.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError, UnsupportedLayerError
from d2c.head_params import IOU_LOSSES, yolo_default
from d2c.layers.base import LayerConverter, Node, positive, register
from d2c.layers.common import emit_head

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


@register
class Yolo(LayerConverter):
    section = "yolo"
    alexeyab_clears_delta = True
    keys = frozenset({"classes", "num", "mask", "anchors", "max", "jitter", "ignore_thresh", "truth_thresh",
                      "random", "map", "scale_x_y", "new_coords", "iou_loss", "iou_normalizer",
                      "obj_normalizer", "cls_normalizer", "delta_normalizer", "iou_thresh",
                      "iou_thresh_kind", "beta_nms", "nms_kind", "max_delta", "label_smooth_eps",
                      "resize", "counters_per_class", "focal_loss", "objectness_smooth", "track_history_size",
                      "sim_thresh", "dets_for_track", "dets_for_show", "track_ciou_norm", "embedding_layer",
                      "show_details", "equidistant_point"})
    summary = "YOLOv3+ head: anchors/mask, scale_x_y, new_coords; loss: pjreddie + AlexeyAB keys"
    caffe_layers = "none in deploy (raw output blob); Python loss layer in train nets"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        classes = positive(sec, "classes", sec.get_int("classes", 20))
        total = positive(sec, "num", sec.get_int("num", 1))
        mask = sec.get_int_list("mask", list(range(total)))
        anchors = sec.get_float_list("anchors", [0.5] * (2 * total))
        if len(anchors) < 2 * total:
            raise CfgError(f"{sec.where_key('anchors')}: num={total} needs {2 * total} values, got {len(anchors)}")
        anchors = anchors[: 2 * total]
        for m in mask:
            if not 0 <= m < total:
                raise CfgError(f"{sec.where_key('mask')}: anchor index {m} outside 0..{total - 1}")
        if c != len(mask) * (classes + 5):
            raise CfgError(f"{sec.where}: input has {c} channels but mask has {len(mask)} anchors x "
                           f"(classes {classes} + 5) = {len(mask) * (classes + 5)}")
        flavor = graph.flavor
        iou_loss = sec.get_str("iou_loss", yolo_default("iou_loss", flavor))
        if iou_loss not in IOU_LOSSES:
            raise UnsupportedLayerError(f"{sec.where_key('iou_loss')}: '{iou_loss}' not in {IOU_LOSSES}")
        if sec.get_str("map") is not None:
            raise UnsupportedLayerError(f"{sec.where_key('map')}: class remapping files are not supported")

        def number(key: str) -> float:
            return sec.get_float(key, yolo_default(key, flavor))

        attrs = {
            "classes": classes, "mask": mask, "anchors": anchors, "num": total,
            "max_boxes": sec.get_int("max", yolo_default("max_boxes", flavor)),
            "jitter": sec.get_float("jitter", 0.2),
            "ignore_thresh": number("ignore_thresh"),
            "truth_thresh": number("truth_thresh"),
            "random": sec.get_float("random", 0.0),
            "scale_x_y": number("scale_x_y"),
            "new_coords": sec.get_int("new_coords", int(yolo_default("new_coords", flavor))),
            "iou_loss": iou_loss,
            "iou_normalizer": number("iou_normalizer"),
            "obj_normalizer": number("obj_normalizer"),
            "cls_normalizer": number("cls_normalizer"),
            "iou_thresh": number("iou_thresh"),
            "iou_thresh_kind": sec.get_str("iou_thresh_kind", yolo_default("iou_thresh_kind", flavor)),
            "label_smooth_eps": number("label_smooth_eps"),
            "max_delta": number("max_delta") if sec.has("max_delta") else None,
            "objectness_smooth": sec.get_int("objectness_smooth", 0),
            "beta_nms": sec.get_float("beta_nms", 0.6),
            "nms_kind": sec.get_str("nms_kind", "default"),
        }
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(c, h, w), attrs=attrs)

    def engine_arrays(self, l: Any, updates: bool, flavor: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """The anchors (l.biases; not in .weights)."""
        return [] if updates else [("anchors", "biases", (2 * int(l.total),))]

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        emit_head(em, node)
