"""[reorg]: pjreddie's reorg (not a plain space-to-depth), from three stock layers.

Darknet reads the C x H x W input as C' = C/s^2 planes of (H*s) x (W*s), gathers each s x s
phase of those planes into channels (phase-major), and the result is read back as
(C*s^2) x (H/s) x (W/s). So: Reshape -> one-hot stride-s Convolution -> Reshape. The
convolution's products are with exact ones and zeros, so the result is bit-exact.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError, UnsupportedLayerError
from d2c.layers.base import LayerConverter, Node, check_emitted_size, positive, register

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


def reorg_reference(x: np.ndarray, stride: int) -> np.ndarray:
    """numpy reference of pjreddie's reorg_cpu(forward=0) on a (C, H, W) array."""
    c, h, w = x.shape
    planes = c // (stride * stride)
    a = x.reshape(planes, h * stride, w * stride)
    y = np.empty((c, h, w), x.dtype)
    for k in range(c):
        off = k // planes
        y[k] = a[k % planes, off // stride::stride, off % stride::stride][:h, :w]
    return y.reshape(c * stride * stride, h // stride, w // stride)


def one_hot_kernel(channels: int, stride: int) -> np.ndarray:
    """Convolution weights (C, C/s^2, s, s) with W[k, k mod C', off div s, off mod s] = 1."""
    planes = channels // (stride * stride)
    kernel = np.zeros((channels, planes, stride, stride), np.float32)
    for k in range(channels):
        off = k // planes
        kernel[k, k % planes, off // stride, off % stride] = 1.0
    return kernel


@register
class Reorg(LayerConverter):
    section = "reorg"
    keys = frozenset({"stride", "reverse", "flatten", "extra"})
    summary = "pjreddie's reorg order (YOLOv2 passthrough), forward"
    caffe_layers = "Reshape + one-hot Convolution (fixed) + Reshape"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        s = positive(sec, "stride", sec.get_int("stride", 1))
        for key in ("reverse", "flatten", "extra"):
            if sec.get_int(key, 0):
                raise UnsupportedLayerError(f"{sec.where_key(key)}: reorg '{key}' is not supported")
        if h % s or w % s or c % (s * s):
            raise CfgError(f"{sec.where_key('stride')}: input {c}x{h}x{w} does not divide by stride {s}")
        check_emitted_size(sec, "stride", floats=c * (c // (s * s)) * s * s)
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(c * s * s, h // s, w // s), attrs={"stride": s})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        c, h, w = node.in_shape
        s = node.attrs["stride"]
        base = f"{node.prefix}_reorg"
        planes = f"{base}_planes"
        em.add("Reshape", planes, [em.blob(node.inputs[0])], [planes],
               reshape_param={"shape": {"dim": [0, c // (s * s), h * s, w * s]}})
        gathered = f"{base}_gather"
        em.add("Convolution", gathered, [planes], [gathered], [one_hot_kernel(c, s)],
               convolution_param={"num_output": c, "kernel_size": [s], "stride": [s], "bias_term": False},
               param=em.frozen(1))
        em.add("Reshape", base, [gathered], [base],
               reshape_param={"shape": {"dim": [0, c * s * s, h // s, w // s]}})
        em.blob_of[node.index] = base
