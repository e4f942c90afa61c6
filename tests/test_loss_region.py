"""The [region] (YOLOv2) loss reference: invariants, hand-derived cases, the prior warm-up,
the backward modes, and agreement with the real Debian Darknet (section at the end)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from loss_helpers import assert_printed_stats, darknet, make_truth, sigmoid64  # noqa: F401  (darknet is a fixture)

from d2c.errors import ParamError
from d2c.loss.region import RegionParams, region_forward, region_grad, region_loss

F32 = np.float32
ANCHORS = (0.57273, 0.677385, 1.87446, 2.06253, 3.33843, 5.47434)


def rparams(**kw) -> RegionParams:
    base = dict(classes=4, num=3, anchors=ANCHORS)
    base.update(kw)
    return RegionParams(**base)


def truth_array(batch: int, boxes_per_image: list[list[tuple]], k: int = 30) -> np.ndarray:
    return make_truth(batch, boxes_per_image, k)


# ------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------

def test_json_round_trip() -> None:
    p = rparams(softmax=True, rescore=True, bias_match=True, thresh=0.6, object_scale=5.0)
    assert RegionParams.from_json(json.loads(json.dumps(p.to_json()))) == p


@pytest.mark.parametrize("obj, fragment", [
    ({"classes": 4, "num": 1, "anchors": [1, 1], "tree": "x"}, "'tree'"),
    ({"classes": 4, "anchors": [1, 1]}, "'num'"),
    ({"classes": 4, "num": 2, "anchors": [1, 1]}, "'anchors'"),
    ({"classes": 4, "num": 1, "anchors": [1, 1], "softmax": "yes"}, "'softmax'"),
    ({"classes": 4, "num": 1, "anchors": [1, 1], "coords": 8}, "'coords'"),
    ({"classes": 4, "num": 1, "anchors": [1, 1], "thresh": None}, "'thresh' expects a number"),
    ("{}", "JSON object"),
])
def test_from_json_is_strict(obj, fragment) -> None:
    with pytest.raises(ParamError) as info:
        RegionParams.from_json(obj)
    assert fragment in str(info.value)


def test_bad_inputs_raise_param_error() -> None:
    p = rparams()
    z = np.zeros((1, 27, 3, 3), F32)
    with pytest.raises(ParamError, match="channels"):
        region_forward(np.zeros((1, 26, 3, 3), F32), p)
    with pytest.raises(ParamError, match="seen"):
        region_loss(z, np.zeros((1, 150), F32), p, seen=-1)
    with pytest.raises(ParamError, match="class id"):
        region_loss(z, truth_array(1, [[(0.5, 0.5, 0.2, 0.2, 4)]]), p, seen=0)
    with pytest.raises(ParamError, match="outside"):
        region_loss(z, truth_array(1, [[(-0.5, 0.5, 0.2, 0.2, 1)]]), p, seen=0)
    r = region_loss(z, np.zeros((1, 150), F32), p, seen=0)
    with pytest.raises(ParamError, match="mode"):
        region_grad(r, 1, mode="tpu")


# ------------------------------------------------------------------------------------------
# Forward
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("softmax, background", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("classes, num, H, W", [(1, 1, 1, 1), (4, 3, 5, 4), (20, 5, 3, 3)])
def test_forward_activations(softmax, background, classes, num, H, W) -> None:
    p = RegionParams(classes=classes, num=num, anchors=tuple((ANCHORS * 2)[:2 * num]), softmax=softmax,
                     background=background)
    rng = np.random.default_rng(classes * 7 + num)
    z = rng.normal(0, 3, (2, num * (5 + classes), H, W)).astype(F32)
    o = region_forward(z, p).reshape(2, num, 5 + classes, H, W)
    z5 = z.reshape(o.shape)
    assert_array_equal(o[:, :, 0:2], sigmoid64(z5[:, :, 0:2]).astype(F32))
    assert_array_equal(o[:, :, 2:4], z5[:, :, 2:4])
    if background:
        if not softmax:
            assert_array_equal(o[:, :, 4], z5[:, :, 4])
    else:
        assert_array_equal(o[:, :, 4], sigmoid64(z5[:, :, 4]).astype(F32))
    if softmax:
        start = 4 if background else 5
        e = np.exp(z5[:, :, start:].astype(np.float64) - z5[:, :, start:].max(axis=2, keepdims=True))
        assert_allclose(o[:, :, start:], e / e.sum(axis=2, keepdims=True), rtol=1e-6, atol=1e-7)
    else:
        assert_array_equal(o[:, :, 5:], sigmoid64(z5[:, :, 5:]).astype(F32))


# ------------------------------------------------------------------------------------------
# Training branch
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seen, warm", [(0, True), (12799, True), (12800, False), (10 ** 7, False)])
def test_empty_truth_noobj_and_prior_warmup(seen, warm) -> None:
    p = rparams(noobject_scale=0.5)
    rng = np.random.default_rng(seen % 97)
    H, W = 4, 5
    z = rng.normal(0, 1, (2, 27, H, W)).astype(F32)
    r = region_loss(z, np.zeros((2, 150), F32), p, seen=seen)
    d = r.delta.reshape(2, 3, 9, H, W)
    o = r.output.reshape(d.shape)
    assert_array_equal(d[:, :, 4], F32(0.5) * -o[:, :, 4])
    assert not np.any(d[:, :, 5:])
    if warm:
        assert_allclose(d[:, :, 0], 0.01 * (0.5 - o[:, :, 0].astype(np.float64)), rtol=1e-5, atol=1e-9)
        assert_allclose(d[:, :, 1], 0.01 * (0.5 - o[:, :, 1].astype(np.float64)), rtol=1e-5, atol=1e-9)
        # target w is log((a·(1/W))·W/a), zero up to float rounding
        assert_allclose(d[:, :, 2:4], -0.01 * o[:, :, 2:4], rtol=0, atol=2e-9)
    else:
        assert not np.any(d[:, :, 0:4])
    assert_allclose(r.cost, np.sum(r.delta.astype(np.float64) ** 2), rtol=1e-5)
    assert r.stats["count"] == 0 and math.isnan(r.stats["avg_iou"]) and math.isnan(r.stats["recall50"])


def test_one_truth_by_hand() -> None:
    """z = 0: o = 0.5 for x, y, objectness and the logistic classes, w = h = raw 0."""
    p = rparams(classes=3, num=2, anchors=(1.0, 1.5, 3.0, 2.0), coord_scale=2.0, object_scale=5.0,
                class_scale=0.5, thresh=0.99)
    H, W = 4, 4
    z = np.zeros((1, 16, H, W), F32)
    x, y, w, h, c = 0.6, 0.3, 0.7, 0.5, 1      # 2.8 x 2.0 cells -> anchor 1 (3.0 x 2.0) wins
    r = region_loss(z, truth_array(1, [[(x, y, w, h, c)]]), p, seen=20000)
    d = r.delta.reshape(1, 2, 8, H, W)
    i, j = int(x * W), int(y * H)
    s = 2.0 * (2 - w * h)
    expect = [s * (x * W - i - 0.5), s * (y * H - j - 0.5), s * math.log(w * W / 3.0), s * math.log(h * H / 2.0)]
    assert_allclose(d[0, 1, 0:4, j, i], expect, rtol=2e-6)
    assert_allclose(d[0, 1, 4, j, i], 5.0 * 0.5)
    assert_allclose(d[0, 1, 5:, j, i], [-0.25, 0.25, -0.25])
    assert not np.any(d[0, 0, [0, 1, 2, 3, 5, 6, 7]])
    pw, ph = 3.0 / W, 2.0 / H
    px, py = (i + 0.5) / W, (j + 0.5) / H
    ow = min(px + pw / 2, x + w / 2) - max(px - pw / 2, x - w / 2)
    oh = min(py + ph / 2, y + h / 2) - max(py - ph / 2, y - h / 2)
    iou = ow * oh / (pw * ph + w * h - ow * oh)
    assert_allclose(r.stats["avg_iou"], iou, rtol=1e-6)
    assert r.stats["count"] == 1 and r.stats["obj"] == 0.5 and r.stats["class"] == 0.5
    assert r.stats["recall50"] == float(iou > 0.5)
    # rescore: objectness target is the IoU
    rr = region_loss(z, truth_array(1, [[(x, y, w, h, c)]]), rparams(
        classes=3, num=2, anchors=(1.0, 1.5, 3.0, 2.0), object_scale=5.0, rescore=True), seen=20000)
    assert_allclose(rr.delta.reshape(1, 2, 8, H, W)[0, 1, 4, j, i], 5.0 * (iou - 0.5), rtol=1e-5)


def test_best_anchor_uses_predicted_size_unless_bias_match() -> None:
    H, W = 2, 2
    z = np.zeros((1, 16, H, W), F32)
    anchors = (1.0, 1.0, 1.6, 1.6)
    z[0, 2:4, 0, 0] = math.log(1.6)            # slot 0 predicts the size of anchor 1
    truth = truth_array(1, [[(0.25, 0.25, 0.8, 0.8, 0)]])
    by_pred = region_loss(z, truth, rparams(classes=3, num=2, anchors=anchors), seen=20000)
    by_bias = region_loss(z, truth, rparams(classes=3, num=2, anchors=anchors, bias_match=True), seen=20000)
    assert by_pred.delta.reshape(1, 2, 8, H, W)[0, 0, 4, 0, 0] > 0     # slot 0 trained
    assert by_bias.delta.reshape(1, 2, 8, H, W)[0, 1, 4, 0, 0] > 0     # slot 1 trained


def test_two_truths_same_cell_class_rules() -> None:
    H, W = 2, 2
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1, (1, 3 * 9, H, W)).astype(F32)
    first, second = (0.3, 0.3, 0.4, 0.4, 0), (0.32, 0.28, 0.41, 0.39, 2)
    t = truth_array(1, [[first, second]])
    logi = region_loss(z, t, rparams(bias_match=True), seen=20000)
    soft = region_loss(z, t, rparams(bias_match=True, softmax=True), seen=20000)
    d = logi.delta.reshape(1, 3, 9, H, W)
    o = logi.output.reshape(d.shape)
    slot = int(np.flatnonzero(d[0, :, 4, 0, 0] > 0)[0])
    # logistic classes: the class-0 entry is set, so the second truth adds its own class only
    assert_array_equal(d[0, slot, 5:, 0, 0], [1 - o[0, slot, 5, 0, 0], -o[0, slot, 6, 0, 0],
                                              1 - o[0, slot, 7, 0, 0], -o[0, slot, 8, 0, 0]])
    ds = soft.delta.reshape(d.shape)
    os_ = soft.output.reshape(d.shape)
    # softmax: every truth rewrites the whole vector -> the last truth's one-hot
    assert_array_equal(ds[0, slot, 5:, 0, 0], np.array([0, 0, 1, 0], F32) - os_[0, slot, 5:, 0, 0])
    assert logi.stats["count"] == 2
    assert_allclose(logi.stats["class"], o[0, slot, 5, 0, 0] / 2, rtol=1e-6)   # avg_cat once, class_count 2
    assert_allclose(soft.stats["class"], (os_[0, slot, 5, 0, 0] + os_[0, slot, 7, 0, 0]) / 2, rtol=1e-6)


def test_background_objectness() -> None:
    H, W = 2, 2
    z = np.zeros((1, 27, H, W), F32)
    r = region_loss(z, truth_array(1, [[(0.3, 0.3, 0.4, 0.4, 0)]]),
                    rparams(background=True, softmax=True, thresh=0.99), seen=20000)
    d = r.delta.reshape(1, 3, 9, H, W)
    o = r.output.reshape(d.shape)
    trained = np.zeros((3, H, W), bool)
    trained[np.nonzero(d[0, :, 0])] = True
    assert trained.sum() == 1
    assert_array_equal(d[0, :, 4][trained], -o[0, :, 4][trained])       # object_scale·(0 − o)
    assert_array_equal(d[0, :, 4][~trained], F32(1) - o[0, :, 4][~trained])


@pytest.mark.parametrize("b, classes, H, W, seen", [(1, 2, 3, 3, 0), (2, 4, 13, 10, 50000), (3, 20, 5, 7, 64)])
def test_invariants_random(b, classes, H, W, seen) -> None:
    p = RegionParams(classes=classes, num=3, anchors=ANCHORS, softmax=True, rescore=True)
    rng = np.random.default_rng(b * classes)
    z = rng.normal(0, 1.5, (b, 3 * (5 + classes), H, W)).astype(F32)
    boxes = [[(rng.uniform(0.02, 0.98), rng.uniform(0.02, 0.98), rng.uniform(0.05, 0.8), rng.uniform(0.05, 0.8),
               rng.integers(0, classes)) for _ in range(rng.integers(0, 8))] for _ in range(b)]
    r = region_loss(z, truth_array(b, boxes), p, seen=seen)
    d = r.delta.reshape(b, 3, 5 + classes, H, W)
    trained = d[:, :, 5:].any(axis=2)
    assert trained.sum() <= sum(len(x) for x in boxes)
    assert r.stats["count"] == sum(len(x) for x in boxes)
    if seen >= 12800:
        assert not np.any(d[:, :, 0:4][np.broadcast_to(~trained[:, :, None], d[:, :, 0:4].shape)])
    assert_allclose(r.cost, np.sum(r.delta.astype(np.float64) ** 2), rtol=1e-5)
    o = r.output.reshape(d.shape)
    g = region_grad(r, b).reshape(d.shape)
    sig = (1 - o) * o
    assert_allclose(g[:, :, 0:2], -d[:, :, 0:2] * sig[:, :, 0:2] / b, rtol=1e-6)
    assert_allclose(g[:, :, 4], -d[:, :, 4] * sig[:, :, 4] / b, rtol=1e-6)
    assert_array_equal(g[:, :, [2, 3]], -d[:, :, [2, 3]] / F32(b))
    assert_array_equal(g[:, :, 5:], -d[:, :, 5:] / F32(b))
    assert not np.any(region_grad(r, b, mode="cpu"))


# ------------------------------------------------------------------------------------------
# Against the real Darknet (Debian libdarknet.so)
#
# cfg/loss_region*.cfg: [net] 104x80x27, batch 2 -> exact 8x8/8 max-pool -> [region] on a 13x10
# grid (3 anchors, 4 classes). One train_network_datum with *net.seen preset to s0 runs the
# forward with seen = s0 + 2 (it adds the mini-batch first), so s0 = 12796 is the last step
# with the prior warm-up and s0 = 12798 the first without.
# ------------------------------------------------------------------------------------------

import os  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

from d2c.darknet.runtime import DarknetProcess  # noqa: E402

CFG_DIR = Path(__file__).resolve().parents[1] / "cfg"
DN_H, DN_W, DN_UP = 10, 13, 8
DN_CFGS = {
    "loss_region": dict(bias_match=True, softmax=True, rescore=True, object_scale=5.0, thresh=0.6),
    "loss_region_logistic": dict(object_scale=3.0, noobject_scale=0.5, class_scale=1.5, coord_scale=2.0,
                                 thresh=0.5),
    "loss_region_background": dict(bias_match=True, softmax=True, background=True, rescore=True,
                                   object_scale=5.0, thresh=0.6),
}




def run_darknet(engine: DarknetProcess, z: np.ndarray, truth: np.ndarray, seen0: int):
    x = np.repeat(np.repeat(z, DN_UP, axis=2), DN_UP, axis=3)
    engine.set_seen(seen0)
    err = engine.train_datum(x, truth)
    assert engine.seen() == seen0 + 2
    return engine.layer_output(1), engine.layer_delta(1), engine.layer_cost(1), err


def compare(engine, name, z, truth, seen0):
    out, delta, cost, err = run_darknet(engine, z, truth, seen0)
    ref = region_loss(z, truth, rparams(**DN_CFGS[name]), seen=seen0 + 2)
    assert_allclose(ref.output, out, rtol=1e-6, atol=1e-7)
    assert_allclose(ref.delta, delta, rtol=1e-6, atol=1e-7)
    assert_allclose(ref.cost, cost, rtol=1e-6)
    assert err == cost
    return ref, out, delta, cost


def scenario_truth() -> np.ndarray:
    """Image 0: two truths in one cell, boxes on cell borders, various sizes; image 1: none."""
    boxes = [
        (0.5, 0.5, 0.3, 0.4, 1),                  # x·13 = 6.5, y·10 = 5 (border): cell (6, 5)
        (0.52, 0.53, 0.28, 0.42, 3),              # same cell (6, 5)
        (float(F32(4 / 13)), 0.3, 0.7, 0.6, 0),   # x on a border (4/13)
        (0.1, 0.85, 0.05, 0.08, 2),
        (0.9, 0.15, 0.95, 0.9, 2),
    ]
    return truth_array(2, [boxes, []])


@pytest.mark.parametrize("name", list(DN_CFGS))
@pytest.mark.parametrize("seen0", [0, 12796, 12798, 50000])
def test_darknet_scenario_bit_exact(darknet, name, seen0) -> None:
    rng = np.random.default_rng(21)
    z = rng.normal(0, 1.5, (2, 27, DN_H, DN_W)).astype(F32)
    ref, out, delta, cost = compare(darknet(name), name, z, scenario_truth(), seen0)
    assert_array_equal(ref.output, out)
    assert_array_equal(ref.delta, delta)
    assert F32(ref.cost) == F32(cost)
    d1 = delta[1].reshape(3, 9, DN_H, DN_W)
    warm = seen0 + 2 < 12800
    assert bool(np.any(d1[:, 0:4])) == warm          # image 1 (no truth): box deltas only from the warm-up
    assert not np.any(d1[:, 5:])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", list(DN_CFGS))
def test_darknet_random_sweep_bit_exact(darknet, name, seed) -> None:
    rng = np.random.default_rng(2000 + seed)
    z = rng.normal(0, rng.uniform(0.5, 3), (2, 27, DN_H, DN_W)).astype(F32)
    boxes = []
    for _ in range(2):
        img = []
        for _ in range(int(rng.integers(0, 31))):
            x = rng.integers(1, DN_W) / DN_W if rng.random() < 0.3 else rng.uniform(0, 1)
            img.append((x, rng.uniform(0, 1), rng.uniform(0.001, 1), rng.uniform(0.001, 1), int(rng.integers(0, 4))))
        boxes.append(img)
    seen0 = int(rng.choice([0, 12796, 12798, 40000]))
    ref, out, delta, cost = compare(darknet(name), name, z, truth_array(2, boxes), seen0)
    assert_array_equal(ref.output, out)
    assert_array_equal(ref.delta, delta)
    assert F32(ref.cost) == F32(cost)


def test_darknet_printed_statistics() -> None:
    rng = np.random.default_rng(22)
    z = rng.normal(0, 1.5, (2, 27, DN_H, DN_W)).astype(F32)
    truths = [scenario_truth(), np.zeros((2, 150), F32)]
    engine = DarknetProcess(CFG_DIR / "loss_region.cfg")
    log = os.open(engine.log_path, os.O_RDONLY)      # keep the log readable after close() unlinks it
    try:
        refs = []
        for truth in truths:
            run_darknet(engine, z, truth, 20000)
            refs.append(region_loss(z, truth, rparams(**DN_CFGS["loss_region"]), seen=20002).stats)
        engine.close()
        text = os.read(log, 1 << 20).decode(errors="replace")
    finally:
        engine.close()
        os.close(log)
    pattern = r"Region Avg IOU: (\S+), Class: (\S+), Obj: (\S+), No Obj: (\S+), Avg Recall: (\S+),  count: (\d+)"
    lines = re.findall(pattern, text)
    assert len(lines) == 2
    keys = ("avg_iou", "class", "obj", "no_obj", "recall50", "count")
    assert_printed_stats(lines, refs, keys)
    assert refs[0]["count"] == 5 and lines[1][0] == "-nan"


def test_darknet_cpu_backward_propagates_nothing() -> None:
    """cfg/loss_region_conv.cfg: identity 1x1 linear conv before [region]. The Debian CPU build
    leaves the conv's δ at 0 after backward (region_grad mode='cpu'), although the region δ is not 0."""
    rng = np.random.default_rng(23)
    z = rng.normal(0, 1.5, (2, 27, DN_H, DN_W)).astype(F32)
    with DarknetProcess(CFG_DIR / "loss_region_conv.cfg") as engine:
        engine.set_layer_params(1, weights=np.eye(27, dtype=F32).reshape(27, 27, 1, 1), biases=np.zeros(27, F32))
        engine.set_seen(0)
        engine.train_datum(np.repeat(np.repeat(z, DN_UP, axis=2), DN_UP, axis=3), scenario_truth())
        conv_out, conv_delta, region_delta = engine.layer_output(1), engine.layer_delta(1), engine.layer_delta(2)
    assert_array_equal(conv_out, z)
    ref = region_loss(z, scenario_truth(), rparams(**DN_CFGS["loss_region"]), seen=2)
    assert_array_equal(region_delta, ref.delta)
    assert np.any(region_delta)
    assert_array_equal(conv_delta, region_grad(ref, 2, mode="cpu"))
