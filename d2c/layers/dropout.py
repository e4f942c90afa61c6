"""[dropout]: the identity at inference; Caffe Dropout in training nets.

Darknet's dropout layer owns no buffer: parse_network_cfg points its output (and delta) at the
previous layer's, and the training forward zeroes/scales that buffer in place. So the Caffe
form is the previous blob itself (deploy), or an in-place Dropout on it (train), which gives
every other reader of that blob the dropped values too, as in Darknet. Both scale the kept
values by 1/(1-p); the random masks of course differ between engines.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError, UnsupportedLayerError
from d2c.layers.base import LayerConverter, Node, register

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder

DEFAULT_PROBABILITY = {"pjreddie": 0.5, "alexeyab": 0.2}   # parse_dropout in each lineage


@register
class Dropout(LayerConverter):
    section = "dropout"
    keys = frozenset({"probability", "dropblock", "dropblock_size_rel", "dropblock_size_abs"})
    summary = "identity at inference (shares the previous buffer); Dropout in train nets"
    caffe_layers = "none in deploy (blob reuse); Dropout (in place) in train nets"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, shape = graph.previous(sec)
        probability = sec.get_float("probability", DEFAULT_PROBABILITY[graph.flavor])
        if not 0.0 <= probability < 1.0:
            raise CfgError(f"{sec.where_key('probability')}: must be in [0, 1), got {probability}")
        dropblock = sec.get_int("dropblock", 0) if graph.flavor == "alexeyab" else 0
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[shape],
                    out_shape=shape, attrs={"probability": probability, "dropblock": dropblock})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        blob = em.blob(node.inputs[0])
        if em.training and node.attrs["probability"] > 0.0:
            if node.attrs["dropblock"]:
                raise UnsupportedLayerError(f"{node.section.where_key('dropblock')}: DropBlock has no "
                                            f"stock-Caffe training form (inference is the identity)")
            em.add("Dropout", f"{node.prefix}_dropout", [blob], [blob],
                   dropout_param={"dropout_ratio": node.attrs["probability"]})
        em.blob_of[node.index] = blob
