"""Darknet's detection data augmentation (pjreddie `load_data_detection`) in numpy, exactly.

Why exact: a model trained in Caffe should see the distribution of images and boxes Darknet's
trainer would feed, and `--no-augment` batches must be the tensor Darknet builds, so parity
runs compare the same inputs. Every step follows pjreddie's source in float32, in its order:
- src/data.c load_data_detection: aspect jitter `new_ar = (w + U(-jw, jw)) / (h + U(-jh, jh))`
  with jw = jitter*w, the image scaled to the net width (new_ar >= 1) or height, placed at
  U(0, w - nw), U(0, h - nh) on a 0.5 canvas (place_image: bilinear sampling, integer size
  and offset), then random_distort_image, then a coin-flip mirror;
- src/image.c place_image / bilinear_interpolate (pixels past the right/bottom edge read 0,
  so the last row and column blend towards black, as in Darknet), rgb_to_hsv, hsv_to_rgb,
  distort_image (saturation and value scaled, hue shifted with wrap), constrain_image,
  flip_image; src/utils.c rand_uniform, rand_scale;
- src/data.c fill_truth_detection, read_boxes, randomize_boxes, correct_boxes: boxes shuffled,
  mapped through the crop/scale/flip, clipped to [0, 1], truncated to `max_boxes`, then those
  with w or h < .001 dropped; truth record = max_boxes x (x, y, w, h, class), zero-padded.

Randomness: Darknet draws everything from libc rand(). `augment_detection` takes either a
numpy Generator (wrapped as uniform 31-bit integers, the same distribution) or any object with
a `rand()` method; `GlibcRand(seed)` reproduces glibc's rand() after srand(seed), which is how
the tests drive Darknet's own loader and this one with the very same draws.

Draw order per image (after load_data_detection's rand()%m path choice): the width jitter,
then the height jitter (the order of the two calls in one C expression is the compiler's;
read from the library's disassembly and measured), dx, dy, hue, saturation (value + coin), exposure (value + coin), flip, then one rand() per box.

`no_augment=True` is Darknet's loader with jitter=0, hue=0, saturation=exposure=1 and no flip,
with the one remaining random draw (the offset along the axis the aspect ratio leaves free)
fixed at the centre of its range. For an image with the net's aspect ratio (the demo dataset)
that is place_image at full size, i.e. Darknet's plain bilinear resize (not resize_image's), and
the HSV round trip Darknet still performs. Darknet itself has no switch to skip its flip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from d2c.augment_kernel import SourceImage, render, source_from_planar
from d2c.errors import DatasetError, EngineError

F32 = np.float32
F64 = np.float64
RAND_MAX = 2147483647
FILL = F32(0.5)
MIN_BOX = 0.001          # fill_truth_detection: w < .001 || h < .001 (compared in double)
YOLO_MAX_BOXES = 90      # pjreddie [yolo] max (l.max_boxes); [region] uses 30


# --------------------------------------------------------------------------------------------
# Random sources
# --------------------------------------------------------------------------------------------

class RandSource(Protocol):
    def rand(self) -> int:
        """An integer in [0, RAND_MAX], like libc rand()."""
        ...


class GlibcRand:
    """glibc's rand() after srand(seed) (random_r TYPE_3: additive feedback, 31 words).

    Why: Darknet's draws come from libc rand(); reproducing the generator lets a test feed
    Darknet's loader and ours the same numbers.
    """

    def __init__(self, seed: int) -> None:
        seed &= 0xFFFFFFFF
        word = seed if seed != 0 else 1
        state = [0] * 34
        state[0] = word - (1 << 32) if word >= (1 << 31) else word   # int32_t
        for i in range(1, 31):
            value = (16807 * state[i - 1]) % 2147483647
            state[i] = value
        for i in range(31, 34):
            state[i] = state[i - 31]
        self._r = [s & 0xFFFFFFFF for s in state]
        for _ in range(310):
            self._next()

    def _next(self) -> int:
        r = self._r
        value = (r[-31] + r[-3]) & 0xFFFFFFFF
        r.append(value)
        if len(r) > 64:
            del r[:-34]
        return value >> 1

    def rand(self) -> int:
        return self._next()


class GeneratorRand:
    """A numpy Generator as a rand() source: uniform integers in [0, RAND_MAX]."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng

    def rand(self) -> int:
        return int(self.rng.integers(0, RAND_MAX, endpoint=True))


