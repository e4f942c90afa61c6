"""Darknet-exact image input: loading, bilinear resize and letterbox.

Why bit-exact: the converted network must see the very tensor Darknet feeds its own copy,
otherwise detections drift and parity checks compare different inputs. Everything here
follows pjreddie's src/image.c (resize_image, letterbox_image, embed_image, fill_image) and
the OpenCV loader of the Debian build (src/image_opencv.cpp: imread -> planar -> /255. ->
BGR->RGB). Images are planar float32 arrays of shape (3, h, w), values in [0, 1].
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from d2c.errors import DatasetError

F32 = np.float32
LETTERBOX_FILL = F32(0.5)


def load_image_rgb(path: str | Path) -> np.ndarray:
    """Load an image like Darknet's OpenCV loader: (3, h, w) float32 RGB in [0, 1].

    Darknet divides each byte by 255. in double and stores the float; numpy does the same
    (float64 division, then one rounding). Darknet silently substitutes a black 10x10 image
    for unreadable files; we refuse instead, naming the file.
    """
    return bgr_bytes_to_rgb_planar(decode_bgr(path))


def decode_bgr(path: str | Path) -> np.ndarray:
    """The (h, w, 3) uint8 BGR decode load_image_rgb starts from (unreadable files refused, named)."""
    from d2c.engines import import_cv2
    cv2 = import_cv2()
    p = Path(path)
    if not p.is_file():
        raise DatasetError(f"{p}: image not found" if not p.exists() else f"{p}: not a file")
    # imdecode of the bytes avoids OpenCV's own warnings on stderr and handles odd file names.
    try:
        raw = np.fromfile(p, dtype=np.uint8)
    except OSError as exc:
        raise DatasetError(f"{p}: cannot read image ({exc.strerror or exc})") from None
    bgr = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    if bgr is None:
        raise DatasetError(f"{p}: not an image OpenCV can decode")
    return bgr


def bgr_bytes_to_rgb_planar(bgr: np.ndarray) -> np.ndarray:
    """(h, w, 3) uint8 BGR -> (3, h, w) float32 RGB, each value byte/255. rounded once."""
    planar = np.ascontiguousarray(bgr[:, :, ::-1].transpose(2, 0, 1))
    return (planar.astype(np.float64) / 255.0).astype(F32)


def resize_image(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """Darknet's two-pass bilinear resize (src/image.c resize_image), bit for bit.

    Pass 1 interpolates along x into an (c, im_h, w) buffer; pass 2 along y, first storing
    (1-dy)*top and then adding dy*bottom, all in float32 in Darknet's operation order. The
    last column/row copies the source edge instead of interpolating.
    """
    if im.ndim != 3:
        raise ValueError(f"expected a (c, h, w) image, got shape {im.shape}")
    if w < 1 or h < 1:
        raise DatasetError(f"cannot resize an image to {w}x{h}")
    im = np.asarray(im, dtype=F32)
    _, in_h, in_w = im.shape
    # (float)(im.w - 1) / (w - 1): a float division; w == 1 never uses the scale.
    w_scale = F32(in_w - 1) / F32(w - 1) if w > 1 else F32(0)
    h_scale = F32(in_h - 1) / F32(h - 1) if h > 1 else F32(0)

    part = np.empty((im.shape[0], in_h, w), dtype=F32)
    cols = np.arange(w)
    interp = cols[(cols != w - 1)] if in_w > 1 else cols[:0]
    sx = interp.astype(F32) * w_scale
    ix = sx.astype(np.int64)                    # (int) truncation; sx >= 0
    dx = sx - ix.astype(F32)
    one_minus_dx = F32(1) - dx
    part[:, :, interp] = one_minus_dx * im[:, :, ix] + dx * im[:, :, ix + 1]
    edge = np.setdiff1d(cols, interp)
    part[:, :, edge] = im[:, :, in_w - 1:in_w]

    rows = np.arange(h)
    sy = rows.astype(F32) * h_scale
    iy = sy.astype(np.int64)
    dy = sy - iy.astype(F32)
    one_minus_dy = (F32(1) - dy)[:, None]
    resized = one_minus_dy * part[:, iy, :]
    add_rows = rows[(rows != h - 1)] if in_h > 1 else rows[:0]
    resized[:, add_rows, :] += dy[add_rows, None] * part[:, iy[add_rows] + 1, :]
    return resized.astype(F32, copy=False)


def letterbox_size(im_w: int, im_h: int, net_w: int, net_h: int) -> tuple[int, int]:
    """(new_w, new_h) of the scaled image inside the letterbox, Darknet's integer rule.

    The comparison is between two float quotients, as in letterbox_image and
    correct_yolo_boxes; the scaled side is an integer (floor) division.
    """
    if F32(net_w) / F32(im_w) < F32(net_h) / F32(im_h):
        return net_w, (im_h * net_w) // im_w
    return (im_w * net_h) // im_h, net_h


def embed_image(source: np.ndarray, dest: np.ndarray, dx: int, dy: int) -> None:
    """Copy source into dest at (dx, dy), dropping what falls outside (set_pixel's bounds check)."""
    _, sh, sw = source.shape
    _, dh, dw = dest.shape
    x0, y0 = max(dx, 0), max(dy, 0)
    x1, y1 = min(dx + sw, dw), min(dy + sh, dh)
    if x1 > x0 and y1 > y0:
        dest[:, y0:y1, x0:x1] = source[:, y0 - dy:y1 - dy, x0 - dx:x1 - dx]


def letterbox(im: np.ndarray, net_w: int, net_h: int) -> np.ndarray:
    """Darknet's letterbox_image: aspect-preserving resize centred on a 0.5 grey canvas."""
    _, im_h, im_w = im.shape
    new_w, new_h = letterbox_size(im_w, im_h, net_w, net_h)
    resized = resize_image(im, new_w, new_h)
    boxed = np.full((im.shape[0], net_h, net_w), LETTERBOX_FILL, dtype=F32)
    embed_image(resized, boxed, (net_w - new_w) // 2, (net_h - new_h) // 2)
    return boxed


def rgb_planar_to_bgr_bytes(im: np.ndarray) -> np.ndarray:
    """(3, h, w) float RGB in [0, 1] -> (h, w, 3) uint8 BGR, for drawing and saving with OpenCV."""
    clipped = np.clip(np.asarray(im, dtype=F32), 0, 1)
    return np.ascontiguousarray((clipped * F32(255)).astype(np.uint8).transpose(1, 2, 0)[:, :, ::-1])
