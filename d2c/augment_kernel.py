"""The pixel work of one load_data_detection image, fused and in row blocks: Darknet's floats, sooner.

Why a second implementation: d2c.augment's place_image, rgb_to_hsv, hsv_to_rgb, distort_image and
flip_image follow Darknet's C step by step and stay the readable specification; run as whole-image
numpy passes they make the loader 3-4x slower per core than Darknet's own. `render` computes the very
same float32 values (tests/test_augment.py checks it against libdarknet and against the reference
functions) with far less memory traffic:
- the source is decoded once into padded planes of bytes (the extra zero row and column are
  get_pixel_extend's "outside"), turned into floats a few rows at a time through a 256-entry
  table (byte/255. rounded once), where they are used;
- placement, HSV distortion, clipping and the mirror run on blocks of output rows that stay in the
  CPU cache, writing straight into the caller's array; the mirror is free (the column tables are
  reversed) and the grey canvas around the placed image is one constant computed by the same code;
- no data-dependent branches or masks (real images make them mispredict): Darknet's hue cases are
  a byte-table lookup (cv2.LUT; np.take is ~10x slower) on the channel order, its six hsv_to_rgb
  sectors a max/min selection.
Every rewrite is an exact identity on IEEE float32 values (see the comments at each step).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

F32 = np.float32
U8 = np.uint8
FILL = F32(0.5)
BLOCK_ROWS = 64
TINY = np.finfo(F32).tiny          # smallest normal float: max(x, TINY) == x for every x > 0 met here
BYTE_TO_FLOAT = (np.arange(256, dtype=np.float64) / 255.0).astype(F32)   # load_image's byte/255.

# rgb_to_hsv's hue, branch-free. With code = (r>=g) + 2*(g>=b) + 4*(b>=r) and q = (mid - min)/delta,
# Darknet's h (after its `if (h < 0) h += 6`) is |HUE_BASE[code] + q|: the three numerators g-b, b-r,
# r-g are +-(mid - min) exactly, and -(a - q) rounds as -(a + -q). Ties land on a sector boundary
# where both neighbours give the same value (q is then 0 or exactly 1).
HUE_BASE = np.array([0, -6, -2, 0, -4, 4, 2, 0], F32)
# hsv_to_rgb's sectors: channel c takes v, mid (q or t) or p. With the three clipped to [0, 1] first
# (constrain_image commutes with the choice), p <= mid <= v and out = max(p, min(v, mid + w)) for w = 1
# (v), 0 (mid) or -1 (p); index k = floor(6h) in 0..6, where 6 is Darknet's `else` (sector 5).
ROLE = np.array([[1, 0, -1, -1, 0, 1, 1],        # r: v t p / q v p / p v t / p q v / t p v / v p q
                 [0, 1, 1, 0, -1, -1, -1],       # g
                 [-1, -1, 0, 1, 1, 0, 0]], F32)  # b
# The mid value uses f = h - k for an odd index (and 6) and 1 - f for an even one: both are |h - c|
# exactly for c the odd one of k, k+1 (6 for k = 6).
MID_CENTRE = np.array([1, 1, 3, 3, 5, 5, 6], F32)


def _table(values: np.ndarray) -> np.ndarray:
    """A 256-entry float32 table for cv2.LUT (byte -> float, ~3x faster than np.take or 5 passes)."""
    table = np.zeros(256, F32)
    table[:len(values)] = values
    return table


HUE_TABLE = _table(HUE_BASE)
ROLE_TABLES = [_table(row) for row in ROLE]
MID_TABLE = _table(MID_CENTRE)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed large blocks for reuse (a loader process's own setting).

    Why: every image allocates a few MB-sized arrays; above glibc's default 128 kB threshold each
    is a fresh mmap whose pages fault in one by one, and is unmapped again on free.
    Served from the heap and not trimmed, the same pages are reused. False where not glibc.
    """
    import ctypes
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, _KEEP_BYTES))


@dataclass(frozen=True)
class SourceImage:
    """A decoded image as place_image reads it: (3, h+1, w+1) RGB, last row and column 0 (the
    outside that get_pixel_extend reads). Bytes (a decoded file: converted to byte/255. floats
    a few rows at a time, where they are used) or float32 (any float image)."""

    padded: np.ndarray

    @property
    def h(self) -> int:
        return self.padded.shape[1] - 1

    @property
    def w(self) -> int:
        return self.padded.shape[2] - 1

    @property
    def nbytes(self) -> int:
        return self.padded.nbytes

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """Rows lo..hi-1 as float32 (3, hi-lo, w+1): a view of a float source, a fresh array otherwise."""
        if self.padded.dtype == F32:
            return self.padded[:, lo:hi, :]
        import cv2
        out = np.empty((3, hi - lo, self.padded.shape[2]), F32)
        for c in range(3):
            cv2.LUT(self.padded[c, lo:hi], BYTE_TO_FLOAT, dst=out[c])
        return out


