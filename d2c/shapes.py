"""A seeded, self-made detection dataset: coloured circles, squares and triangles on textures.

Why: `d2c train` must be demonstrable (and testable) without downloading anything, on a
2-core machine. Three visually distinct classes on busy backgrounds are easy enough for a
short fine-tune to learn yet not trivial (the texture has edges and colours too).

Layout written under OUT (Darknet's, so Darknet itself can train on it too):
  images/shape_0000.jpg ...   labels/shape_0000.txt ...   (`class x y w h`, relative)
  train.txt  valid.txt        image paths, relative to OUT (Darknet opens them relative to the
                              CWD, so run Darknet from OUT, or write absolute paths)
  shapes.names  shapes.data   (classes, train, valid, names, backup = backup/)
Each image depends only on (seed, its index): `count` can grow without changing earlier images.
Shapes never overlap, so every box is fully visible and its label is its drawn extent.
"""
from __future__ import annotations

import argparse

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2c.errors import DatasetError
from d2c.fsutil import atomic_write_text

CLASSES = ("circle", "square", "triangle")
FORMATS = ("jpg", "png")


@dataclass(frozen=True)
class Shape:
    """One drawn object: class index and its pixel bounding box (x0, y0, x1, y1), inclusive-exclusive."""

    cls: int
    box: tuple[float, float, float, float]
    color: tuple[int, int, int]


@dataclass(frozen=True)
class ShapesDataset:
    root: Path
    data_file: Path
    train: list[Path]
    valid: list[Path]


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """A muted, busy background: smooth colour blobs, fine grain and a few stripes (uint8 BGR)."""
    import cv2
    base = rng.uniform(60, 190, 3)
    coarse = cv2.resize(rng.normal(0, 28, (6, 6, 3)).astype(np.float32), (size, size),
                        interpolation=cv2.INTER_CUBIC)
    fine = cv2.GaussianBlur(rng.normal(0, 14, (size, size, 3)).astype(np.float32), (0, 0), 1.2)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(size / 14, size / 5)
    stripes = (np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period) * rng.uniform(4, 16))
    img = base[None, None, :] + coarse + fine + stripes[:, :, None]
    return np.clip(img, 0, 255).astype(np.uint8)


