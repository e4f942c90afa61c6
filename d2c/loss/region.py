"""Darknet-exact numpy reference of the YOLOv2 [region] layer: output, deltas, cost, statistics.

Why: the Caffe side of a YOLOv2 port needs Darknet's l.delta and l.cost for parity and
training. Semantics: pjreddie's src/region_layer.c, forward_region_layer and delta_region_box /
delta_region_class (61c9d02e, the Debian CPU build), the tree/yolo9000 branch and coords > 4
(masks) excluded. Float details read
from the Debian binary's disassembly and verified against it in tests/test_loss_region.py:
- the prior warm-up target box is x = (float)((i + 0.5)·(1.0/W)) in double and
  w = anchor_w·(1.0f/W) in float (reciprocal multiplies, not divisions); bias_match likewise
  uses anchor·(1.0f/W);
- `log` of the w/h targets is glibc's float `logf`;
- softmax is d2c.numerics.softmax_darknet (the same function `d2c detect` decodes with).

Truth: (b, K·5) or (b, K, 5) of (x, y, w, h, class), Darknet's record of 30 boxes; box t of
image b is read at flat box slot b·K + t for t < 30 (`max` is parsed by Darknet but the loops
hard-code 30), up to the first x == 0.

Backward: the Debian CPU `backward_region_layer` propagates nothing (its body is commented
out). `region_grad(mode="gpu")` gives what pjreddie's GPU backward propagates (δ for x, y and,
unless background, objectness multiplied by σ′ = o(1−o); classes and w, h unchanged), which is
what a trainable Caffe port should use; `mode="cpu"` returns zeros (bit-compatible with Debian).
"""
from __future__ import annotations

import numpy as np

from d2c.errors import ParamError
from d2c.head_params import REGION_MAX_TRUTHS, RegionParams
from d2c.loss.yolo import (
    LossResult,
    _check_boxes,
    _check_head,
    _first_strict_max,
    _Head,
    _read_boxes_flat,
    _truth_records,
)
from d2c.numerics import F32, Box, box_iou, logf, mag_array_sq, region_activate, seq_sum_f32, yolo_box

PRIOR_WARMUP_SEEN = 12800

def _activate(z5: np.ndarray, p: RegionParams) -> np.ndarray:
    """In-layer activations on a (b, num, coords+1+C, H, W) float32 copy of the raw input."""
    return region_activate(z5, p.coords, p.classes, p.background, p.softmax)


def region_forward(z: np.ndarray, p: RegionParams) -> np.ndarray:
    """Darknet's [region] output: logistic x, y, objectness (unless background), softmax/logistic classes."""
    z5 = _check_head(z, p.num, p.entries, "[region] forward")
    return _activate(z5, p).reshape(np.shape(z))


def _box_delta(hd: _Head, base: np.ndarray, i, j, aw, ah, truth: Box, scale, tw_target=None, th_target=None):
    """delta_region_box (assignment) for vectors of targets; returns the IoUs before the update."""
    hw = hd.hw
    ox, oy, ow, oh = (hd.of[base + e * hw] for e in range(4))
    pred = yolo_box(ox, oy, ow, oh, i, j, hd.w, hd.h, aw, ah, hd.w, hd.h)
    iou = box_iou(pred, truth)
    tx = truth.x * F32(hd.w) - np.asarray(i, dtype=F32)
    ty = truth.y * F32(hd.h) - np.asarray(j, dtype=F32)
    tw = logf(F32(hd.w) * truth.w / aw) if tw_target is None else tw_target
    th = logf(F32(hd.h) * truth.h / ah) if th_target is None else th_target
    hd.df[base + 0 * hw] = (tx - ox) * scale
    hd.df[base + 1 * hw] = (ty - oy) * scale
    hd.df[base + 2 * hw] = (tw - ow) * scale
    hd.df[base + 3 * hw] = (th - oh) * scale
    return iou