def _source(rng: np.random.Generator | RandSource) -> RandSource:
    return GeneratorRand(rng) if isinstance(rng, np.random.Generator) else rng


def rand_uniform(src: RandSource, lo: float, hi: float) -> F32:
    """utils.c rand_uniform: ((float)rand()/RAND_MAX * (max - min)) + min, all float."""
    lo, hi = F32(lo), F32(hi)
    if hi < lo:
        lo, hi = hi, lo
    u = F32(src.rand()) / F32(RAND_MAX)
    return F32(F32(u * F32(hi - lo)) + lo)


def rand_scale(src: RandSource, s: float) -> F32:
    """utils.c rand_scale: U(1, s), inverted (in double) on a coin flip."""
    scale = rand_uniform(src, 1.0, s)
    if src.rand() % 2:
        return scale
    return F32(1.0 / F64(scale))


# --------------------------------------------------------------------------------------------
# Image operations (planar float32 (3, h, w), values in [0, 1])
# --------------------------------------------------------------------------------------------

def place_image(im: np.ndarray, w: int, h: int, dx: int, dy: int, canvas: np.ndarray) -> None:
    """image.c place_image: canvas[y+dy, x+dx] = bilinear(im, x/w*im.w, y/h*im.h), in place.

    Samples past the image's last row/column read 0 (get_pixel_extend), and writes outside
    the canvas are dropped (set_pixel). The float operations are those of Debian's -Ofast
    build (read from its disassembly, bit-exact against the library): the source position is
    x * ((1/w) * im.w), the weights are 1-d = (i + 1) - r and d = r - i, and the sum is
    ((1-dx)*((1-dy)*p00 + dy*p01) + (dx*(1-dy))*p10) + (dx*dy)*p11.
    """
    c, im_h, im_w = im.shape
    if w <= 0 or h <= 0:
        return
    one = F32(1)
    step_x = F32(F32(one / F32(w)) * F32(im_w))
    step_y = F32(F32(one / F32(h)) * F32(im_h))
    rx = (np.arange(w, dtype=F32) * step_x).astype(F32, copy=False)
    ry = (np.arange(h, dtype=F32) * step_y).astype(F32, copy=False)
    ix = np.floor(rx).astype(np.int64)
    iy = np.floor(ry).astype(np.int64)
    fx = (rx - ix.astype(F32, copy=False)).astype(F32, copy=False)
    fy = (ry - iy.astype(F32, copy=False)).astype(F32, copy=False)
    gx = ((ix.astype(F32, copy=False) + one).astype(F32, copy=False) - rx).astype(F32, copy=False)      # 1 - dx, as the build computes it
    gy = ((iy.astype(F32, copy=False) + one).astype(F32, copy=False) - ry).astype(F32, copy=False)
    _, ch, cw = canvas.shape
    x0, y0 = max(dx, 0), max(dy, 0)
    x1, y1 = min(dx + w, cw), min(dy + h, ch)
    if x1 <= x0 or y1 <= y0:
        return
    # Only the samples that land on the canvas are computed; rows are gathered first (contiguous
    # copies), then columns along the last axis: the same values as a 2-D gather, ~2x faster.
    rows, cols = slice(y0 - dy, y1 - dy), slice(x0 - dx, x1 - dx)
    iy, fy, gy = iy[rows], fy[rows], gy[rows]
    ix, fx, gx = ix[cols], fx[cols], gx[cols]
    padded = np.zeros((c, im_h + 1, im_w + 1), F32)     # the extra row/column is get_pixel_extend's 0
    padded[:, :im_h, :im_w] = im
    top_rows, bottom_rows = padded[:, iy, :], padded[:, iy + 1, :]
    gy_, fy_ = gy[:, None], fy[:, None]
    gx_, fx_ = gx[None, :], fx[None, :]
    # (1-dy)*p00 + dy*p01 depends on the source column only: blend whole source rows once, then
    # gather (the same float operations on the same operands as blending after the gather).
    blended = gy_ * top_rows            # float32 throughout, in the build's order
    blended += fy_ * bottom_rows
    column = np.take(blended, ix, axis=2)
    p10, p11 = np.take(top_rows, ix + 1, axis=2), np.take(bottom_rows, ix + 1, axis=2)
    val = gx_ * column
    val += (fx_ * gy_) * p10
    val += (fx_ * fy_) * p11
    canvas[:, y0:y1, x0:x1] = val


