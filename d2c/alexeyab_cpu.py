"""What AlexeyAB's CPU build computes in training where it differs from its GPU build (and from
d2c's default Caffe train net), so `d2c parity --darknet-engine alexeyab` compares like with like.

Found by running the engine (commit 59596d7, CPU) against d2c's train net, then reading why:
- BN rolling statistics use a 0.9/0.1 factor on the CPU (forward_batchnorm_layer); the GPU
  build uses 0.99/0.01, which stays d2c's default for models meant for GPU-trained Darknet.
- the CPU BN backward never accumulates the beta (bias) gradient: backward_convolutional_layer
  calls backward_batchnorm_layer instead of backward_bias, and that one only does the scales;
  so on the CPU build BN betas never move. The Caffe side freezes them (Scale bias lr_mult 0).
- a convolution's CPU backward writes its input's delta through col2im_cpu_ext, which first sets
  the whole destination to zero (any kernel size, unlike Debian's, where only 1x1 assigns): what
  later layers (higher index, their backward ran first) had added to that delta is lost. Found on
  yolov4-tiny, where the gradient from the second head through `[route] layers=-4` never reaches
  layer 27. The Caffe side drops the same gradients (propagate_down false on those consumers).
- forward_network clears a layer's delta before a training pass only when the layer has l.train,
  which only the conv, batchnorm, maxpool and shortcut constructors set (the heads clear their own;
  the GPU build clears every delta). A route's or upsample's delta therefore keeps everything it
  ever received, and its backward hands its inputs the sum over the whole run, unless the next
  layer is a convolution, whose col2im zeroes it anyway. Found on yolov4-tiny: every step after
  the first moved the backbone's weights by 30-95% of their change away from the engine's, with
  Caffe resynchronised to the engine's arrays before each step. The Caffe side inserts a
  DarknetKeptDelta layer (identity forward, backward passes its running sum) between such a layer
  and its readers.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np

from d2c.caffe.proto import CaffeLayer
from d2c.layers import REGISTRY
from d2c.loss.params import dump_params

CPU_BN_MOMENTUM = 0.9


def emulate_alexeyab_cpu(graph: Any, conversion: Any) -> list[str]:
    """Make a `--bn exact` train conversion follow AlexeyAB's CPU training; return what was changed."""
    from d2c.parity import _block_gradient

    notes: list[str] = []
    consumers: dict[int, list[int]] = {}
    for node in graph.nodes:
        for src in node.inputs:
            consumers.setdefault(src, []).append(node.index)
    def block(reader: int, blob: str) -> bool:
        """Stop the gradient of `blob` from layer `reader`; a reader that reuses the blob (a one-input
        route has no Caffe layer) passes the job to its own readers."""
        if _block_gradient(conversion.net, graph.nodes[reader].prefix, blob):
            return True
        if conversion.emitter.blob(reader) == blob:
            return any([block(k, blob) for k in consumers.get(reader, [])])
        return False

    for node in graph.nodes:
        if REGISTRY[node.kind].overwrites_input_delta(node, "alexeyab"):
            src = node.inputs[0]
            for j in (j for j in consumers.get(src, []) if j > node.index):
                if block(j, conversion.emitter.blob(src)):
                    notes.append(f"conv layer {node.index} zeroes the delta of layer {src} (col2im_cpu_ext): "
                                 f"the gradient from layer {j} ({graph.nodes[j].kind}) is dropped")
    notes += keep_deltas(graph, conversion, consumers)
    bn_prefixes: list[str] = []
    for layer in conversion.net.layers:
        python = layer.params.get("python_param") or {}
        if layer.type == "Python" and python.get("layer") == "DarknetBatchNorm":
            settings = json.loads(python.get("param_str") or "{}")
            settings["momentum"] = CPU_BN_MOMENTUM
            python["param_str"] = dump_params(settings)
            bn_prefixes.append(layer.name[:-len("_dbn")])
    frozen = 0
    for layer in conversion.net.layers:
        if layer.type == "Scale" and layer.name.endswith("_scale") and layer.name[:-len("_scale")] in bn_prefixes:
            specs = layer.params.get("param")
            if specs and len(specs) == 2:
                specs[1] = {**specs[1], "lr_mult": 0.0}
                frozen += 1
    if bn_prefixes:
        notes.append(f"{len(bn_prefixes)} BN layers: rolling statistics with AlexeyAB's CPU factor 0.9/0.1")
    if frozen:
        notes.append(f"{frozen} BN betas frozen: AlexeyAB's CPU backward never accumulates their gradient")
    return notes


