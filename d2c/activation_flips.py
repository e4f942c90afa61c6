"""Leaky/ReLU sign flips between the engines in `d2c parity`, and what they do to a step's gradients.

Why: a leaky pre-activation within float order of zero can take the other sign in Caffe than in
the engine; its gradient is then scaled by 0.1 on one side and by 1 on the other, and every array
that gradient reaches (the layer's own weights and everything below it) differs by far more than
float order in that step. That is amplification of the inputs' rounding, not a formula error, so
parity finds those elements (each converter's activation_flips, from both engines' outputs of the
last training forward) and measures their effect exactly: the linear response of Caffe's own
backward to the difference of the two gradients at exactly those elements. The affected update and
momentum checks add that response to their bounds; the other arrays keep theirs.

Limits: the flips are those of a step's last mini-batch (with subdivisions > 1 an earlier one's are
not seen), the update bound needs momentum > 0 (the accumulator then carries the step's gradient),
and an in-place Scale's gradient is recomputed only after d2c's exact BN (`--bn exact`, parity's
default); after stock BN its share of the response is missing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

F32 = np.float32


@dataclass
class ActivationFlips:
    """Per node with flips: the count (for the report) and, per Darknet array, max |the flips' effect
    on the array's gradient G| (Darknet's sign and scale: G = -b * Caffe's diff)."""

    counts: dict[str, int] = field(default_factory=dict)
    response: dict[int, dict[str, float]] = field(default_factory=dict)

    def effect(self, index: int, name: str) -> float:
        return self.response.get(index, {}).get(name, 0.0)


def find_activation_flips(dn: Any, net: Any, graph: Any, conversion: Any, sgd: Any) -> ActivationFlips:
    """The sign flips of the last training forward, and their effect on every learned array's gradient."""
    from d2c.layers import REGISTRY

    found = ActivationFlips()
    names = list(net._layer_names)
    for node in graph.nodes:
        blob = conversion.emitter.blob(node.index)
        if blob not in net.blobs:
            continue
        theirs = np.asarray(dn.layer_output(node.index), F32)
        ours = np.asarray(net.blobs[blob].data, F32)
        if ours.size != theirs.size:
            continue
        flips = REGISTRY[node.kind].activation_flips(node, theirs, ours.reshape(theirs.shape))
        if flips is None or flips[0] not in names or not np.any(flips[1]):
            continue
        layer, factor = flips
        found.counts[f"layer {node.index} ({node.kind})"] = int(np.count_nonzero(factor))
        for index, arrays in gradient_response(net, conversion, sgd, names.index(layer), factor).items():
            slot = found.response.setdefault(index, {})
            for name, value in arrays.items():
                slot[name] = slot.get(name, 0.0) + float(np.max(np.abs(value)))   # several flipped layers: summed
    return found


def gradient_response(net: Any, conversion: Any, sgd: Any, at: int,
                      factor: np.ndarray) -> dict[int, dict[str, np.ndarray]]:
    """Darknet-named change of every learned array's gradient G if Caffe's layer `at` (the branch
    activation) had taken the engine's gradient factor: the incoming gradient g at that layer (a
    backward from the loss down to the layer above it) times `factor` (engine's minus Caffe's), fed
    into the activation's bottom and back-propagated from the layer below it. Linear in that input,
    so it is exactly the difference the flips make (to first order in this step's weight change).
    The DarknetKeptDelta running sums are set aside (they pass on the perturbation alone); they, the
    blob diffs (the loss weights among them) and the cleared parameter diffs are left as found."""
    from d2c.loss.caffe_layers import DarknetKeptDelta
    from d2c.parity import caffe_arrays

    names = list(net._layer_names)
    kept = {name: layer for name, layer in zip(names, net.layers) if isinstance(layer, DarknetKeptDelta)}
    saved = {name: None if layer.kept is None else layer.kept.copy() for name, layer in kept.items()}
    diffs = {name: np.array(blob.diff, F32, copy=True) for name, blob in net.blobs.items()}
    top = net.blobs[net.top_names[names[at]][0]]
    bottom = net.blobs[net.bottom_names[names[at]][0]]
    try:
        # the incoming gradient: each running sum as it was before this mini-batch's backward added
        # its top diff, which the rerun adds again
        for name, layer in kept.items():
            if saved[name] is not None:
                layer.kept = saved[name] - diffs[net.top_names[name][0]]
        net.clear_param_diffs()
        net._backward(len(names) - 1, at + 1)
        g = np.asarray(top.diff, F32).reshape(factor.shape).copy()
        # the response: nothing but the perturbation flows below (every diff zero, the loss weights
        # included, so a head below this layer adds nothing; running sums empty)
        for layer in kept.values():
            layer.kept = None
        for blob in net.blobs.values():
            blob.diff[...] = 0
        net.clear_param_diffs()
        bottom.diff[...] = (g * factor).reshape(bottom.diff.shape)
        for i in range(at - 1, -1, -1):
            backward_layer(net, names, i)
        b = F32(sgd.cfg.batch)
        delta_g = {slot.key: (-b * np.asarray(sgd._blob(net, slot).diff, F32)).astype(F32) for slot in sgd.slots}
    finally:
        net.clear_param_diffs()
        for name, blob in net.blobs.items():
            blob.diff[...] = diffs[name]
        for name, layer in kept.items():
            layer.kept = saved[name]
    return caffe_arrays(net, conversion, updates=delta_g)


def backward_layer(net: Any, names: list[str], i: int) -> None:
    """Layer i's backward, once more after the training backward. An in-place Scale layer kept its
    bottom data (x-hat) in a buffer that its first backward overwrote with a product, so its scale
    gradient is recomputed here from the x-hat of the DarknetBatchNorm before it (its own saved
    input and batch statistics); its bottom diff (top diff times the scale) is unaffected."""
    from d2c.loss.bn import normalize
    from d2c.loss.caffe_layers import DarknetBatchNorm

    layer = net.layers[i]
    top = net.top_names[names[i]]
    in_place_scale = layer.type == "Scale" and top == net.bottom_names[names[i]][:1]
    before = net.layers[i - 1] if i > 0 else None
    if not in_place_scale or not isinstance(before, DarknetBatchNorm) or before._saved is None:
        net._backward(i, i)
        return
    dy = np.array(net.blobs[top[0]].diff, F32, copy=True)
    net._backward(i, i)
    x, mean, variance = before._saved
    x_hat = np.asarray(normalize(x, mean, variance, before.cfg["flavor"]), np.float64)
    net.params[names[i]][0].diff[...] = np.sum(dy * x_hat, axis=(0, 2, 3)).astype(F32).reshape(
        net.params[names[i]][0].diff.shape)