def rgb_to_hsv(im: np.ndarray) -> np.ndarray:
    """image.c rgb_to_hsv: h in [0, 1) (h/6 in double), s = delta/max, v = max; float32."""
    r, g, b = (np.asarray(im[i], F32) for i in range(3))
    mx = np.maximum(np.maximum(r, g), b)    # the value Darknet's comparison chain picks (no NaN in images)
    mn = np.minimum(np.minimum(r, g), b)
    delta = (mx - mn).astype(F32, copy=False)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.where(mx == 0, F32(0), delta / mx).astype(F32, copy=False)
        h_r = (g - b) / delta
        h_g = F32(2) + (b - r) / delta
        h_b = F32(4) + (r - g) / delta
    h = np.where(r == mx, h_r, np.where(g == mx, h_g, h_b)).astype(F32, copy=False)
    h = np.where(h < 0, (h + F32(6)).astype(F32, copy=False), h)
    h = (h.astype(F64) / 6.0).astype(F32, copy=False)
    h = np.where(mx == 0, F32(0), h)          # grey pixels keep Darknet's NaN hue; it is never used
    return np.stack([h, s, mx]).astype(F32, copy=False)


def hsv_to_rgb(im: np.ndarray) -> np.ndarray:
    """image.c hsv_to_rgb: sector = floor(6h), p/q/t in float32."""
    h = (F32(6) * np.asarray(im[0], F32)).astype(F32, copy=False)
    s, v = np.asarray(im[1], F32), np.asarray(im[2], F32)
    one = F32(1)
    with np.errstate(invalid="ignore"):
        index = np.floor(h.astype(F64))
        index = np.where(np.isfinite(index), index, 0).astype(np.int64)
        f = (h - index.astype(F32, copy=False)).astype(F32, copy=False)
        p = (v * (one - s)).astype(F32, copy=False)
        q = (v * (one - (s * f).astype(F32, copy=False))).astype(F32, copy=False)
        t = (v * (one - (s * (one - f)).astype(F32, copy=False))).astype(F32, copy=False)
    sectors = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v)]
    r, g, b = (np.array(x, copy=True) for x in (v, p, q))    # index >= 5 (and anything else)
    for k, (rk, gk, bk) in enumerate(sectors):
        m = index == k
        r[m], g[m], b[m] = rk[m], gk[m], bk[m]
    grey = s == 0
    r[grey], g[grey], b[grey] = v[grey], v[grey], v[grey]
    return np.stack([r, g, b]).astype(F32, copy=False)


def distort_image(im: np.ndarray, hue: float, sat: float, val: float) -> np.ndarray:
    """image.c distort_image: HSV, scale s and v, shift h with wrap, back to RGB, clip to [0, 1]."""
    hsv = rgb_to_hsv(im)
    hsv[1] = (hsv[1] * F32(sat)).astype(F32, copy=False)
    hsv[2] = (hsv[2] * F32(val)).astype(F32, copy=False)
    h = (hsv[0] + F32(hue)).astype(F32, copy=False)
    h = np.where(h > 1, (h - F32(1)).astype(F32, copy=False), h)
    h = np.where(h < 0, (h + F32(1)).astype(F32, copy=False), h)
    hsv[0] = h
    return np.clip(hsv_to_rgb(hsv), F32(0), F32(1)).astype(F32, copy=False)


