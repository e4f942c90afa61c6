"""AlexeyAB's detector (test_detector, commit 59596d7) for models converted with AlexeyAB semantics.

Where it differs from pjreddie's, which `d2c.detect` follows:
- the network input is `resize_image` to the net size (aspect ratio not kept) unless the cfg's
  `[net] letter_box=1` asks for `letterbox_image`; boxes are corrected for the letterbox only then
  (with letter_box=0, correct_yolo_boxes divides by ratio 1 and shifts by 0: boxes are unchanged);
- NMS follows the last layer's `nms_kind`: `default` is do_nms_sort (IoU), `greedynms` suppresses
  when IoU - (d/c)^0.6 > nms (box_diou, a fixed exponent), `diounms` when IoU - (d/c)^beta_nms > nms
  (box_diounms), d the squared centre distance and c the squared diagonal of the enclosing box.
Sorting and the suppression loop are the same as do_nms_sort's (glibc's qsort is a stable merge sort).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from d2c.detect import Detection, box_iou, do_nms_sort
from d2c.detect import decode_heads as pjreddie_decode
from d2c.errors import D2CError
from d2c.image import letterbox, resize_image

F32 = np.float32
F64 = np.float64
NMS_KINDS = ("default", "greedynms", "diounms")
GREEDY_EXPONENT = 0.6          # box_diou's fixed power, used by nms_kind=greedynms


def network_input(image: np.ndarray, width: int, height: int, letter_box: bool) -> np.ndarray:
    """test_detector's sized image: letterbox_image with [net] letter_box=1, else resize_image."""
    return letterbox(image, width, height) if letter_box else resize_image(image, width, height)


def decode_heads(outputs: dict[str, np.ndarray], sidecar: dict[str, Any], im_w: int, im_h: int,
                 thresh: float) -> list[Detection]:
    """get_network_boxes(relative=1, letter) over the raw [yolo] head inputs, in the engine's order."""
    heads = sidecar.get("heads") or []
    if not heads or any(h["kind"] != "yolo" for h in heads):
        raise D2CError("AlexeyAB detection decodes [yolo] heads only")
    return pjreddie_decode(outputs, sidecar, im_w, im_h, thresh,
                           letterboxed=bool(sidecar["input"].get("letter_box", 0)))


def _enclosing_diagonal_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """box_c: (right-left)^2 + (bot-top)^2 of the box enclosing `a` (4,) and each of `b` (n, 4), in float."""
    two = F32(2)
    top = np.minimum(a[1] - a[3] / two, b[:, 1] - b[:, 3] / two)
    bot = np.maximum(a[1] + a[3] / two, b[:, 1] + b[:, 3] / two)
    left = np.minimum(a[0] - a[2] / two, b[:, 0] - b[:, 2] / two)
    right = np.maximum(a[0] + a[2] / two, b[:, 0] + b[:, 2] / two)
    w, h = (right - left).astype(F32), (bot - top).astype(F32)
    return (w * w + h * h).astype(F32)


def box_diou_nms(a: np.ndarray, b: np.ndarray, exponent: float) -> np.ndarray:
    """box_diou / box_diounms: IoU - (d/c)^exponent (the IoU alone where c == 0), as float."""
    a = np.asarray(a, dtype=F32)
    b = np.asarray(b, dtype=F32).reshape(-1, 4)
    iou = box_iou(a, b)
    c = _enclosing_diagonal_sq(a, b)
    dx, dy = (a[0] - b[:, 0]).astype(F32), (a[1] - b[:, 1]).astype(F32)
    d = (dx * dx + dy * dy).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = (d / c).astype(F32)
        value = (iou.astype(F64) - np.power(ratio.astype(F64), F64(exponent))).astype(F32)
    return np.where(c == 0, iou, value)


def diou_nms_sort(dets: list[Detection], classes: int, nms: float, kind: str, beta_nms: float) -> list[Detection]:
    """box.c diounms_sort for nms_kind greedynms or diounms, in the engine's final order."""
    if kind not in ("greedynms", "diounms"):
        raise D2CError(f"nms_kind {kind!r}: expected greedynms or diounms")
    exponent = GREEDY_EXPONENT if kind == "greedynms" else float(F32(beta_nms))
    count = len(dets)
    if count == 0:
        return []
    nms32 = F32(nms)
    boxes = np.stack([d.bbox for d in dets]).astype(F32)
    objectness = np.array([d.objectness for d in dets], dtype=F32)
    probs = np.stack([np.asarray(d.prob, dtype=F32) for d in dets]).copy()
    order, last, i = list(range(count)), count - 1, 0
    while i <= last:                       # zero-objectness detections swapped to the end
        if objectness[order[i]] == 0:
            order[i], order[last] = order[last], order[i]
            last -= 1
        else:
            i += 1
    total = last + 1
    perm = np.asarray(order, dtype=np.int64)
    for k in range(min(classes, probs.shape[1])):
        head = perm[:total]
        perm[:total] = head[np.argsort(-probs[head, k], kind="stable")]
        for pos in range(total):
            current = perm[pos]
            if probs[current, k] == 0:
                continue
            later = perm[pos + 1:total]
            if later.size == 0:
                break
            suppressed = box_diou_nms(boxes[current], boxes[later], exponent) > nms32
            probs[later[suppressed], k] = 0
    return [Detection(bbox=dets[j].bbox.copy(), objectness=dets[j].objectness, prob=probs[j],
                      classes=dets[j].classes, head=dets[j].head) for j in perm.tolist()]


def nms_sort(dets: list[Detection], sidecar: dict[str, Any], classes: int, nms: float) -> list[Detection]:
    """The NMS test_detector runs: by the last head's nms_kind (and beta_nms)."""
    last = (sidecar.get("heads") or [{}])[-1]
    kind = str(last.get("nms_kind", "default"))
    if kind not in NMS_KINDS:
        kind = "default"                   # the engine's parser maps any other spelling to DEFAULT_NMS
    if kind == "default":
        return do_nms_sort(dets, classes, nms)
    return diou_nms_sort(dets, classes, nms, kind, float(last.get("beta_nms", 0.6)))


def detect_image(runner: Any, image: np.ndarray, thresh: float, nms: float) -> tuple[list[Detection], tuple[int, int]]:
    """test_detector for one (3, h, w) RGB image with a d2c runner (its `forward` and `files`)."""
    _, im_h, im_w = image.shape
    sidecar = runner.files.sidecar
    net_w, net_h = runner.files.input_size
    outputs = runner.forward(network_input(image, net_w, net_h, bool(sidecar["input"].get("letter_box", 0))))
    dets = decode_heads(outputs, sidecar, im_w, im_h, thresh)
    if nms:
        dets = nms_sort(dets, sidecar, runner.files.classes, nms)
    return dets, (im_w, im_h)