def _padded(h: int, w: int, dtype: type) -> np.ndarray:
    padded = np.empty((3, h + 1, w + 1), dtype)
    padded[:, h, :] = 0
    padded[:, :h, w] = 0
    return padded


def source_from_planar(image: np.ndarray) -> SourceImage:
    """A (3, h, w) float image as a SourceImage (one copy)."""
    _, h, w = image.shape
    padded = _padded(h, w, F32)
    padded[:, :h, :w] = image
    return SourceImage(padded)


def source_from_bgr(bgr: np.ndarray) -> SourceImage:
    """An (h, w, 3) uint8 BGR decode as a SourceImage: RGB planes of bytes (4x smaller than floats
    in a worker's cache; converted to Darknet's byte/255. as they are used)."""
    import cv2
    h, w = bgr.shape[:2]
    padded = _padded(h, w, U8)
    views = [padded[2, :h, :w], padded[1, :h, :w], padded[0, :h, :w]]      # B, G, R
    planes = cv2.split(bgr, views)              # written in place (5x faster than split + copies)
    for view, plane in zip(views, planes):
        if plane is not view:                   # an OpenCV that allocated instead
            view[...] = plane
    return SourceImage(padded)


def load_source(path: object) -> SourceImage:
    """Decode an image file straight into a SourceImage (d2c.image.load_image_rgb's checks)."""
    from d2c.image import decode_bgr
    return source_from_bgr(decode_bgr(path))  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# distort_image on a block: rgb_to_hsv, scale s and v, shift h, hsv_to_rgb, constrain_image
# --------------------------------------------------------------------------------------------

def distort_into(rgb: np.ndarray, out: np.ndarray, hue: F32, sat: F32, val: F32) -> None:
    """distort_image of a (3, n, m) float32 block (overwritten as scratch), result in `out`."""
    import cv2
    r, g, b = rgb[0], rgb[1], rgb[2]
    hi = np.maximum(r, g)
    lo = np.minimum(r, g)
    bits = np.greater_equal(b, r).view(U8)        # bool arrays as bytes: no casts in these steps
    bits <<= 1
    bits |= np.greater_equal(g, b).view(U8)
    bits <<= 1
    bits |= np.greater_equal(r, g).view(U8)
    mx = np.maximum(hi, b)                          # three_way_max / three_way_min: no NaN in images
    mn = np.minimum(lo, b)
    mid = np.minimum(hi, b, out=hi)
    np.maximum(mid, lo, out=mid)                    # the median channel
    delta = np.subtract(mx, mn, out=lo)
    # s = delta/max (0 for black: delta is 0 there too, so 0/TINY), then scale_image_channel(1, sat)
    s = np.maximum(mx, TINY, out=b)
    np.divide(delta, s, out=s)
    s *= sat
    # h = |base + (mid - min)/delta|; grey pixels (delta 0) get 0/TINY = 0 instead of Darknet's NaN,
    # which hsv_to_rgb never reads (s == 0 there, and p = q = t = v for any finite hue)
    np.subtract(mid, mn, out=mid)
    np.maximum(delta, TINY, out=delta)
    np.divide(mid, delta, out=mid)
    h = cv2.LUT(bits, HUE_TABLE)
    h += mid
    np.abs(h, out=h)
    h /= F32(6)                                     # Darknet: h/6. in double; one float rounding of an
    h += hue                                        # exact quotient either way (53 >= 2*24 + 2 bits)
    if hue > 0:                                     # h/6 is in [0, 1]: only one wrap can fire
        np.subtract(h, np.greater(h, F32(1)), out=h)
    elif hue < 0:
        np.add(h, np.less(h, F32(0)), out=h)
    h *= F32(6)
    v = np.multiply(mx, val, out=mx)
    # hsv_to_rgb: index = floor(h) (h in [0, 6]); f = h - index; q = v*(1 - s*f), t = v*(1 - s*(1 - f)).
    # The sector's mid value uses f (odd index, and index 6 which falls to the last case) or 1 - f
    # (even): both equal |h - c| for c = the odd one of index, index+1 (or 6 for index 6), exactly.
    k = h.astype(U8)
    m = np.subtract(h, cv2.LUT(k, MID_TABLE), out=h)
    np.abs(m, out=m)
    m *= s
    np.subtract(F32(1), m, out=m)
    m *= v                                          # q or t
    np.subtract(F32(1), s, out=s)
    s *= v                                          # p
    np.minimum(v, F32(1), out=v)                    # constrain_image, before the selection
    np.clip(m, F32(0), F32(1), out=m)
    np.clip(s, F32(0), F32(1), out=s)
    y = np.empty(rgb.shape, F32)
    for c in range(3):
        cv2.LUT(k, ROLE_TABLES[c], dst=y[c])
    y += m
    np.minimum(y, v, out=y)
    np.maximum(y, s, out=out)


# --------------------------------------------------------------------------------------------
# place_image + distort_image + flip_image
# --------------------------------------------------------------------------------------------