def flip_image(im: np.ndarray) -> np.ndarray:
    """image.c flip_image: mirror left-right."""
    return np.ascontiguousarray(im[:, :, ::-1])


# --------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------

def randomize_boxes(boxes: np.ndarray, src: RandSource) -> np.ndarray:
    """data.c randomize_boxes: for each i, swap with rand() % n (not a uniform shuffle)."""
    out = np.array(boxes, copy=True)
    n = len(out)
    for i in range(n):
        j = src.rand() % n
        out[[i, j]] = out[[j, i]]
    return out


def correct_boxes(boxes: np.ndarray, dx: F32, dy: F32, sx: F32, sy: F32, flip: bool) -> np.ndarray:
    """data.c read_boxes + correct_boxes: (k, 5) class,x,y,w,h -> mapped, clipped class,x,y,w,h.

    A box at x == y == 0 becomes 999999 in every coordinate, as in Darknet.
    """
    boxes = np.asarray(boxes, F32)
    cls, x, y, w, h = (boxes[:, i].astype(F32, copy=False) for i in range(5))
    two = F32(2)
    left = (x - (w / two).astype(F32, copy=False)).astype(F32, copy=False)
    right = (x + (w / two).astype(F32, copy=False)).astype(F32, copy=False)
    top = (y - (h / two).astype(F32, copy=False)).astype(F32, copy=False)
    bottom = (y + (h / two).astype(F32, copy=False)).astype(F32, copy=False)
    left_s, right_s = (left * sx).astype(F32, copy=False), (right * sx).astype(F32, copy=False)
    top = ((top * sy).astype(F32, copy=False) - dy).astype(F32, copy=False)
    bottom = ((bottom * sy).astype(F32, copy=False) - dy).astype(F32, copy=False)
    if flip:   # 1 - (right*sx - dx), reassociated by the -Ofast build to (1 + dx) - right*sx
        shifted_one = F32(F32(1) + F32(dx))
        left, right = (shifted_one - right_s).astype(F32, copy=False), (shifted_one - left_s).astype(F32, copy=False)
    else:
        left, right = (left_s - dx).astype(F32, copy=False), (right_s - dx).astype(F32, copy=False)
    left, right = np.clip(left, 0, 1).astype(F32, copy=False), np.clip(right, 0, 1).astype(F32, copy=False)
    top, bottom = np.clip(top, 0, 1).astype(F32, copy=False), np.clip(bottom, 0, 1).astype(F32, copy=False)
    nx = ((left + right).astype(F32, copy=False) / two).astype(F32, copy=False)
    ny = ((top + bottom).astype(F32, copy=False) / two).astype(F32, copy=False)
    nw = np.clip((right - left).astype(F32, copy=False), 0, 1).astype(F32, copy=False)
    nh = np.clip((bottom - top).astype(F32, copy=False), 0, 1).astype(F32, copy=False)
    out = np.stack([cls, nx, ny, nw, nh], axis=1).astype(F32, copy=False)
    corner = (x == 0) & (y == 0)
    out[corner, 1:] = F32(999999)
    return out


def truth_record(boxes: np.ndarray, max_boxes: int) -> np.ndarray:
    """fill_truth_detection's tail: keep the first max_boxes, drop w or h < .001, (x,y,w,h,class)."""
    truth = np.zeros(max_boxes * 5, F32)
    kept = boxes[:max_boxes]
    small = (kept[:, 3].astype(F64) < MIN_BOX) | (kept[:, 4].astype(F64) < MIN_BOX)
    kept = kept[~small]
    rows = truth.reshape(max_boxes, 5)
    rows[: len(kept), :4] = kept[:, 1:5]
    rows[: len(kept), 4] = kept[:, 0]
    return truth


# --------------------------------------------------------------------------------------------
# One sample
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AugmentParams:
    """The random choices of one load_data_detection image (for logs and tests)."""

    new_ar: float
    nw: float
    nh: float
    dx: float
    dy: float
    hue: float
    saturation: float
    exposure: float
    flip: bool


