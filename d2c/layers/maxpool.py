"""[maxpool]: Pooling MAX with the padding/crop that puts Caffe's windows where Darknet's are.

Darknet's window i starts at i*stride - padding/2 (padding defaults to size-1, total not per
side) and its output size floors; Caffe pads symmetrically and ceils. Padding Caffe by
padding/2 + m*stride shifts its windows by m, so cropping m from the front selects exactly
Darknet's windows. Out-of-range cells never win in either engine, so the maxima are identical.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import math

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.errors import CfgError, UnsupportedLayerError
from d2c.layers.base import LayerConverter, Node, positive, register

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder


def darknet_pool_out(size_in: int, size: int, stride: int, padding: int) -> int:
    """Darknet's maxpool output length (floor)."""
    return (size_in + padding - size) // stride + 1


def caffe_pool_out(size_in: int, kernel: int, stride: int, pad: int) -> int:
    """BVLC Pooling output length (ceil, minus the window that would start in the padding)."""
    out = int(math.ceil((size_in + 2 * pad - kernel) / stride)) + 1
    if pad > 0 and (out - 1) * stride >= size_in + pad:
        out -= 1
    return out


def plan_axis(size_in: int, size: int, stride: int, padding: int) -> tuple[int, int, int]:
    """(caffe pad, crop offset m, darknet out) for one axis, or raise if no stock plan exists."""
    want = darknet_pool_out(size_in, size, stride, padding)
    for shift in range(0, size):
        pad = padding // 2 + shift * stride
        if pad >= size:  # Caffe CHECKs pad < kernel
            break
        if caffe_pool_out(size_in, size, stride, pad) >= want + shift:
            return pad, shift, want
    raise UnsupportedLayerError(f"no stock Pooling places windows like Darknet for in={size_in}, "
                                f"size={size}, stride={stride}, padding={padding}")