def region_loss(z: np.ndarray, truth: np.ndarray, p: RegionParams, seen: int) -> LossResult:
    """Darknet's [region] training forward.

    `seen` is Darknet's *net.seen after the increment for the current mini-batch
    (train_network_datum adds b before the forward), so the prior warm-up applies while
    seen < 12800.
    """
    what = "[region] loss"
    if isinstance(seen, bool) or not isinstance(seen, (int, np.integer)) or seen < 0:
        raise ParamError(f"{what}: seen must be a non-negative integer, got {seen!r}")
    z5 = _check_head(z, p.num, p.entries, what)
    records = _truth_records(truth, z5.shape[0], what)
    o5 = _activate(z5, p)
    hd = _Head(o5, p.classes)
    b_n, n, entries, H, W = o5.shape
    hw = hd.hw
    C = p.coords
    anchors = np.asarray(p.anchors, dtype=F32)
    aw_all, ah_all = anchors[0::2], anchors[1::2]
    thresh = F32(p.thresh)
    noobj = F32(p.noobject_scale)
    objs = F32(p.object_scale)
    cls_scale = F32(p.class_scale)
    coord_scale = F32(p.coord_scale)
    jj, ii = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    inv_w32, inv_h32 = F32(1.0) / F32(W), F32(1.0) / F32(H)
    avg_iou: list[np.float32] = []
    avg_obj: list[np.float32] = []
    avg_cat: list[np.float32] = []
    recall = 0
    count = class_count = 0

    # Warm-up targets do not depend on the image: the cell centre with the anchor's size.
    if seen < PRIOR_WARMUP_SEEN:
        warm_x = ((ii + 0.5) * (1.0 / W)).astype(F32)[None].repeat(n, 0)
        warm_y = ((jj + 0.5) * (1.0 / H)).astype(F32)[None].repeat(n, 0)
        warm_w = aw_all * inv_w32
        warm_h = ah_all * inv_h32
        warm_tw = logf(F32(W) * warm_w / aw_all)
        warm_th = logf(F32(H) * warm_h / ah_all)

    for b in range(b_n):
        boxes = _read_boxes_flat(records, b, REGION_MAX_TRUTHS)
        _check_boxes(boxes, b, what)
        classes_t = boxes[:, 4].astype(np.int64)
        if np.any((classes_t < 0) | (classes_t >= p.classes)):
            raise ParamError(f"{what}: image {b} has a class id outside 0..{p.classes - 1}")
        ob = o5[b]
        db = hd.d5[b]
        # A. every prediction
        pred = yolo_box(ob[:, 0], ob[:, 1], ob[:, 2], ob[:, 3], ii[None], jj[None], W, H,
                        aw_all[:, None, None], ah_all[:, None, None], W, H)
        if len(boxes):
            tb = Box(*(boxes[:, k][:, None, None, None] for k in range(4)))
            ious = box_iou(Box(*(v[None] for v in pred)), tb)
            ious = np.where(np.isnan(ious), F32(-1), ious)
            best_iou = np.maximum(np.max(ious, axis=0), F32(0))
        else:
            best_iou = np.zeros((n, H, W), F32)
        if p.background:
            db[:, C] = noobj * (F32(1) - ob[:, C])
        else:
            db[:, C] = noobj * (F32(0) - ob[:, C])
        db[:, C] = np.where(best_iou > thresh, F32(0), db[:, C])
        if seen < PRIOR_WARMUP_SEEN:
            base = (b * hd.outputs + np.arange(n)[:, None, None] * hw * entries + jj[None] * W + ii[None]).ravel()
            _box_delta(hd, base, np.broadcast_to(ii, (n, H, W)).ravel(), np.broadcast_to(jj, (n, H, W)).ravel(),
                       np.repeat(aw_all, H * W), np.repeat(ah_all, H * W),
                       Box(warm_x.ravel(), warm_y.ravel(), np.repeat(warm_w, H * W), np.repeat(warm_h, H * W)),
                       F32(0.01), np.repeat(warm_tw, H * W), np.repeat(warm_th, H * W))

        # B. each truth
        for t, box in enumerate(boxes):
            tx, ty, tw, th = (F32(v) for v in box[:4])
            i = int(tx * F32(W))
            j = int(ty * F32(H))
            cell = b * hd.outputs + j * W + i
            slot_base = cell + np.arange(n) * hw * entries
            if slot_base.min() < 0 or slot_base.max() + (entries - 1) * hw >= hd.df.size:
                raise ParamError(f"{what}: image {b} truth {t} maps outside the layer's buffer "
                                 f"(Darknet would write out of bounds); boxes must lie in [0, 1]")
            if p.bias_match:
                pw, ph = aw_all * inv_w32, ah_all * inv_h32
            else:
                pb = yolo_box(hd.of[slot_base], hd.of[slot_base + hw], hd.of[slot_base + 2 * hw],
                              hd.of[slot_base + 3 * hw], i, j, W, H, aw_all, ah_all, W, H)
                pw, ph = pb.w, pb.h
            zero = np.zeros(n, F32)
            best_n = _first_strict_max(box_iou(Box(zero, zero, pw, ph), Box(F32(0), F32(0), tw, th)))
            base = int(slot_base[best_n])
            iou = _box_delta(hd, np.array([base]), np.array([i]), np.array([j]),
                             aw_all[best_n:best_n + 1], ah_all[best_n:best_n + 1],
                             Box(*(np.array([v], F32) for v in (tx, ty, tw, th))),
                             coord_scale * (F32(2) - tw * th))[0]
            recall += int(iou > 0.5)
            avg_iou.append(iou)
            obj = base + C * hw
            avg_obj.append(hd.of[obj])
            hd.df[obj] = objs * (F32(1) - hd.of[obj])
            if p.rescore:
                hd.df[obj] = objs * (iou - hd.of[obj])
            if p.background:
                hd.df[obj] = objs * (F32(0) - hd.of[obj])
            cls = int(classes_t[t])
            c0 = base + (C + 1) * hw
            if hd.df[c0] != 0 and not p.softmax:
                hd.df[c0 + hw * cls] = cls_scale * (F32(1) - hd.of[c0 + hw * cls])
            else:
                idx = c0 + hw * np.arange(p.classes)
                hd.df[idx] = cls_scale * ((np.arange(p.classes) == cls).astype(F32) - hd.of[idx])
                avg_cat.append(hd.of[c0 + hw * cls])
            count += 1
            class_count += 1

    def ratio(num, den) -> float:
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(F32(num) / F32(den))

    any_obj = seq_sum_f32(o5[:, :, C].transpose(0, 2, 3, 1))
    stats = {
        "avg_iou": ratio(seq_sum_f32(avg_iou), count),
        "class": ratio(seq_sum_f32(avg_cat), class_count),
        "obj": ratio(seq_sum_f32(avg_obj), count),
        "no_obj": ratio(any_obj, W * H * n * b_n),
        "recall50": ratio(F32(recall), count),
        "count": float(count),
    }
    shape = (b_n, n * entries, H, W)
    return LossResult(delta=hd.d5.reshape(shape), output=o5.reshape(shape), cost=mag_array_sq(hd.d5), stats=stats,
                      params=p)