@dataclass(frozen=True)
class DetectionSample:
    image: np.ndarray        # (3, h, w) float32 RGB in [0, 1]
    truth: np.ndarray        # (max_boxes*5,) float32 x, y, w, h, class; x == 0 ends the list
    params: AugmentParams


def augment_detection(image: np.ndarray | SourceImage, boxes: np.ndarray, w: int, h: int, *,
                      rng: np.random.Generator | RandSource | None = None, max_boxes: int = YOLO_MAX_BOXES,
                      jitter: float = 0.2, hue: float = 0.0, saturation: float = 1.0, exposure: float = 1.0,
                      no_augment: bool = False, out: np.ndarray | None = None) -> DetectionSample:
    """One image of pjreddie's load_data_detection: (3, oh, ow) image + (k, 5) class,x,y,w,h boxes.

    `rng` is required unless `no_augment`; the net size is (w, h); max_boxes is the last
    layer's `max` (90 for [yolo], 30 for [region]); jitter comes from that layer, hue,
    saturation and exposure from [net]. The image may be a d2c.augment_kernel.SourceImage (decoded
    once, e.g. cached); `out` (3, h, w) float32 receives the pixels (a batch row, a shared slot).
    The pixels come from d2c.augment_kernel.render, the same floats as place_image,
    distort_image and flip_image below.
    """
    if not isinstance(image, SourceImage):
        image = np.asarray(image, F32)
        if image.ndim != 3 or image.shape[0] != 3:
            raise DatasetError(f"expected a (3, h, w) image, got shape {image.shape}")
        image = source_from_planar(image)
    if w <= 0 or h <= 0:
        raise DatasetError(f"net size must be positive, got {w}x{h}")
    if out is None:
        out = np.empty((3, h, w), F32)
    elif out.shape != (3, h, w) or out.dtype != F32:
        raise ValueError(f"out must be a ({3}, {h}, {w}) float32 array, got {out.shape} {out.dtype}")
    boxes = np.asarray(boxes, F32).reshape(-1, 5)
    oh, ow = image.h, image.w
    if no_augment:
        src: RandSource | None = None
        jitter, hue, saturation, exposure = 0.0, 0.0, 1.0, 1.0
    else:
        if rng is None:
            raise ValueError("augment_detection needs an rng unless no_augment=True")
        src = _source(rng)

    def draw(lo: float, hi: float) -> F32:
        return rand_uniform(src, lo, hi) if src is not None else F32(0)

    dw = F32(F32(jitter) * F32(ow))
    dh = F32(F32(jitter) * F32(oh))
    jit_w = draw(-dw, dw)
    jit_h = draw(-dh, dh)
    new_ar = F32(F32(F32(ow) + jit_w) / F32(F32(oh) + jit_h))
    if new_ar < 1:
        nh = F32(h)
        nw = F32(nh * new_ar)
    else:
        nw = F32(w)
        nh = F32(nw / new_ar)
    if src is not None:
        dx = rand_uniform(src, 0.0, F32(F32(w) - nw))
        dy = rand_uniform(src, 0.0, F32(F32(h) - nh))
    else:   # the centre of Darknet's U(0, slack) range
        dx = F32(F32(F32(w) - nw) / F32(2))
        dy = F32(F32(F32(h) - nh) / F32(2))
    if src is not None:
        dhue = rand_uniform(src, -hue, hue)
        dsat = rand_scale(src, saturation)
        dexp = rand_scale(src, exposure)
    else:
        dhue, dsat, dexp = F32(0), F32(1), F32(1)
    flip = bool(src.rand() % 2) if src is not None else False
    # place_image on a 0.5 canvas, distort_image, flip_image (no draws happen in between)
    render(image, out, int(nw), int(nh), int(dx), int(dy), dhue, dsat, dexp, flip)
    shuffled = randomize_boxes(boxes, src) if src is not None else boxes
    # fill_truth_detection(..., -dx/w, -dy/h, nw/w, nh/h) with the un-truncated float placement;
    # the -Ofast build multiplies by the float reciprocals 1/w and 1/h instead of dividing.
    inv_w, inv_h = F32(F32(1) / F32(w)), F32(F32(1) / F32(h))
    corrected = correct_boxes(shuffled, -F32(dx * inv_w), -F32(dy * inv_h), F32(nw * inv_w), F32(nh * inv_h), flip)
    truth = truth_record(corrected, max_boxes)
    params = AugmentParams(new_ar=float(new_ar), nw=float(nw), nh=float(nh), dx=float(dx), dy=float(dy),
                           hue=float(dhue), saturation=float(dsat), exposure=float(dexp), flip=flip)
    return DetectionSample(image=out, truth=truth, params=params)


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DetectionBatch:
    images: np.ndarray       # (n, 3, h, w) float32
    truth: np.ndarray        # (n, max_boxes*5) float32, Darknet's net.truth layout
    indices: np.ndarray      # which samples (positions in the list given) were used, in order
    params: list[AugmentParams]


