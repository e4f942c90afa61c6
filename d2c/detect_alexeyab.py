"""AlexeyAB's detector (test_detector, commit 59596d7) for models converted with AlexeyAB semantics.

Where it differs from pjreddie's, which `d2c.detect` follows:
- the network input is `resize_image` to the net size (aspect ratio not kept) unless the cfg's
  `[net] letter_box=1` asks for `letterbox_image`; boxes are corrected for the letterbox only then
  (with letter_box=0, correct_yolo_boxes divides by ratio 1 and shifts by 0: boxes are unchanged);
- NMS follows the last layer's `nms_kind`: `default` is do_nms_sort (IoU), `greedynms` suppresses
  when IoU - (d/c)^0.6 > nms (box_diou, a fixed exponent), `diounms` when IoU - (d/c)^beta_nms > nms
  (box_diounms), d the squared centre distance and c the squared diagonal of the enclosing box.
Sorting and the suppression loop are do_nms_sort's (glibc's qsort is a stable merge sort); the overlaps
are d2c.numerics' box_iou / box_diou, the functions the training loss uses.
"""
from __future__ import annotations

import functools
from typing import Any

import numpy as np

from d2c.detect import Detection, Overlap, do_nms_sort
from d2c.detect import decode_heads as pjreddie_decode
from d2c.errors import D2CError
from d2c.image import letterbox, resize_image
from d2c.numerics import box_diou, box_iou

F32 = np.float32
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


def nms_overlap(kind: str, beta_nms: float) -> Overlap:
    """What AlexeyAB's NMS compares with the threshold for an nms_kind: box_iou with its zero guard
    (default, do_nms_sort), box_diou's IoU - (d/c)^0.6 (greedynms) or box_diounms's IoU - (d/c)^beta_nms
    (diounms; beta_nms is a float). diounms_sort runs do_nms_sort's loop with it (d2c.detect)."""
    if kind == "greedynms":
        return functools.partial(box_diou, exponent=GREEDY_EXPONENT)
    if kind == "diounms":
        return functools.partial(box_diou, exponent=float(F32(beta_nms)))
    return functools.partial(box_iou, zero_guard=True)


def nms_sort(dets: list[Detection], sidecar: dict[str, Any], classes: int, nms: float) -> list[Detection]:
    """The NMS test_detector runs: by the last head's nms_kind (and beta_nms)."""
    last = (sidecar.get("heads") or [{}])[-1]
    kind = str(last.get("nms_kind", "default"))   # the engine's parser maps any other spelling to default
    return do_nms_sort(dets, classes, nms, nms_overlap(kind, float(last.get("beta_nms", 0.6))))


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
