"""Darknet-exact numpy reference of the [yolo] layer: inference output and training deltas.

Why: the Caffe training layer and `d2c parity` need Darknet's l.delta, l.cost and printed
statistics bit for bit, including its quirks (assignment of box targets, the class-0 "already
set" test, the anchor search over all anchors, truth lists that end at the first x == 0).
Semantics: src/yolo_layer.c, forward_yolo_layer with delta_yolo_box / delta_yolo_class, of
pjreddie's Darknet (the Debian binary) and of AlexeyAB's. Float details the C source leaves to
the compiler were read from the Debian binary's disassembly and are verified against it in
tests/test_loss_yolo.py:
- the anchor search uses `anchor_w * (1.0f/net_w)` (-Ofast turned the division into a
  reciprocal multiply), not `anchor_w / net_w`;
- the `log` of the w/h targets is glibc's float `logf`, not double `log`.

Conventions
- `z` is the raw head input, shape (b, n·(5+C), H, W) with n = len(mask), float32.
- `truth` is Darknet's per-image truth record, boxes of (x, y, w, h, class) relative to the
  network input: shape (b, K·5) or (b, K, 5); (b, K, 6) is accepted for AlexeyAB's 6-float
  records (the 6th value, track_id, is ignored). A box list ends at the first box with x == 0.
- pjreddie reads box t of image b at flat offset (b·K + t)·5 of the whole buffer, for t < max
  (90), exactly like Darknet (l.truths = 450 = K·5 with K = 90): a `max` larger than K reads
  into the next image's record, as the C code does. AlexeyAB reads at most min(max, K) boxes.
- δ is Darknet's l.delta: target − output, i.e. the negative gradient.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from d2c.errors import ParamError
from d2c.head_params import YoloParams
from d2c.numerics import (
    F32,
    F64,
    Box,
    box_giou,
    box_iou,
    box_iou_kind,
    dx_box_iou,
    logf,
    mag_array,
    mag_array_sq,
    seq_sum_f32,
    yolo_activate,
    yolo_box,
)

_ALEXEYAB_CLASS_THRESH = F32(0.25)  # compare_yolo_class's hard-coded conf_thresh


# --------------------------------------------------------------------------------------------
# Input checks (shared with region.py)
# --------------------------------------------------------------------------------------------

def _check_head(z: np.ndarray, n: int, entries: int, what: str) -> np.ndarray:
    """Validate a (b, n·entries, H, W) head and return it as float32 (b, n, entries, H, W)."""
    try:
        arr = np.asarray(z, dtype=F32)
    except (TypeError, ValueError) as exc:
        raise ParamError(f"{what}: input is not a numeric array ({exc})") from None
    if arr.ndim != 4:
        raise ParamError(f"{what}: input must be 4-D (batch, channels, height, width), got shape {arr.shape}")
    b, c, h, w = arr.shape
    if c != n * entries:
        raise ParamError(f"{what}: input has {c} channels, expected {n}·{entries} = {n * entries}")
    if b < 1 or h < 1 or w < 1:
        raise ParamError(f"{what}: input shape {arr.shape} has an empty dimension")
    return np.array(arr, dtype=F32, copy=True).reshape(b, n, entries, h, w)


def _truth_records(truth: np.ndarray, batch: int, what: str) -> np.ndarray:
    """Normalise a truth tensor to (b, K, 5) float32 (a 6th track_id column is dropped)."""
    try:
        arr = np.asarray(truth, dtype=F32)
    except (TypeError, ValueError) as exc:
        raise ParamError(f"{what}: truth is not a numeric array ({exc})") from None
    if arr.ndim == 2:
        if arr.shape[1] % 5:
            raise ParamError(f"{what}: truth of shape {arr.shape}: the record length must be a multiple of 5 "
                             f"(x, y, w, h, class per box); pass (b, K, 6) for 6-float records")
        arr = arr.reshape(arr.shape[0], -1, 5)
    elif arr.ndim == 3:
        if arr.shape[2] not in (5, 6):
            raise ParamError(f"{what}: truth of shape {arr.shape}: boxes must have 5 or 6 values")
        arr = arr[:, :, :5]
    else:
        raise ParamError(f"{what}: truth must be (b, K*5), (b, K, 5) or (b, K, 6), got shape {arr.shape}")
    if arr.shape[0] != batch:
        raise ParamError(f"{what}: truth has {arr.shape[0]} images, the input has {batch}")
    return np.ascontiguousarray(arr)


def _read_boxes_flat(records: np.ndarray, b: int, limit: int) -> np.ndarray:
    """Boxes Darknet reads for image b when the record buffer is one flat array (pjreddie).

    Box t sits at flat box slot b·K + t; reading stops at t == limit, at the first x == 0,
    or at the end of the buffer (beyond it the C code would read unrelated memory).
    """
    flat = records.reshape(-1, 5)
    start = b * records.shape[1]
    stop = min(start + limit, flat.shape[0])
    boxes = flat[start:stop]
    zeros = np.flatnonzero(boxes[:, 0] == 0)
    if zeros.size:
        boxes = boxes[: zeros[0]]
    return boxes


def _check_boxes(boxes: np.ndarray, b: int, what: str) -> None:
    """Reject truths Darknet would turn into out-of-grid writes (its loader clamps to [0, 1])."""
    if boxes.size and not np.all(np.isfinite(boxes)):
        raise ParamError(f"{what}: image {b} has a truth box with a non-finite value")
    bad = np.flatnonzero((boxes[:, 0] < 0) | (boxes[:, 0] > 1) | (boxes[:, 1] < 0) | (boxes[:, 1] > 1))
    if bad.size:
        t = int(bad[0])
        raise ParamError(f"{what}: image {b} truth {t} has its centre ({boxes[t, 0]:g}, {boxes[t, 1]:g}) "
                         f"outside [0, 1]; Darknet would write outside the layer's grid")



@dataclass
class LossResult:
    """What a Darknet detection layer leaves behind after a training forward."""

    delta: np.ndarray          # l.delta, shaped like the head input, float32
    output: np.ndarray         # l.output (activations applied), float32
    cost: float                # l.cost
    stats: dict[str, float] = field(default_factory=dict)  # the printed statistics
    params: Any = None         # the YoloParams/RegionParams that produced it (layout for grads)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

def _activate(z5: np.ndarray, p: YoloParams) -> np.ndarray:
    """In-layer activations on a (b, n, 5+C, H, W) float32 copy."""
    return yolo_activate(z5, p.flavor, p.scale_x_y, p.new_coords)


def yolo_forward(z: np.ndarray, p: YoloParams) -> np.ndarray:
    """Darknet's [yolo] inference output: logistic on x, y, objectness, classes."""
    z5 = _check_head(z, p.n, 5 + p.classes, "[yolo] forward")
    return _activate(z5, p).reshape(np.shape(z))