def detection_batch(samples: list, n: int, w: int, h: int, *,
                    rng: np.random.Generator | RandSource | None = None, indices: list[int] | None = None,
                    max_boxes: int = YOLO_MAX_BOXES, jitter: float = 0.2, hue: float = 0.0,
                    saturation: float = 1.0, exposure: float = 1.0, no_augment: bool = False,
                    image_cache: dict | None = None) -> DetectionBatch:
    """n images as pjreddie's load_data_detection builds a batch: first n draws of rand() % m
    pick samples with replacement (get_random_paths), then each image is augmented in turn.

    `samples` are d2c.dataset.Sample (image_path, boxes). Pass `indices` to choose the samples
    yourself (e.g. sequential batches with no_augment); `image_cache` (path -> decoded image)
    avoids decoding the same file twice.
    """
    from d2c.augment_kernel import load_source
    if not samples:
        raise DatasetError("no samples to build a batch from")
    src = None if rng is None else _source(rng)
    if indices is None:
        if src is None:
            raise ValueError("detection_batch needs an rng or explicit indices")
        chosen = [src.rand() % len(samples) for _ in range(n)]
    else:
        chosen = [int(i) for i in indices]
        if len(chosen) != n or any(not 0 <= i < len(samples) for i in chosen):
            raise ValueError(f"indices must be {n} positions in 0..{len(samples) - 1}")
    images = np.empty((n, 3, h, w), F32)
    truth = np.empty((n, max_boxes * 5), F32)
    params = []
    for k, index in enumerate(chosen):
        sample = samples[index]
        key = str(sample.image_path)
        if image_cache is not None and key in image_cache:
            image = image_cache[key]
        else:
            image = load_source(sample.image_path)
            if image_cache is not None:
                image_cache[key] = image
        one = augment_detection(image, sample.boxes, w, h, rng=src, max_boxes=max_boxes, jitter=jitter, hue=hue,
                                saturation=saturation, exposure=exposure, no_augment=no_augment, out=images[k])
        truth[k] = one.truth
        params.append(one.params)
    return DetectionBatch(images=images, truth=truth, indices=np.array(chosen), params=params)


# --------------------------------------------------------------------------------------------
# Planned batches: the random draws taken in order, the pixel work done elsewhere
# --------------------------------------------------------------------------------------------

#: rand() calls of one augmented image besides one per box: width and height jitter, dx, dy,
#: hue, saturation (value + coin), exposure (value + coin), flip.
DRAWS_PER_IMAGE = 10


class ReplayRand:
    """rand() values drawn earlier (plan_detection_batch), replayed in the same order.

    Why: the draws of a Darknet batch are sequential (each image's depend on the state left by
    the previous one) but cheap; the pixel work is not. Drawing them up front in one process and
    replaying them in workers keeps the stream, and so every tensor, identical to detection_batch's.
    """

    def __init__(self, values: tuple[int, ...] | list[int]) -> None:
        self.values = values
        self.used = 0

    def rand(self) -> int:
        if self.used >= len(self.values):
            raise ValueError(f"ReplayRand: more than the {len(self.values)} planned draws were requested")
        value = self.values[self.used]
        self.used += 1
        return int(value)


