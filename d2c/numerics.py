"""Darknet's numerics, once: activations, softmax, head decoding, IoU family, float sums.

Why one module: `d2c detect`, the training loss and the parity checks evaluate the same Darknet
expressions, and Darknet's output is defined as much by *how* it rounds as by its formulas. Two
copies drift (detect's scale_x_y offset once sat 13 float32 ulps away from the loss's); one copy
cannot. Everything here reproduces the operation order and precision of the Debian
`libdarknet.so` (pjreddie 61c9d02e built with -Ofast), as read from its disassembly, and of
AlexeyAB's src/activations.c, src/yolo_layer.c and src/box.c:

- `logistic_darknet`: pjreddie `logistic_activate`, `exp` in double rounded to float;
  `logistic_alexeyab`: `1.f/(1.f+expf(-x))`, all in float.
- `logf` and `expf`: -Ofast narrowed `log((double)f)` in `delta_yolo_box`/`delta_region_box` and
  `exp` in `softmax` to glibc's *float* `logf`/`expf`. numpy's float32 `log`/`exp` differ from
  glibc in a few % of inputs, so `logf` calls glibc through ctypes (it is only evaluated per
  truth box) and `expf` uses float64 `exp` rounded to float except for the rare inputs whose
  result lies next to a rounding midpoint, where it asks glibc too.
- `softmax_darknet`: blas.c `softmax` as the Debian build runs it (sums below).
- `yolo_activate`, `region_activate`, `yolo_box`: the in-layer activations of the heads
  (incl. AlexeyAB's scale_x_y and new_coords) and get_yolo_box / get_region_box.
- `box_iou`: float32, `l = x - w*0.5`, `overlap = min(right) - max(left)`, intersection 0 if an
  overlap is negative, `union = (a.w*a.h + b.w*b.h) - inter`, `iou = inter/union`.
- `bn_denominator`: inference BatchNorm's divisor, pjreddie `sqrt(var) + 1e-6f` (eps outside the
  root, in double), AlexeyAB `sqrt(var + 1e-5f)`.
- `mag_array_sq`: `mag_array` is vectorised with 4 interleaved float partial sums, combined as
  `(s0+s2)+(s1+s3)`, then the scalar tail, then `sqrtss`; the cost is that value squared in float.

The AlexeyAB IoU helpers (`box_giou`, `box_diou`, `box_ciou`, `dx_box_iou`) follow AlexeyAB's
src/box.c formulas. They are dtype-generic (float32 for the loss, float64 for finite-difference
tests) rather than bit-matched to a binary.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from typing import NamedTuple

import numpy as np

F32 = np.float32
F64 = np.float64


class Box(NamedTuple):
    """Centre/size box of broadcastable arrays (Darknet's `box`), relative to the network input."""

    x: np.ndarray
    y: np.ndarray
    w: np.ndarray
    h: np.ndarray


# --------------------------------------------------------------------------------------------
# Scalars: logistic, logf, expf, sums
# --------------------------------------------------------------------------------------------

def logistic_darknet(z: np.ndarray) -> np.ndarray:
    """pjreddie `logistic_activate` on Debian: `1/(1+exp(-x))` in double, rounded to float."""
    z64 = np.asarray(z, dtype=F32).astype(F64)
    with np.errstate(over="ignore"):
        return (1.0 / (1.0 + np.exp(-z64))).astype(F32)


def logistic_alexeyab(z: np.ndarray) -> np.ndarray:
    """AlexeyAB `logistic_activate`: `1.f/(1.f+expf(-x))`, all in float."""
    z32 = np.asarray(z, dtype=F32)
    with np.errstate(over="ignore"):
        e = expf(-z32)
        return (F32(1.0) / (F32(1.0) + e)).astype(F32)


@functools.lru_cache(maxsize=1)
def _libm() -> ctypes.CDLL | None:
    """glibc's libm, the library Darknet's logf/expf come from (None if not loadable)."""
    name = ctypes.util.find_library("m") or "libm.so.6"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        return None
    for fn in ("logf", "expf"):
        getattr(lib, fn).restype = ctypes.c_float
        getattr(lib, fn).argtypes = [ctypes.c_float]
    return lib


def logf(x: np.ndarray) -> np.ndarray:
    """glibc `logf` elementwise (Darknet's narrowed `log`); float64-rounded if libm is missing.

    Only called for one value per truth box (or per anchor), so the ctypes loop is cheap.
    """
    x32 = np.asarray(x, dtype=F32)
    lib = _libm()
    if lib is None:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(x32.astype(F64)).astype(F32)
    flat = [lib.logf(float(v)) for v in x32.ravel()]
    return np.asarray(flat, dtype=F32).reshape(x32.shape)


def expf(x: np.ndarray) -> np.ndarray:
    """glibc `expf` elementwise, vectorised.

    glibc's expf is within 0.502 ulp, so it equals the correctly rounded value unless the exact
    result is within 0.002 ulp of a float rounding midpoint. float64 `exp` is far more accurate
    than that, so: round the float64 result, and ask glibc only for the few near-midpoint inputs.
    """
    x32 = np.asarray(x, dtype=F32)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        y64 = np.exp(x32.astype(F64))
        y32 = y64.astype(F32)
        lo = np.nextafter(y32, F32(-np.inf))
        hi = np.nextafter(y32, F32(np.inf))
        below = y64 < y32.astype(F64)
        other = np.where(below, lo, hi).astype(F64)
        ulp = np.abs(other - y32.astype(F64))
        mid = 0.5 * (y32.astype(F64) + other)
        near = np.isfinite(y64) & (ulp > 0) & (np.abs(y64 - mid) < 0.01 * ulp)
    lib = _libm()
    if lib is not None and np.any(near):
        out = y32.copy()
        idx = np.flatnonzero(near)
        flat_in = x32.ravel()
        flat_out = out.reshape(-1)
        for k in idx:
            flat_out[k] = lib.expf(float(flat_in[k]))
        return out
    return y32


def seq_sum_f32(values: np.ndarray) -> np.float32:
    """Sum in float32 strictly left to right (a Darknet `float acc += v` loop)."""
    v = np.asarray(values, dtype=F32).ravel()
    if v.size == 0:
        return F32(0.0)
    return F32(np.add.accumulate(v, dtype=F32)[-1])


def mag_array(a: np.ndarray) -> np.float32:
    """Debian `mag_array`: sqrt of Σa² with 4 interleaved float partial sums (SSE), then the tail."""
    v = np.asarray(a, dtype=F32).ravel()
    n = v.size
    sq = v * v
    if n <= 3:
        total = F32(0.0)
        for s in sq:
            total = F32(total + s)
        return F32(np.sqrt(total))
    main = (n // 4) * 4
    lanes = sq[:main].reshape(-1, 4)
    partial = np.add.accumulate(lanes, axis=0, dtype=F32)[-1]  # lane-wise sequential sums
    total = F32(F32(partial[1] + partial[3]) + F32(partial[0] + partial[2]))
    for s in sq[main:]:
        total = F32(total + s)
    return F32(np.sqrt(total))


def mag_array_sq(a: np.ndarray) -> float:
    """Darknet's layer cost `pow(mag_array(delta), 2)`, squared in float as the binary does."""
    m = mag_array(a)
    return float(F32(m * m))


PJREDDIE_EPS_OUTSIDE = 1e-6      # pjreddie normalize_cpu: sqrt(var) + .000001f
ALEXEYAB_EPS_INSIDE = 1e-5       # AlexeyAB normalize_cpu: sqrt(var + .00001f)


def bn_denominator(variance: np.ndarray, flavor: str) -> np.ndarray:
    """Darknet's inference BatchNorm denominator in float64 (the float eps widened exactly)."""
    var = np.asarray(variance).astype(F64)
    if flavor == "pjreddie":
        return np.sqrt(var) + F64(F32(PJREDDIE_EPS_OUTSIDE))
    return np.sqrt(var + F64(F32(ALEXEYAB_EPS_INSIDE)))


def softmax_darknet(z: np.ndarray, axis: int = 0, temperature: float = 1.0) -> np.ndarray:
    """blas.c `softmax` over `axis` as Debian's -Ofast build evaluates it.

    e = expf(z/t - max/t) in float; the sum is sequential for up to 30 entries, and for more it
    runs in 4 interleaved float lanes (lane l adds entries l, l+4, ...), combined as
    (l0 + l2) + (l1 + l3), then the remaining n mod 4 entries one by one; finally each e is
    multiplied by the float reciprocal 1/sum. The vector path uses libmvec's expf, which may
    differ from glibc's scalar one by an ulp.
    """
    zm = np.moveaxis(np.asarray(z, dtype=F32), axis, 0)
    count = zm.shape[0]
    t = F32(temperature)
    with np.errstate(over="ignore", under="ignore"):
        e = expf(zm / t - zm.max(axis=0) / t)
    if count <= 30:
        total = e[0].copy()
        for k in range(1, count):
            total += e[k]
    else:
        body = count - count % 4
        lanes = [np.add.accumulate(e[k:body:4], axis=0, dtype=F32)[-1] for k in range(4)]
        total = (lanes[0] + lanes[2]) + (lanes[1] + lanes[3])
        for k in range(body, count):
            total += e[k]
    return np.moveaxis((e * (F32(1) / total)).astype(F32), 0, axis)


# --------------------------------------------------------------------------------------------
# Detection heads: in-layer activations and box decoding
# --------------------------------------------------------------------------------------------
# Arrays of head entries have the entry axis third from the end: (..., entries, H, W).

def scale_x_y_offset(scale_x_y: float) -> tuple[np.float32, np.float32]:
    """AlexeyAB's scal_add_cpu(ALPHA=l.scale_x_y, BETA=-0.5*(l.scale_x_y - 1)): the float alpha
    and beta. l.scale_x_y is a float; `- 1` is float arithmetic (exact for 0.5 <= s <= 2), the
    product with -0.5 is double, and the argument is rounded back to float."""
    alpha = F32(scale_x_y)
    return alpha, F32(-0.5 * F64(alpha - F32(1)))


def yolo_activate(o: np.ndarray, flavor: str, scale_x_y: float = 1.0, new_coords: bool = False) -> np.ndarray:
    """forward_yolo_layer's activations in place on float32 (..., 5+C, H, W): logistic on x, y,
    objectness and classes (none with new_coords), then AlexeyAB's x*s + beta on x, y."""
    if flavor == "pjreddie":
        o[..., 0:2, :, :] = logistic_darknet(o[..., 0:2, :, :])
        o[..., 4:, :, :] = logistic_darknet(o[..., 4:, :, :])
        return o
    if not new_coords:
        o[..., 0:2, :, :] = logistic_alexeyab(o[..., 0:2, :, :])
        o[..., 4:, :, :] = logistic_alexeyab(o[..., 4:, :, :])
    alpha, beta = scale_x_y_offset(scale_x_y)   # the CPU build applies it even for s = 1
    o[..., 0:2, :, :] = o[..., 0:2, :, :] * alpha + beta
    return o


def region_activate(o: np.ndarray, coords: int, classes: int, background: bool, softmax: bool) -> np.ndarray:
    """forward_region_layer's activations in place on float32 (..., coords+1+C, H, W): logistic
    x, y and objectness (unless background), then softmax or logistic over the classes."""
    o[..., 0:2, :, :] = logistic_darknet(o[..., 0:2, :, :])
    if not background:
        o[..., coords, :, :] = logistic_darknet(o[..., coords, :, :])
    if softmax:
        start = coords + (0 if background else 1)
        o[..., start:coords + 1 + classes, :, :] = softmax_darknet(o[..., start:coords + 1 + classes, :, :], axis=-3)
    else:
        o[..., coords + 1:, :, :] = logistic_darknet(o[..., coords + 1:, :, :])
    return o


def yolo_box(ox, oy, ow, oh, i, j, lw: int, lh: int, anchor_w, anchor_h, net_w: int, net_h: int,
             new_coords: bool = False) -> Box:
    """get_yolo_box (and get_region_box with net = the grid size, anchors in cells).

    x, y in float; w, h as (double)exp(o)*anchor/net in double, rounded once; with new_coords
    (AlexeyAB) o*o*4*anchor/net in float, left to right.
    """
    x = (np.asarray(i, dtype=F32) + ox) / F32(lw)
    y = (np.asarray(j, dtype=F32) + oy) / F32(lh)
    if new_coords:
        w = ow * ow * F32(4) * np.asarray(anchor_w, dtype=F32) / F32(net_w)
        h = oh * oh * F32(4) * np.asarray(anchor_h, dtype=F32) / F32(net_h)
    else:
        with np.errstate(over="ignore"):
            w = (np.exp(np.asarray(ow, dtype=F32).astype(F64)) * np.asarray(anchor_w, dtype=F32).astype(F64)
                 / F64(net_w)).astype(F32)
            h = (np.exp(np.asarray(oh, dtype=F32).astype(F64)) * np.asarray(anchor_h, dtype=F32).astype(F64)
                 / F64(net_h)).astype(F32)
    return Box(np.asarray(x, F32), np.asarray(y, F32), np.asarray(w, F32), np.asarray(h, F32))


# --------------------------------------------------------------------------------------------
# IoU family
# --------------------------------------------------------------------------------------------

def _overlap(x1, w1, x2, w2):
    l1 = x1 - w1 * 0.5
    l2 = x2 - w2 * 0.5
    left = np.maximum(l1, l2)
    r1 = x1 + w1 * 0.5
    r2 = x2 + w2 * 0.5
    right = np.minimum(r1, r2)
    return right - left


def box_intersection(a: Box, b: Box) -> np.ndarray:
    """Darknet `box_intersection`: product of the overlaps, 0 if either is negative."""
    w = _overlap(a.x, a.w, b.x, b.w)
    h = _overlap(a.y, a.h, b.y, b.h)
    area = w * h
    return np.where((w < 0) | (h < 0), np.zeros_like(area), area)


def box_union(a: Box, b: Box) -> np.ndarray:
    """Darknet `box_union`: `(a.w*a.h + b.w*b.h) - inter` in that order."""
    return (a.w * a.h + b.w * b.h) - box_intersection(a, b)


def box_iou(a: Box, b: Box, *, zero_guard: bool = False) -> np.ndarray:
    """IoU in the input dtype with Darknet's operation order.

    pjreddie divides unconditionally (0/0 gives NaN, which never wins a `>` test); AlexeyAB
    (`zero_guard=True`) returns 0 when the intersection or the union is 0.
    """
    inter = box_intersection(a, b)
    union = box_union(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / union
    if zero_guard:
        iou = np.where((inter == 0) | (union == 0), np.zeros_like(iou), iou)
    return iou


def _box_c(a: Box, b: Box):
    """Smallest enclosing box as (top, bot, left, right), AlexeyAB `box_c`."""
    top = np.minimum(a.y - a.h / 2, b.y - b.h / 2)
    bot = np.maximum(a.y + a.h / 2, b.y + b.h / 2)
    left = np.minimum(a.x - a.w / 2, b.x - b.w / 2)
    right = np.maximum(a.x + a.w / 2, b.x + b.w / 2)
    return top, bot, left, right


def _box_c_diagonal_sq(a: Box, b: Box):
    """Squared diagonal c² of the smallest enclosing box (DIoU/CIoU's normaliser)."""
    top, bot, left, right = _box_c(a, b)
    w = right - left
    h = bot - top
    return w * w + h * h


def box_giou(a: Box, b: Box) -> np.ndarray:
    """AlexeyAB `box_giou`: IoU − (C − U)/C, IoU if the enclosing area C is 0."""
    top, bot, left, right = _box_c(a, b)
    c = (right - left) * (bot - top)
    iou = box_iou(a, b, zero_guard=True)
    u = box_union(a, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        g = iou - (c - u) / c
    return np.where(c == 0, iou, g)


def box_diou(a: Box, b: Box, exponent: float = 0.6) -> np.ndarray:
    """AlexeyAB `box_diou`: IoU − (ρ²/c²)^0.6 (the printed DIoU; its delta uses exponent 1)."""
    c = _box_c_diagonal_sq(a, b)
    iou = box_iou(a, b, zero_guard=True)
    d = (a.x - b.x) * (a.x - b.x) + (a.y - b.y) * (a.y - b.y)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.power((d / c).astype(F64), exponent).astype(iou.dtype)
    return np.where(c == 0, iou, iou - term)


def _ar_loss(a: Box, b: Box, dtype) -> np.ndarray:
    """CIoU aspect term v = 4/π²·(atan(w_gt/h_gt) − atan(w/h))², evaluated in double like C."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ar_gt = (b.w / b.h).astype(F64)
        ar_pred = (a.w / a.h).astype(F64)
        diff = np.arctan(ar_gt) - np.arctan(ar_pred)
    return (4.0 / (math.pi * math.pi) * diff * diff).astype(dtype)


def box_ciou(a: Box, b: Box) -> np.ndarray:
    """AlexeyAB `box_ciou`: IoU − (ρ²/c² + α·v), α = v/(1 − IoU + v + 1e-6)."""
    c = _box_c_diagonal_sq(a, b)
    iou = box_iou(a, b, zero_guard=True)
    u = (a.x - b.x) * (a.x - b.x) + (a.y - b.y) * (a.y - b.y)
    v = _ar_loss(a, b, iou.dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = u / c
        alpha = (v.astype(F64) / ((1 - iou + v).astype(F64) + 0.000001)).astype(iou.dtype)
        out = iou - (d + alpha * v)
    return np.where(c == 0, iou, out)


def box_iou_kind(a: Box, b: Box, kind: str) -> np.ndarray:
    """AlexeyAB `box_iou_kind` (used by iou_thresh): iou, giou, diou or ciou; mse means iou."""
    if kind == "giou":
        return box_giou(a, b)
    if kind == "diou":
        return box_diou(a, b)
    if kind == "ciou":
        return box_ciou(a, b)
    return box_iou(a, b, zero_guard=True)


def dx_box_iou(pred: Box, truth: Box, kind: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """AlexeyAB `dx_box_iou`: the (dx, dy, dw, dh) "IoU-loss gradient" of the predicted box.

    What it is, exactly (checked by finite differences in tests/test_loss_yolo.py), with
    J_iou = I/U, J_giou = J_iou − (C−U)/C (C enclosing area), R = ρ²/c² (c enclosing diagonal):
    - dx, dy: the exact partial derivatives w.r.t. the box centre of J_iou ("iou"), J_giou
      ("giou") or J_iou − R ("diou", "ciou"), where the boxes overlap;
    - dw, dh: **twice** the derivative of the IoU/GIoU part ("we do not divide by 2"), plus the
      exact derivative of −R for diou/ciou, plus for ciou `α·8/π²·Δatan·h` (resp. `−…·w`), which is
      the derivative of −α·v *without* its 1/(w²+h²) factor (α held constant): an approximation;
    - boxes that do not overlap: giou/diou/ciou keep only the C or R term, but evaluated with the
      unclamped (negative) overlap I = Iw·Ih, so that case is not an exact derivative either.
    """
    dt = np.result_type(pred.x, truth.x)
    half = lambda v: v / 2  # noqa: E731  (AlexeyAB writes a.h / 2)
    # to_tblr
    p_top = pred.y - half(pred.h)
    p_bot = pred.y + half(pred.h)
    p_left = pred.x - half(pred.w)
    p_right = pred.x + half(pred.w)
    pred_t = np.minimum(p_top, p_bot)
    pred_b = np.maximum(p_top, p_bot)
    pred_l = np.minimum(p_left, p_right)
    pred_r = np.maximum(p_left, p_right)
    t_top = truth.y - half(truth.h)
    t_bot = truth.y + half(truth.h)
    t_left = truth.x - half(truth.w)
    t_right = truth.x + half(truth.w)

    X = (pred_b - pred_t) * (pred_r - pred_l)
    Xhat = (t_bot - t_top) * (t_right - t_left)
    Ih = np.minimum(pred_b, t_bot) - np.maximum(pred_t, t_top)
    Iw = np.minimum(pred_r, t_right) - np.maximum(pred_l, t_left)
    I = Iw * Ih  # noqa: E741  (unclamped, as in AlexeyAB)
    U = X + Xhat - I
    S = (pred.x - truth.x) * (pred.x - truth.x) + (pred.y - truth.y) * (pred.y - truth.y)
    giou_Cw = np.maximum(pred_r, t_right) - np.minimum(pred_l, t_left)
    giou_Ch = np.maximum(pred_b, t_bot) - np.minimum(pred_t, t_top)
    giou_C = giou_Cw * giou_Ch

    zero = np.zeros_like(I)
    dX_t = -1 * (pred_r - pred_l)
    dX_b = pred_r - pred_l
    dX_l = -1 * (pred_b - pred_t)
    dX_r = pred_b - pred_t
    dI_t = np.where(pred_t > t_top, -1 * Iw, zero)
    dI_b = np.where(pred_b < t_bot, Iw, zero)
    dI_l = np.where(pred_l > t_left, -1 * Ih, zero)
    dI_r = np.where(pred_r < t_right, Ih, zero)
    dU_t = dX_t - dI_t
    dU_b = dX_b - dI_b
    dU_l = dX_l - dI_l
    dU_r = dX_r - dI_r
    dC_t = np.where(pred_t < t_top, -1 * giou_Cw, zero)
    dC_b = np.where(pred_b > t_bot, giou_Cw, zero)
    dC_l = np.where(pred_l < t_left, -1 * giou_Ch, zero)
    dC_r = np.where(pred_r > t_right, giou_Ch, zero)

    with np.errstate(divide="ignore", invalid="ignore"):
        UU = U * U
        pos = U > 0
        p_dt = np.where(pos, ((U * dI_t) - (I * dU_t)) / UU, zero)
        p_db = np.where(pos, ((U * dI_b) - (I * dU_b)) / UU, zero)
        p_dl = np.where(pos, ((U * dI_l) - (I * dU_l)) / UU, zero)
        p_dr = np.where(pos, ((U * dI_r) - (I * dU_r)) / UU, zero)
        # corner selection (a no-op for positive sizes)
        tb = p_top < p_bot
        lr = p_left < p_right
        p_dt, p_db = np.where(tb, p_dt, p_db), np.where(tb, p_db, p_dt)
        p_dl, p_dr = np.where(lr, p_dl, p_dr), np.where(lr, p_dr, p_dl)

        no_overlap = (Iw <= 0) | (Ih <= 0)
        if kind == "giou":
            CC = giou_C * giou_C
            g_t = ((giou_C * dU_t) - (U * dC_t)) / CC
            g_b = ((giou_C * dU_b) - (U * dC_b)) / CC
            g_l = ((giou_C * dU_l) - (U * dC_l)) / CC
            g_r = ((giou_C * dU_r) - (U * dC_r)) / CC
            p_dt, p_db, p_dl, p_dr = _with_penalty((p_dt, p_db, p_dl, p_dr), (g_t, g_b, g_l, g_r),
                                                   giou_C > 0, no_overlap)

        p_dx = p_dl + p_dr
        p_dy = p_dt + p_db
        p_dw = p_dr - p_dl
        p_dh = p_db - p_dt

        if kind in ("diou", "ciou"):
            Ct = np.minimum(pred.y - pred.h / 2, truth.y - truth.h / 2)
            Cb = np.maximum(pred.y + pred.h / 2, truth.y + truth.h / 2)
            Cl = np.minimum(pred.x - pred.w / 2, truth.x - truth.w / 2)
            Cr = np.maximum(pred.x + pred.w / 2, truth.x + truth.w / 2)
            Cw = Cr - Cl
            Ch = Cb - Ct
            C = Cw * Cw + Ch * Ch
            one = np.ones_like(I)
            dCt_dy = np.where(pred_t < t_top, one, zero)
            dCt_dh = np.where(pred_t < t_top, -0.5 * one, zero)
            dCb_dy = np.where(pred_b > t_bot, one, zero)
            dCb_dh = np.where(pred_b > t_bot, 0.5 * one, zero)
            dCl_dx = np.where(pred_l < t_left, one, zero)
            dCl_dw = np.where(pred_l < t_left, -0.5 * one, zero)
            dCr_dx = np.where(pred_r > t_right, one, zero)
            dCr_dw = np.where(pred_r > t_right, 0.5 * one, zero)
            dCw_dx = dCr_dx - dCl_dx
            dCw_dw = dCr_dw - dCl_dw
            dCh_dy = dCb_dy - dCt_dy
            dCh_dh = dCb_dh - dCt_dh
            # dCw_dy = dCw_dh = dCh_dx = dCh_dw = 0
            CC = C * C
            r_dx = (2 * (truth.x - pred.x) * C - (2 * Cw * dCw_dx) * S) / CC
            r_dy = (2 * (truth.y - pred.y) * C - (2 * Ch * dCh_dy) * S) / CC
            r_dw = (2 * Cw * dCw_dw) * S / CC
            r_dh = (2 * Ch * dCh_dh) * S / CC
            if kind == "ciou":
                ar_gt = (truth.w / truth.h).astype(F64)
                ar_pred = (pred.w / pred.h).astype(F64)
                datan = np.arctan(ar_gt) - np.arctan(ar_pred)
                ar_loss = (4 / (math.pi * math.pi) * datan * datan).astype(dt)
                alpha = (ar_loss.astype(F64) / ((1 - I / U + ar_loss).astype(F64) + 0.000001)).astype(dt)
                ar_dw = (8 / (math.pi * math.pi) * datan * pred.h.astype(F64)).astype(dt)
                ar_dh = (-8 / (math.pi * math.pi) * datan * pred.w.astype(F64)).astype(dt)
                r_dw = r_dw + alpha * ar_dw
                r_dh = r_dh + alpha * ar_dh
            p_dx, p_dy, p_dw, p_dh = _with_penalty((p_dx, p_dy, p_dw, p_dh), (r_dx, r_dy, r_dw, r_dh),
                                                   C > 0, no_overlap)
    return (np.asarray(p_dx, dtype=dt), np.asarray(p_dy, dtype=dt),
            np.asarray(p_dw, dtype=dt), np.asarray(p_dh, dtype=dt))


def _with_penalty(base: tuple, penalty: tuple, add_where: np.ndarray, only_where: np.ndarray) -> tuple:
    """AlexeyAB's GIoU/DIoU/CIoU gradient: the penalty term's gradient is added where its
    normaliser is positive, and replaces the IoU gradient where the boxes do not overlap."""
    return tuple(np.where(only_where, g, np.where(add_where, b + g, b)) for b, g in zip(base, penalty))
