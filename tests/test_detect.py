"""`d2c detect` and d2c.image against the real engines (never skipped: a missing engine fails).

What is checked:
- load + letterbox equal Darknet's own (load_image_color + letterbox_image) bit for bit, on
  every image Debian ships, for square, wide and odd network sizes;
- decode + do_nms_sort equal Darknet's get_network_boxes + do_nms_sort when both decode the
  same head inputs (Darknet's own layer outputs): [yolo] on real yolov3-tiny, [region] with
  softmax on yolov2-tiny-voc and yolov2-tiny (random weights); order, objectness, det.classes,
  probabilities and x/y bit-exact, w/h to 1 ulp (Debian's -Ofast rcpps, see detect.py);
- the whole pipeline (convert, Caffe or OpenCV forward, decode, NMS) prints Darknet's
  detections for real yolov3-tiny on every shipped image, within 1e-4;
- hand-made heads for the formulas (scale_x_y, new_coords, region softmax/logistic), NMS
  quirks, the resize against a literal scalar transcription, and the CLI contract.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from d2c import cli, numerics
from d2c.convert import convert, load_graph
from d2c.darknet.runtime import DarknetProcess
from d2c.darknet.weights import WeightsHeader, random_weights, write_weights
from d2c.detect import (Detection, Engine, class_names, decode_heads, detections_to_json,
                        do_nms_sort, load_model_files, run_model)
from d2c.errors import D2CError, DatasetError
from d2c.image import letterbox, letterbox_size, load_image_rgb, resize_image
from d2c.numerics import logistic_darknet, softmax_darknet

F32 = np.float32
ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/usr/share/darknet/data")
SYS_CFG = Path("/usr/share/darknet/cfg")
TINY_CFG = SYS_CFG / "yolov3-tiny.cfg"
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"
IMAGES = sorted(DATA.glob("*.jpg"))
IMAGE_IDS = [p.stem for p in IMAGES]
DOG = DATA / "dog.jpg"

# End-to-end tolerance on scores and box coordinates (relative units), as specified.
E2E_TOL = 1e-4


def test_debian_images_present() -> None:
    assert len(IMAGES) >= 7, f"expected Debian's sample images in {DATA}"
    assert TINY_WEIGHTS.is_file(), f"{TINY_WEIGHTS} missing: run tools/fetch_weights (make setup)"


# ------------------------------------------------------------------------------------------
# Image loading, resize, letterbox
# ------------------------------------------------------------------------------------------

def _resize_scalar(im: np.ndarray, w: int, h: int) -> np.ndarray:
    """A literal, loop-by-loop transcription of image.c resize_image in float32."""
    c, in_h, in_w = im.shape
    part = np.zeros((c, in_h, w), F32)
    w_scale = F32(in_w - 1) / F32(w - 1) if w > 1 else F32(0)
    h_scale = F32(in_h - 1) / F32(h - 1) if h > 1 else F32(0)
    for k in range(c):
        for r in range(in_h):
            for col in range(w):
                if col == w - 1 or in_w == 1:
                    val = im[k, r, in_w - 1]
                else:
                    sx = F32(col) * w_scale
                    ix = int(sx)
                    dx = sx - F32(ix)
                    val = (F32(1) - dx) * im[k, r, ix] + dx * im[k, r, ix + 1]
                part[k, r, col] = val
    out = np.zeros((c, h, w), F32)
    for k in range(c):
        for r in range(h):
            sy = F32(r) * h_scale
            iy = int(sy)
            dy = sy - F32(iy)
            for col in range(w):
                out[k, r, col] = (F32(1) - dy) * part[k, iy, col]
            if r == h - 1 or in_h == 1:
                continue
            for col in range(w):
                out[k, r, col] = out[k, r, col] + dy * part[k, iy + 1, col]
    return out


@pytest.mark.parametrize("src,dst", [((5, 7), (3, 4)), ((4, 4), (9, 11)), ((1, 6), (2, 3)), ((6, 1), (4, 5)),
                                     ((7, 5), (7, 5)), ((3, 8), (8, 1)), ((13, 9), (1, 4))])
def test_resize_matches_scalar_transcription(src: tuple[int, int], dst: tuple[int, int]) -> None:
    rng = np.random.default_rng(sum(src) * 31 + sum(dst))
    im = rng.random((3, *src), dtype=F32)
    got = resize_image(im, dst[1], dst[0])
    assert got.dtype == F32 and got.shape == (3, *dst)
    assert_array_equal(got, _resize_scalar(im, dst[1], dst[0]))


def test_resize_to_same_size_is_identity() -> None:
    im = np.random.default_rng(1).random((3, 17, 23), dtype=F32)
    assert_array_equal(resize_image(im, 23, 17), im)


@pytest.mark.parametrize("im_wh,net_wh,expected", [
    ((768, 576), (416, 416), (416, 312)), ((352, 448), (416, 416), (326, 416)),
    ((500, 500), (416, 416), (416, 416)), ((1352, 900), (608, 320), (480, 320)),
])
def test_letterbox_size(im_wh, net_wh, expected) -> None:
    assert letterbox_size(*im_wh, *net_wh) == expected


def test_letterbox_fill_and_offsets() -> None:
    im = np.ones((3, 10, 20), F32)
    boxed = letterbox(im, 8, 8)          # scaled to 8x4, centred: rows 2..5
    assert boxed.shape == (3, 8, 8) and boxed.dtype == F32
    assert_array_equal(boxed[:, 2:6], 1)
    assert_array_equal(boxed[:, :2], 0.5)
    assert_array_equal(boxed[:, 6:], 0.5)


def test_load_image_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nothere.jpg.*not found"):
        load_image_rgb(tmp_path / "nothere.jpg")
    bogus = tmp_path / "bogus.jpg"
    bogus.write_bytes(b"this is not a JPEG")
    with pytest.raises(DatasetError, match="bogus.jpg.*decode"):
        load_image_rgb(bogus)
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(DatasetError, match="empty.png"):
        load_image_rgb(empty)


def _net_cfg(path: Path, width: int, height: int) -> Path:
    path.write_text(f"[net]\nwidth={width}\nheight={height}\nchannels=3\n\n"
                    "[convolutional]\nfilters=1\nsize=1\nstride=1\nactivation=linear\n")
    return path


NET_SIZES = [(416, 416), (608, 320), (97, 61)]


@pytest.fixture(scope="module")
def letterbox_nets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("letterbox")
    nets = {size: DarknetProcess(_net_cfg(tmp / f"net{size[0]}x{size[1]}.cfg", *size)) for size in NET_SIZES}
    yield nets
    for net in nets.values():
        net.close()


@pytest.mark.parametrize("size", NET_SIZES, ids=[f"{w}x{h}" for w, h in NET_SIZES])
@pytest.mark.parametrize("image", IMAGES, ids=IMAGE_IDS)
def test_letterbox_equals_darknet(letterbox_nets, image: Path, size: tuple[int, int]) -> None:
    ours = letterbox(load_image_rgb(image), *size)
    theirs = letterbox_nets[size].letterbox(image)
    assert ours.shape == theirs.shape == (3, size[1], size[0])
    assert_array_equal(ours, theirs)     # bit for bit


# ------------------------------------------------------------------------------------------
# Hand-made heads
# ------------------------------------------------------------------------------------------

def _yolo_sidecar(classes: int, mask: list[int], anchors: list[float], shape, net=(64, 64), flavor="pjreddie",
                  **attrs) -> dict:
    head = {"index": 1, "kind": "yolo", "blob": "head", "shape": list(shape), "classes": classes, "mask": mask,
            "anchors": anchors, "num": len(anchors) // 2, "scale_x_y": 1.0, "new_coords": 0}
    head.update(attrs)
    return {"d2c_sidecar": 1, "flavor": flavor, "input": {"name": "data", "channels": 3, "width": net[0],
                                                          "height": net[1]}, "heads": [head]}


def _ref_yolo(raw: np.ndarray, side: dict, im_w: int, im_h: int, thresh: float) -> list[tuple]:
    """Scalar reference of get_yolo_detections + correct_yolo_boxes (float64 math, exact order)."""
    head = side["heads"][0]
    net_w, net_h = side["input"]["width"], side["input"]["height"]
    classes, mask, anchors = head["classes"], head["mask"], head["anchors"]
    s, new_coords = head["scale_x_y"], head["new_coords"]
    n = len(mask)
    _, lh, lw = raw.shape
    z = raw.reshape(n, 5 + classes, lh, lw).astype(np.float64)
    act = z if new_coords else 1 / (1 + np.exp(-z))
    if side["flavor"] == "alexeyab":
        act = act.copy()
        act[:, :2] = act[:, :2] * s - 0.5 * (s - 1)
    new_w, new_h = letterbox_size(im_w, im_h, net_w, net_h)
    dets = []
    for j in range(lh):
        for i in range(lw):
            for a in range(n):
                obj = act[a, 4, j, i]
                if obj <= thresh:
                    continue
                tx, ty, tw, th = act[a, 0, j, i], act[a, 1, j, i], z[a, 2, j, i], z[a, 3, j, i]
                aw, ah = anchors[2 * mask[a]], anchors[2 * mask[a] + 1]
                if new_coords:
                    bw, bh = tw * tw * 4 * aw / net_w, th * th * 4 * ah / net_h
                else:
                    bw, bh = math.exp(tw) * aw / net_w, math.exp(th) * ah / net_h
                bx, by = (i + tx) / lw, (j + ty) / lh
                bx = (bx - (net_w - new_w) / 2 / net_w) / (new_w / net_w)
                by = (by - (net_h - new_h) / 2 / net_h) / (new_h / net_h)
                bw, bh = bw * net_w / new_w, bh * net_h / new_h
                probs = [obj * act[a, 5 + c, j, i] for c in range(classes)]
                dets.append(((bx, by, bw, bh), obj, [p if p > thresh else 0 for p in probs]))
    return dets


YOLO_CASES = {
    "pjreddie": dict(flavor="pjreddie"),
    "scale_x_y": dict(flavor="alexeyab", scale_x_y=1.2),
    "scale_x_y_2": dict(flavor="alexeyab", scale_x_y=2.0),
    "new_coords": dict(flavor="alexeyab", scale_x_y=2.0, new_coords=1),
}


@pytest.mark.parametrize("case", list(YOLO_CASES))
@pytest.mark.parametrize("im_wh", [(64, 64), (100, 40), (30, 90)])
def test_yolo_decode_formulas(case: str, im_wh: tuple[int, int]) -> None:
    classes, mask, anchors = 3, [1, 2], [4.0, 6.0, 10.0, 14.0, 23.0, 27.0]
    shape = (len(mask) * (5 + classes), 4, 5)
    side = _yolo_sidecar(classes, mask, anchors, shape, net=(64, 48), **YOLO_CASES[case])
    rng = np.random.default_rng(7)
    raw = rng.normal(0, 2, size=shape).astype(F32)
    if side["heads"][0]["new_coords"]:      # the conv before such heads is logistic already
        raw = logistic_darknet(raw)
    dets = decode_heads({"head": raw[None]}, side, *im_wh, thresh=0.3)
    ref = _ref_yolo(raw, side, *im_wh, thresh=0.3)
    assert 0 < len(dets) == len(ref) < shape[1] * shape[2] * len(mask)
    for det, (box, obj, probs) in zip(dets, ref):
        assert det.classes == classes
        assert det.bbox.dtype == F32 and det.prob.dtype == F32
        assert_allclose(det.bbox, box, rtol=2e-6, atol=1e-7)
        assert_allclose(det.objectness, obj, rtol=1e-6)
        assert_allclose(det.prob, probs, rtol=2e-6, atol=0)


def test_yolo_decode_known_values() -> None:
    """One cell, zeros everywhere: logistic 0.5, exp 1; the box sits at the cell centre."""
    side = _yolo_sidecar(2, [0], [16.0, 32.0], (7, 2, 2), net=(64, 64))
    raw = np.zeros((1, 7, 2, 2), F32)
    dets = decode_heads({"head": raw}, side, 64, 64, thresh=0.2)
    assert len(dets) == 4
    assert_array_equal([d.bbox for d in dets], [[0.25, 0.25, 0.25, 0.5], [0.75, 0.25, 0.25, 0.5],
                                                [0.25, 0.75, 0.25, 0.5], [0.75, 0.75, 0.25, 0.5]])
    assert_array_equal([d.prob for d in dets], [[0.25, 0.25]] * 4)
    # Above the threshold nothing survives; probs at exactly thresh are zeroed (strict >).
    assert decode_heads({"head": raw}, side, 64, 64, thresh=0.5) == []
    assert all((d.prob == 0).all() for d in decode_heads({"head": raw}, side, 64, 64, thresh=0.25))


def test_yolo_scale_x_y_known_values() -> None:
    side = _yolo_sidecar(1, [0], [8.0, 8.0], (6, 1, 1), net=(32, 32), flavor="alexeyab", scale_x_y=2.0)
    raw = np.zeros((1, 6, 1, 1), F32)
    raw[0, 0] = 20.0     # logistic ~ 1 -> 1*2 - 0.5 = 1.5
    raw[0, 1] = -20.0    # logistic ~ 0 -> -0.5
    raw[0, 4] = 20.0
    raw[0, 5] = 20.0
    (det,) = decode_heads({"head": raw}, side, 32, 32, thresh=0.5)
    assert_allclose(det.bbox, [1.5, -0.5, 0.25, 0.25], rtol=1e-6)


def test_yolo_order_is_cell_major() -> None:
    """Darknet lists [yolo] boxes by cell (row, column), anchors innermost."""
    side = _yolo_sidecar(1, [0, 1], [8.0, 8.0, 16.0, 16.0], (12, 2, 2), net=(32, 32))
    raw = np.full((1, 12, 2, 2), -10, F32)
    raw[0, 4, :, :] = 10        # anchor 0 objectness everywhere
    raw[0, 6 + 4, 0, 1] = 10    # anchor 1 at row 0, col 1
    raw[0, 5] = raw[0, 11] = 10
    raw[0, [0, 1, 2, 3, 6, 7, 8, 9]] = 0     # centred boxes of the anchor's size
    dets = decode_heads({"head": raw}, side, 32, 32, thresh=0.5)
    widths = [round(float(d.bbox[2]), 3) for d in dets]
    xs = [round(float(d.bbox[0]), 2) for d in dets]
    assert widths == [0.25, 0.25, 0.5, 0.25, 0.25]
    assert xs == [0.25, 0.75, 0.75, 0.25, 0.75]


def _region_sidecar(classes: int, num: int, shape, softmax: int, background: int = 0) -> dict:
    anchors = [0.5 + 0.3 * k for k in range(2 * num)]
    head = {"index": 1, "kind": "region", "blob": "head", "shape": list(shape), "classes": classes, "coords": 4,
            "num": num, "anchors": anchors, "softmax": softmax, "background": background}
    return {"d2c_sidecar": 1, "flavor": "pjreddie", "input": {"name": "data", "channels": 3, "width": 96,
                                                              "height": 96}, "heads": [head]}


@pytest.mark.parametrize("softmax", [1, 0], ids=["softmax", "logistic"])
@pytest.mark.parametrize("classes", [5, 40])      # 40 > 30: Darknet's vectorised softmax sum
def test_region_decode_formulas(softmax: int, classes: int) -> None:
    num, lh, lw = 2, 3, 4
    shape = (num * (5 + classes), lh, lw)
    side = _region_sidecar(classes, num, shape, softmax)
    raw = np.random.default_rng(classes + softmax).normal(0, 2, size=shape).astype(F32)
    thresh = 0.1 if softmax else 0.3
    dets = decode_heads({"head": raw[None]}, side, 120, 80, thresh=thresh)
    assert len(dets) == num * lh * lw          # region heads emit every box
    z = raw.reshape(num, 5 + classes, lh, lw).astype(np.float64)
    new_w, new_h = letterbox_size(120, 80, 96, 96)
    anchors = side["heads"][0]["anchors"]
    for index, det in enumerate(dets):
        a, cell = divmod(index, lh * lw)       # anchor-major
        j, i = divmod(cell, lw)
        obj = 1 / (1 + math.exp(-z[a, 4, j, i]))
        cls = z[a, 5:, j, i]
        p = np.exp(cls - cls.max()) / np.exp(cls - cls.max()).sum() if softmax else 1 / (1 + np.exp(-cls))
        bx = (i + 1 / (1 + math.exp(-z[a, 0, j, i]))) / lw
        by = (j + 1 / (1 + math.exp(-z[a, 1, j, i]))) / lh
        bw = math.exp(z[a, 2, j, i]) * anchors[2 * a] / lw
        bh = math.exp(z[a, 3, j, i]) * anchors[2 * a + 1] / lh
        box = [(bx - (96 - new_w) / 2 / 96) / (new_w / 96), (by - (96 - new_h) / 2 / 96) / (new_h / 96),
               bw * 96 / new_w, bh * 96 / new_h]
        assert det.classes == 0              # get_region_detections never sets det.classes
        assert_allclose(det.bbox, box, rtol=2e-6)
        assert_allclose(det.objectness, obj if obj > thresh else 0, rtol=1e-6)
        expected = np.where((obj * p > thresh) & (obj > thresh), obj * p, 0)
        assert_allclose(det.prob, expected, rtol=2e-6, atol=0)
    assert any(d.prob.any() for d in dets) and any(not d.prob.any() for d in dets)


def test_region_background_quirks() -> None:
    """background=1: objectness is 1, softmax covers entries 4..4+classes, classes read from 5."""
    classes, num = 3, 1
    side = _region_sidecar(classes, num, (5 + classes, 1, 1), softmax=1, background=1)
    raw = np.array([0, 0, 0, 0, 1.0, 2.0, 3.0, 4.0], F32).reshape(1, 8, 1, 1)
    (det,) = decode_heads({"head": raw}, side, 96, 96, thresh=0.01)
    soft = np.exp(np.array([1.0, 2, 3, 4]) - 4)
    soft /= soft.sum()
    assert det.objectness == 1
    assert_allclose(det.prob, [soft[1], soft[2], soft[3]], rtol=1e-6)


@pytest.mark.parametrize("count", [3, 20, 30, 31, 80, 83])
def test_softmax_sums_to_one(count: int) -> None:
    z = np.random.default_rng(count).normal(0, 3, size=(count, 4)).astype(F32)
    p = softmax_darknet(z)
    ref = np.exp(z - z.max(0)) / np.exp(z - z.max(0)).sum(0)
    assert_allclose(p, ref, rtol=1e-6, atol=1e-8)


def test_decode_rejects_wrong_blobs() -> None:
    side = _yolo_sidecar(1, [0], [8.0, 8.0], (6, 2, 2))
    with pytest.raises(D2CError, match="no blob 'head'"):
        decode_heads({"other": np.zeros((1, 6, 2, 2), F32)}, side, 10, 10, 0.5)
    with pytest.raises(D2CError, match="shape"):
        decode_heads({"head": np.zeros((1, 6, 3, 2), F32)}, side, 10, 10, 0.5)


# ------------------------------------------------------------------------------------------
# NMS
# ------------------------------------------------------------------------------------------

def _det(box, obj, probs, classes=None) -> Detection:
    probs = np.asarray(probs, F32)
    return Detection(bbox=np.asarray(box, F32), objectness=F32(obj), prob=probs,
                     classes=len(probs) if classes is None else classes)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """d2c.numerics.box_iou (what do_nms_sort compares) of box `a` (4,) against rows of `b` (n, 4)."""
    return numerics.box_iou(numerics.Box(*np.asarray(a, F32)), numerics.Box(*np.asarray(b, F32).T))


def test_box_iou_values() -> None:
    a = np.array([0.5, 0.5, 0.2, 0.2], F32)
    others = np.array([[0.5, 0.5, 0.2, 0.2], [0.9, 0.9, 0.1, 0.1], [0.6, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4]], F32)
    assert_allclose(box_iou(a, others), [1.0, 0.0, 1 / 3, 0.25], rtol=1e-6)


def test_nms_suppresses_per_class_and_sorts() -> None:
    dets = [_det([0.5, 0.5, 0.2, 0.2], 0.9, [0.6, 0.0]),
            _det([0.52, 0.5, 0.2, 0.2], 0.9, [0.8, 0.7]),    # overlaps the first: wins class 0
            _det([0.1, 0.1, 0.1, 0.1], 0.9, [0.5, 0.0]),
            _det([0.5, 0.52, 0.2, 0.2], 0.9, [0.0, 0.9])]    # wins class 1 over the second
    out = do_nms_sort(dets, 2, 0.45)
    # Class 0 sorts (1, 0, 2, 3) and box 1 suppresses box 0; class 1 then sorts by its own
    # column, ties (two zeros) keeping the class-0 order: (3, 1, 0, 2); box 3 suppresses box 1.
    assert_array_equal([d.prob for d in out], np.array([[0, 0.9], [0.8, 0], [0, 0], [0.5, 0]], F32))
    assert [float(d.bbox[0]) for d in out] == pytest.approx([0.5, 0.52, 0.5, 0.1])
    assert [float(d.bbox[1]) for d in out] == pytest.approx([0.52, 0.5, 0.5, 0.1])
    assert dets[0].prob[0] == F32(0.6), "the input must not be modified"
    assert detections_to_json(out, 0.25) == [
        {"class": 1, "score": pytest.approx(0.9), "box": pytest.approx([0.5, 0.52, 0.2, 0.2])},
        {"class": 0, "score": pytest.approx(0.8), "box": pytest.approx([0.52, 0.5, 0.2, 0.2])},
        {"class": 0, "score": pytest.approx(0.5), "box": pytest.approx([0.1, 0.1, 0.1, 0.1])}]


def test_nms_zero_objectness_swap_and_stable_ties() -> None:
    """Darknet swaps zero-objectness boxes to the end (permuting the others); ties keep order."""
    far = [[0.1, 0.1, 0.05, 0.05], [0.3, 0.3, 0.05, 0.05], [0.6, 0.6, 0.05, 0.05], [0.9, 0.9, 0.05, 0.05]]
    dets = [_det(far[0], 0.0, [0.0]), _det(far[1], 0.5, [0.5]), _det(far[2], 0.0, [0.0]),
            _det(far[3], 0.5, [0.5])]
    out = do_nms_sort(dets, 1, 0.45)
    assert [float(d.bbox[0]) for d in out] == pytest.approx([0.9, 0.3, 0.6, 0.1])


def test_nms_threshold_is_strict() -> None:
    a = _det([0.5, 0.5, 0.2, 0.2], 1, [0.9])
    b = _det([0.6, 0.5, 0.2, 0.2], 1, [0.8])        # IoU exactly 1/3 in float
    iou = float(box_iou(a.bbox, b.bbox[None])[0])
    assert [float(d.prob[0]) for d in do_nms_sort([a, b], 1, iou)] == pytest.approx([0.9, 0.8])
    assert [float(d.prob[0]) for d in do_nms_sort([a, b], 1, iou * 0.999)] == pytest.approx([0.9, 0.0])


# ------------------------------------------------------------------------------------------
# Decode + NMS against Darknet, on Darknet's own head inputs
# ------------------------------------------------------------------------------------------

# Runs in a child process (libdarknet.so switches on FTZ/DAZ where it is loaded): Darknet's
# letterbox, forward, head inputs, then get_network_boxes and do_nms_sort, every detection dumped.
DARKNET_BOXES = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from d2c.darknet.runtime import DarknetNet
    cfg, weights, image, thresh, nms, out = sys.argv[1:7]
    net = DarknetNet(cfg, weights, batch=1, quiet=True)
    import cv2
    im_h, im_w = cv2.imread(image).shape[:2]
    net.forward(net.letterbox(image)[None])
    dll, n = net.lib.dll, net.net
    heads = {}
    for i in range(net.n_layers):
        if net.layer_info(i)["type"] in ("YOLO", "REGION"):
            heads[f"head{i}"] = net.layer_output(i - 1)
    classes = int(n.layers[n.n - 1].classes)
    count = ctypes.c_int(0)
    dets = dll.get_network_boxes(net._net, im_w, im_h, float(thresh), 0.5, None, 1, ctypes.byref(count))
    def dump(tag):
        k = count.value
        heads[tag + "_bbox"] = np.array([[dets[i].bbox.x, dets[i].bbox.y, dets[i].bbox.w, dets[i].bbox.h]
                                         for i in range(k)], np.float32).reshape(k, 4)
        heads[tag + "_obj"] = np.array([dets[i].objectness for i in range(k)], np.float32)
        heads[tag + "_classes"] = np.array([dets[i].classes for i in range(k)], np.int64)
        heads[tag + "_prob"] = np.array([[dets[i].prob[c] for c in range(classes)] for i in range(k)],
                                        np.float32).reshape(k, classes)
    dump("raw")
    dll.do_nms_sort(dets, count.value, classes, float(nms))
    dump("nms")
    heads["size"] = np.array([im_w, im_h])
    np.savez(out, **heads)
""")