@dataclass(frozen=True)
class PlannedImage:
    """One image of a planned batch: which sample, and the rand() values its augmentation uses."""

    index: int
    draws: tuple[int, ...]


def image_draws(box_count: int, no_augment: bool) -> int:
    """How many rand() calls augment_detection makes for an image with `box_count` boxes."""
    return 0 if no_augment else DRAWS_PER_IMAGE + box_count


def plan_detection_batch(samples: list, n: int, rng: np.random.Generator | RandSource, *,
                         no_augment: bool = False) -> list[PlannedImage]:
    """detection_batch's draws without the pixel work: the n picks (rand() % m), then each
    image's augmentation draws, taken from `rng` in exactly detection_batch's order."""
    if not samples:
        raise DatasetError("no samples to build a batch from")
    src = _source(rng)
    chosen = [src.rand() % len(samples) for _ in range(n)]
    return [PlannedImage(index, tuple(src.rand() for _ in range(image_draws(len(samples[index].boxes), no_augment))))
            for index in chosen]


def render_planned(image: np.ndarray | SourceImage, sample: object, planned: PlannedImage, w: int, h: int, *,
                   max_boxes: int = YOLO_MAX_BOXES, jitter: float = 0.2, hue: float = 0.0,
                   saturation: float = 1.0, exposure: float = 1.0, no_augment: bool = False,
                   out: np.ndarray | None = None) -> DetectionSample:
    """augment_detection of one planned image; every planned draw must be used (exactness check)."""
    src = ReplayRand(planned.draws)
    one = augment_detection(image, sample.boxes, w, h, rng=src, max_boxes=max_boxes,  # type: ignore[attr-defined]
                            jitter=jitter, hue=hue, saturation=saturation, exposure=exposure, no_augment=no_augment,
                            out=out)
    if src.used != len(planned.draws):
        raise ValueError(f"render_planned: {src.used} of {len(planned.draws)} planned draws used")
    return one


# --------------------------------------------------------------------------------------------
# Darknet's own loader, for comparisons (in a child process: libdarknet turns on FTZ/DAZ)
# --------------------------------------------------------------------------------------------