def kept_delta_nodes(graph: Any) -> list[int]:
    """Nodes whose delta the engine never clears (and the next layer's col2im does not zero), that
    have readers: their backward passes on the running sum of the whole run."""
    kept = []
    for node in graph.nodes:
        if not REGISTRY[node.kind].keeps_delta(node, "alexeyab"):
            continue
        following = graph.nodes[node.index + 1] if node.index + 1 < len(graph.nodes) else None
        if (following is not None and following.inputs[:1] == [node.index]
                and REGISTRY[following.kind].overwrites_input_delta(following, "alexeyab")):
            continue
        kept.append(node.index)
    return kept


def keep_deltas(graph: Any, conversion: Any, consumers: dict[int, list[int]]) -> list[str]:
    """Insert a DarknetKeptDelta layer between each kept-delta node's output and its readers.

    Readers are the Caffe layers of the node's consumers that read its blob; a consumer without
    layers of its own (a one-input route reuses the blob) passes the search to its consumers.
    Deepest first, so an outer node's accumulator also feeds an inner one's."""
    layers = conversion.net.layers
    notes = []
    for index in sorted(kept_delta_nodes(graph), reverse=True):
        node = graph.nodes[index]
        blob = conversion.emitter.blob(index)
        readers: list[Any] = []

        def collect(reader: int) -> None:
            prefix = graph.nodes[reader].prefix
            own = [layer for layer in layers if layer.name == prefix or layer.name.startswith(prefix + "_")]
            hits = [layer for layer in own if blob in layer.bottom]
            if hits:
                readers.extend(hits)
            elif not own and conversion.emitter.blob(reader) == blob:
                for k in consumers.get(reader, []):
                    collect(k)

        for k in consumers.get(index, []):
            collect(k)
        if not readers:
            continue
        kept = f"{blob}_kept{index}"
        for layer in readers:
            layer.bottom = [kept if b == blob else b for b in layer.bottom]
        first = min(layers.index(layer) for layer in readers)
        layers.insert(first, CaffeLayer(f"{node.prefix}_kept", "Python", [blob], [kept], {
            "python_param": {"module": "d2c.loss.caffe_layers", "layer": "DarknetKeptDelta",
                             "param_str": str(index)}}))
        notes.append(f"layer {index} ({node.kind}): its delta is never cleared on the CPU build, so its "
                     "backward passes on the sum over all mini-batches")
    return notes


def resync_kept_deltas(dn: Any, net: Any, batch: int) -> None:
    """Each DarknetKeptDelta's running sum := the engine's kept delta of that layer (Caffe's diff is
    minus Darknet's delta over the mini-batch), so a step compared from the engine's state starts
    from its accumulated route deltas too."""
    import numpy as np

    from d2c.loss.caffe_layers import DarknetKeptDelta

    for layer in net.layers:
        if isinstance(layer, DarknetKeptDelta):
            theirs = np.asarray(dn.layer_delta(int(layer.param_str)), np.float32)
            layer.kept = (-theirs / np.float32(batch)).astype(np.float32).reshape(layer.kept_shape)


# ---------------------------------------------------------------------------------------------
# The heads' -Ofast arithmetic: the bound of parity's "delta formula" check for this engine
# ---------------------------------------------------------------------------------------------

#: Unit roundoff of float32 (half an ulp of 1).
U32 = 2.0 ** -24
#: Relative backward error of the quantities a [yolo] delta is computed from in the engine's -Ofast
#: build, in units of U32 (the rest is d2c's own rounding of the same quantity):
#: - the logistic 1/(1 + expf(-x)) runs in 4-lane loops (activate_array): glibc's vector expf is
#:   within 1 ulp (<= 2u) where numpy's is too (2u); 1 + e rounds on both sides (2u); the division is
#:   an rcpps estimate (|e0| <= 1.5 * 2^-12) refined by one Newton step, e0^2 + 3 roundings =
#:   5.25u, against d2c's correctly rounded division (1u): 12.25u in all;
#: - dx_box_iou's divisions are rcpps + Newton as well (5.25u + 1u each), and no path through it
#:   takes more than two of them: 12.5u relative on the box coordinates they divide.
OFAST_REL = 12.5 * U32