# --------------------------------------------------------------------------------------------
# Shared pieces of the training branch
# --------------------------------------------------------------------------------------------

class _Head:
    """Flat views of output/delta with Darknet's entry_index arithmetic."""

    def __init__(self, o5: np.ndarray, classes: int) -> None:
        self.b, self.n, self.entries, self.h, self.w = o5.shape
        self.hw = self.h * self.w
        self.outputs = self.n * self.entries * self.hw
        self.classes = classes
        self.o5 = o5
        self.d5 = np.zeros_like(o5)
        self.of = o5.reshape(-1)
        self.df = self.d5.reshape(-1)

    def base(self, b: int, slot: int, j: int, i: int) -> int:
        """Flat index of entry 0 (like entry_index; i == W aliases the next row as in C)."""
        return b * self.outputs + slot * self.hw * self.entries + j * self.w + i


def _training_setup(z5: np.ndarray, p: YoloParams) -> tuple:
    """What both training branches start from: activated output, the head views, mask and anchor
    arrays, the float thresholds and the cell grids (jj = row, ii = column)."""
    o5 = _activate(z5, p)
    H, W = o5.shape[3], o5.shape[4]
    jj, ii = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    return (o5, _Head(o5, p.classes), np.asarray(p.mask), np.asarray(p.anchors, dtype=F32),
            F32(p.ignore_thresh), F32(p.truth_thresh), jj, ii)


def _best_anchor(tw: np.float32, th: np.float32, anchors: np.ndarray, net_w: int, net_h: int,
                 reciprocal: bool) -> int:
    """Index of the anchor whose shape best overlaps the truth (first strict max from 0)."""
    aw = anchors[0::2]
    ah = anchors[1::2]
    if reciprocal:  # Debian -Ofast: anchor * (1.0f/net)
        pw = aw * (F32(1.0) / F32(net_w))
        ph = ah * (F32(1.0) / F32(net_h))
    else:
        pw = aw / F32(net_w)
        ph = ah / F32(net_h)
    zero = np.zeros_like(pw)
    ious = box_iou(Box(zero, zero, pw, ph), Box(F32(0), F32(0), tw, th))
    return _first_strict_max(ious)