@register
class Maxpool(LayerConverter):
    section = "maxpool"
    alexeyab_clears_delta = True
    keys = frozenset({"size", "stride", "stride_x", "stride_y", "padding", "maxpool_depth",
                      "out_channels", "antialiasing", "maxpool_zero_nonmax"})
    summary = "any size/stride(_x/_y)/padding incl. size 2 stride 1 and SPP 5/9/13"
    caffe_layers = "Pooling MAX [+ Crop against a reference blob]"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        stride = positive(sec, "stride", sec.get_int("stride", 1))
        stride_x = positive(sec, "stride_x", sec.get_int("stride_x", stride))
        stride_y = positive(sec, "stride_y", sec.get_int("stride_y", stride))
        size = positive(sec, "size", sec.get_int("size", stride))
        padding = sec.get_int("padding", size - 1)
        if padding < 0:
            raise CfgError(f"{sec.where_key('padding')}: must be >= 0, got {padding}")
        for key in ("maxpool_depth", "antialiasing", "maxpool_zero_nonmax"):
            if sec.get_int(key, 0):
                raise UnsupportedLayerError(f"{sec.where_key(key)}: '{key}' is not supported")
        try:
            pad_h, crop_h, out_h = plan_axis(h, size, stride_y, padding)
            pad_w, crop_w, out_w = plan_axis(w, size, stride_x, padding)
        except UnsupportedLayerError as exc:
            raise UnsupportedLayerError(f"{sec.where}: {exc}") from None
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(c, out_h, out_w),
                    attrs={"size": size, "stride_x": stride_x, "stride_y": stride_y, "padding": padding,
                           "pad_h": pad_h, "pad_w": pad_w, "crop_h": crop_h, "crop_w": crop_w})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        a = node.attrs
        bottom = em.blob(node.inputs[0])
        name = f"{node.prefix}_maxpool"
        pool = {"pool": "MAX", "kernel_size": a["size"]}
        pool.update({"stride": a["stride_x"]} if a["stride_x"] == a["stride_y"]
                    else {"stride_h": a["stride_y"], "stride_w": a["stride_x"]})
        pool.update({"pad": a["pad_h"]} if a["pad_h"] == a["pad_w"]
                    else {"pad_h": a["pad_h"], "pad_w": a["pad_w"]})
        c, h, w = node.in_shape
        caffe_h = caffe_pool_out(h, a["size"], a["stride_y"], a["pad_h"])
        caffe_w = caffe_pool_out(w, a["size"], a["stride_x"], a["pad_w"])
        _, out_h, out_w = node.out_shape
        if (caffe_h, caffe_w) == (out_h, out_w):
            em.add("Pooling", name, [bottom], [name], pooling_param=pool)
            em.blob_of[node.index] = name
            return
        raw = f"{name}_uncropped"
        em.add("Pooling", raw, [bottom], [raw], pooling_param=pool)
        reference = self._reference(node, em, bottom)
        offsets = [a["crop_h"]] if a["crop_h"] == a["crop_w"] else [a["crop_h"], a["crop_w"]]
        em.add("Crop", name, [raw, reference], [name], crop_param={"axis": 2, "offset": offsets},
               propagate_down=[True, False] if em.training else None)
        em.blob_of[node.index] = name

    def routing_flips(self, node: Node, theirs: np.ndarray, ours: np.ndarray) -> int | None:
        """Windows whose first maximum (Darknet's and Caffe's scan order) sits elsewhere in the two inputs."""
        return int(np.count_nonzero(window_argmax(node, theirs) != window_argmax(node, ours)))

    @staticmethod
    def _reference(node: Node, em: Emitter, bottom: str) -> str:
        """A blob with Darknet's output H x W, for Crop's shape: the input itself or a cheap pool."""
        _, h, w = node.in_shape
        _, out_h, out_w = node.out_shape
        if (h, w) == (out_h, out_w):
            return bottom
        a = node.attrs
        k_h, p_h = reference_window(h, a["stride_y"], out_h)
        k_w, p_w = reference_window(w, a["stride_x"], out_w)
        ref = f"{node.prefix}_shape_ref"
        em.add("Pooling", ref, [bottom], [ref],
               pooling_param={"pool": "MAX", "kernel_h": k_h, "kernel_w": k_w, "pad_h": p_h, "pad_w": p_w,
                              "stride_h": a["stride_y"], "stride_w": a["stride_x"]})
        return ref


def reference_window(size_in: int, stride: int, want: int) -> tuple[int, int]:
    """(kernel, pad) of a Caffe pooling whose output length is `want`; its values are never read."""
    for kernel in range(1, size_in + stride + 1):
        for pad in range(0, kernel):
            if kernel > size_in + 2 * pad:
                continue
            if caffe_pool_out(size_in, kernel, stride, pad) == want:
                return kernel, pad
    raise UnsupportedLayerError(f"no Caffe pooling yields {want} outputs from {size_in} at stride {stride}")


def window_argmax(node: Node, x: np.ndarray) -> np.ndarray:
    """Darknet's forward_maxpool_layer argmax per output (index inside the window, first strict
    maximum in row-major order; positions outside the input count as -inf)."""
    a = node.attrs
    size, sy, sx = a["size"], a["stride_y"], a["stride_x"]
    _, out_h, out_w = node.out_shape
    b, c, h, w = x.shape
    top = a["padding"] // 2
    full_h, full_w = (out_h - 1) * sy + size, (out_w - 1) * sx + size
    padded = np.full((b, c, max(full_h, top + h), max(full_w, top + w)), -np.inf, np.float32)
    padded[:, :, top:top + h, top:top + w] = x
    windows = np.lib.stride_tricks.sliding_window_view(padded[:, :, :full_h, :full_w], (size, size), axis=(2, 3))
    windows = windows[:, :, ::sy, ::sx][:, :, :out_h, :out_w]
    return np.argmax(windows.reshape(b, c, out_h, out_w, size * size), axis=-1)