def ofast_input_error(node: Any, z: np.ndarray) -> np.ndarray:
    """Per head-input element (b, C, H, W), how far the input would have to move for the exact
    formula to reproduce the engine's rounding of the quantity computed from it (OFAST_REL relative
    on the logistic outputs and on the box: its centre (i + x) / lw, its size exp(w) or (2w)^2).

    Why an input perturbation: the delta check then bounds the engine's arithmetic as an absolute
    error of those quantities propagated through d2c's own Jacobian of each delta term, instead of
    counting ulps of a delta that is a small difference (a CIoU term near zero)."""
    from d2c.numerics import logistic_alexeyab

    a = node.attrs
    b, c, h, w = z.shape
    entries = 5 + int(a["classes"])
    z5 = np.asarray(z, np.float64).reshape(b, c // entries, entries, h, w)
    new_coords, s = bool(a["new_coords"]), float(a["scale_x_y"])
    y = z5 if new_coords else np.asarray(logistic_alexeyab(z5.astype(np.float32)), np.float64)
    slope = np.ones_like(z5) if new_coords else y * (1 - y)       # d(activated)/dz
    out = np.zeros_like(z5)
    cells = (np.arange(w)[None, None, :], np.arange(h)[None, :, None])    # i (column), j (row)
    for k, cell in enumerate(cells):          # centre: x*s + beta, then (cell + that) / grid
        centre = cell + np.abs(y[:, :, k] * s - 0.5 * (s - 1))
        out[:, :, k] = OFAST_REL * centre / (s * slope[:, :, k])
    for k in (2, 3):                          # size: exp(z) (d/dz relative 1) or (2z)^2 (2/z)
        out[:, :, k] = OFAST_REL * (np.abs(z5[:, :, k]) / 2 if new_coords else 1.0)
    out[:, :, 4:] = OFAST_REL * np.abs(y[:, :, 4:]) / slope[:, :, 4:]
    return np.minimum(np.nan_to_num(out, nan=np.inf), 1e-3).reshape(z.shape)   # 1e-3: the Jacobian's step


def ofast_formula_check(default: Any, node: Any, z: np.ndarray, darknet_delta: np.ndarray,
                        ours_on_darknet_input: np.ndarray, jacobian: np.ndarray) -> Any:
    """parity's "delta formula" check for a [yolo] head of this engine (`default`, the engine-free
    check, for any other head): d2c's loss on the engine's
    own head input against the engine's delta, each element within formula_check's ceiling plus
    SAFETY times the engine's -Ofast error (ofast_input_error) through d2c's Jacobian (`jacobian`:
    (b, n, out entries, in entries, H, W), from d2c.tolerances.head_sensitivity). Value and bound
    are in formula_check's unit (ulps of max(|delta|, 1)) at the element nearest its bound."""
    from d2c.tolerances import CEILINGS, SAFETY, Check, ulp

    if "new_coords" not in node.attrs:        # not a [yolo] head: no -Ofast model of its arithmetic
        return default
    name = default.name
    theirs = np.asarray(darknet_delta, np.float32)
    ours = np.asarray(ours_on_darknet_input, np.float32).reshape(theirs.shape)
    b, n, entries, _, h, w = jacobian.shape
    dz = ofast_input_error(node, z).reshape(b, n, entries, h, w)
    through = np.einsum("bnoihw,bnihw->bnohw", jacobian, dz).reshape(theirs.shape)
    scale = ulp(np.maximum(np.abs(theirs), np.float32(1)))     # formula_check's unit: ulps of max(|delta|, 1)
    allowed = CEILINGS["formula_ulps"] * scale + SAFETY * through
    diff = np.abs(theirs.astype(np.float64) - ours)
    at = np.unravel_index(int(np.argmax(diff / allowed)), diff.shape) if diff.size else ()
    value, bound = (float(diff[at] / scale[at]), float(allowed[at] / scale[at])) if diff.size else (0.0, 1.0)
    return Check(name, value, bound, {
        "max_abs": float(np.max(diff)) if diff.size else 0.0,
        "max_ulps": float(np.max(diff / scale)) if diff.size else 0.0,
        "engine_arithmetic": f"-Ofast: vector expf and rcpps+Newton, {OFAST_REL / U32:g}u relative on the logistic "
                             "outputs and the box, through d2c's Jacobian",
        **({"worst": {"index": [int(i) for i in at], "darknet": float(theirs[at]), "d2c": float(ours[at]),
                      "engine_allowance_abs": float(SAFETY * through[at])}} if value else {})})