def darknet_load_detection(image_paths: list[str | Path], seeds: list[int], w: int, h: int, *,
                           max_boxes: int = YOLO_MAX_BOXES, classes: int = 80, jitter: float = 0.0,
                           hue: float = 0.0, saturation: float = 1.0, exposure: float = 1.0,
                           timeout: float = 300.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(image (3, h, w), truth) from libdarknet's load_data_detection(1, [path], 1, ...) after
    srand(seed), for each path/seed pair, run in a child process.

    Its draws match `GlibcRand(seed)` after one rand() for the path choice.
    """
    batches = darknet_load_batches([[p] for p in image_paths], [1] * len(seeds), seeds, w, h,
                                   max_boxes=max_boxes, classes=classes, jitter=jitter, hue=hue,
                                   saturation=saturation, exposure=exposure, timeout=timeout)
    return [(x[0], y[0]) for x, y in batches]


def darknet_load_batches(path_lists: list[list[str | Path]], sizes: list[int], seeds: list[int], w: int, h: int, *,
                         max_boxes: int = YOLO_MAX_BOXES, classes: int = 80, jitter: float = 0.0,
                         hue: float = 0.0, saturation: float = 1.0, exposure: float = 1.0,
                         timeout: float = 300.0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Darknet's own batches, as train_detector loads them: for each (paths, n, seed),
    srand(seed) then load_data_detection(n, paths, len(paths), ...) -> ((n, 3, h, w), (n, 5*max_boxes)).

    Runs in a child process (libdarknet turns on FTZ/DAZ in the process that loads it). Darknet
    exits on a missing label file and substitutes a blank image for an unreadable one, so both
    are checked here first.
    """
    from d2c.dataset import label_path_for
    from d2c.darknet.runtime import library_path
    if not len(path_lists) == len(sizes) == len(seeds):
        raise ValueError("one size and one seed per path list")
    lists = [[str(p) for p in paths] for paths in path_lists]
    for p in {p for paths in lists for p in paths}:
        if not Path(p).is_file():
            raise DatasetError(f"{p}: image not found")
        if not Path(label_path_for(p)).is_file():
            raise DatasetError(f"{label_path_for(p)}: label file not found (Darknet would exit)")
    if any(not paths for paths in lists) or any(n < 1 for n in sizes):
        raise ValueError("every batch needs at least one path and n >= 1")
    library_path()
    with tempfile.TemporaryDirectory(prefix="d2c-loader-") as tmp:
        job = {"lists": lists, "sizes": [int(n) for n in sizes], "seeds": [int(s) for s in seeds],
               "w": int(w), "h": int(h), "boxes": int(max_boxes), "classes": int(classes),
               "jitter": float(jitter), "hue": float(hue), "saturation": float(saturation),
               "exposure": float(exposure), "out": str(Path(tmp) / "out.npz")}
        package_root = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ)
        env["PYTHONPATH"] = package_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.run([sys.executable, "-c", "from d2c.augment import _darknet_child; _darknet_child()"],
                              input=json.dumps(job), text=True, capture_output=True, env=env, timeout=timeout,
                              check=False)
        if proc.returncode != 0 or not Path(job["out"]).is_file():
            raise EngineError(f"Darknet's load_data_detection failed (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
        with np.load(job["out"]) as data:
            return [(data[f"x{i}"].reshape(n, 3, h, w), data[f"y{i}"].reshape(n, 5 * max_boxes))
                    for i, n in enumerate(sizes)]


def darknet_load_data_detection() -> tuple[Any, Any]:
    """libdarknet with its load_data_detection and free_data typed, and srand seeded by the caller.

    The same binding serves the bit-exactness reference above and the loader benchmark, so both
    call Darknet's loader with one signature: (n, paths, m, w, h, boxes, classes, jitter, hue,
    saturation, exposure) -> data.
    """
    import ctypes
    from d2c.darknet.runtime import _library
    lib = _library()
    fn = lib.dll.load_data_detection
    c_int, c_float = ctypes.c_int, ctypes.c_float
    fn.argtypes = [c_int, ctypes.POINTER(ctypes.c_char_p), c_int, c_int, c_int, c_int, c_int,
                   c_float, c_float, c_float, c_float]
    fn.restype = lib.Data
    lib.dll.free_data.argtypes = [lib.Data]
    lib.dll.free_data.restype = None
    lib.libc.srand.argtypes = [ctypes.c_uint]
    return lib, fn


def _darknet_child() -> None:
    """Child-process body of darknet_load_batches: JSON job on stdin, arrays to an .npz."""
    import ctypes
    job = json.loads(sys.stdin.read())
    lib, fn = darknet_load_data_detection()
    w, h, boxes = job["w"], job["h"], job["boxes"]
    arrays: dict[str, np.ndarray] = {}
    for i, (paths, n, seed) in enumerate(zip(job["lists"], job["sizes"], job["seeds"])):
        c_paths = (ctypes.c_char_p * len(paths))(*(p.encode() for p in paths))
        lib.libc.srand(seed)
        data = fn(n, c_paths, len(paths), w, h, boxes, job["classes"], job["jitter"], job["hue"],
                  job["saturation"], job["exposure"])
        arrays[f"x{i}"] = np.stack([np.ctypeslib.as_array(data.X.vals[k], shape=(3 * h * w,)).copy()
                                    for k in range(n)])
        arrays[f"y{i}"] = np.stack([np.ctypeslib.as_array(data.y.vals[k], shape=(5 * boxes,)).copy()
                                    for k in range(n)])
        lib.dll.free_data(data)
    np.savez(job["out"], **arrays)