def region_grad(result: LossResult, batch: int, mode: str = "gpu") -> np.ndarray:
    """bottom.diff for a Caffe [region] layer: −δ′/b (Caffe minimises).

    mode="gpu" (default): δ′ = δ with x, y and objectness (unless background) multiplied by
    σ′ = (1−o)·o in float, as pjreddie's backward_region_layer_gpu does; class and w, h deltas
    unchanged. This is the gradient a trainable port needs. mode="cpu": zeros, bit-compatible
    with Debian's CPU build, whose backward_region_layer propagates nothing.
    """
    if isinstance(batch, bool) or not isinstance(batch, (int, np.integer)) or batch < 1:
        raise ParamError(f"[region] grad: batch must be a positive integer, got {batch!r}")
    if mode == "cpu":
        return np.zeros_like(result.delta, dtype=F32)
    if mode != "gpu":
        raise ParamError(f"[region] grad: mode must be 'gpu' or 'cpu', got {mode!r}")
    p = result.params
    if not isinstance(p, RegionParams):
        raise ParamError("[region] grad: the LossResult does not come from region_loss (no RegionParams)")
    b, c, h, w = result.delta.shape
    d5 = result.delta.reshape(b, p.num, p.entries, h, w).astype(F32, copy=True)
    o5 = result.output.reshape(b, p.num, p.entries, h, w)
    d5[:, :, 0:2] = d5[:, :, 0:2] * ((F32(1) - o5[:, :, 0:2]) * o5[:, :, 0:2])
    if not p.background:
        d5[:, :, p.coords] = d5[:, :, p.coords] * ((F32(1) - o5[:, :, p.coords]) * o5[:, :, p.coords])
    return (-d5 / F32(batch)).reshape(b, c, h, w).astype(F32)
