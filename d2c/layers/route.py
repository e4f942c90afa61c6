"""[route]: the listed layers' outputs concatenated along channels (AlexeyAB: a channel group each).

A channel group is taken with Crop(axis 1) against a zero-cost Reshape of the source that has
the group's channel count, so no Slice top is left dangling (which would become a net output).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError, UnsupportedLayerError
from d2c.layers.base import LayerConverter, Node, positive, register

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


def emit_channel_crop(em: Emitter, name: str, source: str, shape: tuple[int, int, int],
                      first: int, count: int, reference: str | None = None) -> str:
    """Channels [first, first+count) of `source` (shape C x H x W) as a new blob named `name`.

    `reference` is any blob whose dims 1..3 are (count, H, W); without one, a free Reshape of
    the source serves, which needs count to divide C.
    """
    c, h, w = shape
    if first == 0 and count == c:
        return source
    ref = reference
    if ref is None:
        if c % count:
            raise ValueError(f"{name}: no reference blob and {count} does not divide {c}")
        ref = f"{name}_shape_ref"
        em.add("Reshape", ref, [source], [ref],
               reshape_param={"shape": {"dim": [-1, count, h, w]}})
    em.add("Crop", name, [source, ref], [name], crop_param={"axis": 1, "offset": [first, 0, 0]},
           propagate_down=[True, False] if em.training else None)
    return name


@register
class Route(LayerConverter):
    section = "route"
    keys = frozenset({"layers", "groups", "group_id"})
    summary = "concat of same-size inputs; AlexeyAB groups/group_id"
    caffe_layers = "(blob reuse) | Concat | Crop+Reshape for a channel group"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        refs = sec.get_int_list("layers", required=True)
        inputs = [graph.resolve(sec, "layers", r) for r in refs]
        shapes = [graph.shape_of(i) for i in inputs]
        groups = positive(sec, "groups", sec.get_int("groups", 1))
        group_id = sec.get_int("group_id", 0)
        if not 0 <= group_id < groups:
            raise CfgError(f"{sec.where_key('group_id')}: must be in 0..{groups - 1}, got {group_id}")
        for i, (c, h, w) in zip(inputs, shapes):
            if c % groups:
                raise CfgError(f"{sec.where_key('groups')}: layer {i} has {c} channels, not divisible "
                               f"by groups={groups}")
            if (h, w) != shapes[0][1:]:
                raise UnsupportedLayerError(
                    f"{sec.where_key('layers')}: layer {i} is {h}x{w} but layer {inputs[0]} is "
                    f"{shapes[0][1]}x{shapes[0][2]}; Darknet would concatenate flat vectors, which has "
                    f"no stock-Caffe equivalent")
        out_c = sum(c // groups for c, _, _ in shapes)
        return Node(index=sec.index, kind=self.section, section=sec, inputs=inputs, in_shapes=shapes,
                    out_shape=(out_c, shapes[0][1], shapes[0][2]),
                    attrs={"groups": groups, "group_id": group_id})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        groups, group_id = node.attrs["groups"], node.attrs["group_id"]
        parts = []
        for k, (src, shape) in enumerate(zip(node.inputs, node.in_shapes)):
            size = shape[0] // groups
            parts.append(emit_channel_crop(em, f"{node.prefix}_group{k}", em.blob(src), shape,
                                           group_id * size, size))
        if len(parts) == 1:
            em.blob_of[node.index] = parts[0]
            return
        name = f"{node.prefix}_route"
        em.add("Concat", name, parts, [name], concat_param={"axis": 1})
        em.blob_of[node.index] = name