def _axis(n: int, source: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """place_image's source index i, weights d and 1-d (as the -Ofast build computes them, see
    d2c.augment.place_image) and i+1 for the samples lo..hi-1 of an n-long axis over `source`."""
    one = F32(1)
    step = F32(F32(one / F32(n)) * F32(source))
    pos = np.arange(lo, hi, dtype=F32) * step
    i = np.floor(pos)
    d = pos - i
    g = (i + one) - pos
    index = i.astype(np.intp)
    return index, d, g, index + 1


def _identity(index: np.ndarray, d: np.ndarray) -> bool:
    """True if the axis samples whole source pixels in a row (the image keeps its size on it):
    then (1-d)*a + d*b == 1*a + 0*b == a for the finite, non-negative pixels, so the pass is a slice."""
    return bool(np.all(d == 0) and index[-1] - index[0] == len(index) - 1)


def render(src: SourceImage, out: np.ndarray, nw: int, nh: int, dx: int, dy: int,
           hue: F32, sat: F32, val: F32, flip: bool) -> None:
    """Darknet's sized image for one sample, written into `out` (3, H, W): the source placed at
    (dx, dy) with size (nw, nh) on a 0.5 canvas, distorted, clipped, mirrored if `flip`."""
    _, H, W = out.shape
    fill = np.empty((3, 1, 1), F32)
    distort_into(np.full((3, 1, 1), FILL, F32), fill, hue, sat, val)
    x0, y0 = max(dx, 0), max(dy, 0)
    x1, y1 = min(dx + nw, W), min(dy + nh, H)
    if nw <= 0 or nh <= 0 or x1 <= x0 or y1 <= y0:
        out[...] = fill
        return
    ix, fx, gx, ix1 = _axis(nw, src.w, x0 - dx, x1 - dx)
    iy, fy, gy, iy1 = _axis(nh, src.h, y0 - dy, y1 - dy)
    same_x, same_y = _identity(ix, fx), _identity(iy, fy)
    ox0, ox1 = x0, x1
    cols = slice(int(ix[0]), int(ix[0]) + len(ix))
    if flip:        # flip_image after everything else is elementwise: mirror the column tables
        ix, fx, gx, ix1 = ix[::-1].copy(), fx[::-1].copy(), gx[::-1].copy(), ix1[::-1].copy()
        ox0, ox1 = W - x1, W - x0
        cols = slice(cols.stop - 1, cols.start - 1 if cols.start > 0 else None, -1)
    out[:, :y0] = fill
    out[:, y1:] = fill
    out[:, y0:y1, :ox0] = fill
    out[:, y0:y1, ox1:] = fill
    padded = src.padded
    for b0 in range(0, y1 - y0, BLOCK_ROWS):
        rows = slice(b0, min(b0 + BLOCK_ROWS, y1 - y0))
        target = out[:, y0 + rows.start:y0 + rows.stop, ox0:ox1]
        # ((1-dx)*((1-dy)*p00 + dy*p01) + (dx*(1-dy))*p10) + (dx*dy)*p11, in the build's order; the
        # y blend is done on whole source rows before the column gather (same operands, same values).
        # A term with a zero weight adds +0 (pixels are finite and >= 0), a weight of 1 changes nothing.
        if same_y:
            first = int(iy[rows.start])
            top = src.rows(first, first + rows.stop - rows.start)
            if same_x:
                block = np.array(top[:, :, cols])
            else:                                   # per channel: np.take would copy the whole view first
                block = np.empty((3, rows.stop - rows.start, len(ix)), F32)
                p10 = np.empty_like(block)
                for c in range(3):
                    np.take(top[c], ix, axis=1, out=block[c])
                    np.take(top[c], ix1, axis=1, out=p10[c])
                block *= gx
                p10 *= fx                           # dx*(1-dy) with 1-dy == 1; the dx*dy term is +0
                block += p10
            distort_into(block, target, hue, sat, val)
            continue
        gyb, fyb = gy[rows, None], fy[rows, None]
        if padded.dtype == F32:
            top = np.take(padded, iy[rows], axis=1)
            bottom = np.take(padded, iy1[rows], axis=1)
        else:                                       # convert the rows this block spans once
            lo = int(iy[rows.start])
            span = src.rows(lo, int(iy1[rows.stop - 1]) + 1)
            top = np.take(span, iy[rows] - lo, axis=1)
            bottom = np.take(span, iy1[rows] - lo, axis=1)
        if not same_x:
            p10 = np.take(top, ix1, axis=2)
            p10 *= fx * gyb
            p11 = np.take(bottom, ix1, axis=2)
            p11 *= fx * fyb
        top *= gyb
        bottom *= fyb
        top += bottom
        if same_x:
            block = top[:, :, cols]
        else:
            block = np.take(top, ix, axis=2)
            block *= gx
            block += p10
            block += p11
        distort_into(block, target, hue, sat, val)
