"""int8-friendly [yolo] heads: each head split into stock-layer outputs with their own int8 scales.

Why: a quantizing toolchain (RKNN, tpu-mlir) gives every tensor one int8 scale (per tensor for
activations). A [yolo] head's input mixes x/y and objectness/class logits (wide, and squashed by
the logistic anyway) with the w/h logits that go through exp: yolov3-tiny's first head spans
-26.3..13.0, an int8 step of 0.154, i.e. about 8% in box size after exp. Splitting the head gives
w/h a tensor of its own (a range of a few units), and applying the logistic in the network where
Darknet applies it (x, y, objectness, classes) gives the others a 0..1 range. The rewrite is exact
up to the float logistic: the decoder rebuilds Darknet's activated tensor from the split outputs.

Two forms, per head of A anchors, C classes, an H x W grid and input blob B:
- "conv" (the head's input is a plain Convolution with bias, nothing in place after it, group 1:
  every pjreddie head and AlexeyAB's linear heads): the convolution itself is split into three
  Convolutions over the same bottom, with the weight rows of x/y (2 per anchor), w/h (2 per anchor)
  and objectness+classes (1+C per anchor), anchor-major; Sigmoid on the x/y and objectness+classes
  ones. No tensor ever holds the mixed 255 channels, so none is quantized with the mixed range.
- "slice" (any other head, e.g. yolov7's `activation=logistic` head conv with `new_coords`):
  Reshape B -> (1, A, 5+C, H*W); Slice axis 2 at 2, 4; Sigmoid on x/y and objectness+classes
  (none with new_coords: the conv's logistic already ran); an identity Reshape makes each other
  part its own layer's only top, because RKNN-Toolkit2's Caffe loader drops an unconsumed top of a
  Slice whose other tops are consumed.
Outputs: B_xy, B_wh, B_oc. [region] heads (softmax across classes) are refused.
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from d2c.caffe.proto import CaffeLayer, CaffeNet
from d2c.errors import D2CError, EngineError
from d2c.numerics import scale_x_y_offset

F32 = np.float32
PARTS = ("xy", "wh", "oc")


def split_names(blob: str) -> dict[str, str]:
    """The output blob of each part of a split head."""
    return {part: f"{blob}_{part}" for part in PARTS}


def split_heads(net: CaffeNet, sidecar: dict[str, Any]) -> tuple[CaffeNet, dict[str, Any]]:
    """The deploy net with every [yolo] head split (new layers appended), and its sidecar: each head
    gains `split` {"xy", "wh", "oc": blob names, "sigmoid": bool}. The input nets are not modified."""
    heads = sidecar.get("heads") or []
    if not heads:
        raise D2CError("split heads: the model has no detection head")
    bad = [f"heads[{i}] (layer {h.get('index')}) is a [{h.get('kind')}] head" for i, h in enumerate(heads)
           if h.get("kind") != "yolo"]
    if bad:
        raise D2CError(f"split heads: only [yolo] heads can be split; {bad[0]}", bad)
    if sidecar.get("preprocess", {}).get("layout", "NCHW") != "NCHW" or net.inputs[0][1][0] != 1:
        raise D2CError("split heads: needs the batch-1 deploy net")
    layers = list(net.layers)
    new_heads = []
    for head in heads:
        blob = head["blob"]
        channels = int(head["shape"][0])
        entries = 5 + int(head["classes"])
        anchors = len(head["mask"])
        if anchors * entries != channels:
            raise D2CError(f"split heads: head of layer {head.get('index')} has {channels} channels, "
                           f"not {anchors} anchors x (5 + {head['classes']})")
        sigmoid = not bool(head.get("new_coords", 0))
        conv = _plain_head_conv(layers, blob)
        if conv is not None and sigmoid:
            layers = _split_conv(layers, conv, blob, anchors, entries)
            form = "conv"
        else:
            layers += _split_slice(blob, head, anchors, entries, sigmoid)
            form = "slice"
        new_heads.append(dict(head, split=dict(split_names(blob), sigmoid=sigmoid, form=form)))
    out_sidecar = copy.deepcopy(sidecar)
    out_sidecar["heads"] = new_heads
    return CaffeNet(name=net.name, inputs=list(net.inputs), layers=layers), out_sidecar


def _plain_head_conv(layers: list[CaffeLayer], blob: str) -> CaffeLayer | None:
    """The Convolution writing `blob` when it is the blob's only writer and has a bias and group 1."""
    writers = [layer for layer in layers if blob in layer.top]
    if any(blob in layer.bottom for layer in layers):   # another layer reads the mixed tensor
        return None
    if len(writers) != 1 or writers[0].type != "Convolution" or writers[0].top != [blob]:
        return None
    conv = writers[0]
    param = conv.params.get("convolution_param", {})
    if int(param.get("group", 1)) != 1 or len(conv.blobs) != 2 or not param.get("bias_term", True):
        return None
    return conv


