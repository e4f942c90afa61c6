"""[reorg3d] (AlexeyAB): true space-to-depth; reverse=1 is AlexeyAB's own permutation.

AlexeyAB's forward_reorg_layer calls reorg_cpu with the *output* dimensions, which makes it a
plain space-to-depth, phase-major: out[(dy*s + dx)*C + c][j][i] = in[c][j*s + dy][i*s + dx]
(unlike [reorg], which passes the input dimensions and gets pjreddie's odd order).
A stride-s Convolution whose filter k = (dy*s + dx)*C + c is one-hot at (c, dy, dx) computes
exactly that (one product by 1.0 per output).

reverse=1 is *not* depth-to-space: reorg_cpu(forward=1) is again called with the output
dimensions (C/s^2, H*s, W*s), so it reads the input buffer as C/s^2 planes of (H*s) x (W*s),
applies depth-to-space to that (giving C/s^4 planes of (H*s^2) x (W*s^2)) and the result is
read back as C/s^2 x H*s x W*s. Reshape -> one-hot Deconvolution -> Reshape reproduces it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError
from d2c.layers.base import LayerConverter, Node, check_emitted_size, positive, register

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


def space_to_depth_reference(x: np.ndarray, stride: int) -> np.ndarray:
    """numpy reference of AlexeyAB reorg3d (reverse=0) on (N, C, H, W)."""
    n, c, h, w = x.shape
    s = stride
    blocks = x.reshape(n, c, h // s, s, w // s, s)              # n, c, j, dy, i, dx
    return blocks.transpose(0, 3, 5, 1, 2, 4).reshape(n, s * s * c, h // s, w // s)


def depth_to_space_reference(x: np.ndarray, stride: int) -> np.ndarray:
    """Plain depth-to-space on (N, C, H, W), the inverse of space_to_depth_reference."""
    n, c, h, w = x.shape
    s = stride
    planes = c // (s * s)
    blocks = x.reshape(n, s, s, planes, h, w)                    # n, dy, dx, c, j, i
    return blocks.transpose(0, 3, 4, 1, 5, 2).reshape(n, planes, h * s, w * s)


def reorg3d_reverse_reference(x: np.ndarray, stride: int) -> np.ndarray:
    """AlexeyAB reorg3d reverse=1 on (N, C, H, W): depth-to-space of the buffer read as
    (C/s^2, H*s, W*s), read back as that same shape."""
    n, c, h, w = x.shape
    s = stride
    planes = x.reshape(n, c // (s * s), h * s, w * s)
    return depth_to_space_reference(planes, s).reshape(n, c // (s * s), h * s, w * s)


def reorg_cpu_reference(x: np.ndarray, out_w: int, out_h: int, out_c: int, stride: int,
                        forward: bool) -> np.ndarray:
    """Index-by-index model of Darknet's reorg_cpu(x, out_w, out_h, out_c, batch, stride, forward)
    on a (N, flat) buffer, written from the index formula; a slow oracle for tests."""
    n = x.shape[0]
    s = stride
    in_c = out_c // (s * s)
    src = x.reshape(n, -1)
    dst = np.zeros_like(src)
    for k in range(out_c):
        c2, off = k % in_c, k // in_c
        for j in range(out_h):
            for i in range(out_w):
                a = i + out_w * (j + out_h * k)
                b = (i * s + off % s) + out_w * s * ((j * s + off // s) + out_h * s * c2)
                if forward:
                    dst[:, b] = src[:, a]
                else:
                    dst[:, a] = src[:, b]
    return dst


def space_to_depth_kernel(channels: int, stride: int) -> np.ndarray:
    """Convolution weights (C*s^2, C, s, s): filter (dy*s + dx)*C + c is one-hot at (c, dy, dx)."""
    s = stride
    kernel = np.zeros((s * s * channels, channels, s, s), np.float32)
    for dy in range(s):
        for dx in range(s):
            for c in range(channels):
                kernel[(dy * s + dx) * channels + c, c, dy, dx] = 1.0
    return kernel


@register
class Reorg3d(LayerConverter):
    section = "reorg3d"
    keys = frozenset({"stride", "reverse"})
    summary = "true space-to-depth (phase-major channels); reverse=1 (AlexeyAB's own permutation)"
    caffe_layers = "one-hot Convolution (fixed) | Reshape + one-hot Deconvolution + Reshape for reverse"
    alexeyab_only = True

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        s = positive(sec, "stride", sec.get_int("stride", 1))
        reverse = bool(sec.get_int("reverse", 0))
        if reverse:
            if c % (s ** 4):
                # reorg_cpu would index past its buffers: it splits C/s^2 planes into s^2 phases again.
                raise CfgError(f"{sec.where_key('reverse')}: reverse=1 needs channels divisible by "
                               f"stride^4 = {s ** 4}, got {c}")
            out = (c // (s * s), h * s, w * s)
        else:
            # reorg_cpu indexes the input with out_w*stride as its row length: only exact multiples work.
            if h % s or w % s:
                raise CfgError(f"{sec.where_key('stride')}: input {h}x{w} does not divide by stride {s} "
                               f"(Darknet would read the wrong pixels)")
            out = (c * s * s, h // s, w // s)
        check_emitted_size(sec, "stride", floats=c * c * s * s)  # one-hot kernel (out C, in C, s, s)
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=out, attrs={"stride": s, "reverse": reverse})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        s = node.attrs["stride"]
        bottom = em.blob(node.inputs[0])
        name = f"{node.prefix}_reorg3d"
        if s == 1:
            em.blob_of[node.index] = bottom
            return
        if node.attrs["reverse"]:
            c, h, w = node.in_shape
            read_as = f"{name}_planes"
            em.add("Reshape", read_as, [bottom], [read_as],
                   reshape_param={"shape": {"dim": [0, c // (s * s), h * s, w * s]}})
            planes = c // s ** 4
            spread = f"{name}_spread"
            # Deconvolution blob (C_in, C_out, s, s): the space-to-depth one-hot, read transposed.
            em.add("Deconvolution", spread, [read_as], [spread], [space_to_depth_kernel(planes, s)],
                   convolution_param={"num_output": planes, "kernel_size": [s], "stride": [s],
                                      "bias_term": False},
                   param=em.frozen(1))
            em.add("Reshape", name, [spread], [name],
                   reshape_param={"shape": {"dim": [0, c // (s * s), h * s, w * s]}})
        else:
            c = node.in_shape[0]
            em.add("Convolution", name, [bottom], [name], [space_to_depth_kernel(c, s)],
                   convolution_param={"num_output": c * s * s, "kernel_size": [s], "stride": [s],
                                      "bias_term": False},
                   param=em.frozen(1))
        em.blob_of[node.index] = name