def _shape_color(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour (BGR), so shapes stand out from the muted texture."""
    import cv2
    hsv = np.array([[[rng.integers(0, 180), rng.integers(170, 256), rng.integers(150, 256)]]], np.uint8)
    b, g, r = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[0, 0]
    return int(b), int(g), int(r)


def _polygon(cls: int, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    if cls == 1:   # square, axis-aligned: radius is half the side
        return np.array([[cx - radius, cy - radius], [cx + radius, cy - radius],
                         [cx + radius, cy + radius], [cx - radius, cy + radius]])
    corners = [angle + k * 2 * math.pi / 3 for k in range(3)]
    return np.array([[cx + radius * math.cos(a), cy + radius * math.sin(a)] for a in corners])


def render_shapes_image(rng: np.random.Generator, size: int, max_shapes: int = 4
                        ) -> tuple[np.ndarray, list[Shape], list[np.ndarray]]:
    """One image (uint8 BGR), its shapes, and each shape's drawn mask (for checking labels)."""
    import cv2
    img = _texture(rng, size)
    shapes: list[Shape] = []
    masks: list[np.ndarray] = []
    wanted = int(rng.integers(1, max_shapes + 1))
    shift = 4                      # sub-pixel coordinates for cv2 (fixed point, 1/16 px)
    for _ in range(wanted * 20):
        if len(shapes) == wanted:
            break
        cls = int(rng.integers(0, len(CLASSES)))
        radius = float(rng.uniform(0.05, 0.16) * size)
        margin = radius + 2
        cx, cy = (float(v) for v in rng.uniform(margin, size - margin, 2))
        if cls == 0:
            box = (cx - radius, cy - radius, cx + radius, cy + radius)
            poly = None
        else:
            poly = _polygon(cls, cx, cy, radius, float(rng.uniform(0, 2 * math.pi)))
            box = (poly[:, 0].min(), poly[:, 1].min(), poly[:, 0].max(), poly[:, 1].max())
        if any(box[0] < s.box[2] + 4 and s.box[0] < box[2] + 4 and box[1] < s.box[3] + 4 and s.box[1] < box[3] + 4
               for s in shapes):
            continue              # keep objects apart: every box is its whole, visible shape
        # OpenCV puts pixel i's centre at coordinate i; labels use pixel i = [i, i+1). Draw at -0.5
        # so the shape covers exactly its box in the label convention.
        mask = np.zeros((size, size), np.uint8)
        if poly is None:
            cv2.circle(mask, (round((cx - 0.5) * 16), round((cy - 0.5) * 16)), round(radius * 16), 255, -1,
                       cv2.LINE_AA, shift)
        else:
            cv2.fillPoly(mask, [np.round((poly - 0.5) * 16).astype(np.int32)], 255, cv2.LINE_AA, shift)
        color = _shape_color(rng)
        alpha = (mask.astype(np.float32) / 255.0)[:, :, None]
        img = (img.astype(np.float32) * (1 - alpha) + np.array(color, np.float32) * alpha).round().astype(np.uint8)
        shapes.append(Shape(cls=cls, box=tuple(float(v) for v in box), color=color))
        masks.append(mask)
    grain = rng.normal(0, 3, img.shape)
    img = np.clip(img.astype(np.float64) + grain, 0, 255).astype(np.uint8)
    return img, shapes, masks


def label_lines(shapes: list[Shape], size: int) -> list[str]:
    """Darknet label lines: class, centre and size relative to the image, 6 decimals."""
    lines = []
    for s in shapes:
        x0, y0, x1, y1 = s.box
        lines.append(f"{s.cls} {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} "
                     f"{(x1 - x0) / size:.6f} {(y1 - y0) / size:.6f}")
    return lines


def make_shapes_dataset(out_dir: str | Path, *, count: int = 300, size: int = 416, seed: int = 0,
                        valid_fraction: float = 0.2, max_shapes: int = 4, image_format: str = "jpg",
                        absolute_paths: bool = False) -> ShapesDataset:
    """Write the dataset (see the module docstring); the last `valid_fraction` is held out."""
    import cv2
    if count < 2:
        raise DatasetError(f"count must be >= 2 (one train and one valid image), got {count}")
    if not 32 <= size <= 4096:
        raise DatasetError(f"size must be in 32..4096, got {size}")
    if not 0 < valid_fraction < 1:
        raise DatasetError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    if image_format not in FORMATS:
        raise DatasetError(f"image format must be one of {FORMATS}, got {image_format!r}")
    if max_shapes < 1:
        raise DatasetError(f"max_shapes must be >= 1, got {max_shapes}")
    root = Path(out_dir)
    try:
        for sub in ("images", "labels", "backup"):
            (root / sub).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetError(f"{root}: cannot create the dataset directories ({exc.strerror or exc})") from None
    n_valid = max(1, round(count * valid_fraction))
    entries: list[str] = []
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        img, shapes, _ = render_shapes_image(rng, size, max_shapes)
        stem = f"shape_{index:04d}"
        params = [cv2.IMWRITE_JPEG_QUALITY, 92] if image_format == "jpg" else [cv2.IMWRITE_PNG_COMPRESSION, 3]
        ok, encoded = cv2.imencode(f".{image_format}", img, params)
        if not ok:
            raise DatasetError(f"OpenCV could not encode {stem}.{image_format}")
        image_path = root / "images" / f"{stem}.{image_format}"
        # Plain writes (no fsync per file): the dataset is regenerable; the lists below are atomic
        # and written last, so an interrupted run never yields a list naming a missing file.
        try:
            image_path.write_bytes(encoded.tobytes())
            (root / "labels" / f"{stem}.txt").write_text("\n".join(label_lines(shapes, size)) + "\n")
        except OSError as exc:
            raise DatasetError(f"{root}: cannot write the dataset ({exc.strerror or exc})") from None
        entries.append(str(image_path.resolve()) if absolute_paths else f"images/{stem}.{image_format}")
    train, valid = entries[:-n_valid], entries[-n_valid:]
    atomic_write_text(root / "train.txt", "\n".join(train) + "\n")
    atomic_write_text(root / "valid.txt", "\n".join(valid) + "\n")
    atomic_write_text(root / "shapes.names", "\n".join(CLASSES) + "\n")
    prefix = f"{root.resolve()}/" if absolute_paths else ""
    atomic_write_text(root / "shapes.data",
                      f"classes = {len(CLASSES)}\ntrain = {prefix}train.txt\nvalid = {prefix}valid.txt\n"
                      f"names = {prefix}shapes.names\nbackup = {prefix}backup/\n")
    return ShapesDataset(root=root, data_file=root / "shapes.data",
                         train=[root / e for e in train], valid=[root / e for e in valid])


# --------------------------------------------------------------------------------------------
# `d2c shapes OUT`
# --------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="directory to write (created if needed)")
    p.add_argument("--count", type=int, default=300, help="number of images (default 300)")
    p.add_argument("--size", type=int, default=416, help="square image side in pixels (default 416)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--valid-fraction", type=float, default=0.2, help="held-out share (default 0.2)")
    p.add_argument("--max-shapes", type=int, default=4, help="at most this many objects per image")
    p.add_argument("--format", choices=FORMATS, default="jpg", help="image format (default jpg)")
    p.add_argument("--absolute", action="store_true",
                   help="write absolute paths in the lists and .data (Darknet from any directory)")


def run(args: argparse.Namespace) -> int:
    ds = make_shapes_dataset(args.out, count=args.count, size=args.size, seed=args.seed,
                             valid_fraction=args.valid_fraction, max_shapes=args.max_shapes,
                             image_format=args.format, absolute_paths=args.absolute)
    print(f"wrote {len(ds.train)} train + {len(ds.valid)} valid images ({', '.join(CLASSES)}) to {ds.root}")
    print(f"  data file: {ds.data_file}")
    return 0
