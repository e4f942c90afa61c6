"""Train-net emission for detection heads: the Python loss layers and the `truth` input blob.

Why here and not in d2c/layers/yolo.py: the deploy converters must not depend on the loss
machinery; in train mode they call `emit_loss_layer`, and `convert.build_conversion` calls
`add_truth_input` once every layer has been emitted (that is also when the number of heads L,
which normalises every loss top, is known, so it is filled in there).

Truth blob width (Darknet's `net->truths`, records of (x, y, w, h, class)):
- pjreddie [yolo]: 90 boxes x 5 (l.truths is hard-coded to 90*5 whatever `max` says);
- [region]: 30 boxes x 5 (the loops hard-code 30);
- AlexeyAB [yolo]: Darknet uses 6-float records (track_id last) and `max` boxes (default 200).
  The loss never reads track_id, so d2c uses 5-float records of max(max over heads) boxes:
  (batch, max*5). Feed 5-float records; a (b, K, 6) array must be sliced to [:, :, :5] first.
"""
from __future__ import annotations

from typing import Any

from d2c.caffe.emitter import Emitter
from d2c.errors import D2CError, ParamError, UnsupportedLayerError
from d2c.head_params import PJREDDIE_YOLO_TRUTHS, REGION_MAX_TRUTHS, head_params, head_params_json, yolo_default
from d2c.darknet.node import Node
from d2c.loss.params import LOSS_SCHEMA, check_object, dump_params, parse_param_str

LOSS_MODULE = "d2c.loss.caffe_layers"
LAYER_CLASS = {"yolo": "YoloLoss", "region": "RegionLoss"}
TRUTH_BLOB = "truth"


def loss_layer_name(node: Node) -> str:
    return f"{node.prefix}_loss"


def emit_loss_layer(em: Emitter, node: Node, blob: str) -> None:
    """A Python loss layer on the head's raw input blob and the truth blob (train nets only)."""
    kind = node.kind
    if kind not in LAYER_CLASS:
        raise UnsupportedLayerError(f"{node.where}: no training loss for [{kind}]")
    _c, net_h, net_w = em.input_shape
    params = head_params_json(kind, node.attrs, net_w, net_h, em.options.flavor)
    try:  # validate now, so a bad head fails at convert time with the cfg line, not in Caffe
        head_params(kind, node.attrs, net_w, net_h, em.options.flavor)
    except D2CError as exc:
        raise type(exc)(f"{node.where}: {exc}", exc.problems) from None
    name = loss_layer_name(node)
    config = {"name": name, "kind": kind, "heads": max(1, len(em.heads)), "params": params,
              "darknet_compat": bool(em.options.darknet_compat)}
    em.add("Python", name, [blob, TRUTH_BLOB], [name],
           python_param={"module": LOSS_MODULE, "layer": LAYER_CLASS[kind], "param_str": dump_params(config)},
           loss_weight=[1.0], propagate_down=[True, False])


def loss_layers(em: Emitter) -> list:
    """The CaffeLayers emit_loss_layer added, in net order."""
    return [layer for layer in em.layers if is_loss_layer(layer)]


def is_loss_layer(layer: Any) -> bool:
    """True for a CaffeLayer that is one of d2c's detection loss layers."""
    pp = layer.params.get("python_param", {}) if layer.type == "Python" else {}
    return pp.get("module") == LOSS_MODULE and pp.get("layer") in LAYER_CLASS.values()


def truth_boxes(em: Emitter) -> int:
    """Boxes per image in the truth blob (see the module docstring)."""
    kinds = {head.kind for head in em.heads}
    if not kinds:
        raise UnsupportedLayerError("a training net needs at least one [yolo] or [region] head; this cfg has none")
    if len(kinds) > 1:
        raise UnsupportedLayerError("a cfg mixing [yolo] and [region] heads has no single Darknet truth layout "
                                    "(net->truths comes from the last layer); not supported for training")
    if "region" in kinds:
        return REGION_MAX_TRUTHS
    if em.options.flavor == "pjreddie":
        return PJREDDIE_YOLO_TRUTHS
    return max(int(head.attrs.get("max_boxes") or yolo_default("max_boxes", "alexeyab")) for head in em.heads)


def add_truth_input(em: Emitter, graph: Any) -> None:
    """Add the (batch, boxes*5) `truth` Input blob and fix every loss layer's head count L."""
    boxes = truth_boxes(em)
    layers = loss_layers(em)
    for layer in layers:
        pp = layer.params["python_param"]
        owner = f"Caffe layer '{layer.name}'"
        config = check_object(parse_param_str(pp["param_str"], owner), LOSS_SCHEMA, owner)
        config["heads"] = len(layers)
        pp["param_str"] = dump_params(config)
    if any(name == TRUTH_BLOB for name, _shape in em.extra_inputs):
        raise ParamError(f"the net already has an input named '{TRUTH_BLOB}'")
    em.extra_inputs.append((TRUTH_BLOB, (em.options.batch, boxes * 5)))
