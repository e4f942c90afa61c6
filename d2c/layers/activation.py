"""[activation]: a stand-alone activation over the previous layer's output.

Darknet copies its input into its own buffer before activating, so the previous blob stays
untouched for any other reader (e.g. a later [route]); the Caffe layers must therefore write
a new blob, never act in place on the input. AlexeyAB's CPU activate() has no case for
mish/swish/hard_mish/relu6/gelu and returns 0 for them in this layer (their special paths
exist only inside [convolutional]/[shortcut]), so those are refused instead of reproduced.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import UnsupportedLayerError
from d2c.layers.base import LayerConverter, Node, register
from d2c.layers.common import emit_activation, read_activation

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder

# Activations that are one in-place Caffe layer in common.emit_activation: their out-of-place form.
_SINGLE_LAYER: dict[str, tuple[str, dict]] = {
    "leaky": ("ReLU", {"relu_param": {"negative_slope": 0.1}}),
    "relu": ("ReLU", {}),
    "logistic": ("Sigmoid", {}),
    "tanh": ("TanH", {}),
    "elu": ("ELU", {}),
}
# Activations AlexeyAB computes only in conv/shortcut paths; elsewhere its CPU activate() yields 0.
ALEXEYAB_GENERIC_ZERO = frozenset({"mish", "swish", "silu", "hard_mish", "relu6", "gelu"})


def refuse_zeroing_activation(sec: Section, act: str, flavor: str) -> None:
    """AlexeyAB's generic activate_array returns 0 for these: refuse rather than emit zeros."""
    if flavor == "alexeyab" and act in ALEXEYAB_GENERIC_ZERO:
        raise UnsupportedLayerError(
            f"{sec.where_key('activation')}: AlexeyAB's Darknet computes '{act}' only inside "
            f"[convolutional]/[shortcut]; in [{sec.raw_type}] its CPU activate() returns 0 for every "
            f"element, so there is no meaningful model to convert")


def emit_activation_copy(em: Emitter, node: Node, bottom: str, act: str) -> str:
    """Apply `act` to `bottom` into a new blob (never in place on `bottom`)."""
    if act in _SINGLE_LAYER:
        layer_type, params = _SINGLE_LAYER[act]
        top = f"{node.prefix}_{act}"
        em.add(layer_type, top, [bottom], [top], **params)
        return top
    # Multi-layer forms (mish, swish) already write fresh blobs; linear is the identity.
    return emit_activation(em, node, bottom, act)


@register
class Activation(LayerConverter):
    section = "activation"
    keys = frozenset({"activation"})
    summary = "stand-alone activation (copy, then activate), any exact activation"
    caffe_layers = "the activation's layer(s), out of place; none for linear"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, shape = graph.previous(sec)
        refuse_zeroing_activation(sec, sec.get_str("activation", "linear"), graph.flavor)
        warnings: list[str] = []
        act = read_activation(sec, "linear", graph.flavor, warnings)
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[shape],
                    out_shape=shape, attrs={"activation": act, "warnings": warnings})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        em.blob_of[node.index] = emit_activation_copy(em, node, em.blob(node.inputs[0]), node.attrs["activation"])


#: Piecewise-linear activations whose gradient both engines pick by the sign of the *output*
#: (Darknet's leaky_gradient/relu_gradient `x > 0`, Caffe's ReLU `bottom_data > 0` in place):
#: the slope on the non-positive side.
BRANCH_SLOPES: dict[str, float] = {"leaky": 0.1, "relu": 0.0}


def gradient_branches(act: str, out: np.ndarray) -> np.ndarray | None:
    """The gradient factor each output element of `act` takes (1 above zero, the slope at or below),
    or None for an activation without branches (its gradient is a smooth function of the output)."""
    if act not in BRANCH_SLOPES:
        return None
    return np.where(np.asarray(out) > 0, np.float32(1.0), np.float32(BRANCH_SLOPES[act]))


def branch_layer(node: Node) -> str | None:
    """The Caffe layer that applies the node's branch activation (common.emit_activation and
    emit_activation_copy name it `<prefix>_<activation>`), or None without one."""
    act = node.attrs.get("activation")
    return f"{node.prefix}_{act}" if isinstance(act, str) and act in BRANCH_SLOPES else None
