"""[connected]: InnerProduct (+ BatchNorm + Scale) + activation, reshaped to Darknet's C x 1 x 1.

Darknet flattens its C x H x W input buffer as is (channel-major), which is exactly what
InnerProduct(axis 1) does with an N x C x H x W blob, and stores weights outputs x inputs
row-major, which is InnerProduct's blob 0. Unlike [convolutional], the BN arrays come after
the weights in the .weights file (load_connected_weights): biases, weights, scales,
rolling_mean, rolling_variance. The output is reshaped to N x out x 1 x 1 so every later
converter (conv, BN, softmax, route) sees the 4-D blob Darknet's shape inference describes.
A .weights file whose header major or minor exceeds 1000 stores the matrix inputs x outputs
(load_connected_weights transposes it on read, save_connected_weights never does).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.darknet.node import ParamArray
from d2c.layers.base import LayerConverter, Node, darknet_init_arrays, positive, register
from d2c.layers.common import emit_activation, lr_scale, read_activation
from d2c.layers.convolutional import bn_engine_arrays, emit_batchnorm, export_weighted, fold_batchnorm

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder
    from d2c.darknet.weights import WeightsHeader
    from d2c.export import ModelReader


@register
class Connected(LayerConverter):
    section = "connected"
    keys = frozenset({"output", "activation", "batch_normalize"})
    summary = "fully connected over the flattened C·H·W input, optional BN (arrays after the weights), any exact activation"
    caffe_layers = "InnerProduct + Reshape [+ BatchNorm + Scale] + activation; `--fold-bn`: InnerProduct + Reshape"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        outputs = positive(sec, "output", sec.get_int("output", 1))
        inputs = c * h * w
        bn = bool(sec.get_int("batch_normalize", 0))
        warnings: list[str] = []
        act = read_activation(sec, "logistic", graph.flavor, warnings)
        params = [ParamArray("biases", (outputs,)), ParamArray("weights", (outputs, inputs))]
        if bn:  # load_connected_weights: the BN triple follows the weight matrix
            params += [ParamArray("scales", (outputs,)), ParamArray("rolling_mean", (outputs,)),
                       ParamArray("rolling_variance", (outputs,))]
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(outputs, 1, 1), params=params,
                    attrs={"output": outputs, "bn": bn, "activation": act, "flavor": graph.flavor,
                           "warnings": warnings})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        a = node.attrs
        outputs = a["output"]
        name = f"{node.prefix}_fc"
        bottom = em.blob(node.inputs[0])
        rho = lr_scale(node)
        weights = arrays["weights"]
        ip_param = {"num_output": outputs, "axis": 1}
        fold = a["bn"] and em.options.fold_bn and not em.training
        if not a["bn"]:
            em.add("InnerProduct", name, [bottom], [name], [weights, arrays["biases"]],
                   inner_product_param=ip_param, param=em.learnable(rho, with_bias=True))
        elif fold:
            w, b = fold_batchnorm(weights, arrays["scales"], arrays["biases"], arrays["rolling_mean"],
                                  arrays["rolling_variance"], a["flavor"])
            em.add("InnerProduct", name, [bottom], [name], [w, b], inner_product_param=ip_param)
        else:
            em.add("InnerProduct", name, [bottom], [name], [weights],
                   inner_product_param={**ip_param, "bias_term": False},
                   param=em.learnable(rho, with_bias=False))
        shaped = f"{node.prefix}_fc4d"
        em.add("Reshape", shaped, [name], [shaped], reshape_param={"shape": {"dim": [0, outputs, 1, 1]}})
        if a["bn"] and not fold:
            emit_batchnorm(em, node, shaped, arrays, a["flavor"], rho)
        em.blob_of[node.index] = emit_activation(em, node, shaped, a["activation"])

    def export(self, node: Node, model: ModelReader) -> dict[str, np.ndarray]:
        return export_weighted(model, node, "_fc", "InnerProduct")

    def engine_arrays(self, l: Any, updates: bool, flavor: str) -> list[tuple[str, str, tuple[int, ...]]]:
        out, inp, bn = int(l.outputs), int(l.inputs), bool(l.batch_normalize)
        if updates:
            return [("bias_updates", "bias_updates", (out,)), ("weight_updates", "weight_updates", (out, inp)),
                    *[("scale_updates", "scale_updates", (out,))] * bn]
        return [("biases", "biases", (out,)), ("weights", "weights", (out, inp)), *bn_engine_arrays(out) * bn]

    def darknet_init(self, node: Node, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """make_connected_layer: weights sqrt(2/inputs) * U(-1, 1)."""
        def weights(spec: ParamArray) -> np.ndarray:
            return math.sqrt(2.0 / spec.shape[1]) * rng.uniform(-1, 1, spec.shape)
        return darknet_init_arrays(node, weights)

    def read_array(self, node: Node, spec: ParamArray, stored: np.ndarray, header: WeightsHeader) -> np.ndarray:
        if spec.name == "weights" and header.transpose:
            return np.ascontiguousarray(stored.reshape(spec.shape[1], spec.shape[0]).T)
        return stored.reshape(spec.shape)

    def write_array(self, node: Node, spec: ParamArray, arr: np.ndarray, header: WeightsHeader) -> np.ndarray:
        if spec.name == "weights" and header.transpose:
            return arr.reshape(spec.shape).T
        return arr.reshape(spec.shape)
