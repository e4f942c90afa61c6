"""int8-friendly [yolo] heads: each head split into stock-layer outputs with their own int8 scales.

Why: a quantizing toolchain (RKNN, tpu-mlir) gives every network output one int8 scale. A [yolo]
head's raw tensor mixes x/y and objectness/class logits (wide, and squashed by the logistic anyway)
with the w/h logits that go through exp: yolov3-tiny's first head spans -26.3..13.0, an int8 step of
0.154, i.e. about 8% in box size after exp. Splitting the head with stock layers gives w/h a tensor
of its own (a range of a few units), and applying the logistic in the network where Darknet applies
it (x, y, objectness, classes) gives the others a 0..1 range. The rewrite is exact up to the float
logistic: the decoder rebuilds Darknet's activated tensor from the split outputs.

Per head of A anchors, C classes and an H x W grid, after the head's input blob B:
    Reshape B -> (1, A, 5+C, H*W); Slice axis 2 at 2, 4 -> B_xy_raw, B_wh, B_oc_raw;
    Sigmoid B_xy_raw -> B_xy; Reshape (identity) B_wh_raw -> B_wh; Sigmoid B_oc_raw -> B_oc
    (outputs: B_xy, B_wh, B_oc)
The identity Reshape is there because RKNN-Toolkit2's Caffe loader only makes outputs of layers
nothing consumes: an unconsumed top of a Slice whose other tops are consumed is dropped.
`new_coords` heads (AlexeyAB; the conv's own logistic already ran) get identity Reshapes instead
of Sigmoids.
[region] heads (softmax across classes) are refused: Darknet's softmax is not a per-value map.
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
        channels, height, width = (int(v) for v in head["shape"])
        entries = 5 + int(head["classes"])
        anchors = len(head["mask"])
        if anchors * entries != channels:
            raise D2CError(f"split heads: head of layer {head.get('index')} has {channels} channels, "
                           f"not {anchors} anchors x (5 + {head['classes']})")
        names = split_names(blob)
        sigmoid = not bool(head.get("new_coords", 0))
        raw = {part: f"{names[part]}_raw" for part in PARTS}
        dims = {"xy": 2, "wh": 2, "oc": entries - 4}
        layers.append(CaffeLayer(name=f"{blob}_reshape", type="Reshape", bottom=[blob], top=[f"{blob}_grid"],
                                 params={"reshape_param": {"shape": {"dim": [1, anchors, entries,
                                                                             height * width]}}}))
        layers.append(CaffeLayer(name=f"{blob}_slice", type="Slice", bottom=[f"{blob}_grid"],
                                 top=[raw[p] for p in PARTS],
                                 params={"slice_param": {"axis": 2, "slice_point": [2, 4]}}))
        for part in PARTS:
            if sigmoid and part != "wh":
                layers.append(CaffeLayer(name=f"{names[part]}_logistic", type="Sigmoid", bottom=[raw[part]],
                                         top=[names[part]]))
            else:   # an exact identity, so each output is a layer's only top (see the module docstring)
                layers.append(CaffeLayer(name=f"{names[part]}_out", type="Reshape", bottom=[raw[part]],
                                         top=[names[part]], params={"reshape_param": {"shape": {
                                             "dim": [1, anchors, dims[part], height * width]}}}))
        new_heads.append(dict(head, split=dict(names, sigmoid=sigmoid)))
    out_sidecar = copy.deepcopy(sidecar)
    out_sidecar["heads"] = new_heads
    return CaffeNet(name=net.name, inputs=list(net.inputs), layers=layers), out_sidecar


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
