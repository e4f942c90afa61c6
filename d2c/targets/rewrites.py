"""Exact rewrites of d2c's stock-Caffe net into forms a deploy toolchain's importer accepts.

Why rewrites on the Caffe net (and not in the layer converters): they are properties of a target,
not of a Darknet section, and each one is a local, exact identity over stock BVLC layers, so the
plain output stays what it always was and a target only pays for what its importer lacks. Each
rewrite returns how many sites it changed; tests/test_targets.py proves each one against the
unrewritten net in pycaffe (and the toolchain tests against the real importers).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from d2c.caffe.proto import CaffeLayer
from d2c.targets.base import is_inplace_output_writer, net_outputs

if TYPE_CHECKING:  # pragma: no cover
    from d2c.caffe.emitter import Emitter

#: Darknet-style SPP pools larger than this become a cascade of small stride-1 pools.
MAX_POOL_KERNEL = 5


def _splice(em: Emitter, start: int, count: int, new: list[CaffeLayer]) -> None:
    """Replace em.layers[start:start+count] by `new`; new layers inherit the first one's cfg origin."""
    origin = em.origin.get(em.layers[start].name)
    for layer in new:
        if layer.name not in {old.name for old in em.layers[start:start + count]}:
            if layer.name in em._names:
                raise ValueError(f"duplicate Caffe layer name {layer.name}")
            em._names.add(layer.name)
        if origin is not None:
            em.origin[layer.name] = origin
    em.layers[start:start + count] = new


def _layer(type_: str, name: str, bottom: list[str], top: list[str], **params: Any) -> CaffeLayer:
    return CaffeLayer(name=name, type=type_, bottom=bottom, top=top, params=params)


def mish_without_bnll(em: Emitter) -> int:
    """tanh(softplus(x)) from BNLL -> TanH becomes s(2-s)/(1+(1-s)^2) with s = sigmoid(x).

    Why this form: it is tanh(log(1+e^x)) exactly (with e = e^x, s = e/(1+e): tanh = ((1+e)^2-1)/((1+e)^2+1),
    divide by (1+e)^2), it needs only Sigmoid, Power and 2-input Eltwise PROD, and it stays accurate at
    both ends: for very negative x it is ~s ~e^x (relative error of float), for large x it is 1, as
    Darknet's softplus thresholds give. Measured against Darknet's float mish in tests/test_targets.py.
    """
    count, i = 0, 0
    while i < len(em.layers):
        bnll = em.layers[i]
        nxt = em.layers[i + 1] if i + 1 < len(em.layers) else None
        if not (bnll.type == "BNLL" and nxt is not None and nxt.type == "TanH"
                and nxt.bottom == bnll.top and nxt.top == bnll.top):
            i += 1
            continue
        (x,), (sp,) = bnll.bottom, bnll.top
        s, q, inv, two_minus, num = (f"{sp}_sig", f"{sp}_1ms_sq", f"{sp}_den_inv", f"{sp}_2ms", f"{sp}_num")
        new = [_layer("Sigmoid", s, [x], [s]),
               _layer("Power", q, [s], [q], power_param={"power": 2.0, "scale": -1.0, "shift": 1.0}),
               _layer("Power", inv, [q], [inv], power_param={"power": -1.0, "shift": 1.0}),
               _layer("Power", two_minus, [s], [two_minus], power_param={"scale": -1.0, "shift": 2.0}),
               _layer("Eltwise", num, [s, two_minus], [num], eltwise_param={"operation": "PROD"}),
               _layer("Eltwise", f"{sp}_tanh", [num, inv], [sp], eltwise_param={"operation": "PROD"})]
        _splice(em, i, 2, new)
        i += len(new)
        count += 1
    return count


def is_large_same_pool(layer: CaffeLayer) -> bool:
    """A MAX pool with an odd square kernel above MAX_POOL_KERNEL, stride 1 and 'same' padding (SPP)."""
    p = layer.params.get("pooling_param", {})
    k = p.get("kernel_size", 0)
    return (layer.type == "Pooling" and p.get("pool") == "MAX" and k > MAX_POOL_KERNEL and k % 2 == 1
            and p.get("stride", 1) == 1 and p.get("pad", 0) == (k - 1) // 2
            and not any(key in p for key in ("kernel_h", "kernel_w", "stride_h", "stride_w", "pad_h", "pad_w")))