def _first_strict_max(values: np.ndarray) -> int:
    """Darknet's `if (v > best) {best = v; idx = k;}` with best = 0, idx = 0 to start."""
    best = F32(0)
    idx = 0
    for k, v in enumerate(np.asarray(values, dtype=F32).ravel()):
        if v > best:
            best = v
            idx = k
    return idx


def _stats(sums: dict[str, float], count: int, class_count: int, cells: int, force_count: bool) -> dict[str, float]:
    """The printed ratios in float; Darknet prints -nan for 0/0 (AlexeyAB forces count ≥ 1)."""
    c = max(count, 1) if force_count else count
    cc = max(class_count, 1) if force_count else class_count

    def ratio(num: float, den: int) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(F32(num) / F32(den))

    return {
        "avg_iou": ratio(sums["avg_iou"], c),
        "class": ratio(sums["avg_cat"], cc),
        "obj": ratio(sums["avg_obj"], c),
        "no_obj": ratio(sums["avg_anyobj"], cells),
        "recall50": ratio(sums["recall"], c),
        "recall75": ratio(sums["recall75"], c),
        "count": float(count),
    }


# --------------------------------------------------------------------------------------------
# pjreddie training branch
# --------------------------------------------------------------------------------------------

def _pj_box_delta(hd: _Head, base: np.ndarray, i: np.ndarray, j: np.ndarray, anchor: np.ndarray,
                  truth: Box, scale: np.ndarray, p: YoloParams) -> np.ndarray:
    """delta_yolo_box for a vector of (flat base, i, j, anchor) targets; returns the IoUs."""
    hw = hd.hw
    anchors = np.asarray(p.anchors, dtype=F32)
    aw = anchors[2 * anchor]
    ah = anchors[2 * anchor + 1]
    ox, oy, ow, oh = (hd.of[base + e * hw] for e in range(4))
    pred = yolo_box(ox, oy, ow, oh, i, j, hd.w, hd.h, aw, ah, p.net_w, p.net_h)
    iou = box_iou(pred, truth)
    tx = truth.x * F32(hd.w) - np.asarray(i, dtype=F32)
    ty = truth.y * F32(hd.h) - np.asarray(j, dtype=F32)
    tw = logf(F32(p.net_w) * truth.w / aw)
    th = logf(F32(p.net_h) * truth.h / ah)
    hd.df[base + 0 * hw] = (tx - ox) * scale
    hd.df[base + 1 * hw] = (ty - oy) * scale
    hd.df[base + 2 * hw] = (tw - ow) * scale
    hd.df[base + 3 * hw] = (th - oh) * scale
    return iou


def _check_index(hd: _Head, base: int, what: str, b: int, t: int) -> None:
    last = base + (hd.entries - 1) * hd.hw
    if base < 0 or last >= hd.df.size:
        raise ParamError(f"{what}: image {b} truth {t} maps outside the layer's buffer "
                         f"(Darknet would write out of bounds); boxes must lie in [0, 1]")


