"""The [yolo] loss reference: invariants, hand-derived cases, AlexeyAB IoU losses by finite
differences, and bit-level agreement with the real Debian Darknet (section at the end)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from loss_helpers import assert_printed_stats, darknet, make_truth, sigmoid64  # noqa: F401  (darknet is a fixture)

from d2c.errors import ParamError
from d2c.numerics import Box, box_giou, box_iou, dx_box_iou, mag_array, mag_array_sq, seq_sum_f32
from d2c.loss.yolo import YoloParams, yolo_forward, yolo_grad, yolo_loss

ANCHORS = (10.0, 14.0, 23.0, 27.0, 37.0, 58.0, 81.0, 82.0, 135.0, 169.0, 344.0, 319.0)
F32 = np.float32


def params(**kw) -> YoloParams:
    base = dict(classes=2, mask=(3, 4, 5), anchors=ANCHORS, net_w=128, net_h=96)
    base.update(kw)
    return YoloParams(**base)


def truth_array(batch: int, boxes_per_image: list[list[tuple]], k: int = 90) -> np.ndarray:
    return make_truth(batch, boxes_per_image, k)


def best_anchor64(w: float, h: float, anchors=ANCHORS, net_w=128, net_h=96) -> int:
    """Independent float64 anchor search (shapes centred at the origin)."""
    best, idx = 0.0, 0
    for a in range(len(anchors) // 2):
        aw, ah = anchors[2 * a] / net_w, anchors[2 * a + 1] / net_h
        inter = min(aw, w) * min(ah, h)
        iou = inter / (aw * ah + w * h - inter)
        if iou > best:
            best, idx = iou, a
    return idx


def random_case(rng, b, n, classes, H, W, n_truth):
    z = rng.normal(0, 1.5, (b, n * (5 + classes), H, W)).astype(F32)
    boxes = []
    for _ in range(b):
        img = []
        for _ in range(rng.integers(0, n_truth + 1)):
            img.append((rng.uniform(0.02, 0.98), rng.uniform(0.02, 0.98), rng.uniform(0.05, 0.9),
                        rng.uniform(0.05, 0.9), rng.integers(0, classes)))
        boxes.append(img)
    return z, boxes


# ------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flavor, max_boxes, iou_norm", [("pjreddie", 90, 1.0), ("alexeyab", 200, 0.75)])
def test_flavor_defaults_and_json_round_trip(flavor, max_boxes, iou_norm) -> None:
    p = params(flavor=flavor)
    assert p.max_boxes == max_boxes and p.iou_normalizer == iou_norm
    encoded = json.dumps(p.to_json())  # strict JSON: no inf
    assert "Infinity" not in encoded
    assert YoloParams.from_json(json.loads(encoded)) == p


def test_alexeyab_json_round_trip_with_options() -> None:
    p = params(flavor="alexeyab", iou_loss="ciou", max_delta=5.0, scale_x_y=1.05, iou_thresh=0.213,
               label_smooth_eps=0.1, new_coords=True)
    assert YoloParams.from_json(json.loads(json.dumps(p.to_json()))) == p


@pytest.mark.parametrize("obj, fragment", [
    ({"classes": 2, "mask": [0], "anchors": [1, 2], "net_w": 8, "net_h": 8, "bogus": 1}, "'bogus'"),
    ({"mask": [0], "anchors": [1, 2], "net_w": 8, "net_h": 8}, "'classes'"),
    ({"classes": "2", "mask": [0], "anchors": [1, 2], "net_w": 8, "net_h": 8}, "'classes' expects an integer"),
    ({"classes": 2.0, "mask": [0], "anchors": [1, 2], "net_w": 8, "net_h": 8}, "'classes' expects an integer"),
    ({"classes": True, "mask": [0], "anchors": [1, 2], "net_w": 8, "net_h": 8}, "'classes' expects an integer"),
    ({"classes": 2, "mask": 0, "anchors": [1, 2], "net_w": 8, "net_h": 8}, "'mask' expects a list"),
    ({"classes": 2, "mask": [0], "anchors": [1, "x"], "net_w": 8, "net_h": 8}, "'anchors[1]' expects a number"),
    ({"classes": 2, "mask": [5], "anchors": [1, 2], "net_w": 8, "net_h": 8}, "'mask'"),
    ({"classes": 2, "mask": [0], "anchors": [1, 2, 3], "net_w": 8, "net_h": 8}, "'anchors'"),
    ({"classes": 2, "mask": [0], "anchors": [1, 2], "net_w": 8, "net_h": 8, "new_coords": 2}, "'new_coords'"),
    ({"classes": 2, "mask": [0], "anchors": [1, 2], "net_w": 8, "net_h": 8, "iou_loss": "giou"}, "AlexeyAB-only"),
    ({"classes": 2, "mask": [0], "anchors": [1, 2], "net_w": 8, "net_h": 8, "flavor": "v4"}, "'flavor'"),
    ({"classes": 2, "mask": [0], "anchors": [1, 2], "net_w": 8, "net_h": 8, "flavor": "alexeyab",
      "iou_loss": "eiou"}, "'iou_loss'"),
    ([1, 2], "JSON object"),
])
def test_from_json_is_strict(obj, fragment) -> None:
    with pytest.raises(ParamError) as info:
        YoloParams.from_json(obj)
    assert fragment in str(info.value)


def test_bad_inputs_raise_param_error() -> None:
    p = params()
    with pytest.raises(ParamError, match="channels"):
        yolo_loss(np.zeros((1, 20, 4, 4), F32), np.zeros((1, 450), F32), p)
    with pytest.raises(ParamError, match="4-D"):
        yolo_forward(np.zeros((21, 4, 4), F32), p)
    with pytest.raises(ParamError, match="images"):
        yolo_loss(np.zeros((2, 21, 4, 4), F32), np.zeros((1, 450), F32), p)
    with pytest.raises(ParamError, match="multiple of 5"):
        yolo_loss(np.zeros((1, 21, 4, 4), F32), np.zeros((1, 451), F32), p)
    with pytest.raises(ParamError, match="class id"):
        yolo_loss(np.zeros((1, 21, 4, 4), F32), truth_array(1, [[(0.5, 0.5, 0.3, 0.3, 2)]]), p)
    with pytest.raises(ParamError, match="non-finite"):
        yolo_loss(np.zeros((1, 21, 4, 4), F32), truth_array(1, [[(0.5, np.nan, 0.3, 0.3, 1)]]), p)
    with pytest.raises(ParamError, match="outside"):
        yolo_loss(np.zeros((1, 21, 4, 4), F32), truth_array(1, [[(0.5, 1.5, 0.9, 0.9, 1)]]), p)
    with pytest.raises(ParamError, match="numeric"):
        yolo_loss(np.zeros((1, 21, 4, 4), F32), [["a"] * 450], p)
    with pytest.raises(ParamError, match="batch"):
        yolo_grad(yolo_loss(np.zeros((1, 21, 4, 4), F32), np.zeros((1, 450), F32), p), 0)


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, classes, mask, H, W", [
    (1, 1, (0,), 1, 1), (2, 2, (3, 4, 5), 4, 6), (3, 80, (0, 1, 2), 5, 3), (1, 5, (1, 5), 7, 7)])
def test_forward_activates_xy_obj_classes_only(b, classes, mask, H, W) -> None:
    p = params(classes=classes, mask=mask)
    rng = np.random.default_rng(b * 100 + classes)
    z = rng.normal(0, 4, (b, len(mask) * (5 + classes), H, W)).astype(F32)
    o = yolo_forward(z, p).reshape(b, len(mask), 5 + classes, H, W)
    z5 = z.reshape(o.shape)
    # Debian: exp in double, then rounded to float -> bit-exact with this expression
    assert_array_equal(o[:, :, [0, 1]], sigmoid64(z5[:, :, [0, 1]]).astype(F32))
    assert_array_equal(o[:, :, 4:], sigmoid64(z5[:, :, 4:]).astype(F32))
    assert_array_equal(o[:, :, 2:4], z5[:, :, 2:4])


def test_alexeyab_forward_scale_x_y_and_new_coords() -> None:
    rng = np.random.default_rng(3)
    z = rng.normal(0, 2, (1, 21, 3, 3)).astype(F32)
    o = yolo_forward(z, params(flavor="alexeyab", scale_x_y=1.2)).reshape(1, 3, 7, 3, 3)
    s = sigmoid64(z.reshape(o.shape))
    assert_allclose(o[:, :, :2], 1.2 * s[:, :, :2] - 0.1, rtol=0, atol=3e-7)
    assert_allclose(o[:, :, 4:], s[:, :, 4:], rtol=0, atol=1.2e-7)
    o = yolo_forward(z, params(flavor="alexeyab", new_coords=True)).reshape(1, 3, 7, 3, 3)
    assert_array_equal(o, z.reshape(o.shape))  # no activation at all inside the layer


# ------------------------------------------------------------------------------------------
# Helpers of d2c.numerics
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 100, 1001])
def test_mag_array_matches_lane_emulation(n) -> None:
    rng = np.random.default_rng(n)
    a = rng.normal(0, 3, n).astype(F32)
    lanes = [F32(0)] * 4
    main = (n // 4) * 4 if n > 3 else 0
    for k in range(main):
        lanes[k % 4] = F32(lanes[k % 4] + a[k] * a[k])
    total = F32(F32(lanes[1] + lanes[3]) + F32(lanes[0] + lanes[2]))
    for k in range(main, n):
        total = F32(total + a[k] * a[k])
    assert mag_array(a) == F32(np.sqrt(total))
    assert_allclose(mag_array_sq(a), np.sum(a.astype(np.float64) ** 2), rtol=2e-6, atol=0)


def test_seq_sum_is_sequential() -> None:
    v = np.array([1.0, 1e8, -1e8, 1.0], F32)
    assert seq_sum_f32(v) == F32(1.0)   # ((1+1e8)-1e8)+1 in float = 0 + 1
    assert seq_sum_f32([]) == 0


def test_box_iou_darknet_order_and_degenerate_cases() -> None:
    a = Box(F32(0.5), F32(0.5), F32(0.2), F32(0.4))
    b = Box(F32(0.6), F32(0.5), F32(0.2), F32(0.2))
    assert_allclose(box_iou(a, b), 0.1 * 0.2 / (0.08 + 0.04 - 0.02), rtol=1e-6)
    far = Box(F32(0.9), F32(0.9), F32(0.1), F32(0.1))
    assert box_iou(a, far) == 0
    zero = Box(F32(0.5), F32(0.5), F32(0), F32(0))
    assert np.isnan(box_iou(zero, zero))                     # pjreddie: 0/0
    assert box_iou(zero, zero, zero_guard=True) == 0         # AlexeyAB guard


# ------------------------------------------------------------------------------------------
# pjreddie training branch: invariants
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("b, classes, mask, H, W, n_truth", [
    (1, 1, (0, 1, 2), 3, 3, 3), (2, 2, (3, 4, 5), 12, 16, 6), (3, 4, (0, 2, 4), 5, 7, 10),
    (2, 20, (5,), 6, 6, 4), (1, 3, (0, 1, 2, 3, 4, 5), 9, 4, 12)])
def test_deltas_are_zero_where_nothing_applies(b, classes, mask, H, W, n_truth) -> None:
    p = params(classes=classes, mask=mask)
    rng = np.random.default_rng(b + 10 * classes + H)
    z, boxes = random_case(rng, b, len(mask), classes, H, W, n_truth)
    r = yolo_loss(z, truth_array(b, boxes), p)
    n = len(mask)
    d = r.delta.reshape(b, n, 5 + classes, H, W)
    o = r.output.reshape(d.shape)
    assigned = np.zeros((b, n, H, W), bool)
    owned = 0
    for bi, img in enumerate(boxes):
        for (x, y, w, h, c) in img:
            a = best_anchor64(w, h)
            if a in mask:
                owned += 1
                assigned[bi, mask.index(a), int(F32(y) * F32(H)), int(F32(x) * F32(W))] = True
    other = ~assigned
    # box and class entries only at assigned cells (truth_thresh = 1 never fires)
    assert not np.any(d[:, :, 0:4][np.broadcast_to(other[:, :, None], d[:, :, 0:4].shape)])
    assert not np.any(d[:, :, 5:][np.broadcast_to(other[:, :, None], d[:, :, 5:].shape)])
    # objectness: 1 - o where assigned; 0 or -o elsewhere
    obj_d, obj_o = d[:, :, 4], o[:, :, 4]
    assert_array_equal(obj_d[assigned], F32(1) - obj_o[assigned])
    rest = obj_d[other]
    assert np.all((rest == 0) | (rest == -obj_o[other]))
    assert_allclose(r.cost, np.sum(r.delta.astype(np.float64) ** 2), rtol=1e-5)
    assert r.stats["count"] == owned
    assert_array_equal(yolo_grad(r, b), -r.delta / F32(b))
    assert r.delta.dtype == F32 and r.output.dtype == F32 and r.delta.shape == z.shape


@pytest.mark.parametrize("b, H, W", [(1, 1, 1), (2, 4, 5), (3, 13, 13)])
def test_empty_truth_only_noobj(b, H, W) -> None:
    p = params()
    rng = np.random.default_rng(H)
    z = rng.normal(0, 2, (b, 21, H, W)).astype(F32)
    r = yolo_loss(z, np.zeros((b, 450), F32), p)
    d = r.delta.reshape(b, 3, 7, H, W)
    o = r.output.reshape(d.shape)
    assert_array_equal(d[:, :, 4], -o[:, :, 4])
    assert not np.any(d[:, :, [0, 1, 2, 3, 5, 6]])
    assert_allclose(r.cost, np.sum(o[:, :, 4].astype(np.float64) ** 2), rtol=1e-5)
    assert r.stats["count"] == 0
    for key in ("avg_iou", "class", "obj", "recall50", "recall75"):
        assert math.isnan(r.stats[key])  # Darknet prints -nan
    assert_allclose(r.stats["no_obj"], o[:, :, 4].mean(), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# pjreddie: hand-derived cases
# ------------------------------------------------------------------------------------------

def test_one_truth_one_cell_by_hand() -> None:
    """z = 0 everywhere: o = 0.5 for x, y, obj, classes and raw 0 for w, h."""
    p = params(classes=3, mask=(3, 4, 5), ignore_thresh=0.99)
    H, W = 2, 4
    z = np.zeros((1, 3 * 8, H, W), F32)
    x, y, w, h, c = 0.8, 0.3, 0.7, 0.9, 2          # w*128 = 89.6, h*96 = 86.4 -> anchor 3 (81x82)
    assert best_anchor64(w, h) == 3
    r = yolo_loss(z, truth_array(1, [[(x, y, w, h, c)]]), p)
    d = r.delta.reshape(1, 3, 8, H, W)
    i, j = int(x * W), int(y * H)                   # 3, 0
    s = 2 - w * h
    expect_box = [s * (x * W - i - 0.5), s * (y * H - j - 0.5),
                  s * math.log(w * 128 / 81), s * math.log(h * 96 / 82)]
    assert_allclose(d[0, 0, 0:4, j, i], expect_box, rtol=2e-6)
    assert_allclose(d[0, 0, 4, j, i], 0.5)
    assert_allclose(d[0, 0, 5:, j, i], [-0.5, -0.5, 0.5])
    # every other objectness is -0.5 (ignore_thresh 0.99 is never exceeded), rest 0
    obj = d[0, :, 4].copy()
    obj[0, j, i] = 0
    assert np.count_nonzero(obj == -0.5) == 3 * H * W - 1
    assert np.count_nonzero(d) == 4 + 1 + 3 + 3 * H * W - 1
    # IoU of the z=0 prediction (cell centre, anchor size) with the truth, by hand
    px, py, pw, ph = (i + 0.5) / W, (j + 0.5) / H, 81 / 128, 82 / 96
    ow = min(px + pw / 2, x + w / 2) - max(px - pw / 2, x - w / 2)
    oh = min(py + ph / 2, y + h / 2) - max(py - ph / 2, y - h / 2)
    iou = ow * oh / (pw * ph + w * h - ow * oh)
    assert_allclose(r.stats["avg_iou"], iou, rtol=1e-6)
    assert r.stats["count"] == 1 and r.stats["obj"] == 0.5 and r.stats["class"] == 0.5
    assert r.stats["recall50"] == float(iou > 0.5) and r.stats["recall75"] == float(iou > 0.75)
    assert_allclose(r.cost, sum(v * v for v in expect_box) + 0.25 + 3 * 0.25 + (3 * H * W - 1) * 0.25, rtol=1e-6)


def test_ignore_thresh_zeroes_noobj_for_overlapping_predictions() -> None:
    H, W = 2, 4
    z = np.zeros((1, 21, H, W), F32)
    truth = truth_array(1, [[(0.8, 0.3, 0.7, 0.9, 1)]])
    strict = yolo_loss(z, truth, params(ignore_thresh=0.99)).delta.reshape(1, 3, 7, H, W)
    loose = yolo_loss(z, truth, params(ignore_thresh=0.05)).delta.reshape(1, 3, 7, H, W)
    changed = (strict[:, :, 4] != loose[:, :, 4])
    assert changed.any()
    assert np.all(loose[:, :, 4][changed] == 0)


def test_two_truths_same_cell_overwrite_box_and_multilabel_class() -> None:
    p = params(classes=3)
    H, W = 3, 3
    rng = np.random.default_rng(5)
    z = rng.normal(0, 1, (1, 24, H, W)).astype(F32)
    first = (0.5, 0.5, 0.7, 0.9, 0)
    second = (0.45, 0.55, 0.72, 0.88, 2)            # same cell (1, 1), same anchor 3
    both = yolo_loss(z, truth_array(1, [[first, second]]), p).delta.reshape(1, 3, 8, H, W)
    only2 = yolo_loss(z, truth_array(1, [[second]]), p).delta.reshape(1, 3, 8, H, W)
    o = yolo_forward(z, p).reshape(1, 3, 8, H, W)
    assert_array_equal(both[0, 0, 0:4, 1, 1], only2[0, 0, 0:4, 1, 1])  # box target overwritten
    # class-0 entry already non-zero -> second truth only sets its own class
    assert_array_equal(both[0, 0, 5:, 1, 1], [1 - o[0, 0, 5, 1, 1], -o[0, 0, 6, 1, 1], 1 - o[0, 0, 7, 1, 1]])


def test_class0_test_quirk_resets_vector_when_class0_delta_is_zero() -> None:
    """pjreddie looks at δ of class 0: if the first truth is class 0 and o_0 == 1 exactly, δ_0 = 0,
    so the second truth rewrites the whole class vector (δ_0 becomes −1)."""
    H, W = 1, 1
    z = np.zeros((1, 3 * 7, H, W), F32)
    z[0, 5] = 40.0                                      # slot 0, class 0 -> sigmoid == 1.0f
    first, second = (0.5, 0.5, 0.7, 0.9, 0), (0.5, 0.5, 0.7, 0.9, 1)
    d = yolo_loss(z, truth_array(1, [[first, second]]), params()).delta.reshape(1, 3, 7)
    assert_array_equal(d[0, 0, 5:], [-1.0, 0.5])
    # AlexeyAB looks at the truth's own class entry (δ_1 = −0.5 ≠ 0): only δ_1 is set.
    d = yolo_loss(z, truth_array(1, [[first, second]]), params(flavor="alexeyab")).delta.reshape(1, 3, 7)
    assert_array_equal(d[0, 0, 5:], [0.0, 0.5])


def test_truth_on_unmasked_anchor_is_ignored_by_this_layer() -> None:
    z = np.zeros((1, 21, 4, 4), F32)
    small = (0.5, 0.5, 0.08, 0.14, 1)                   # best anchor 0, not in mask (3, 4, 5)
    assert best_anchor64(0.08, 0.14) == 0
    r = yolo_loss(z, truth_array(1, [[small]]), params(ignore_thresh=0.99))
    d = r.delta.reshape(1, 3, 7, 4, 4)
    assert not np.any(d[:, :, [0, 1, 2, 3, 5, 6]])
    assert r.stats["count"] == 0


@pytest.mark.parametrize("x, W, cell", [(0.5, 4, 2), (0.25, 4, 1), (0.75, 8, 6), (1 / 3, 3, 1)])
def test_box_on_cell_border_uses_truncation(x, W, cell) -> None:
    z = np.zeros((1, 21, 2, W), F32)
    r = yolo_loss(z, truth_array(1, [[(x, 0.5, 0.7, 0.9, 0)]]), params())
    d = r.delta.reshape(1, 3, 7, 2, W)
    xs = np.flatnonzero(d[0, 0, 5, 1, :])
    assert list(xs) == [int(F32(x) * F32(W))] == [cell]
    assert_allclose(d[0, 0, 0, 1, cell], (2 - 0.63) * (F32(x) * F32(W) - cell - 0.5), rtol=1e-6)


def test_list_ends_at_first_zero_x() -> None:
    z = np.zeros((1, 21, 4, 4), F32)
    keep = (0.3, 0.3, 0.7, 0.9, 0)
    after = (0.8, 0.8, 0.7, 0.9, 1)
    a = yolo_loss(z, truth_array(1, [[keep, (0, 0.5, 0.5, 0.5, 0), after]]), params())
    b = yolo_loss(z, truth_array(1, [[keep]]), params())
    assert_array_equal(a.delta, b.delta)
    assert a.stats["count"] == 1


def test_max_boxes_limits_and_reads_past_record_like_darknet() -> None:
    rng = np.random.default_rng(9)
    z = rng.normal(0, 1, (2, 21, 6, 6)).astype(F32)
    big = [(rng.uniform(0.05, 0.95), rng.uniform(0.05, 0.95), 0.7, 0.9, 1) for _ in range(90)]
    other = [(0.5, 0.5, 0.72, 0.88, 0)]
    t = truth_array(2, [big, other])
    r90 = yolo_loss(z, t, params())
    assert r90.stats["count"] == 91
    r3 = yolo_loss(z, t, params(max_boxes=3))
    assert r3.stats["count"] == 4
    # max 91 > 90: image 0 reads box 0 of image 1's record as its 91st box (flat buffer)
    r91 = yolo_loss(z, t, params(max_boxes=91))
    assert r91.stats["count"] == 92
    # a (b, K, 5) record gives the same as (b, K*5)
    assert_array_equal(yolo_loss(z, t.reshape(2, 90, 5), params()).delta, r90.delta)


def test_truth_thresh_below_one_trains_overlapping_predictions() -> None:
    H, W = 2, 4
    z = np.zeros((1, 21, H, W), F32)
    truth = truth_array(1, [[(0.3, 0.3, 0.7, 0.9, 1)]])
    p = params(ignore_thresh=0.3, truth_thresh=0.4)
    r = yolo_loss(z, truth, p)
    d = r.delta.reshape(1, 3, 7, H, W)
    o = r.output.reshape(d.shape)
    base = yolo_loss(z, truth, params(ignore_thresh=0.3))
    # cells whose prediction overlaps the truth by > 0.4 now have obj δ = 1 − o and a class vector
    extra = (d[:, :, 4] == F32(1) - o[:, :, 4]) & (base.delta.reshape(d.shape)[:, :, 4] == 0)
    assert extra.any()
    for s, j, i in zip(*np.nonzero(extra[0])):
        assert_array_equal(d[0, s, 5:, j, i], [-0.5, 0.5])
        assert np.all(d[0, s, 0:4, j, i] != 0)
    assert r.stats["count"] == base.stats["count"]     # statistics come from truths only


# ------------------------------------------------------------------------------------------
# AlexeyAB: IoU-loss derivatives by finite differences
# ------------------------------------------------------------------------------------------

def _central(f, x0: np.ndarray, k: int, eps: float = 1e-6) -> float:
    xp = x0.copy()
    xm = x0.copy()
    xp[k] += eps
    xm[k] -= eps
    return (f(xp) - f(xm)) / (2 * eps)


def _iou64(v, t):
    return float(box_iou(Box(*v), Box(*t), zero_guard=True))


def _giou64(v, t):
    return float(box_giou(Box(*v), Box(*t)))


def _r64(v, t):
    """Distance term R = ρ²/c² of DIoU (exponent 1, as its gradient uses)."""
    x, y, w, h = v
    tx, ty, tw, th = t
    cw = max(x + w / 2, tx + tw / 2) - min(x - w / 2, tx - tw / 2)
    ch = max(y + h / 2, ty + th / 2) - min(y - h / 2, ty - th / 2)
    return ((x - tx) ** 2 + (y - ty) ** 2) / (cw * cw + ch * ch)


def _v64(v, t):
    return 4 / math.pi ** 2 * (math.atan(t[2] / t[3]) - math.atan(v[2] / v[3])) ** 2


def _overlapping_pairs(seed: int, count: int):
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        t = np.array([rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.1, 0.5), rng.uniform(0.1, 0.5)])
        p = t + rng.normal(0, 0.08, 4)
        p[2:] = np.abs(p[2:]) + 0.02
        edges_p = [p[0] - p[2] / 2, p[0] + p[2] / 2, p[1] - p[3] / 2, p[1] + p[3] / 2]
        edges_t = [t[0] - t[2] / 2, t[0] + t[2] / 2, t[1] - t[3] / 2, t[1] + t[3] / 2]
        iw = min(edges_p[1], edges_t[1]) - max(edges_p[0], edges_t[0])
        ih = min(edges_p[3], edges_t[3]) - max(edges_p[2], edges_t[2])
        if iw > 1e-3 and ih > 1e-3 and min(abs(a - b) for a, b in zip(edges_p, edges_t)) > 1e-3:
            out.append((p, t))
    return out


@pytest.mark.parametrize("p, t", _overlapping_pairs(1, 12))
def test_dx_box_iou_iou_and_giou_are_exact_derivatives(p, t) -> None:
    """dx, dy = ∂J/∂x, ∂J/∂y; dw, dh = 2·∂J/∂w, 2·∂J/∂h ("not divided by 2") for J = IoU, GIoU."""
    for kind, J in (("iou", _iou64), ("giou", _giou64)):
        got = dx_box_iou(Box(*p), Box(*t), kind)
        fd = [_central(lambda v: J(v, t), p, k) for k in range(4)]
        assert_allclose([float(g) for g in got], [fd[0], fd[1], 2 * fd[2], 2 * fd[3]], rtol=1e-6, atol=1e-8)


def _c64(v, t):
    """Squared diagonal of the enclosing box (DIoU's c²)."""
    x, y, w, h = v
    tx, ty, tw, th = t
    cw = max(x + w / 2, tx + tw / 2) - min(x - w / 2, tx - tw / 2)
    ch = max(y + h / 2, ty + th / 2) - min(y - h / 2, ty - th / 2)
    return cw * cw + ch * ch


def _s64(v, t):
    return (v[0] - t[0]) ** 2 + (v[1] - t[1]) ** 2


@pytest.mark.parametrize("p, t", _overlapping_pairs(2, 12))
def test_dx_box_iou_diou_ciou_components(p, t) -> None:
    """What AlexeyAB's DIoU/CIoU delta is, term by term (R = S/c², S = ρ²):
    - size: 2·∂IoU − ∂R, exact;
    - centre: ∂IoU − ∂S/c² − S·∂(c²)/c⁴. The true −∂R has +S·∂(c²)/c⁴: AlexeyAB flips the sign of
      the enclosing-box term, so the centre delta is the DIoU derivative only where c² does not
      depend on the centre (documented, not exact in general);
    - ciou adds α·(w²+h²)·(−∂v) to the size: AlexeyAB drops the 1/(w²+h²) factor of ∂v (α held
      constant), so its size delta is not a derivative of CIoU either."""
    iou_fd = [_central(lambda v: _iou64(v, t), p, k) for k in range(4)]
    r_fd = [_central(lambda v: _r64(v, t), p, k) for k in range(4)]
    s_fd = [_central(lambda v: _s64(v, t), p, k) for k in range(2)]
    c_fd = [_central(lambda v: _c64(v, t), p, k) for k in range(2)]
    S, C = _s64(p, t), _c64(p, t)
    got = [float(g) for g in dx_box_iou(Box(*p), Box(*t), "diou")]
    centre = [iou_fd[k] - s_fd[k] / C - S * c_fd[k] / C ** 2 for k in range(2)]
    assert_allclose(got, centre + [2 * iou_fd[2] - r_fd[2], 2 * iou_fd[3] - r_fd[3]], rtol=1e-6, atol=1e-8)
    true_centre = [iou_fd[k] - r_fd[k] for k in range(2)]
    for k in range(2):  # equal to the true derivative exactly when c² does not move with the centre
        assert (abs(got[k] - true_centre[k]) < 1e-6) == (abs(c_fd[k]) < 1e-9)
    v_fd = [_central(lambda v: _v64(v, t), p, k) for k in (2, 3)]
    iou = _iou64(p, t)
    v = _v64(p, t)
    alpha = v / (1 - iou + v + 1e-6)
    s = p[2] ** 2 + p[3] ** 2
    got_c = [float(g) for g in dx_box_iou(Box(*p), Box(*t), "ciou")]
    assert_allclose(got_c[:2], got[:2], rtol=1e-12)
    assert_allclose(got_c[2:], [got[2] - alpha * s * v_fd[0], got[3] - alpha * s * v_fd[1]], rtol=1e-6, atol=1e-8)


def test_dx_box_iou_diou_without_overlap_keeps_only_the_distance_term() -> None:
    p = np.array([0.2, 0.3, 0.1, 0.15])
    t = np.array([0.7, 0.6, 0.2, 0.1])
    got = [float(g) for g in dx_box_iou(Box(*p), Box(*t), "diou")]
    r_fd = [_central(lambda v: _r64(v, t), p, k) for k in range(4)]
    s_fd = [_central(lambda v: _s64(v, t), p, k) for k in range(2)]
    c_fd = [_central(lambda v: _c64(v, t), p, k) for k in range(2)]
    S, C = _s64(p, t), _c64(p, t)
    expect = [-s_fd[k] / C - S * c_fd[k] / C ** 2 for k in range(2)] + [-r_fd[2], -r_fd[3]]
    assert_allclose(got, expect, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("iou_loss", ["iou", "giou"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_alexeyab_layer_box_delta_is_scaled_objective_gradient(iou_loss, seed) -> None:
    """In the layer, δ_x = iou_normalizer·W·∂J/∂o_x and δ_w = iou_normalizer·2·(net_w/anchor)·∂J/∂o_w
    for J = IoU or GIoU and o the layer output: AlexeyAB differentiates w.r.t. the decoded box
    (x relative to the image, so no 1/W), applies exp(o_w) but not anchor/net_w, and doubles w, h."""
    rng = np.random.default_rng(seed)
    H, W, net_w, net_h = 3, 4, 128, 96
    p = params(flavor="alexeyab", iou_loss=iou_loss, iou_normalizer=0.5)
    x, y, w, h = 0.55, 0.45, 0.7, 0.9          # anchor 3 (81x82), cell (i=2, j=1)
    i, j = int(F32(x) * F32(W)), int(F32(y) * F32(H))
    z = np.zeros((1, 21, H, W), F32)
    z[0, 0:4, j, i] = rng.normal(0, 0.3, 4)
    r = yolo_loss(z, truth_array(1, [[(x, y, w, h, 0)]], k=200), p)
    o = r.output.reshape(1, 3, 7, H, W)[0, 0, 0:4, j, i].astype(np.float64)
    d = r.delta.reshape(1, 3, 7, H, W)[0, 0, 0:4, j, i]
    t = np.array([x, y, w, h], np.float64)
    t32 = t.astype(F32).astype(np.float64)

    def decode(ov):
        return np.array([(i + ov[0]) / W, (j + ov[1]) / H, math.exp(ov[2]) * 81 / net_w, math.exp(ov[3]) * 82 / net_h])

    def objective(ov, size_factor):
        b = decode(ov)
        return size_factor * (_giou64(b, t32) if iou_loss == "giou" else _iou64(b, t32))

    fd_xy = [_central(lambda v: objective(v, 1.0), o, k, 1e-5) for k in (0, 1)]
    fd_wh = [_central(lambda v: objective(v, 2.0), o, k, 1e-5) for k in (2, 3)]
    expect = [0.5 * W * fd_xy[0], 0.5 * H * fd_xy[1], 0.5 * net_w / 81 * fd_wh[0], 0.5 * net_h / 82 * fd_wh[1]]
    assert_allclose(d, expect, rtol=2e-3, atol=2e-6)


# ------------------------------------------------------------------------------------------
# AlexeyAB: other differences from pjreddie
# ------------------------------------------------------------------------------------------

def test_alexeyab_mse_box_delta_is_scaled_and_accumulated() -> None:
    H, W = 3, 3
    rng = np.random.default_rng(4)
    z = rng.normal(0, 1, (1, 21, H, W)).astype(F32)
    one = (0.5, 0.5, 0.7, 0.9, 0)
    two = (0.45, 0.55, 0.72, 0.88, 1)
    pj = yolo_loss(z, truth_array(1, [[one]]), params()).delta.reshape(1, 3, 7, H, W)
    pj2 = yolo_loss(z, truth_array(1, [[two]]), params()).delta.reshape(1, 3, 7, H, W)
    ab = yolo_loss(z, truth_array(1, [[one, two]], k=200), params(flavor="alexeyab")).delta.reshape(1, 3, 7, H, W)
    assert_allclose(ab[0, 0, 0:4, 1, 1], 0.75 * (pj[0, 0, 0:4, 1, 1] + pj2[0, 0, 0:4, 1, 1]), rtol=1e-6)


def test_alexeyab_ignore_rule_needs_a_confident_class() -> None:
    H, W = 2, 4
    z = np.zeros((1, 21, H, W), F32)
    z[0, [5, 6, 12, 13, 19, 20]] = -3.0                   # every class prob ≈ 0.047 < 0.25
    truth = truth_array(1, [[(0.3, 0.3, 0.7, 0.9, 1)]], k=200)
    pj = yolo_loss(z, truth, params(ignore_thresh=0.05)).delta.reshape(1, 3, 7, H, W)
    ab = yolo_loss(z, truth, params(flavor="alexeyab", ignore_thresh=0.05)).delta.reshape(1, 3, 7, H, W)
    o = yolo_forward(z, params()).reshape(1, 3, 7, H, W)
    ignored_pj = (pj[:, :, 4] == 0)
    assert ignored_pj.any()
    assigned = (ab[:, :, 4] > 0)
    assert_array_equal(ab[:, :, 4][~assigned], -o[:, :, 4][~assigned])   # nothing ignored
    z[0, 5] = 3.0                                                       # slot 0 class 0 now confident
    ab2 = yolo_loss(z, truth, params(flavor="alexeyab", ignore_thresh=0.05)).delta.reshape(1, 3, 7, H, W)
    assert np.any((ab2[0, 0, 4] == 0) & ignored_pj[0, 0])


def test_alexeyab_iou_thresh_adds_anchors_and_averages() -> None:
    H, W = 2, 2
    z = np.zeros((1, 21, H, W), F32)
    truth = truth_array(1, [[(0.3, 0.3, 0.7, 0.9, 1)]], k=200)
    base = yolo_loss(z, truth, params(flavor="alexeyab"))
    more = yolo_loss(z, truth, params(flavor="alexeyab", iou_thresh=0.2))
    assert more.stats["count"] > base.stats["count"] == 1
    d = more.delta.reshape(1, 3, 7, H, W)
    trained = np.flatnonzero(d[0, :, 4, 0, 0] > 0)
    assert len(trained) == more.stats["count"]
    # one positive class per cell -> averaging divides by 1: the original slot is unchanged
    assert_array_equal(d[0, 0, 0:4, 0, 0], base.delta.reshape(1, 3, 7, H, W)[0, 0, 0:4, 0, 0])


def test_alexeyab_max_delta_label_smoothing_and_new_coords() -> None:
    H, W = 2, 2
    z = np.zeros((1, 21, H, W), F32)
    truth = truth_array(1, [[(0.3, 0.3, 0.7, 0.9, 1)]], k=200)
    free = yolo_loss(z, truth, params(flavor="alexeyab", iou_loss="giou")).delta.reshape(1, 3, 7, H, W)
    d = yolo_loss(z, truth, params(flavor="alexeyab", iou_loss="giou", max_delta=0.5)).delta.reshape(1, 3, 7, H, W)
    big = np.abs(free[0, 0, 0:4, 0, 0]) > 0.5
    assert big.any() and not big.all()
    assert_array_equal(d[0, 0, 0:4, 0, 0], np.where(big, np.sign(free[0, 0, 0:4, 0, 0]) * F32(0.5),
                                                    free[0, 0, 0:4, 0, 0]))
    d = yolo_loss(z, truth, params(flavor="alexeyab", label_smooth_eps=0.2)).delta.reshape(1, 3, 7, H, W)
    assert_allclose(d[0, 0, 5:, 0, 0], [0.1 - 0.5, 0.9 - 0.5], rtol=1e-6)
    zc = np.full((1, 21, H, W), 0.5, F32)
    d = yolo_loss(zc, truth, params(flavor="alexeyab", new_coords=True, iou_normalizer=1.0)).delta.reshape(1, 3, 7, H, W)
    s = 2 - 0.7 * 0.9
    assert_allclose(d[0, 0, 2:4, 0, 0], [s * (math.sqrt(0.7 * 128 / (4 * 81)) - 0.5),
                                          s * (math.sqrt(0.9 * 96 / (4 * 82)) - 0.5)], rtol=1e-6, atol=2e-7)


def test_alexeyab_cost_for_iou_losses() -> None:
    rng = np.random.default_rng(8)
    z = rng.normal(0, 1, (2, 21, 3, 3)).astype(F32)
    truth = truth_array(2, [[(0.5, 0.5, 0.7, 0.9, 0), (0.2, 0.8, 0.6, 0.6, 1)], [(0.6, 0.4, 0.8, 0.7, 1)]], k=200)
    r = yolo_loss(z, truth, params(flavor="alexeyab", iou_loss="giou", obj_normalizer=0.5))
    d = r.delta.reshape(2, 3, 7, 3, 3).astype(np.float64)
    class_loss = 0.5 * np.sum(d[:, :, 4:] ** 2)
    assert_allclose(r.cost, 0.75 * r.stats["giou_loss_sum"] / r.stats["count"] + class_loss, rtol=1e-5)
    r = yolo_loss(z, truth, params(flavor="alexeyab"))
    assert_allclose(r.cost, np.sum(r.delta.astype(np.float64) ** 2), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Against the real Darknet (Debian libdarknet.so, pjreddie keys)
#
# cfg/loss_yolo*.cfg: [net] 128x96x21, batch 2 -> exact 8x8/8 max-pool -> [yolo] on a 16x12 grid
# (mask 3,4,5 of 6 anchors, 2 classes). The test feeds z upsampled 8x8, so the layer sees z
# exactly; one train_network_datum runs forward + backward (+ an update with no parameters),
# leaving l.output, l.delta and l.cost of the forward. DarknetProcess runs the library in a
# child process, so its FTZ/DAZ never touches the numpy reference.
# ------------------------------------------------------------------------------------------

import os  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from d2c.darknet.runtime import DarknetProcess  # noqa: E402

CFG_DIR = Path(__file__).resolve().parents[1] / "cfg"
DN_H, DN_W, DN_UP = 12, 16, 8
DN_CFGS = {
    "loss_yolo": dict(),
    "loss_yolo_truth_thresh": dict(ignore_thresh=0.3, truth_thresh=0.6),
    "loss_yolo_max91": dict(max_boxes=91),
}




def dn_params(name: str) -> YoloParams:
    return params(**DN_CFGS[name])


def run_darknet(engine: DarknetProcess, z: np.ndarray, truth: np.ndarray):
    x = np.repeat(np.repeat(z, DN_UP, axis=2), DN_UP, axis=3)
    engine.set_seen(0)
    err = engine.train_datum(x, truth)
    return engine.layer_output(1), engine.layer_delta(1), engine.layer_cost(1), err


def compare(engine: DarknetProcess, name: str, z: np.ndarray, truth: np.ndarray):
    out, delta, cost, err = run_darknet(engine, z, truth)
    ref = yolo_loss(z, truth, dn_params(name))
    assert_allclose(ref.output, out, rtol=1e-6, atol=1e-7)
    assert_allclose(ref.delta, delta, rtol=1e-6, atol=1e-7)
    assert_allclose(ref.cost, cost, rtol=1e-6)
    assert err == cost            # one cost layer: *net->cost is the yolo cost
    return ref, out, delta, cost


def scenario_truth(rng) -> np.ndarray:
    """Image 0: two truths in one cell (same anchor), truths on unmasked anchors, boxes whose
    centre sits exactly on cell borders (x·W, y·H integers); image 1: no truth at all."""
    boxes = [
        (0.5, 0.5, 0.7, 0.9, 1),          # on a cell border in x and y (8/16, 6/12): cell (8, 6)
        (0.52, 0.47, 0.74, 0.86, 0),      # cell (8, 5), anchor 3 ...
        (0.51, 0.46, 0.69, 0.93, 1),      # ... same cell and anchor: overwrites box, multi-label class
        (0.25, 0.75, 0.08, 0.14, 0),      # anchor 0: not in this layer's mask
        (0.8, 0.2, 0.2, 0.25, 1),         # anchor 1 or 2: not in the mask
        (0.125, 1 / 3, 0.9, 0.95, 0),     # borders: 2/16, 4/12; big anchor
        (0.9, 0.9, 0.3, 0.55, 1),
        (float(F32(11 / 16)), 0.5, 0.6, 0.3, 0),
    ]
    assert best_anchor64(0.08, 0.14) == 0 and best_anchor64(0.2, 0.25) in (1, 2)
    t = truth_array(2, [boxes, []])
    return t


def test_darknet_scenario_bit_exact(darknet) -> None:
    rng = np.random.default_rng(11)
    z = rng.normal(0, 1.5, (2, 21, DN_H, DN_W)).astype(F32)
    ref, out, delta, cost = compare(darknet("loss_yolo"), "loss_yolo", z, scenario_truth(rng))
    assert_array_equal(ref.output, out)
    assert_array_equal(ref.delta, delta)
    assert F32(ref.cost) == F32(cost)
    assert ref.stats["count"] == 5
    # image 1 has no truth: only noobj objectness deltas
    d1 = delta[1].reshape(3, 7, DN_H, DN_W)
    assert not np.any(d1[:, [0, 1, 2, 3, 5, 6]])


def test_darknet_truth_thresh_below_one(darknet) -> None:
    rng = np.random.default_rng(12)
    z = rng.normal(0, 1.0, (2, 21, DN_H, DN_W)).astype(F32)
    z[:, [2, 3, 9, 10, 16, 17]] = rng.normal(0.3, 0.2, (2, 6, DN_H, DN_W))   # larger predicted boxes
    truth = scenario_truth(rng)
    ref, out, delta, cost = compare(darknet("loss_yolo_truth_thresh"), "loss_yolo_truth_thresh", z, truth)
    base = yolo_loss(z, truth, params(ignore_thresh=0.3))
    assert np.count_nonzero(ref.delta[:, :, :, :] != base.delta) > 0      # the branch fired
    assert_array_equal(ref.delta, delta)


def test_darknet_90_boxes_and_max_91_reads_the_next_record(darknet) -> None:
    rng = np.random.default_rng(13)
    z = rng.normal(0, 1.0, (2, 21, DN_H, DN_W)).astype(F32)
    img0 = [(rng.uniform(0.02, 0.98), rng.uniform(0.02, 0.98), rng.uniform(0.3, 0.95), rng.uniform(0.3, 0.95),
             int(rng.integers(0, 2))) for _ in range(90)]
    img1 = [(0.4, 0.6, 0.8, 0.9, 1), (0.7, 0.3, 0.9, 0.7, 0)]
    truth = truth_array(2, [img0, img1])
    r90, _, d90, _ = compare(darknet("loss_yolo"), "loss_yolo", z, truth)
    r91, _, d91, _ = compare(darknet("loss_yolo_max91"), "loss_yolo_max91", z, truth)
    assert_array_equal(r90.delta, d90)
    assert_array_equal(r91.delta, d91)
    assert np.any(d90 != d91)                    # image 0 trained image 1's first box too
    assert r91.stats["count"] == r90.stats["count"] + (1 if best_anchor64(0.8, 0.9) in (3, 4, 5) else 0)


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("name", ["loss_yolo", "loss_yolo_truth_thresh"])
def test_darknet_random_sweep_bit_exact(darknet, name, seed) -> None:
    rng = np.random.default_rng(1000 + seed)
    z = rng.normal(0, rng.uniform(0.5, 4), (2, 21, DN_H, DN_W)).astype(F32)
    boxes = []
    for _ in range(2):
        img = []
        for _ in range(int(rng.integers(0, 91))):
            x = rng.integers(1, DN_W) / DN_W if rng.random() < 0.3 else rng.uniform(0, 1)
            y = rng.integers(1, DN_H) / DN_H if rng.random() < 0.3 else rng.uniform(0, 1)
            img.append((x, y, rng.uniform(0.001, 1), rng.uniform(0.001, 1), int(rng.integers(0, 2))))
        boxes.append(img)
    truth = truth_array(2, boxes)
    ref, out, delta, cost = compare(darknet(name), name, z, truth)
    assert_array_equal(ref.output, out)
    assert_array_equal(ref.delta, delta)
    assert F32(ref.cost) == F32(cost)


def test_darknet_printed_statistics() -> None:
    """The 'Region N Avg IOU: ...' line Darknet prints equals our stats (6 decimals)."""
    rng = np.random.default_rng(14)
    z = rng.normal(0, 1.5, (2, 21, DN_H, DN_W)).astype(F32)
    truths = [scenario_truth(rng), np.zeros((2, 450), F32)]
    engine = DarknetProcess(CFG_DIR / "loss_yolo.cfg")
    log = os.open(engine.log_path, os.O_RDONLY)      # keep the log readable after close() unlinks it
    try:
        refs = []
        for truth in truths:
            run_darknet(engine, z, truth)
            refs.append(yolo_loss(z, truth, params()).stats)
        engine.close()                                 # the child exits and flushes its stdout
        text = os.read(log, 1 << 20).decode(errors="replace")
    finally:
        engine.close()
        os.close(log)
    pattern = (r"Region 1 Avg IOU: (\S+), Class: (\S+), Obj: (\S+), No Obj: (\S+), "
               r"\.5R: (\S+), \.75R: (\S+),  count: (\d+)")
    lines = re.findall(pattern, text)
    assert len(lines) == 2
    keys = ("avg_iou", "class", "obj", "no_obj", "recall50", "recall75", "count")
    assert_printed_stats(lines, refs, keys)
    assert refs[1]["count"] == 0 and lines[1][0] == "-nan"


def test_darknet_backward_hands_delta_unchanged_to_the_conv() -> None:
    """cfg/loss_yolo_conv.cfg: identity 1x1 linear conv before [yolo]. After backward the conv's
    δ equals the yolo δ bit for bit (no σ′, no scaling), which is why yolo_grad is −δ/b."""
    rng = np.random.default_rng(15)
    z = rng.normal(0, 1.5, (2, 21, DN_H, DN_W)).astype(F32)
    truth = scenario_truth(rng)
    with DarknetProcess(CFG_DIR / "loss_yolo_conv.cfg") as engine:
        engine.set_layer_params(1, weights=np.eye(21, dtype=F32).reshape(21, 21, 1, 1), biases=np.zeros(21, F32))
        x = np.repeat(np.repeat(z, DN_UP, axis=2), DN_UP, axis=3)
        engine.train_datum(x, truth)
        conv_out, conv_delta = engine.layer_output(1), engine.layer_delta(1)
        yolo_delta = engine.layer_delta(2)
    assert_array_equal(conv_out, z)
    ref = yolo_loss(z, truth, params())
    assert_array_equal(yolo_delta, ref.delta)
    assert_array_equal(conv_delta, ref.delta)
    assert_array_equal(yolo_grad(ref, 2), -conv_delta / F32(2))