def _darknet_boxes(cfg: Path, weights: Path, image: Path, thresh: float, nms: float, out: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", DARKNET_BOXES, str(cfg), str(weights), str(image), str(thresh),
                           str(nms), str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


MAX_WH_ULPS = 2


def _ulps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance in float32 units in the last place (same-sign finite values)."""
    ia = np.asarray(a, F32).view(np.int32).astype(np.int64)
    ib = np.asarray(b, F32).view(np.int32).astype(np.int64)
    return np.abs(ia - ib)


def _assert_same_detections(ours: list[Detection], ref: dict, tag: str) -> None:
    assert len(ours) == len(ref[f"{tag}_obj"])
    if not ours:
        return
    boxes = np.stack([d.bbox for d in ours])
    assert_array_equal(np.array([d.classes for d in ours]), ref[f"{tag}_classes"])
    assert_array_equal(np.array([d.objectness for d in ours]), ref[f"{tag}_obj"])
    assert_array_equal(np.stack([d.prob for d in ours]), ref[f"{tag}_prob"])
    assert_array_equal(boxes[:, :2], ref[f"{tag}_bbox"][:, :2])
    # w, h: Debian's -Ofast computes (float)net/new with rcpps + Newton (CPU-dependent), so the
    # scale factor can be 1 ulp off, which moves the product by at most 2 ulp.
    assert _ulps(boxes[:, 2:], ref[f"{tag}_bbox"][:, 2:]).max() <= MAX_WH_ULPS


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("yolov3-tiny")
    convert(TINY_CFG, TINY_WEIGHTS, out)
    return out


@pytest.fixture(scope="module")
def region_models(tmp_path_factory) -> dict[str, tuple[Path, Path, Path]]:
    """yolov2-tiny-voc (20 classes, scalar softmax) and yolov2-tiny (80, vector softmax), random weights."""
    models = {}
    for name in ("yolov2-tiny-voc", "yolov2-tiny"):
        out = tmp_path_factory.mktemp(name)
        cfg = SYS_CFG / f"{name}.cfg"
        graph = load_graph(cfg)
        weights = out / f"{name}.weights"
        write_weights(weights, WeightsHeader(), graph, random_weights(graph, seed=3))
        convert(cfg, weights, out / "model")
        models[name] = (cfg, weights, out / "model")
    return models


@pytest.mark.parametrize("thresh", [0.25, 0.0625])
@pytest.mark.parametrize("image", IMAGES, ids=IMAGE_IDS)
def test_yolo_decode_bit_exact_vs_darknet(tiny_model: Path, tmp_path: Path, image: Path, thresh: float) -> None:
    ref = _darknet_boxes(TINY_CFG, TINY_WEIGHTS, image, thresh, 0.45, tmp_path / "ref.npz")
    files = load_model_files(tiny_model)
    outputs = {h["blob"]: ref[f"head{h['index']}"] for h in files.sidecar["heads"]}
    im_w, im_h = (int(v) for v in ref["size"])
    dets = decode_heads(outputs, files.sidecar, im_w, im_h, thresh, 0.5)
    _assert_same_detections(dets, ref, "raw")
    _assert_same_detections(do_nms_sort(dets, files.classes, 0.45), ref, "nms")


@pytest.mark.parametrize("image", [DOG, DATA / "scream.jpg", DATA / "kite.jpg"], ids=["dog", "scream", "kite"])
@pytest.mark.parametrize("name", ["yolov2-tiny-voc", "yolov2-tiny"])
def test_region_decode_vs_darknet(region_models, tmp_path: Path, name: str, image: Path) -> None:
    cfg, weights, model = region_models[name]
    thresh = 0.25
    ref = _darknet_boxes(cfg, weights, image, thresh, 0.45, tmp_path / "ref.npz")
    files = load_model_files(model)
    outputs = {h["blob"]: ref[f"head{h['index']}"] for h in files.sidecar["heads"]}
    dets = decode_heads(outputs, files.sidecar, *(int(v) for v in ref["size"]), thresh, 0.5)
    if name == "yolov2-tiny-voc":
        # <= 30 classes: Darknet's scalar softmax, reproduced bit for bit.
        _assert_same_detections(dets, ref, "raw")
        _assert_same_detections(do_nms_sort(dets, files.classes, 0.45), ref, "nms")
        return
    # 80 classes: Darknet's softmax uses libmvec's vector expf (ulp-level differences).
    assert len(dets) == len(ref["raw_obj"])
    assert_array_equal([d.classes for d in dets], ref["raw_classes"])
    assert_array_equal([d.objectness for d in dets], ref["raw_obj"])
    assert_allclose(np.stack([d.prob for d in dets]), ref["raw_prob"], rtol=1e-6, atol=1e-9)
    assert_allclose(np.stack([d.bbox for d in dets]), ref["raw_bbox"], rtol=3e-7)


# ------------------------------------------------------------------------------------------
# The whole pipeline on the real engines
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def darknet_tiny():
    net = DarknetProcess(TINY_CFG, TINY_WEIGHTS, batch=1)
    yield net
    net.close()


def _cli_json(capsys, *argv: str) -> list[dict]:
    assert cli.main(["detect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("engine", ["caffe", "opencv"])
def test_detect_equals_darknet_on_every_image(tiny_model, darknet_tiny, capsys, engine: str) -> None:
    records = _cli_json(capsys, str(tiny_model), *map(str, IMAGES), "--engine", engine)
    assert [r["image"] for r in records] == [str(p) for p in IMAGES]
    worst_score = worst_box = 0.0
    total = 0
    for record, image in zip(records, IMAGES):
        theirs = darknet_tiny.detect(image, 0.25, 0.5, 0.45)
        ours = record["detections"]
        assert [d["class"] for d in ours] == [d["class"] for d in theirs], image.name
        for a, b in zip(ours, theirs):
            worst_score = max(worst_score, abs(a["score"] - b["score"]))
            worst_box = max(worst_box, float(np.abs(np.subtract(a["box"], b["box"])).max()))
        assert_allclose([d["score"] for d in ours], [d["score"] for d in theirs], atol=E2E_TOL, rtol=0)
        assert_allclose([d["box"] for d in ours], [d["box"] for d in theirs], atol=E2E_TOL, rtol=0)
        total += len(ours)
    assert total >= 20          # the sample images do have objects
    print(f"\n{engine}: {total} detections, max |score diff| {worst_score:.3g}, max |box diff| {worst_box:.3g}")


def test_engine_outputs_agree_with_darknet_heads(tiny_model, tmp_path) -> None:
    """The raw head inputs from Caffe and OpenCV equal Darknet's layer outputs closely."""
    ref = _darknet_boxes(TINY_CFG, TINY_WEIGHTS, DOG, 0.25, 0.45, tmp_path / "ref.npz")
    files = load_model_files(tiny_model)
    for engine in ("caffe", "opencv"):
        outs = run_model(tiny_model, DOG, engine)
        for head in files.sidecar["heads"]:
            theirs = ref[f"head{head['index']}"]
            assert outs[head["blob"]].shape == theirs.shape == (1, *head["shape"])
            assert_allclose(outs[head["blob"]], theirs, atol=2e-4, rtol=0, err_msg=engine)


# ------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------

def test_cli_json_shape(tiny_model, capsys) -> None:
    (record,) = _cli_json(capsys, str(tiny_model), str(DOG))
    assert (record["width"], record["height"]) == (768, 576) and record["engine"] == "caffe"
    names = {d["name"] for d in record["detections"]}
    assert {"dog", "bicycle", "truck"} <= names
    for det in record["detections"]:
        assert set(det) == {"class", "name", "score", "box", "box_px"}
        assert 0.25 < det["score"] <= 1 and len(det["box"]) == 4 and len(det["box_px"]) == 4


def test_cli_table_and_prototxt_model(tiny_model, capsys) -> None:
    assert cli.main(["detect", str(tiny_model / "yolov3-tiny.prototxt"), str(DOG), "--thresh", "0.5"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith(f"{DOG}: ")
    assert "bicycle" in out and "%" in out


def test_cli_writes_png(tiny_model, tmp_path, capsys) -> None:
    import cv2
    png = tmp_path / "x.png"
    assert cli.main(["detect", str(tiny_model), str(DOG), "-o", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn, original = cv2.imread(str(png)), cv2.imread(str(DOG))
    assert drawn.shape == original.shape
    assert (drawn != original).any(), "boxes were drawn"
    assert not list(tmp_path.glob(".*tmp")), "no temporary file left behind"
    outdir = tmp_path / "many"
    outdir.mkdir()
    assert cli.main(["detect", str(tiny_model), str(DOG), str(DATA / "horses.jpg"), "-o", str(outdir)]) == 0
    assert sorted(p.name for p in outdir.iterdir()) == ["dog.png", "horses.png"]


def test_cli_missing_image_exit_2(tiny_model, tmp_path, capsys) -> None:
    missing = tmp_path / "nope.jpg"
    assert cli.main(["detect", str(tiny_model), str(missing), "--json"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "nope.jpg" in lines[0] and "no such image" in lines[0]


def test_cli_bad_model_exit_2(tmp_path, capsys) -> None:
    assert cli.main(["detect", str(tmp_path), str(DOG)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no d2c sidecar" in err[0]
    (tmp_path / "m.json").write_text('{"d2c_sidecar": 1, "heads": []}')
    assert cli.main(["detect", str(tmp_path), str(DOG)]) == 2
    assert "malformed" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["caffe", "opencv"])
def test_cli_truncated_caffemodel_is_an_error_not_an_abort(tiny_model, tmp_path, capsys, engine) -> None:
    """pycaffe would CHECK-fail (abort the process) on these files; d2c reads them first."""
    for name in ("yolov3-tiny.prototxt", "yolov3-tiny.json"):
        (tmp_path / name).write_bytes((tiny_model / name).read_bytes())
    (tmp_path / "yolov3-tiny.caffemodel").write_bytes((tiny_model / "yolov3-tiny.caffemodel").read_bytes()[:3000])
    assert cli.main(["detect", str(tmp_path), str(DOG), "--engine", engine]) == 2
    assert "truncated" in capsys.readouterr().err
    (tmp_path / "yolov3-tiny.caffemodel").write_bytes((tiny_model / "yolov3-tiny.caffemodel").read_bytes())
    (tmp_path / "yolov3-tiny.prototxt").write_bytes(b"name: \"caf\xe9\"\n")
    assert cli.main(["detect", str(tmp_path), str(DOG), "--engine", engine]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_class_names(tmp_path) -> None:
    coco = class_names(80)
    assert coco[0] == "person" and coco[16] == "dog" and len(coco) == 80
    assert class_names(20)[11] == "dog"
    assert class_names(3) == ["0", "1", "2"]
    custom = tmp_path / "n.names"
    custom.write_text("cat\nbird\n\ndog\n")
    assert class_names(3, custom) == ["cat", "bird", "dog"]
    assert class_names(3, None, ["x", "y", "z"]) == ["x", "y", "z"]       # recorded at convert time
    for wrong in (2, 4):   # Darknet would mislabel (or read past its names array): refuse
        with pytest.raises(DatasetError, match=f"3 class name\\(s\\) but the model has {wrong} classes"):
            class_names(wrong, custom)
    with pytest.raises(DatasetError, match="missing.names"):
        class_names(3, tmp_path / "missing.names")


def test_engine_rejects_unknown_engine(tiny_model) -> None:
    with pytest.raises(D2CError, match="unknown engine"):
        Engine(load_model_files(tiny_model), "tensorrt")