def _yolo_loss_pjreddie(z5: np.ndarray, records: np.ndarray, p: YoloParams) -> LossResult:
    what = "[yolo] loss"
    o5, hd, mask, anchors, ignore, truth_thresh, jj, ii = _training_setup(z5, p)
    b_n, n, _, H, W = o5.shape
    hw = hd.hw
    avg_iou: list[np.float32] = []
    avg_obj: list[np.float32] = []
    avg_cat: list[np.float32] = []
    recall = recall75 = 0
    count = class_count = 0

    for b in range(b_n):
        boxes = _read_boxes_flat(records, b, p.max_boxes)
        _check_boxes(boxes, b, what)
        classes_t = boxes[:, 4].astype(np.int64)  # C truncation of the float class
        if np.any((classes_t < 0) | (classes_t >= p.classes)):
            raise ParamError(f"{what}: image {b} has a class id outside 0..{p.classes - 1}; "
                             f"pjreddie would write outside the class vector")
        ob = o5[b]
        db = hd.d5[b]
        # A. every prediction: objectness target 0 unless it overlaps some truth enough.
        pred = yolo_box(ob[:, 0], ob[:, 1], ob[:, 2], ob[:, 3], ii[None], jj[None], W, H,
                            anchors[2 * mask][:, None, None], anchors[2 * mask + 1][:, None, None],
                            p.net_w, p.net_h)
        if len(boxes):
            tb = Box(*(boxes[:, k][:, None, None, None] for k in range(4)))
            ious = box_iou(Box(*(v[None] for v in pred)), tb)          # (K, n, H, W)
            ious = np.where(np.isnan(ious), F32(-1), ious)
            best_t = np.argmax(ious, axis=0)
            best_iou = np.maximum(np.max(ious, axis=0), F32(0))
            best_t = np.where(best_iou > 0, best_t, 0)
        else:
            best_iou = np.zeros((n, H, W), F32)
            best_t = np.zeros((n, H, W), np.int64)
        db[:, 4] = F32(0) - ob[:, 4]
        db[:, 4] = np.where(best_iou > ignore, F32(0), db[:, 4])
        hit = best_iou > truth_thresh
        if np.any(hit):
            s_n, s_j, s_i = np.nonzero(hit)
            t_sel = best_t[s_n, s_j, s_i]
            db[s_n, 4, s_j, s_i] = F32(1) - ob[s_n, 4, s_j, s_i]
            cls = classes_t[t_sel]
            onehot = (np.arange(p.classes)[None, :] == cls[:, None]).astype(F32)
            db[s_n[:, None], 5 + np.arange(p.classes)[None, :], s_j[:, None], s_i[:, None]] = \
                onehot - ob[s_n[:, None], 5 + np.arange(p.classes)[None, :], s_j[:, None], s_i[:, None]]
            tbx = Box(*(boxes[t_sel, k] for k in range(4)))
            scale = F32(2) - tbx.w * tbx.h
            base = b * hd.outputs + s_n * hw * hd.entries + s_j * W + s_i
            _pj_box_delta(hd, base, s_i, s_j, mask[s_n], tbx, scale, p)

        # B. each truth trains the best anchor (over all anchors) if this layer owns it.
        for t, box in enumerate(boxes):
            tx, ty, tw, th = (F32(v) for v in box[:4])
            i = int(tx * F32(W))
            j = int(ty * F32(H))
            best_n = _best_anchor(tw, th, anchors, p.net_w, p.net_h, reciprocal=True)
            hits = np.flatnonzero(mask == best_n)
            if hits.size == 0:
                continue
            mask_n = int(hits[0])
            base = hd.base(b, mask_n, j, i)
            _check_index(hd, base, what, b, t)
            truth = Box(tx, ty, tw, th)
            iou = _pj_box_delta(hd, np.array([base]), np.array([i]), np.array([j]), np.array([best_n]),
                                Box(*(np.array([v], F32) for v in truth)),
                                np.array([F32(2) - tw * th], F32), p)[0]
            obj = base + 4 * hw
            avg_obj.append(hd.of[obj])
            hd.df[obj] = F32(1) - hd.of[obj]
            cls = int(classes_t[t])
            c0 = base + 5 * hw
            if hd.df[c0] != 0:
                hd.df[c0 + hw * cls] = F32(1) - hd.of[c0 + hw * cls]
            else:
                idx = c0 + hw * np.arange(p.classes)
                hd.df[idx] = (np.arange(p.classes) == cls).astype(F32) - hd.of[idx]
            avg_cat.append(hd.of[c0 + hw * cls])
            count += 1
            class_count += 1
            recall += int(iou > 0.5)
            recall75 += int(iou > 0.75)
            avg_iou.append(iou)

    any_obj = seq_sum_f32(o5[:, :, 4].transpose(0, 2, 3, 1))  # loop order b, j, i, n
    sums = {"avg_iou": seq_sum_f32(avg_iou), "avg_cat": seq_sum_f32(avg_cat), "avg_obj": seq_sum_f32(avg_obj),
            "avg_anyobj": any_obj, "recall": F32(recall), "recall75": F32(recall75)}
    stats = _stats(sums, count, class_count, W * H * n * b_n, force_count=False)
    shape = (b_n, n * hd.entries, H, W)
    return LossResult(delta=hd.d5.reshape(shape), output=o5.reshape(shape),
                      cost=mag_array_sq(hd.d5), stats=stats, params=p)


# --------------------------------------------------------------------------------------------
# AlexeyAB training branch
# --------------------------------------------------------------------------------------------

