"""[local] (YOLOv1): a locally connected layer (a different filter bank at every output cell).

forward_local_layer preloads each output cell with its own bias, im2cols the input (with the
`pad` *flag* used as the padding amount) and, per location j, adds W_j (filters x C*k*k,
row-major in im2col order c, ky, kx) times that location's column. Stock Caffe has no local
layer, but each location is exactly an InnerProduct over its k x k x C patch: the patch is a
Crop of the (zero-padded) input, flattened C-major, which is im2col's row order. So:
  pad (a depthwise 1x1 Convolution of ones with `pad`; exact) -> per location: Crop + InnerProduct
  (W_j, b_j) + Reshape to N x n x 1 x 1 -> Concat along width, then height -> activation.
Parameters are exactly Darknet's (no replication); layers grow with out_h * out_w (49 in YOLOv1).
Export reads the cell InnerProducts back into Darknet's (cells, filters, c, k, k) weights and
(filters, out_h, out_w) biases; the random init is make_local_layer's sqrt(2/(k*k*c)) * U(-1, 1).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from d2c.caffe.emitter import Emitter
from d2c.darknet.cfg import Section
from d2c.darknet.node import ParamArray
from d2c.errors import CfgError, UnsupportedLayerError
from d2c.layers.activation import refuse_zeroing_activation
from d2c.layers.base import LayerConverter, Node, check_emitted_size, darknet_init_arrays, positive, register
from d2c.layers.common import emit_activation, lr_scale, read_activation

if TYPE_CHECKING:  # pragma: no cover
    from d2c.darknet.graph import GraphBuilder
    from d2c.export import ModelReader


def local_out_size(size_in: int, size: int, stride: int, pad: int) -> int:
    """local_out_height/width: `pad` is a flag here (in - 1 when set, in - size otherwise)."""
    return (size_in - (1 if pad else size)) // stride + 1


def local_reference(x: np.ndarray, weights: np.ndarray, biases: np.ndarray, size: int, stride: int,
                    pad: int) -> np.ndarray:
    """float64 numpy model of forward_local_layer before the activation, on (N, C, H, W)."""
    n_img, c, h, w = x.shape
    filters, out_h, out_w = biases.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    out = np.empty((n_img, filters, out_h, out_w))
    for y in range(out_h):
        for x0 in range(out_w):
            patch = xp[:, :, y * stride:y * stride + size, x0 * stride:x0 * stride + size].reshape(n_img, -1)
            out[:, :, y, x0] = patch @ weights[y * out_w + x0].reshape(filters, -1).T.astype(np.float64)
    return out + biases.astype(np.float64)[None]


@register
class Local(LayerConverter):
    section = "local"
    keys = frozenset({"filters", "size", "stride", "pad", "activation"})
    summary = "YOLOv1 locally connected layer (per-cell weights), any exact activation"
    caffe_layers = "[Convolution pad] + per cell Crop + InnerProduct + Reshape; Concat; + activation"

    def build(self, sec: Section, graph: GraphBuilder) -> Node:
        prev, (c, h, w) = graph.previous(sec)
        filters = positive(sec, "filters", sec.get_int("filters", 1))
        size = positive(sec, "size", sec.get_int("size", 1))
        stride = positive(sec, "stride", sec.get_int("stride", 1))
        pad = sec.get_int("pad", 0)
        if pad < 0:
            raise CfgError(f"{sec.where_key('pad')}: must be >= 0, got {pad}")
        out_h, out_w = local_out_size(h, size, stride, pad), local_out_size(w, size, stride, pad)
        col_h, col_w = (h + 2 * pad - size) // stride + 1, (w + 2 * pad - size) // stride + 1
        if (out_h, out_w) != (col_h, col_w):
            # Darknet's output grid and its im2col grid disagree: it would read the wrong columns.
            raise UnsupportedLayerError(
                f"{sec.where_key('pad')}: Darknet's [local] output is {out_h}x{out_w} but its im2col grid "
                f"is {col_h}x{col_w} for size={size}, pad={pad}; Darknet itself computes garbage here")
        refuse_zeroing_activation(sec, sec.get_str("activation", "logistic"), graph.flavor)
        warnings: list[str] = []
        act = read_activation(sec, "logistic", graph.flavor, warnings)
        check_emitted_size(sec, "size", layers=2 * out_h * out_w)  # a Crop + InnerProduct per cell
        params = [ParamArray("biases", (filters, out_h, out_w)),
                  ParamArray("weights", (out_h * out_w, filters, c, size, size))]
        return Node(index=sec.index, kind=self.section, section=sec, inputs=[prev], in_shapes=[(c, h, w)],
                    out_shape=(filters, out_h, out_w), params=params,
                    attrs={"filters": filters, "size": size, "stride": stride, "pad": pad, "activation": act,
                           "warnings": warnings})

    def emit(self, node: Node, em: Emitter, arrays: dict[str, np.ndarray]) -> None:
        a = node.attrs
        c, h, w = node.in_shape
        filters, out_h, out_w = node.out_shape
        size, stride, pad = a["size"], a["stride"], a["pad"]
        base = node.prefix
        source = em.blob(node.inputs[0])
        if pad:
            padded = f"{base}_padded"
            em.add("Convolution", padded, [source], [padded], [np.ones((c, 1, 1, 1), np.float32)],
                   convolution_param={"num_output": c, "kernel_size": [1], "pad": [pad], "group": c,
                                      "bias_term": False},
                   param=em.frozen(1))
            source = padded
        # Crop's reference only lends its k x k spatial shape; a max-pool of the padded input has it.
        ref = f"{base}_patch_shape"
        em.add("Pooling", ref, [source], [ref],
               pooling_param={"pool": "MAX", "kernel_h": h + 2 * pad - size + 1, "kernel_w": w + 2 * pad - size + 1,
                              "stride": 1})
        weights = np.asarray(arrays["weights"], np.float32).reshape(out_h * out_w, filters, c * size * size)
        biases = np.asarray(arrays["biases"], np.float32).reshape(filters, out_h * out_w)
        rho = lr_scale(node)
        rows = []
        for y in range(out_h):
            cells = []
            for x in range(out_w):
                j = y * out_w + x
                cell = f"{base}_y{y:02d}x{x:02d}"
                em.add("Crop", f"{cell}_patch", [source, ref], [f"{cell}_patch"],
                       crop_param={"axis": 2, "offset": [y * stride, x * stride]},
                       propagate_down=[True, False] if em.training else None)
                em.add("InnerProduct", f"{cell}_fc", [f"{cell}_patch"], [f"{cell}_fc"],
                       [weights[j], biases[:, j]], inner_product_param={"num_output": filters, "axis": 1},
                       param=em.learnable(rho, with_bias=True))
                em.add("Reshape", cell, [f"{cell}_fc"], [cell],
                       reshape_param={"shape": {"dim": [0, filters, 1, 1]}})
                cells.append(cell)
            if len(cells) == 1:
                rows.append(cells[0])
            else:
                row = f"{base}_row{y:02d}"
                em.add("Concat", row, cells, [row], concat_param={"axis": 3})
                rows.append(row)
        if len(rows) == 1:
            out = rows[0]
        else:
            out = f"{base}_local"
            em.add("Concat", out, rows, [out], concat_param={"axis": 2})
        em.blob_of[node.index] = emit_activation(em, node, out, a["activation"])

    def export(self, node: Node, model: ModelReader) -> dict[str, np.ndarray]:
        """One `_yYYxXX_fc` InnerProduct per output cell -> Darknet's per-cell weights and biases."""
        shapes = {p.name: p.shape for p in node.params}
        cells, filters, c, size, _ = shapes["weights"]
        _, out_h, out_w = shapes["biases"]
        weights = np.empty((cells, filters, c * size * size), np.float32)
        biases = np.empty((filters, cells), np.float32)
        for y in range(out_h):
            for x in range(out_w):
                j = y * out_w + x
                fc = model.require(node, f"{node.prefix}_y{y:02d}x{x:02d}_fc", ("InnerProduct",), f"cell ({y}, {x})")
                weights[j] = model.blob(node, fc, 0, (filters, c * size * size), "cell weights")
                biases[:, j] = model.blob(node, fc, 1, (filters,), "cell biases")
        return {"biases": biases.reshape(shapes["biases"]), "weights": weights.reshape(shapes["weights"])}

    def engine_arrays(self, l: Any, updates: bool, flavor: str) -> list[tuple[str, str, tuple[int, ...]]]:
        """Darknet keeps the per-cell weights flat: out_w*out_h*size*size*c*n floats."""
        size = int(l.out_w * l.out_h * l.size * l.size * l.c * l.n)
        bias, weight = ("bias_updates", "weight_updates") if updates else ("biases", "weights")
        return [(bias, bias, (int(l.outputs),)), (weight, weight, (size,))]

    def darknet_init(self, node: Node, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """make_local_layer: weights sqrt(2/(k*k*c)) * U(-1, 1), biases 0."""
        def weights(spec: ParamArray) -> np.ndarray:
            return math.sqrt(2.0 / int(np.prod(spec.shape[2:]))) * rng.uniform(-1, 1, spec.shape)
        return darknet_init_arrays(node, weights)
