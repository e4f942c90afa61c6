"""The [yolo]/[region] loss as Caffe Python layers, run inside real pycaffe nets.

Checked: the bottom diff is exactly -delta/b of the numpy reference (times the loss weight),
the loss top is exactly sum(delta^2)/(L*b), the statistics registry, the region warm-up driven
by set_seen (per net), the region backward modes, every error path (bad JSON, unknown keys, wrong
shapes, NaN, class ids), and what `convert --train` emits (truth widths, head count L), down to
the Caffe loss of a two-head net equalling Darknet's own *net->cost / b.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GLOG_minloglevel", "2")

from d2c.caffe.emitter import TRAIN, ConvertOptions  # noqa: E402
from d2c.caffe.proto import CaffeLayer, CaffeNet, to_prototxt  # noqa: E402
from d2c.convert import build_conversion, load_graph  # noqa: E402
from d2c.darknet.cfg import parse_cfg  # noqa: E402
from d2c.darknet.graph import build_graph  # noqa: E402
from d2c.darknet.runtime import DarknetProcess  # noqa: E402
from d2c.darknet.weights import WeightsHeader, random_weights  # noqa: E402
from d2c.engines import import_caffe  # noqa: E402
from d2c.errors import NumericError, ParamError, UnsupportedLayerError  # noqa: E402
from d2c.loss import caffe_layers  # noqa: E402
from d2c.loss.params import dump_params, parse_param_str  # noqa: E402
from d2c.loss.region import RegionParams, region_grad, region_loss  # noqa: E402
from d2c.loss.yolo import YoloParams, yolo_grad, yolo_loss  # noqa: E402

F32 = np.float32
caffe = import_caffe()

YOLO_PARAMS = {"classes": 3, "mask": [0, 1, 2], "anchors": [10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319],
               "net_w": 128, "net_h": 96, "ignore_thresh": 0.5, "truth_thresh": 1.0}
REGION_PARAMS = {"classes": 2, "num": 3, "anchors": [1.0, 1.5, 2.5, 2.0, 4.0, 4.5], "softmax": True,
                 "rescore": True, "bias_match": True, "object_scale": 5.0, "noobject_scale": 1.0,
                 "class_scale": 1.0, "coord_scale": 1.0}


def truth_records(b: int, boxes: int, seed: int, classes: int) -> np.ndarray:
    """(b, boxes*5) truth: a few random boxes per image, zero-terminated."""
    rng = np.random.default_rng(seed)
    out = np.zeros((b, boxes * 5), F32)
    for i in range(b):
        for t in range(rng.integers(1, 5)):
            x, y = rng.uniform(0.05, 0.95, 2)
            w, h = rng.uniform(0.05, 0.6, 2)
            out[i, 5 * t:5 * t + 5] = [x, y, w, h, rng.integers(0, classes)]
    return out


def loss_net(tmp_path: Path, kind: str, z_shape, truth_width: int, config: dict, *, loss_weight: float = 1.0,
             name: str = "head_loss") -> Path:
    """Input z + truth -> one d2c loss layer, as a prototxt file."""
    layer = CaffeLayer(name, "Python", ["z", "truth"], [name], {
        "loss_weight": [loss_weight], "propagate_down": [True, False],
        "python_param": {"module": "d2c.loss.caffe_layers", "layer": "YoloLoss" if kind == "yolo" else "RegionLoss",
                         "param_str": dump_params(config)}})
    net = CaffeNet("loss", [("z", tuple(z_shape)), ("truth", (z_shape[0], truth_width))], [layer])
    path = tmp_path / f"{name}.prototxt"
    path.write_text("force_backward: true\n" + to_prototxt(net))
    return path


def run(path: Path, z: np.ndarray, truth: np.ndarray, seen: int | None = None):
    net = caffe.Net(str(path), caffe.TRAIN)
    if seen is not None:
        caffe_layers.set_seen(net, seen)
    net.blobs["z"].data[...] = z
    net.blobs["truth"].data[...] = truth
    out = net.forward()
    net.backward()
    return net, out


@pytest.mark.parametrize("flavor", ["pjreddie", "alexeyab"])
@pytest.mark.parametrize("b,heads", [(1, 1), (2, 3), (3, 2)])
def test_yolo_layer_is_minus_delta_over_b_and_loss_is_cost_over_heads_b(tmp_path, flavor, b, heads):
    params = dict(YOLO_PARAMS, flavor=flavor)
    p = YoloParams.from_json(params)
    rng = np.random.default_rng(b * 10 + heads)
    z = rng.normal(0, 1.5, (b, 3 * 8, 12, 16)).astype(F32)
    boxes = 90 if flavor == "pjreddie" else 200
    truth = truth_records(b, boxes, b + heads, 3)
    path = loss_net(tmp_path, "yolo", z.shape, boxes * 5, {"name": "head_loss", "kind": "yolo", "heads": heads,
                                                            "params": params})
    net, out = run(path, z, truth)
    ref = yolo_loss(z, truth, p)
    assert ref.stats["count"] > 0
    np.testing.assert_array_equal(out["head_loss"], np.array([np.float64(ref.cost) / (heads * b)], F32))
    np.testing.assert_array_equal(net.blobs["z"].diff, yolo_grad(ref, b))
    np.testing.assert_array_equal(net.blobs["z"].diff, (-ref.delta / F32(b)).astype(F32))
    stats = caffe_layers.last_stats(net, "head_loss")
    assert stats["avg_iou"] == ref.stats["avg_iou"] and stats["count"] == ref.stats["count"]
    assert stats["cost"] == float(ref.cost)
    assert caffe_layers.stats_line(net, "head_loss", 7).startswith("Region 7 Avg IOU: ")
    # the statistics live on the layer object: a second net does not see (or clobber) them
    other = caffe.Net(str(path), caffe.TRAIN)
    assert caffe_layers.last_stats(net, "head_loss") is stats
    with pytest.raises(ParamError, match="no statistics for loss layer 'head_loss'"):
        caffe_layers.last_stats(other, "head_loss")


def test_loss_weight_scales_the_gradient(tmp_path):
    p = YoloParams.from_json(YOLO_PARAMS)
    z = np.random.default_rng(3).normal(0, 1, (2, 24, 12, 16)).astype(F32)
    truth = truth_records(2, 90, 3, 3)
    path = loss_net(tmp_path, "yolo", z.shape, 450, {"name": "l", "kind": "yolo", "heads": 1, "params": YOLO_PARAMS},
                    loss_weight=2.0, name="l")
    net, _ = run(path, z, truth)
    np.testing.assert_array_equal(net.blobs["z"].diff, (yolo_grad(yolo_loss(z, truth, p), 2) * F32(2)).astype(F32))


@pytest.mark.parametrize("compat", [False, True])
@pytest.mark.parametrize("seen", [2, 12800])
def test_region_layer_backward_modes_and_warmup(tmp_path, compat, seen):
    p = RegionParams.from_json(REGION_PARAMS)
    rng = np.random.default_rng(seen + compat)
    z = rng.normal(0, 1, (2, 3 * 7, 9, 9)).astype(F32)
    truth = truth_records(2, 30, 5, 2)
    path = loss_net(tmp_path, "region", z.shape, 150, {"name": "r", "kind": "region", "heads": 1,
                                                        "params": REGION_PARAMS, "darknet_compat": compat}, name="r")
    net, out = run(path, z, truth, seen)
    ref = region_loss(z, truth, p, seen)
    np.testing.assert_array_equal(out["r"], np.array([np.float64(ref.cost) / 2], F32))
    np.testing.assert_array_equal(net.blobs["z"].diff, region_grad(ref, 2, "cpu" if compat else "gpu"))
    if compat:
        assert not np.any(net.blobs["z"].diff)
    else:
        assert np.any(net.blobs["z"].diff)
    # the warm-up really depends on seen (prior deltas on every cell while seen < 12800)
    other = region_loss(z, truth, p, 12800 if seen < 12800 else 2)
    assert other.cost != ref.cost


def test_region_uses_param_seen_until_set_seen_is_called(tmp_path):
    p = RegionParams.from_json(REGION_PARAMS)
    z = np.random.default_rng(8).normal(0, 1, (1, 21, 5, 5)).astype(F32)
    truth = truth_records(1, 30, 8, 2)
    path = loss_net(tmp_path, "region", z.shape, 150, {"name": "r2", "kind": "region", "heads": 1,
                                                        "params": REGION_PARAMS, "seen": 20000}, name="r2")
    net, out = run(path, z, truth)
    np.testing.assert_array_equal(out["r2"], np.array([region_loss(z, truth, p, 20000).cost], F32))
    caffe_layers.set_seen(net, 5)
    np.testing.assert_array_equal(net.forward()["r2"], np.array([region_loss(z, truth, p, 5).cost], F32))
    caffe_layers.set_seen(net, None)
    np.testing.assert_array_equal(net.forward()["r2"], out["r2"])
    with pytest.raises(ParamError, match="non-negative"):
        caffe_layers.set_seen(net, -1)


# ------------------------------------------------------------------------------------------
# Errors name the layer and the key
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("config,pattern", [
    ({"name": "bad", "kind": "yolo", "heads": 1, "params": YOLO_PARAMS, "extra": 1}, r"'bad'.*unknown key\(s\) 'extra'"),
    ({"name": "bad", "kind": "yolo", "heads": 1, "params": dict(YOLO_PARAMS, ignore=0.7)},
     r"'bad'.*unknown key\(s\) 'ignore'"),
    ({"name": "bad", "kind": "region", "heads": 1, "params": YOLO_PARAMS}, r"'bad'.*computes 'yolo'"),
    ({"name": "bad", "kind": "yolo", "heads": 0, "params": YOLO_PARAMS}, r"'bad'.*'heads' must be >= 1"),
    ({"name": "bad", "kind": "yolo", "params": YOLO_PARAMS}, r"'bad'.*missing required key\(s\) 'heads'"),
    ({"name": "bad", "kind": "yolo", "heads": 1, "params": dict(YOLO_PARAMS, classes=4)}, r"'bad'.*bottom 0 must be"),
])
def test_bad_configuration_fails_at_net_construction(tmp_path, config, pattern):
    path = loss_net(tmp_path, "yolo", (1, 24, 12, 16), 450, config, name="bad")
    with pytest.raises(ParamError, match=pattern):
        caffe.Net(str(path), caffe.TRAIN)


def test_param_str_is_json_only(tmp_path):
    with pytest.raises(ParamError, match="not valid JSON"):
        parse_param_str("{'name': __import__('os')}", "x")
    with pytest.raises(ParamError, match="not valid JSON"):
        parse_param_str('{"a": NaN}', "x")


def test_nan_input_and_bad_class_ids_fail_with_the_layer_name(tmp_path):
    z = np.zeros((2, 24, 12, 16), F32)
    truth = truth_records(2, 90, 1, 3)
    path = loss_net(tmp_path, "yolo", z.shape, 450, {"name": "lyr", "kind": "yolo", "heads": 1, "params": YOLO_PARAMS},
                    name="lyr")
    net = caffe.Net(str(path), caffe.TRAIN)
    net.blobs["truth"].data[...] = truth
    z[1, 3, 2, 2] = np.inf
    net.blobs["z"].data[...] = z
    with pytest.raises(NumericError, match="'lyr'.*1 NaN/inf"):
        net.forward()
    z[1, 3, 2, 2] = 0
    net.blobs["z"].data[...] = z
    bad = truth.copy()
    bad[0, 4] = 3  # classes = 3: ids are 0..2
    net.blobs["truth"].data[...] = bad
    with pytest.raises(ParamError, match="'lyr'"):
        net.forward()
    bad[0, 4] = 1
    bad[1, 0] = np.nan
    net.blobs["truth"].data[...] = bad
    with pytest.raises(NumericError, match="'lyr'.*truth"):
        net.forward()


# ------------------------------------------------------------------------------------------
# Emission (convert --train) and the two-head loss against Darknet
# ------------------------------------------------------------------------------------------

TWO_HEADS = """[net]
batch={batch}
subdivisions=1
width=32
height=32
channels=3

