"""Pieces several converters share: activations and per-layer learning-rate multipliers."""
from __future__ import annotations

from d2c.caffe.emitter import Emitter, Head
from d2c.errors import UnsupportedLayerError
from d2c.layers.base import Node

# Darknet activation name -> how it is built from stock layers (for the support table too).
ACTIVATIONS: dict[str, str] = {
    "linear": "(none)",
    "leaky": "ReLU(negative_slope 0.1)",
    "relu": "ReLU",
    "logistic": "Sigmoid",
    "tanh": "TanH",
    "elu": "ELU(alpha 1)",
    "mish": "BNLL -> TanH -> Eltwise PROD with x",
    "swish": "Sigmoid -> Eltwise PROD with x",
    "silu": "Sigmoid -> Eltwise PROD with x",
}
PJREDDIE_ACTIVATIONS = frozenset({"logistic", "loggy", "relu", "elu", "selu", "relie", "plse",
                                  "hardtan", "lhtan", "linear", "ramp", "leaky", "tanh", "stair"})


def read_activation(node_section, default: str, flavor: str, warnings: list[str] | None = None) -> str:
    """Read `activation`, applying pjreddie's fallback (unknown names run as ReLU) when targeted."""
    act = node_section.get_str("activation", default)
    if flavor == "pjreddie" and act not in PJREDDIE_ACTIVATIONS:
        if warnings is not None:
            warnings.append(f"{node_section.where_key('activation')}: pjreddie Darknet does not know "
                            f"'{act}' and runs ReLU instead; converting as ReLU")
        return "relu"
    if act not in ACTIVATIONS:
        raise UnsupportedLayerError(f"{node_section.where_key('activation')}: activation '{act}' has no "
                                    f"exact stock-Caffe form; supported: {', '.join(sorted(ACTIVATIONS))}")
    return act


def emit_activation(em: Emitter, node: Node, blob: str, act: str) -> str:
    """Apply `act` to `blob`; returns the blob holding the result (in place where Caffe allows)."""
    base = f"{node.prefix}"
    if act == "linear":
        return blob
    if act in ("leaky", "relu"):
        slope = {"relu_param": {"negative_slope": 0.1}} if act == "leaky" else {}
        em.add("ReLU", f"{base}_{act}", [blob], [blob], **slope)
        return blob
    if act == "logistic":
        em.add("Sigmoid", f"{base}_logistic", [blob], [blob])
        return blob
    if act == "tanh":
        em.add("TanH", f"{base}_tanh", [blob], [blob])
        return blob
    if act == "elu":
        em.add("ELU", f"{base}_elu", [blob], [blob])
        return blob
    if act == "mish":
        softplus, tanh, out = f"{base}_softplus", f"{base}_tanh_sp", f"{base}_mish"
        em.add("BNLL", softplus, [blob], [softplus])
        em.add("TanH", tanh, [softplus], [softplus])
        em.add("Eltwise", out, [blob, softplus], [out], eltwise_param={"operation": "PROD"})
        return out
    if act in ("swish", "silu"):
        gate, out = f"{base}_sigmoid", f"{base}_{act}"
        em.add("Sigmoid", gate, [blob], [gate])
        em.add("Eltwise", out, [blob, gate], [out], eltwise_param={"operation": "PROD"})
        return out
    raise UnsupportedLayerError(f"{node.where}: activation '{act}' is not supported")


def lr_scale(node: Node) -> float:
    """Darknet's per-layer `learning_rate` key: a multiplier on the global rate (Caffe lr_mult)."""
    return node.section.get_float("learning_rate", 1.0)


def emit_head(em: Emitter, node: Node) -> None:
    """A detection head adds no deploy layer: its input blob becomes a net output, recorded with
    the attributes decoding needs; train nets attach the Python loss layer to it."""
    blob = em.blob(node.inputs[0])
    em.heads.append(Head(index=node.index, kind=node.kind, blob=blob, shape=node.in_shape,
                         attrs=dict(node.attrs)))
    em.blob_of[node.index] = blob
    if em.training:
        from d2c.loss.emit import emit_loss_layer
        emit_loss_layer(em, node, blob)