def cascade_large_pools(em: Emitter) -> int:
    """A k x k stride-1 'same' max pool (SPP's 9 and 13) becomes chained 5x5 (and one 3x3) stride-1 pools.

    Why exact: Caffe's max pool skips padded positions, so each pool is the max over a clipped window of
    radius r; chaining radii r1 + r2 + ... reaches exactly the clipped window of radius (k-1)/2.
    """
    count, i = 0, 0
    while i < len(em.layers):
        layer = em.layers[i]
        if not is_large_same_pool(layer):
            i += 1
            continue
        radius, kernels = (layer.params["pooling_param"]["kernel_size"] - 1) // 2, []
        while radius > 0:
            step = min(radius, (MAX_POOL_KERNEL - 1) // 2)
            kernels.append(2 * step + 1)
            radius -= step
        new, bottom = [], layer.bottom[0]
        for n, k in enumerate(kernels):
            last = n == len(kernels) - 1
            name = layer.name if last else f"{layer.name}_cascade{n}"
            top = layer.top[0] if last else name
            new.append(_layer("Pooling", name, [bottom], [top],
                              pooling_param={"pool": "MAX", "kernel_size": k, "stride": 1, "pad": (k - 1) // 2}))
            bottom = top
        _splice(em, i, 1, new)
        i += len(new)
        count += 1
    return count


def outputs_out_of_place(em: Emitter) -> int:
    """An in-place layer that writes a net output (a head conv's logistic/leaky) gets its own top.

    Why: MNN names a net output after the layer that wrote it last (so the sidecar's blob name is not
    among its outputs), and tpu-mlir stops converting once every output name exists; the same values
    in a fresh blob named like its layer are unambiguous for both. The sidecar's head blobs follow.
    """
    count = 0
    for i, layer in enumerate(list(em.layers)):
        outputs = net_outputs(em.layers)
        if not is_inplace_output_writer(layer, outputs) or any(
                layer.top[0] in later.top for later in em.layers[i + 1:]):
            continue
        blobs = {b for other in em.layers for b in (*other.top, *other.bottom)}
        old = layer.top[0]
        new = layer.name if layer.name not in blobs else f"{layer.name}_out"   # MNN names outputs by layer
        layer.top = [new]
        for head in em.heads:
            if head.blob == old:
                head.blob = new
        for index, blob in em.blob_of.items():
            if blob == old:
                em.blob_of[index] = new
        count += 1
    return count


def eltwise_pairs(em: Emitter) -> int:
    """An Eltwise with more than two bottoms becomes a chain of two-bottom Eltwise layers.

    Why exact: Caffe's Eltwise folds its bottoms left to right (SUM with coefficients as y += c_i x_i,
    PROD and MAX likewise), which is what the chain computes in the same order.
    """
    count, i = 0, 0
    while i < len(em.layers):
        layer = em.layers[i]
        if layer.type != "Eltwise" or len(layer.bottom) <= 2:
            i += 1
            continue
        param = dict(layer.params.get("eltwise_param", {}))
        coeff = list(param.pop("coeff", [])) or [1.0] * len(layer.bottom)
        new, acc = [], layer.bottom[0]
        for n, bottom in enumerate(layer.bottom[1:], start=1):
            last = n == len(layer.bottom) - 1
            name = layer.name if last else f"{layer.name}_pair{n}"
            top = layer.top[0] if last else name
            pair = {**param}
            if param.get("operation", "SUM") == "SUM" and (coeff[0] != 1.0 or coeff[n] != 1.0):
                pair["coeff"] = [coeff[0] if n == 1 else 1.0, coeff[n]]
            new.append(_layer("Eltwise", name, [acc, bottom], [top], eltwise_param=pair))
            acc = top
        _splice(em, i, 1, new)
        i += len(new)
        count += 1
    return count


def flatten_as_reshape(em: Emitter) -> int:
    """Flatten(axis 1) becomes Reshape with dims (0, -1): the same memory, the same shape."""
    count = 0
    for layer in em.layers:
        if layer.type == "Flatten" and layer.params.get("flatten_param", {}).get("axis", 1) == 1:
            layer.type = "Reshape"
            layer.params = {"reshape_param": {"shape": {"dim": [0, -1]}}}
            count += 1
    return count


REWRITES: dict[str, Callable[[Emitter], int]] = {
    "mish-sigmoid": mish_without_bnll,
    "pool-cascade": cascade_large_pools,
    "outputs-out-of-place": outputs_out_of_place,
    "eltwise-pairs": eltwise_pairs,
    "flatten-reshape": flatten_as_reshape,
}