[convolutional]
filters=8
size=3
stride=2
pad=1
activation=leaky

[convolutional]
filters=21
size=1
stride=1
activation=linear

[yolo]
mask=3,4,5
anchors=3,4, 6,8, 9,7, 12,12, 18,15, 25,25
classes=2
num=6
{extra}
[route]
layers=-3

[maxpool]
size=2
stride=2

[convolutional]
filters=21
size=1
stride=1
activation=linear

[yolo]
mask=0,1,2
anchors=3,4, 6,8, 9,7, 12,12, 18,15, 25,25
classes=2
num=6
{extra}"""


def train_conversion(text: str, batch: int = 2, flavor: str | None = None):
    graph = build_graph(parse_cfg("two_heads.cfg", text), flavor)
    options = ConvertOptions(flavor=graph.flavor, mode=TRAIN, bn="exact", batch=batch)
    return build_conversion(graph, random_weights(graph, 0), WeightsHeader(), options, name="two")


def loss_configs(conv) -> list[dict]:
    return [parse_param_str(layer.params["python_param"]["param_str"], layer.name)
            for layer in conv.net.layers if layer.type == "Python"]


def test_emission_two_heads_truth_width_and_head_count():
    conv = train_conversion(TWO_HEADS.format(batch=2, extra=""))
    assert ("truth", (2, 450)) in conv.net.inputs
    configs = loss_configs(conv)
    assert [c["name"] for c in configs] == ["layer002_loss", "layer006_loss"]
    assert all(c["heads"] == 2 and c["kind"] == "yolo" for c in configs)
    assert configs[0]["params"]["mask"] == [3, 4, 5] and configs[0]["params"]["net_w"] == 32
    loss = [layer for layer in conv.net.layers if layer.name == "layer002_loss"][0]
    assert loss.bottom == ["layer001_conv", "truth"] and loss.params["loss_weight"] == [1.0]
    assert loss.params["propagate_down"] == [True, False]
    alexey = train_conversion(TWO_HEADS.format(batch=2, extra="max=120\nscale_x_y=1.05\n"))
    assert ("truth", (2, 600)) in alexey.net.inputs
    assert loss_configs(alexey)[0]["params"]["scale_x_y"] == 1.05


def test_emission_region_truth_and_errors():
    region = """[net]
