"""[batchnorm]: a stand-alone BN over the previous layer's output.

The two lineages store different arrays (load_batchnorm_weights): pjreddie reads scales,
rolling_mean, rolling_variance and keeps biases at 0 (calloc'd, never loaded); AlexeyAB reads
biases first, then the same three. The inference formula is the flavor's BN (pjreddie divides
by sqrt(var) + 1e-6, AlexeyAB by sqrt(var + 1e-5)), reproduced with the same blob trick as
[convolutional]. Darknet copies the input first, so the Caffe BatchNorm writes a new blob.
pjreddie gives this layer no update function: its gamma/beta are frozen in training.

Debian's pjreddie build cannot run this layer at all: make_batchnorm_layer never allocates
l.x / l.x_norm on the CPU while forward_batchnorm_layer copies into l.x on every call, so
forward_network segfaults (measured). The tests give Darknet scratch buffers to compare.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.darknet.node import ParamArray
from d2c.layers.base import LayerConverter, Node, darknet_init_arrays, register
from d2c.layers.common import lr_scale
from d2c.errors import WeightsError
from d2c.layers.convolutional import bn_engine_arrays, caffe_bn_blobs, emit_batchnorm, export_bn
from d2c.numerics import bn_denominator

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder
    from d2c.export import ModelReader


def batchnorm_params(channels: int, flavor: str) -> list[ParamArray]:
    """The arrays in .weights order for each lineage."""
    triple = [ParamArray("scales", (channels,)), ParamArray("rolling_mean", (channels,)),
              ParamArray("rolling_variance", (channels,))]
    if flavor == "alexeyab":
        return [ParamArray("biases", (channels,)), *triple]
    return triple


def batchnorm_reference(x: np.ndarray, scales: np.ndarray, biases: np.ndarray, mean: np.ndarray,
                        variance: np.ndarray, flavor: str) -> np.ndarray:
    """Inference BN on (N, C, H, W): (x - mean) / denominator * scale + bias, Darknet's order."""
    shape = (1, -1, 1, 1)
    centred = x.astype(np.float32) - mean.astype(np.float32).reshape(shape)
    normed = (centred.astype(np.float64) / bn_denominator(variance, flavor).reshape(shape)).astype(np.float32)
    return normed * scales.astype(np.float32).reshape(shape) + biases.astype(np.float32).reshape(shape)


@register
class Batchnorm(LayerConverter):
    section = "batchnorm"
    alexeyab_clears_delta = True
    keys = frozenset()
    summary = ("stand-alone BN; pjreddie (3 arrays, beta = 0) and AlexeyAB (4 arrays) files "
               "(Debian's Darknet itself segfaults on this layer: no l.x buffer)")
    caffe_layers = "BatchNorm (out of place) + Scale"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(c, h, w), params=batchnorm_params(c, graph.flavor),
                    attrs={"flavor": graph.flavor})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        flavor = node.attrs["flavor"]
        c = node.in_shape[0]
        full = dict(arrays)
        full.setdefault("biases", np.zeros(c, np.float32))   # pjreddie: beta stays 0
        bottom = em.blob(node.inputs[0])
        top = f"{node.prefix}_batchnorm"
        if not em.training:
            bn_blobs, eps = caffe_bn_blobs(full["rolling_mean"], full["rolling_variance"], flavor)
            em.add("BatchNorm", top, [bottom], [top], bn_blobs,
                   batch_norm_param={"use_global_stats": True, "eps": eps})
            em.add("Scale", f"{node.prefix}_scale", [top], [top], [full["scales"], full["biases"]],
                   scale_param={"bias_term": True})
        else:
            # Training forms act in place, so copy first (Power 1*x+0 is an exact copy, both ways).
            em.add("Power", top, [bottom], [top], power_param={"power": 1.0, "scale": 1.0, "shift": 0.0})
            rho = lr_scale(node) if flavor == "alexeyab" else 0.0   # pjreddie never updates this layer
            emit_batchnorm(em, node, top, full, flavor, rho)
        em.blob_of[node.index] = top

    def export(self, node: Node, model: ModelReader) -> dict[str, np.ndarray]:
        """BatchNorm (deploy `_batchnorm`, train `_bn` or `_dbn`) + Scale; pjreddie has no beta to keep."""
        arrays = export_bn(model, node, node.in_shape[0], (f"{node.prefix}_batchnorm", f"{node.prefix}_bn"))
        if arrays is None:
            raise WeightsError(f"{model.where}: no BatchNorm layer '{node.prefix}_batchnorm' (or '_bn'/'_dbn') "
                               f"for {node.where}")
        if not any(p.name == "biases" for p in node.params):
            beta = arrays.pop("biases")
            if np.any(beta != 0):
                model.out.notes.append(f"{node.where}: pjreddie's [batchnorm] stores no beta; the Caffe Scale bias "
                                       f"(max |beta| {float(np.abs(beta).max()):.3g}) is dropped")
        return arrays

    def engine_arrays(self, l: Any, updates: bool, flavor: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """The parameters (pjreddie never updates this layer); AlexeyAB's beta comes first."""
        c = int(l.c)
        return [] if updates else [*[("biases", "biases", (c,))] * (flavor == "alexeyab"), *bn_engine_arrays(c)]

    def darknet_init(self, node: Node, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """make_batchnorm_layer: constants only (no weights, nothing drawn)."""
        return darknet_init_arrays(node, None)