def _split_conv(layers: list[CaffeLayer], conv: CaffeLayer, blob: str, anchors: int,
                entries: int) -> list[CaffeLayer]:
    """The head conv replaced by three convs (x/y, w/h, objectness+classes rows, anchor-major)."""
    names = split_names(blob)
    weights, bias = conv.blobs
    rows = {"xy": (0, 2), "wh": (2, 4), "oc": (4, entries)}
    new: list[CaffeLayer] = []
    for part, (lo, hi) in rows.items():
        pick = np.concatenate([np.arange(a * entries + lo, a * entries + hi) for a in range(anchors)])
        param = dict(conv.params.get("convolution_param", {}), num_output=int(pick.size))
        top = f"{names[part]}_raw" if part != "wh" else names[part]
        new.append(CaffeLayer(name=f"{conv.name}_{part}", type="Convolution", bottom=list(conv.bottom), top=[top],
                              params=dict(conv.params, convolution_param=param),
                              blobs=[np.ascontiguousarray(weights[pick]), np.ascontiguousarray(bias[pick])]))
        if part != "wh":
            new.append(CaffeLayer(name=f"{names[part]}_logistic", type="Sigmoid", bottom=[top], top=[names[part]]))
    at = layers.index(conv)
    return layers[:at] + new + layers[at + 1:]


def _split_slice(blob: str, head: dict[str, Any], anchors: int, entries: int, sigmoid: bool) -> list[CaffeLayer]:
    """Reshape + Slice after the head's input, Sigmoid or an identity Reshape per part."""
    names = split_names(blob)
    height, width = (int(v) for v in head["shape"][1:])
    raw = {part: f"{names[part]}_raw" for part in PARTS}
    dims = {"xy": 2, "wh": 2, "oc": entries - 4}
    layers = [CaffeLayer(name=f"{blob}_reshape", type="Reshape", bottom=[blob], top=[f"{blob}_grid"],
                         params={"reshape_param": {"shape": {"dim": [1, anchors, entries, height * width]}}}),
              CaffeLayer(name=f"{blob}_slice", type="Slice", bottom=[f"{blob}_grid"], top=[raw[p] for p in PARTS],
                         params={"slice_param": {"axis": 2, "slice_point": [2, 4]}})]
    for part in PARTS:
        if sigmoid and part != "wh":
            layers.append(CaffeLayer(name=f"{names[part]}_logistic", type="Sigmoid", bottom=[raw[part]],
                                     top=[names[part]]))
        else:
            layers.append(CaffeLayer(name=f"{names[part]}_out", type="Reshape", bottom=[raw[part]], top=[names[part]],
                                     params={"reshape_param": {"shape": {"dim": [1, anchors, dims[part],
                                                                                  height * width]}}}))
    return layers


def output_blobs(sidecar: dict[str, Any]) -> list[str]:
    """The blobs a run must fetch to decode: each head's input, or its three split parts."""
    blobs: list[str] = []
    for head in sidecar.get("heads") or []:
        split = head.get("split")
        blobs.extend([split[p] for p in PARTS] if split else [head["blob"]])
    return blobs


def merge_split(outputs: dict[str, np.ndarray], head: dict[str, Any], flavor: str) -> np.ndarray:
    """The activated (A, 5+C, H, W) float32 tensor Darknet's forward_yolo_layer leaves, rebuilt from
    a split head's outputs (any toolchain's layout of the same values: (1, A, k, HW) or flat)."""
    split = head["split"]
    channels, height, width = (int(v) for v in head["shape"])
    entries = 5 + int(head["classes"])
    anchors = channels // entries
    parts = []
    for part, size in zip(PARTS, (2, 2, entries - 4), strict=True):
        if split[part] not in outputs:
            raise EngineError(f"the network produced no blob '{split[part]}' (split head of layer "
                              f"{head.get('index')}); got {sorted(outputs)}")
        value = np.asarray(outputs[split[part]], dtype=F32)
        if value.size != anchors * size * height * width:
            raise EngineError(f"blob '{split[part]}' has {value.size} values, expected "
                              f"{anchors}x{size}x{height * width}")
        parts.append(value.reshape(anchors, size, height, width))
    grid = np.concatenate(parts, axis=1)
    if flavor == "alexeyab":   # scale_x_y on the logistic (the CPU build applies it even for s = 1)
        alpha, beta = scale_x_y_offset(float(head.get("scale_x_y", 1.0)))
        grid[:, 0:2] = grid[:, 0:2] * alpha + beta
    return grid
