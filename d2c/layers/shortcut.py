"""[shortcut]: out = act(alpha*prev + beta*from); AlexeyAB adds several `from`s.

Unequal channel counts (yolov3-tiny-prn) add into the first min(C) channels in both lineages
(pjreddie's shortcut_cpu loops to min(c); AlexeyAB adds a channel prefix).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import NeedsAlexeyABError, UnsupportedLayerError
from d2c.layers.base import LayerConverter, Node, register
from d2c.layers.common import emit_activation, read_activation
from d2c.layers.route import emit_channel_crop

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


@register
class Shortcut(LayerConverter):
    section = "shortcut"
    alexeyab_clears_delta = True
    keys = frozenset({"from", "activation", "alpha", "beta", "weights_type", "weights_normalization"})
    summary = "residual sum with activation, alpha/beta, several `from` and unequal channels (channel prefix)"
    caffe_layers = "Eltwise SUM [+ Crop/Slice/Concat for unequal channels] + activation"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, prev_shape = graph.previous(sec)
        sources = [graph.resolve(sec, "from", r) for r in sec.get_int_list("from", required=True)]
        if len(sources) > 1 and graph.flavor == "pjreddie":
            raise NeedsAlexeyABError(f"{sec.where_key('from')}: pjreddie Darknet reads one `from` only")
        if sec.get_str("weights_type", "none") != "none":
            raise UnsupportedLayerError(f"{sec.where_key('weights_type')}: weighted shortcuts are not supported")
        shapes = [graph.shape_of(s) for s in sources]
        for s, shape in zip(sources, shapes):
            if shape[1:] != prev_shape[1:]:
                raise UnsupportedLayerError(
                    f"{sec.where_key('from')}: layer {s} is {shape[1]}x{shape[2]} but the previous layer is "
                    f"{prev_shape[1]}x{prev_shape[2]}; strided shortcuts have no stock-Caffe form")
        alpha = sec.get_float("alpha", 1.0)
        beta = sec.get_float("beta", 1.0)
        warnings: list[str] = []
        act = read_activation(sec, "linear", graph.flavor, warnings)
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev, *sources],
                    in_shapes=[prev_shape, *shapes], out_shape=prev_shape,
                    attrs={"alpha": alpha, "beta": beta, "activation": act, "warnings": warnings})

    def engine_arrays(self, l: Any, updates: bool, flavor: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """AlexeyAB's weighted shortcut: its nweights per-input (or per-channel) weights."""
        if flavor != "alexeyab" or l.nweights <= 0:
            return []
        name = "weight_updates" if updates else "weights"
        return [(name, name, (int(l.nweights),))]

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        a = node.attrs
        base = f"{node.prefix}"
        prev_shape = node.in_shapes[0]
        c_out = prev_shape[0]
        total = em.blob(node.inputs[0])
        for k, (src, shape) in enumerate(zip(node.inputs[1:], node.in_shapes[1:])):
            addend = em.blob(src)
            if shape[0] > c_out:  # only the first c_out channels of `from` are added
                addend = emit_channel_crop(em, f"{base}_from{k}_prefix", addend, shape, 0, c_out,
                                           reference=total)
            coeff = {"coeff": [a["alpha"] if k == 0 else 1.0, a["beta"]]}
            if coeff["coeff"] == [1.0, 1.0]:
                coeff = {}
            name = f"{base}_shortcut" if k == len(node.inputs) - 2 else f"{base}_sum{k}"
            if shape[0] < c_out:  # add into the channel prefix, pass the rest through
                head, tail = f"{base}_prefix{k}", f"{base}_rest{k}"
                em.add("Slice", f"{base}_split{k}", [total], [head, tail],
                       slice_param={"axis": 1, "slice_point": [shape[0]]})
                summed = f"{base}_prefix_sum{k}"
                em.add("Eltwise", summed, [head, addend], [summed],
                       eltwise_param={"operation": "SUM", **coeff})
                em.add("Concat", name, [summed, tail], [name], concat_param={"axis": 1})
            else:
                em.add("Eltwise", name, [total, addend], [name],
                       eltwise_param={"operation": "SUM", **coeff})
            total = name
        em.blob_of[node.index] = emit_activation(em, node, total, a["activation"])