def _ab_class_delta(hd: _Head, c0: int, cls: int, p: YoloParams, avg_cat: list | None) -> None:
    """AlexeyAB delta_yolo_class: own-class "already set" test, optional label smoothing."""
    hw = hd.hw
    eps = F32(p.label_smooth_eps)

    def smooth(y: np.ndarray) -> np.ndarray:
        if eps == 0:
            return y
        return (F64(1) * (y * (F32(1) - eps)).astype(F64) + 0.5 * F64(eps)).astype(F32)

    own = c0 + hw * cls
    if hd.df[own] != 0:
        result = smooth(np.array([1], F32))[0] - hd.of[own]
        if np.isfinite(result):
            hd.df[own] = result
        if avg_cat is not None:
            avg_cat.append(hd.of[own])
        return
    idx = c0 + hw * np.arange(p.classes)
    y = smooth((np.arange(p.classes) == cls).astype(F32))
    result = y - hd.of[idx]
    ok = np.isfinite(result)
    hd.df[idx[ok]] = result[ok]
    if avg_cat is not None:
        avg_cat.append(hd.of[own])


def _ab_box_delta(hd: _Head, base: int, i: int, j: int, anchor: int, truth: Box, scale: np.float32,
                  p: YoloParams) -> dict[str, np.float32]:
    """AlexeyAB delta_yolo_box (accumulating); returns iou/giou of the prediction before it."""
    hw = hd.hw
    aw = F32(p.anchors[2 * anchor])
    ah = F32(p.anchors[2 * anchor + 1])
    ox, oy, ow, oh = (hd.of[base + e * hw] for e in range(4))
    pred = yolo_box(ox, oy, ow, oh, i, j, hd.w, hd.h, aw, ah, p.net_w, p.net_h, p.new_coords)
    pred = Box(*(F32(v) for v in pred))
    ious = {"iou": F32(box_iou(pred, truth, zero_guard=True)), "giou": F32(box_giou(pred, truth))}
    pred = Box(pred.x, pred.y, pred.w if pred.w != 0 else F32(1), pred.h if pred.h != 0 else F32(1))
    norm = F32(p.iou_normalizer) * F32(1.0)  # iou_normalizer * class_multiplier
    if p.iou_loss == "mse":
        tx = truth.x * F32(hd.w) - F32(i)
        ty = truth.y * F32(hd.h) - F32(j)
        if p.new_coords:
            tw = F32(np.sqrt(truth.w * F32(p.net_w) / (F32(4) * aw)))
            th = F32(np.sqrt(truth.h * F32(p.net_h) / (F32(4) * ah)))
        else:
            tw = logf(F32(p.net_w) * truth.w / aw)[()]
            th = logf(F32(p.net_h) * truth.h / ah)[()]
        for e, (tgt, out) in enumerate(((tx, ox), (ty, oy), (tw, ow), (th, oh))):
            hd.df[base + e * hw] += scale * (tgt - out) * norm
        return ious
    kind = "iou" if p.iou_loss == "iou" else p.iou_loss
    dx, dy, dw, dh = (F32(v) for v in dx_box_iou(pred, truth, kind))
    if not p.new_coords:
        dw = F32(F64(dw) * np.exp(F64(ow)))
        dh = F32(F64(dh) * np.exp(F64(oh)))
    out = []
    for d in (dx, dy, dw, dh):
        d = F32(d * norm)
        if not np.isfinite(d):
            d = F32(0)
        if math.isfinite(p.max_delta):
            d = F32(min(max(d, -F32(p.max_delta)), F32(p.max_delta)))
        out.append(d)
    for e, d in enumerate(out):
        hd.df[base + e * hw] += d
    return ious


