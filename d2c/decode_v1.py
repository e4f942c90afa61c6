"""YOLOv1 `[detection]` heads, decoded the way pjreddie's `darknet yolo test` does.

Why a module of its own: YOLOv1 differs from the later heads in every step, so it shares no
code with the [yolo]/[region] decoders. Darknet's examples/yolo.c (test_yolo) stretches the
image to the network size with resize_image (no letterbox), runs the net, and asks
get_network_boxes for boxes with w = h = 1 and relative = 0, so the boxes are relative to the
image and never corrected. src/detection_layer.c: forward_detection_layer copies its input
and, with softmax=1, applies softmax to each cell's class block; get_detection_detections
reads, for cell i = row*side + col and box n, confidence `scale` at side²·classes + i·num + n
and the box at side²·(classes + num) + (i·num + n)·4:
  x = (p0 + col) / side, y = (p1 + row) / side   (float; Debian's -Ofast build multiplies by
                                                 the float 1/side, and so do we)
  w = pow(p2, sqrt ? 2 : 1), h = pow(p3, sqrt ? 2 : 1)   (double, rounded to float)
  prob[j] = scale · class[i·classes + j], kept when > thresh (float)
with objectness = scale (not thresholded) and det.classes left 0 (make_network_boxes never
sets it). Every cell and box gives a detection, in (cell, box) order, as Darknet lists them.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from d2c.numerics import softmax_darknet

F32 = np.float32
F64 = np.float64


def decode_detection(raw: np.ndarray, head: dict[str, Any], thresh: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw [detection] input (any shape holding side²·((1+coords)·num + classes) floats) ->
    (boxes (k, 4), objectness (k,), probs (k, classes)) in Darknet's order, k = side²·num.
    """
    side, num, classes = int(head["side"]), int(head["num"]), int(head["classes"])
    coords = int(head.get("coords", 4))
    if coords != 4:
        from d2c.errors import D2CError
        raise D2CError(f"[detection] head with coords={coords}: only 4 box coordinates are decoded")
    cells = side * side
    flat = np.asarray(raw, dtype=F32).reshape(-1)
    expected = cells * ((1 + coords) * num + classes)
    if flat.size != expected:
        from d2c.errors import D2CError
        raise D2CError(f"[detection] head input has {flat.size} values, side/num/classes say {expected}")
    class_block = flat[:cells * classes].reshape(cells, classes)
    if int(head.get("softmax", 0)):
        class_block = np.ascontiguousarray(softmax_darknet(class_block.T).T, dtype=F32)
    scale = flat[cells * classes:cells * (classes + num)].reshape(cells, num)
    box = flat[cells * (classes + num):].reshape(cells, num, 4)
    cell = np.arange(cells)
    col = (cell % side).astype(F32)[:, None]
    row = (cell // side).astype(F32)[:, None]
    boxes = np.empty((cells, num, 4), dtype=F32)
    inverse = F32(1) / F32(side)     # Debian's -Ofast build multiplies by the float reciprocal
    boxes[:, :, 0] = (box[:, :, 0] + col) * inverse
    boxes[:, :, 1] = (box[:, :, 1] + row) * inverse
    power = 2.0 if int(head.get("sqrt", 0)) else 1.0
    boxes[:, :, 2] = np.power(box[:, :, 2].astype(F64), power).astype(F32)
    boxes[:, :, 3] = np.power(box[:, :, 3].astype(F64), power).astype(F32)
    probs = scale[:, :, None] * class_block[:, None, :]                  # (cells, num, classes) float
    probs = np.where(probs > F32(thresh), probs, F32(0)).astype(F32)
    return boxes.reshape(-1, 4), scale.reshape(-1).astype(F32), probs.reshape(-1, classes)
