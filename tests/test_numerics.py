"""d2c.numerics: detect's decoding and the loss's are the same Darknet float expressions.

`d2c detect` and the training loss decode the same head outputs. Darknet evaluates one float
expression for each (logistic, scale_x_y's x*s + beta, the box), so the two must agree bit for
bit, not to a tolerance: random [yolo] heads (AlexeyAB scale_x_y incl. 1.05/1.1/1.2, new_coords,
pjreddie) and [region] heads (softmax or logistic, with and without background) of random grid
sizes go through `decode_heads` and through the loss's forward + box decode, and every box,
objectness and probability is compared by its bits.
"""
from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from d2c.detect import decode_heads
from d2c.head_params import RegionParams, YoloParams
from d2c.loss.region import region_forward
from d2c.loss.yolo import yolo_forward
from d2c.numerics import Box, box_iou, softmax_darknet, yolo_box

F32 = np.float32


def _sidecar(flavor: str, net: tuple[int, int], head: dict) -> dict:
    return {"d2c_sidecar": 1, "flavor": flavor, "heads": [head],
            "input": {"name": "data", "channels": 3, "width": net[0], "height": net[1]}}


def _loss_yolo_boxes(z: np.ndarray, p: YoloParams) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes, objectness, class scores) from the loss's forward, in detect's (row, col, anchor) order."""
    n, entries = p.n, 5 + p.classes
    _, _, lh, lw = z.shape
    o = yolo_forward(z, p).reshape(n, entries, lh, lw)
    jj, ii = np.meshgrid(np.arange(lh), np.arange(lw), indexing="ij")
    anchors = np.asarray(p.anchors, F32)
    mask = np.asarray(p.mask)
    boxes = yolo_box(o[:, 0], o[:, 1], o[:, 2], o[:, 3], ii[None], jj[None], lw, lh,
                     anchors[2 * mask][:, None, None], anchors[2 * mask + 1][:, None, None], p.net_w, p.net_h,
                     p.new_coords)
    order = lambda a: np.moveaxis(a, 0, -1).reshape(-1)   # noqa: E731  (anchor, row, col) -> cell-major
    stacked = np.stack([order(np.broadcast_to(v, o[:, 0].shape)) for v in boxes], axis=1)
    classes = np.stack([order(o[:, 5 + k]) for k in range(p.classes)], axis=1)
    return stacked, order(o[:, 4]), classes


YOLO_SCALES = [1.05, 1.1, 1.2]


@pytest.mark.parametrize("seed", range(24))
def test_yolo_decode_of_detect_equals_the_loss_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(seed)
    flavor = "pjreddie" if seed % 6 == 5 else "alexeyab"
    scale = YOLO_SCALES[seed % 3] if seed < 12 else float(rng.uniform(1.0, 2.0))
    new_coords = flavor == "alexeyab" and bool(rng.integers(0, 2))
    if flavor == "pjreddie":
        scale = 1.0
    classes = int(rng.integers(1, 12))
    total = int(rng.integers(1, 7))
    mask = sorted(rng.choice(total, size=int(rng.integers(1, total + 1)), replace=False).tolist())
    anchors = [float(F32(v)) for v in rng.uniform(2, 300, 2 * total)]
    lh, lw = int(rng.integers(1, 20)), int(rng.integers(1, 20))
    net = (int(rng.integers(1, 40)) * 32, int(rng.integers(1, 40)) * 32)
    z = rng.normal(0, 3, (1, len(mask) * (5 + classes), lh, lw)).astype(F32)
    if new_coords:   # the conv before such a head is logistic already: inputs in (0, 1)
        z = rng.uniform(0.01, 1.0, z.shape).astype(F32)
    head = {"index": 1, "kind": "yolo", "blob": "head", "shape": list(z.shape[1:]), "classes": classes,
            "mask": mask, "anchors": anchors, "num": total, "scale_x_y": scale, "new_coords": int(new_coords)}
    dets = decode_heads({"head": z}, _sidecar(flavor, net, head), net[0], net[1], thresh=0.0)

    p = YoloParams(classes=classes, mask=tuple(mask), anchors=tuple(anchors), net_w=net[0], net_h=net[1],
                   flavor=flavor, scale_x_y=scale, new_coords=new_coords)
    boxes, objectness, class_scores = _loss_yolo_boxes(z, p)
    keep = objectness > 0
    assert len(dets) == int(keep.sum()) > 0
    got = np.stack([d.bbox for d in dets])
    assert_array_equal(got.view(np.uint32), boxes[keep].view(np.uint32),
                       err_msg=f"flavor {flavor}, scale_x_y {scale}, new_coords {new_coords}, grid {lh}x{lw}")
    assert_array_equal(np.array([d.objectness for d in dets], F32).view(np.uint32),
                       objectness[keep].view(np.uint32))
    probs = objectness[keep, None] * class_scores[keep]
    probs = np.where(probs > 0, probs, F32(0))
    assert_array_equal(np.stack([d.prob for d in dets]).view(np.uint32), probs.view(np.uint32))


@pytest.mark.parametrize("seed", range(8))
def test_region_decode_of_detect_equals_the_loss_bit_for_bit(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    classes = int(rng.integers(1, 45))      # both softmax sums: sequential (<= 30) and 4 lanes
    num = int(rng.integers(1, 6))
    softmax, background = bool(seed % 2), bool(seed % 4 == 3)
    anchors = [float(F32(v)) for v in rng.uniform(0.3, 12, 2 * num)]
    lh, lw = int(rng.integers(1, 16)), int(rng.integers(1, 16))
    entries = 5 + classes
    z = rng.normal(0, 3, (1, num * entries, lh, lw)).astype(F32)
    head = {"index": 1, "kind": "region", "blob": "head", "shape": list(z.shape[1:]), "classes": classes,
            "coords": 4, "num": num, "anchors": anchors, "softmax": int(softmax), "background": int(background)}
    dets = decode_heads({"head": z}, _sidecar("pjreddie", (416, 416), head), 416, 416, thresh=-1.0)

    p = RegionParams(classes=classes, num=num, anchors=tuple(anchors), softmax=softmax, background=background)
    o = region_forward(z, p).reshape(num, entries, lh * lw)
    jj, ii = np.divmod(np.arange(lh * lw), lw)
    aw = np.asarray(anchors, F32)[0::2][:, None]
    ah = np.asarray(anchors, F32)[1::2][:, None]
    box = yolo_box(o[:, 0], o[:, 1], o[:, 2], o[:, 3], ii[None], jj[None], lw, lh, aw, ah, lw, lh)
    assert len(dets) == num * lh * lw
    got = np.stack([d.bbox for d in dets])
    want = np.stack([np.broadcast_to(v, (num, lh * lw)).reshape(-1) for v in box], axis=1)
    assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    scale = np.ones(num * lh * lw, F32) if background else o[:, 4].reshape(-1)
    assert_array_equal(np.array([d.objectness for d in dets], F32).view(np.uint32), scale.view(np.uint32))
    probs = scale[:, None] * o[:, 5:].transpose(0, 2, 1).reshape(-1, classes)
    assert_array_equal(np.stack([d.prob for d in dets]).view(np.uint32),
                       np.where(probs > -1, probs, F32(0)).astype(F32).view(np.uint32))


def test_softmax_darknet_sums_like_the_debian_build() -> None:
    """<= 30 entries: one sequential float sum; more: 4 interleaved lanes (l0+l2)+(l1+l3), then the tail."""
    z = np.array([[0.0], [1e-3], [2.0]], F32)
    e = np.exp(np.array([-2.0, 1e-3 - 2.0, 0.0])).astype(F32)
    total = F32(F32(e[0] + e[1]) + e[2])
    assert_array_equal(softmax_darknet(z)[:, 0], e * (F32(1) / total))
    z = np.random.default_rng(3).normal(0, 4, (37, 5)).astype(F32)
    e = np.exp((z - z.max(axis=0)).astype(np.float64)).astype(F32)
    lanes = [np.add.accumulate(e[k:36:4], dtype=F32)[-1] for k in range(4)]
    total = (lanes[0] + lanes[2]) + (lanes[1] + lanes[3])
    total = total + e[36]
    got = softmax_darknet(z)
    assert_array_equal(got, (e * (F32(1) / total)).astype(F32))
    assert np.all(np.abs(got.sum(axis=0) - 1) < 1e-6)
    assert_array_equal(softmax_darknet(z.T, axis=1), got.T)


def test_box_iou_darknet_order() -> None:
    a = Box(F32(0.5), F32(0.5), F32(0.2), F32(0.4))
    others = Box(np.array([0.5, 0.9, 0.55], F32), np.array([0.5, 0.5, 0.5], F32),
                 np.array([0.2, 0.2, 0.1], F32), np.array([0.4, 0.4, 0.4], F32))
    iou = box_iou(a, others)
    assert iou.dtype == F32
    assert_array_equal(iou[:2], [1.0, 0.0])
    assert abs(float(iou[2]) - 0.5) < 1e-6


def test_pjreddie_decode_ignores_alexeyab_keys_as_pjreddie_does() -> None:
    """A cfg forced to pjreddie may carry scale_x_y: pjreddie's parse_yolo never reads it."""
    z = np.random.default_rng(1).normal(0, 2, (1, 7, 3, 3)).astype(F32)
    head = {"index": 1, "kind": "yolo", "blob": "head", "shape": [7, 3, 3], "classes": 2, "mask": [0],
            "anchors": [10.0, 14.0], "num": 1, "scale_x_y": 1.2, "new_coords": 0, "iou_loss": "ciou"}
    plain = dict(head, scale_x_y=1.0)
    dets = decode_heads({"head": z}, _sidecar("pjreddie", (96, 96), head), 96, 96, thresh=0.0)
    same = decode_heads({"head": z}, _sidecar("pjreddie", (96, 96), plain), 96, 96, thresh=0.0)
    assert len(dets) == 9
    assert_array_equal(np.stack([d.bbox for d in dets]), np.stack([d.bbox for d in same]))
    scaled = decode_heads({"head": z}, _sidecar("alexeyab", (96, 96), head), 96, 96, thresh=0.0)
    assert not np.array_equal(np.stack([d.bbox for d in dets]), np.stack([d.bbox for d in scaled]))