width=32
height=32
channels=3
[convolutional]
filters=21
size=1
activation=linear
[region]
anchors=1,1, 2,2, 3,3
classes=2
num=3
softmax=1
"""
    conv = train_conversion(region)
    assert ("truth", (2, 150)) in conv.net.inputs
    assert loss_configs(conv)[0]["params"]["softmax"] is True
    no_head = "[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional]\nfilters=2\nsize=1\n"
    with pytest.raises(UnsupportedLayerError, match="at least one"):
        train_conversion(no_head)


def test_two_head_caffe_loss_equals_darknet_cost(tmp_path):
    """Sum of the loss tops * b == Darknet's *net->cost (mean of the heads' sum(delta^2))."""
    from d2c.convert import convert
    from d2c.darknet.weights import write_weights

    cfg = tmp_path / "two.cfg"
    cfg.write_text(TWO_HEADS.format(batch=2, extra=""))
    graph = load_graph(cfg)
    weights = tmp_path / "two.weights"
    write_weights(weights, WeightsHeader(), graph, random_weights(graph, 5))
    convert(cfg, weights, tmp_path / "out", train=True)
    rng = np.random.default_rng(5)
    x = rng.random((2, 3, 32, 32)).astype(F32)
    truth = truth_records(2, 90, 6, 2)
    net = caffe.Net(str(tmp_path / "out" / "two_train.prototxt"), str(tmp_path / "out" / "two_train.caffemodel"),
                    caffe.TRAIN)
    net.blobs["data"].data[...] = x
    net.blobs["truth"].data[...] = truth
    out = net.forward()
    with DarknetProcess(cfg, weights) as dn:
        dn.forward(x, train=True, truth=truth)
        cost = dn.cost()
        head_costs = [dn.layer_cost(2), dn.layer_cost(6)]
    total = sum(float(v[0]) for v in out.values())
    np.testing.assert_allclose(total * 2, cost, rtol=2e-5)
    np.testing.assert_allclose([caffe_layers.last_stats(net, "layer002_loss")["cost"],
                                caffe_layers.last_stats(net, "layer006_loss")["cost"]], head_costs, rtol=2e-5)