def _yolo_loss_alexeyab(z5: np.ndarray, records: np.ndarray, p: YoloParams) -> LossResult:
    what = "[yolo] loss"
    o5, hd, mask, anchors, ignore, truth_thresh, jj, ii = _training_setup(z5, p)
    b_n, n, _, H, W = o5.shape
    hw = hd.hw
    obj_norm = F32(p.obj_normalizer)
    avg_obj: list[np.float32] = []
    avg_cat: list[np.float32] = []
    recall = recall75 = 0
    count = class_count = 0
    tot_iou = F32(0)
    tot_iou_loss = F32(0)
    tot_giou_loss = F32(0)
    limit = min(p.max_boxes, records.shape[1])

    for b in range(b_n):
        boxes = records[b, :limit]
        zeros = np.flatnonzero(boxes[:, 0] == 0)
        if zeros.size:
            boxes = boxes[: zeros[0]]
        _check_boxes(boxes, b, what)
        classes_t = boxes[:, 4].astype(np.int64)
        valid = (classes_t >= 0) & (classes_t < p.classes)  # AlexeyAB skips bad class ids
        ob = o5[b]
        db = hd.d5[b]
        img_iou = F32(0)
        img_iou_loss = F32(0)
        img_giou_loss = F32(0)
        # A. every prediction
        pred = yolo_box(ob[:, 0], ob[:, 1], ob[:, 2], ob[:, 3], ii[None], jj[None], W, H,
                            anchors[2 * mask][:, None, None], anchors[2 * mask + 1][:, None, None],
                            p.net_w, p.net_h, p.new_coords)
        vb = boxes[valid]
        vidx = np.flatnonzero(valid)
        class_match = np.any(ob[:, 5:] > _ALEXEYAB_CLASS_THRESH, axis=1)  # (n, H, W)
        if len(vb):
            tb = Box(*(vb[:, k][:, None, None, None] for k in range(4)))
            ious = box_iou(Box(*(v[None] for v in pred)), tb, zero_guard=True)
            ious = np.where(np.isnan(ious), F32(-1), ious)
            best_iou = np.maximum(np.max(ious, axis=0), F32(0))
            best_t = np.where(best_iou > 0, vidx[np.argmax(ious, axis=0)], 0)
            best_match_iou = np.where(class_match, best_iou, F32(0))
        else:
            best_iou = np.zeros((n, H, W), F32)
            best_t = np.zeros((n, H, W), np.int64)
            best_match_iou = best_iou
        db[:, 4] = obj_norm * (F32(0) - ob[:, 4])
        if p.objectness_smooth:   # above ignore_thresh: pull towards the IoU, if that is the larger delta
            smooth = obj_norm * (best_match_iou - ob[:, 4])
            db[:, 4] = np.where((best_match_iou > ignore) & (smooth > db[:, 4]), smooth, db[:, 4])
        else:
            db[:, 4] = np.where(best_match_iou > ignore, F32(0), db[:, 4])
        for s_n, s_j, s_i in zip(*np.nonzero(best_iou > truth_thresh)):
            t = int(best_t[s_n, s_j, s_i])
            base = hd.base(b, int(s_n), int(s_j), int(s_i))
            obj = base + 4 * hw
            iou_multiplier = best_iou[s_n, s_j, s_i] * best_iou[s_n, s_j, s_i]
            hd.df[obj] = obj_norm * ((iou_multiplier if p.objectness_smooth else F32(1)) - hd.of[obj])
            _ab_class_delta(hd, base + 5 * hw, int(classes_t[t]), p, None)
            if p.objectness_smooth:
                hit = base + (5 + int(classes_t[t])) * hw
                hd.df[hit] = iou_multiplier - hd.of[hit]
            tx, ty, tw, th = (F32(v) for v in boxes[t, :4])
            _ab_box_delta(hd, base, int(s_i), int(s_j), int(mask[s_n]), Box(tx, ty, tw, th),
                          F32(2) - tw * th, p)

        # B. each truth
        def train(base: int, i: int, j: int, anchor: int, truth: Box, cls: int) -> None:
            nonlocal count, class_count, recall, recall75, img_iou, img_iou_loss, img_giou_loss
            ious = _ab_box_delta(hd, base, i, j, anchor, truth, F32(2) - truth.w * truth.h, p)
            img_iou = F32(img_iou + ious["iou"])
            img_iou_loss = F32(img_iou_loss + (F32(1) - ious["iou"]))
            img_giou_loss = F32(img_giou_loss + (F32(1) - ious["giou"]))
            obj = base + 4 * hw
            avg_obj.append(hd.of[obj])
            if not p.objectness_smooth:
                hd.df[obj] = F32(1.0) * obj_norm * (F32(1) - hd.of[obj])
            elif hd.df[obj] == 0:     # objectness_smooth keeps a delta set above (ignore/IoU pull)
                hd.df[obj] = F32(1.0) * obj_norm * (F32(1) - hd.of[obj])
            _ab_class_delta(hd, base + 5 * hw, cls, p, avg_cat)
            count += 1
            class_count += 1
            recall += int(ious["iou"] > 0.5)
            recall75 += int(ious["iou"] > 0.75)

        for t, box in enumerate(boxes):
            if not valid[t]:
                continue
            tx, ty, tw, th = (F32(v) for v in box[:4])
            truth = Box(tx, ty, tw, th)
            cls = int(classes_t[t])
            i = int(tx * F32(W))
            j = int(ty * F32(H))
            best_n = _best_anchor(tw, th, anchors, p.net_w, p.net_h, reciprocal=False)
            hits = np.flatnonzero(mask == best_n)
            if hits.size:
                base = hd.base(b, int(hits[0]), j, i)
                _check_index(hd, base, what, b, t)
                train(base, i, j, best_n, truth, cls)
            if p.iou_thresh < 1.0:
                for a in range(p.total):
                    slots = np.flatnonzero(mask == a)
                    if slots.size == 0 or a == best_n:
                        continue
                    anchor_box = Box(F32(0), F32(0), anchors[2 * a] / F32(p.net_w), anchors[2 * a + 1] / F32(p.net_h))
                    kiou = F32(box_iou_kind(anchor_box, Box(F32(0), F32(0), tw, th), p.iou_thresh_kind))
                    if kiou > F32(p.iou_thresh):
                        base = hd.base(b, int(slots[0]), j, i)
                        _check_index(hd, base, what, b, t)
                        train(base, i, j, a, truth, cls)
        if p.iou_thresh < 1.0:
            # averages_yolo_deltas over every cell with a non-zero objectness delta
            cls_pos = np.sum(db[:, 5:] > 0, axis=1)  # (n, H, W)
            sel = (db[:, 4] != 0) & (cls_pos > 0)
            for e in range(4):
                db[:, e] = np.where(sel, db[:, e] / np.maximum(cls_pos, 1).astype(F32), db[:, e])
        tot_iou = F32(tot_iou + img_iou)
        tot_iou_loss = F32(tot_iou_loss + img_iou_loss)
        tot_giou_loss = F32(tot_giou_loss + img_giou_loss)

    mag_cost = mag_array_sq(hd.d5)
    if p.iou_loss == "mse":
        cost = mag_cost
    else:
        no_box = hd.d5.copy()
        no_box[:, :, 0:4] = 0
        m = F64(mag_array(no_box))
        class_loss = F32(F64(obj_norm) * (m * m))
        c = max(count, 1)
        loss_sum = tot_giou_loss if p.iou_loss == "giou" else tot_iou_loss
        avg_iou_loss = F32(F32(p.iou_normalizer) * (loss_sum / F32(c)))
        cost = float(F32(avg_iou_loss + class_loss))
    any_obj = seq_sum_f32(o5[:, :, 4].transpose(0, 2, 3, 1))
    sums = {"avg_iou": tot_iou, "avg_cat": seq_sum_f32(avg_cat), "avg_obj": seq_sum_f32(avg_obj),
            "avg_anyobj": any_obj, "recall": F32(recall), "recall75": F32(recall75)}
    stats = _stats(sums, count, class_count, W * H * n * b_n, force_count=True)
    stats["iou_loss_sum"] = float(tot_iou_loss)
    stats["giou_loss_sum"] = float(tot_giou_loss)
    shape = (b_n, n * hd.entries, H, W)
    return LossResult(delta=hd.d5.reshape(shape), output=o5.reshape(shape), cost=float(cost), stats=stats,
                      params=p)


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------

def yolo_loss(z: np.ndarray, truth: np.ndarray, p: YoloParams) -> LossResult:
    """Darknet's [yolo] training forward: output, l.delta, l.cost and the printed statistics."""
    z5 = _check_head(z, p.n, 5 + p.classes, "[yolo] loss")
    records = _truth_records(truth, z5.shape[0], "[yolo] loss")
    if p.flavor == "pjreddie":
        return _yolo_loss_pjreddie(z5, records, p)
    return _yolo_loss_alexeyab(z5, records, p)


def yolo_grad(result: LossResult, batch: int) -> np.ndarray:
    """What the Caffe layer writes into bottom.diff: −δ/b (Caffe minimises).

    No σ′ factor: Darknet's backward adds δ unchanged to the raw conv output's delta.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ParamError(f"[yolo] grad: batch must be a positive integer, got {batch!r}")
    return (-result.delta / F32(batch)).astype(F32)
