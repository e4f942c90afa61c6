"""[convolutional]: Convolution (+ BatchNorm + Scale, or folded) + activation.

BatchNorm is the subtle part. pjreddie's CPU divides by sqrt(var) + 1e-6 (eps outside the
root, in double); Caffe divides by sqrt(var' + eps). Storing var' = (sqrt(var) + 1e-6)^2 - eps
(float64, then float32) with a tiny eps reproduces pjreddie in both BVLC Caffe and OpenCV.
AlexeyAB divides by sqrt(var + 1e-5), which is Caffe's own formula with eps = 1e-5.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.darknet.node import ParamArray
from d2c.errors import CfgError, UnsupportedLayerError, WeightsError
from d2c.layers.base import LayerConverter, Node, darknet_init_arrays, positive, register
from d2c.layers.common import emit_activation, lr_scale, read_activation
from d2c.numerics import ALEXEYAB_EPS_INSIDE, bn_denominator

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder
    from d2c.export import ModelReader

CAFFE_TINY_EPS = 1e-12           # accepted by BVLC BatchNorm and OpenCV, negligible next to 1e-6


def caffe_bn_blobs(mean: np.ndarray, variance: np.ndarray, flavor: str) -> tuple[list[np.ndarray], float]:
    """BatchNorm blobs (mean, var', factor 1) and eps that make Caffe divide like Darknet."""
    if flavor == "pjreddie":
        den = bn_denominator(variance, flavor)
        var_prime = np.maximum(den * den - CAFFE_TINY_EPS, 0.0)
        eps = CAFFE_TINY_EPS
    else:
        var_prime = variance.astype(np.float64)
        eps = ALEXEYAB_EPS_INSIDE
    blobs = [mean.astype(np.float32), var_prime.astype(np.float32), np.ones(1, np.float32)]
    return blobs, eps


def fold_batchnorm(weights: np.ndarray, scales: np.ndarray, biases: np.ndarray, mean: np.ndarray,
                   variance: np.ndarray, flavor: str) -> tuple[np.ndarray, np.ndarray]:
    """Fold BN + Scale into the conv: exact in real arithmetic, float32 rounding otherwise."""
    factor = scales.astype(np.float64) / bn_denominator(variance, flavor)
    folded_w = weights.astype(np.float64) * factor.reshape(-1, *([1] * (weights.ndim - 1)))
    folded_b = biases.astype(np.float64) - mean.astype(np.float64) * factor
    return folded_w.astype(np.float32), folded_b.astype(np.float32)


@register
class Convolutional(LayerConverter):
    section = "convolutional"
    alexeyab_clears_delta = True
    keys = frozenset({"filters", "size", "stride", "stride_x", "stride_y", "pad", "padding", "groups",
                      "activation", "batch_normalize", "binary", "xnor", "flipped", "dot", "dilation",
                      "antialiasing", "share_index", "bin_output", "sway", "rotate", "stretch",
                      "stretch_sway", "cbn", "coordconv", "assisted_excitation"})
    summary = "conv with pad/padding/groups/stride(_x/_y)/dilation, optional BN (pjreddie or AlexeyAB eps), any exact activation"
    caffe_layers = "Convolution [+ BatchNorm + Scale] + activation; `--fold-bn`: one Convolution"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        filters = positive(sec, "filters", sec.get_int("filters", 1))
        size = positive(sec, "size", sec.get_int("size", 1))
        stride = positive(sec, "stride", sec.get_int("stride", 1))
        stride_y = positive(sec, "stride_y", sec.get_int("stride_y", stride))
        stride_x = positive(sec, "stride_x", sec.get_int("stride_x", stride))
        groups = positive(sec, "groups", sec.get_int("groups", 1))
        dilation = positive(sec, "dilation", sec.get_int("dilation", 1))
        padding = sec.get_int("padding", 0)
        if sec.get_int("pad", 0):
            padding = size // 2
        if padding < 0:
            raise CfgError(f"{sec.where_key('padding')}: must be >= 0, got {padding}")
        for key in ("binary", "xnor", "flipped", "antialiasing", "share_index", "coordconv", "sway",
                    "rotate", "stretch", "stretch_sway", "assisted_excitation"):
            if sec.get_int(key, 0):
                raise UnsupportedLayerError(f"{sec.where_key(key)}: '{key}' has no stock-Caffe equivalent")
        if c % groups or filters % groups:
            raise CfgError(f"{sec.where_key('groups')}: groups={groups} must divide input channels {c} "
                           f"and filters {filters}")
        if size == 1 and (stride > 1 or padding > 0) and graph.flavor == "pjreddie":
            # pjreddie's CPU forward skips im2col for 1x1 kernels and computes garbage here.
            raise UnsupportedLayerError(f"{sec.where_key('size')}: pjreddie Darknet mis-computes 1x1 "
                                        f"convolutions with stride>1 or padding>0; no faithful target")
        span = dilation * (size - 1) + 1
        out_h = (h + 2 * padding - span) // stride_y + 1
        out_w = (w + 2 * padding - span) // stride_x + 1
        bn = bool(sec.get_int("batch_normalize", 0))
        warnings: list[str] = []
        act = read_activation(sec, "logistic", graph.flavor, warnings)
        params = [ParamArray("biases", (filters,))]
        if bn:
            params += [ParamArray("scales", (filters,)), ParamArray("rolling_mean", (filters,)),
                       ParamArray("rolling_variance", (filters,))]
        params.append(ParamArray("weights", (filters, c // groups, size, size)))
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(filters, out_h, out_w), params=params,
                    attrs={"filters": filters, "size": size, "stride_x": stride_x, "stride_y": stride_y,
                           "padding": padding, "groups": groups, "dilation": dilation, "bn": bn,
                           "activation": act, "flavor": graph.flavor, "warnings": warnings})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        a = node.attrs
        conv_param: dict = {"num_output": a["filters"], "kernel_size": [a["size"]], "pad": [a["padding"]]}
        if a["stride_x"] == a["stride_y"]:
            conv_param["stride"] = [a["stride_x"]]
        else:
            conv_param.update(stride_h=a["stride_y"], stride_w=a["stride_x"])
        if a["groups"] != 1:
            conv_param["group"] = a["groups"]
        if a["dilation"] != 1:
            conv_param["dilation"] = [a["dilation"]]
        name = f"{node.prefix}_conv"
        bottom = em.blob(node.inputs[0])
        rho = lr_scale(node)
        weights = arrays["weights"]
        if not a["bn"]:
            em.add("Convolution", name, [bottom], [name], [weights, arrays["biases"]],
                   convolution_param=conv_param, param=em.learnable(rho, with_bias=True))
        elif em.options.fold_bn and not em.training:
            check_variance(node, arrays["rolling_variance"])
            w, b = fold_batchnorm(weights, arrays["scales"], arrays["biases"], arrays["rolling_mean"],
                                  arrays["rolling_variance"], a["flavor"])
            em.add("Convolution", name, [bottom], [name], [w, b], convolution_param=conv_param)
        else:
            em.add("Convolution", name, [bottom], [name], [weights],
                   convolution_param={**conv_param, "bias_term": False},
                   param=em.learnable(rho, with_bias=False))
            emit_batchnorm(em, node, name, arrays, a["flavor"], rho)
        em.blob_of[node.index] = emit_activation(em, node, name, a["activation"])

    def export(self, node: Node, model: ModelReader) -> dict[str, np.ndarray]:
        return export_weighted(model, node, "_conv", "Convolution")

    def engine_arrays(self, l: Any, updates: bool, flavor: str) -> list[tuple[str, str, tuple[int, ...]]]:
        n, k = int(l.n), int(l.size)
        wshape = (n, int(l.c) // max(1, int(l.groups)), k, k)
        wshape = wshape if math.prod(wshape) == l.nweights else (int(l.nweights),)
        bn = bool(l.batch_normalize)
        if updates:
            return [("bias_updates", "bias_updates", (n,)), *[("scale_updates", "scale_updates", (n,))] * bn,
                    ("weight_updates", "weight_updates", wshape)]
        return [("biases", "biases", (n,)), *bn_engine_arrays(n) * bn, ("weights", "weights", wshape)]

    def overwrites_input_delta(self, node: Node, engine: str) -> bool:
        """Its backward writes the input delta through col2im: AlexeyAB's CPU col2im_cpu_ext zeroes
        the destination first (any kernel); Debian's pjreddie assigns only for 1x1 kernels."""
        return node.inputs[0] >= 0 and (engine == "alexeyab" or node.attrs["size"] == 1)

    def darknet_init(self, node: Node, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """make_convolutional_layer: weights sqrt(2/(c/groups*k*k)) * N(0, 1)."""
        def weights(spec: ParamArray) -> np.ndarray:
            return math.sqrt(2.0 / int(np.prod(spec.shape[1:]))) * rng.standard_normal(spec.shape)
        return darknet_init_arrays(node, weights)


def bn_engine_arrays(n: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """A BN's gamma and statistics in a Darknet layer struct, in .weights order."""
    return [(name, name, (n,)) for name in ("scales", "rolling_mean", "rolling_variance")]


def export_bn(model: ModelReader, node: Node, n: int, bn_names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The inverse of emit_batchnorm: scales and biases from `_scale`, the rolling statistics from
    the exact `_dbn` Python layer (raw Darknet values) or the first stock BatchNorm in `bn_names`;
    None when the model has no BN for the node."""
    dbn = model.get(f"{node.prefix}_dbn")
    if dbn is not None:
        if dbn.type != "Python":
            raise WeightsError(f"{model.where}: Caffe layer '{dbn.name}' is {dbn.type}, expected the Python "
                               f"DarknetBatchNorm for {node.where}")
        stats = model.blob(node, dbn, 0, (n,), "rolling_mean"), model.blob(node, dbn, 1, (n,), "rolling_variance")
    else:
        bn = next((model.get(name) for name in bn_names if getattr(model.get(name), "type", "") == "BatchNorm"), None)
        if bn is None:
            return None
        stats = model.bn_statistics(node, bn, n)
    scale = model.require(node, f"{node.prefix}_scale", ("Scale",), "BN gamma/beta")
    return {"biases": model.blob(node, scale, 1, (n,), "biases"), "scales": model.blob(node, scale, 0, (n,), "scales"),
            "rolling_mean": stats[0], "rolling_variance": stats[1]}


def export_weighted(model: ModelReader, node: Node, suffix: str, caffe_type: str) -> dict[str, np.ndarray]:
    """[convolutional] and [connected] back: the main layer's weights (+ bias without BN), then BN
    (+ Scale); a BN node whose main layer carries a bias was folded by `convert --fold-bn`."""
    shapes = {p.name: p.shape for p in node.params}
    n = shapes["biases"][0]
    main = model.require(node, f"{node.prefix}{suffix}", (caffe_type,), "weights")
    weights = model.blob(node, main, 0, shapes["weights"], "weights")
    bn = export_bn(model, node, n, (f"{node.prefix}_bn",)) if node.attrs["bn"] else None
    if bn is not None:
        return {**bn, "weights": weights}
    if node.attrs["bn"]:
        if len(main.blobs) != 2:
            raise WeightsError(f"{model.where}: no BatchNorm layer '{node.prefix}_bn' (or '{node.prefix}_dbn') and "
                               f"no bias in '{main.name}' for {node.where} (batch_normalize=1)")
        model.out.folded.append(node.index)
    return {"biases": model.blob(node, main, 1, (n,), "biases"), "weights": weights}


def check_variance(node: Node, variance: np.ndarray) -> None:
    """Negative or NaN variances have no real BN denominator: refuse them, naming the layer."""
    bad = int(np.count_nonzero(~(np.asarray(variance) >= 0)))
    if bad:
        raise WeightsError(f"{node.where}: rolling_variance has {bad} negative or NaN value(s); "
                           f"the weights file does not belong to this cfg or is corrupt")


def emit_batchnorm(em: Emitter, node: Node, blob: str, arrays: dict[str, np.ndarray], flavor: str,
                   rho: float) -> None:
    """BN (+ Scale) in place on `blob`, in the form the emitter's mode asks for."""
    mean, variance = arrays["rolling_mean"], arrays["rolling_variance"]
    check_variance(node, variance)
    scale_blobs = [arrays["scales"], arrays["biases"]]
    scale_param = {"bias_term": True}
    if em.training and em.options.bn == "exact":
        from d2c.loss.bn import darknet_bn_layer  # a Python layer: only for training nets
        darknet_bn_layer(em, node, blob, arrays, flavor, rho)
        return
    if em.training and em.options.bn == "stock":
        # Caffe keeps sums and a factor s: with s = 1/(1-0.99) = 100 its moving average is
        # exactly Darknet's 0.99/0.01 EMA of the (unbiased) batch statistics.
        factor = 100.0
        bn_blobs = [mean * factor, variance * factor, np.full(1, factor, np.float32)]
        em.add("BatchNorm", f"{node.prefix}_bn", [blob], [blob], bn_blobs,
               batch_norm_param={"use_global_stats": False, "moving_average_fraction": 0.99,
                                 "eps": ALEXEYAB_EPS_INSIDE},
               param=[{"lr_mult": 0.0, "decay_mult": 0.0}] * 3)
    else:
        bn_blobs, eps = caffe_bn_blobs(mean, variance, flavor)
        em.add("BatchNorm", f"{node.prefix}_bn", [blob], [blob], bn_blobs,
               batch_norm_param={"use_global_stats": True, "eps": eps},
               param=[{"lr_mult": 0.0, "decay_mult": 0.0}] * 3 if em.training else None)
    scale_spec = None
    if em.training:
        scale_spec = [{"lr_mult": rho, "decay_mult": 0.0}, {"lr_mult": rho, "decay_mult": 0.0}]
    em.add("Scale", f"{node.prefix}_scale", [blob], [blob], scale_blobs,
           scale_param=scale_param, param=scale_spec)
