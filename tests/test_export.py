"""`d2c export`: byte-identical round trips, BN inversion, folded models in the real Darknet, errors."""
from __future__ import annotations

import json
from glob import glob
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared_cfgs import alexeyab_cfgs

from d2c.caffe.proto import read_caffemodel_net, write_caffemodel
from d2c.cli import main as cli_main
from d2c.convert import convert, load_graph
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.weights import WeightsHeader, random_weights, read_weights, write_weights
from d2c.errors import D2CError, WeightsError
from d2c.export import (ALEXEYAB_EPS_INSIDE, CAFFE_TINY_EPS, exact_variance_overrides, export,
                        invert_bn_variance, pjreddie_variance_forward, unscale)
from d2c.layers.convolutional import fold_batchnorm

ROOT = Path(__file__).resolve().parents[1]
TINY_CFG = Path("/usr/share/darknet/cfg/yolov3-tiny.cfg")
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"
CFGS = (sorted(glob("/usr/share/darknet/cfg/yolov[23]*.cfg")) + ["/usr/share/darknet/cfg/yolov1-tiny.cfg"]
        + [str(p) for p in alexeyab_cfgs()])
F32 = np.float32

# Every parameterised layer type: conv (+BN, groups), connected (+BN), stand-alone [batchnorm], [local];
# the [region] head only makes a training net possible.
MIXED_CFG = """[net]
width=8
height=8
channels=3
[convolutional]
filters=4
size=3
pad=1
batch_normalize=1
activation=leaky
[convolutional]
filters=4
size=3
pad=1
groups=2
activation=linear
[batchnorm]
[local]
filters=3
size=3
stride=1
pad=0
activation=leaky
[connected]
output=10
batch_normalize=1
activation=leaky
[connected]
output=6
activation=linear
[region]
anchors=1,1
classes=1
num=1
coords=4
"""


def _same_bytes(a: Path, b: Path) -> None:
    data_a, data_b = a.read_bytes(), b.read_bytes()
    assert len(data_a) == len(data_b), f"{a.name}: {len(data_a)} bytes vs {len(data_b)}"
    if data_a != data_b:
        diff = np.nonzero(np.frombuffer(data_a, np.uint8) != np.frombuffer(data_b, np.uint8))[0]
        pytest.fail(f"{a} and {b} differ in {diff.size} bytes, first at offset {diff[0]}")


def _round_trip(cfg: Path, weights: Path, tmp: Path, **convert_kw) -> Path:
    rep = convert(cfg, weights, tmp / "model", **convert_kw)
    out = tmp / "back.weights"
    export(rep.caffemodel.parent, out)
    return out


# --------------------------------------------------------------------------------------------
# Round trips
# --------------------------------------------------------------------------------------------

def test_real_yolov3_tiny_is_byte_identical(tmp_path: Path) -> None:
    out = _round_trip(TINY_CFG, TINY_WEIGHTS, tmp_path)
    _same_bytes(out, TINY_WEIGHTS)


@pytest.mark.parametrize("bn", ["exact", "frozen"])
def test_real_yolov3_tiny_train_net_is_byte_identical(tmp_path: Path, bn: str) -> None:
    """The train caffemodel (exact DarknetBatchNorm blobs, or frozen BN) exports to the same file."""
    convert(TINY_CFG, TINY_WEIGHTS, tmp_path / "m", train=True, bn=bn)
    export(tmp_path / "m" / "yolov3-tiny_train.caffemodel", tmp_path / "t.weights")
    _same_bytes(tmp_path / "t.weights", TINY_WEIGHTS)


def test_stock_bn_train_net_within_one_ulp(tmp_path: Path) -> None:
    """Stock BatchNorm keeps 100*stat in float32, which is not injective: 1 ulp at worst."""
    convert(TINY_CFG, TINY_WEIGHTS, tmp_path / "m", train=True, bn="stock")
    export(tmp_path / "m" / "yolov3-tiny_train.caffemodel", tmp_path / "s.weights")
    graph = load_graph(TINY_CFG)
    _, want = read_weights(TINY_WEIGHTS, graph)
    _, got = read_weights(tmp_path / "s.weights", graph)
    for index, arrays in want.items():
        for name, arr in arrays.items():
            if name in ("rolling_mean", "rolling_variance"):
                np.testing.assert_array_max_ulp(got[index][name], arr, maxulp=1)
            else:
                np.testing.assert_array_equal(got[index][name], arr, err_msg=f"layer {index} {name}")


@pytest.mark.parametrize("cfg", CFGS, ids=[f"{Path(c).parent.name}/{Path(c).name}" for c in CFGS])
def test_random_weights_round_trip_every_cfg(tmp_path: Path, cfg: str) -> None:
    graph = load_graph(cfg)
    header = WeightsHeader(0, 2, 5 if graph.flavor == "alexeyab" else 0, seen=123456789)
    src = tmp_path / "src.weights"
    write_weights(src, header, graph, random_weights(graph, seed=7))
    out = _round_trip(Path(cfg), src, tmp_path)
    _same_bytes(out, src)


@pytest.mark.parametrize("flavor", ["pjreddie", "alexeyab"])
@pytest.mark.parametrize("header", [WeightsHeader(0, 2, 0, 2 ** 40), WeightsHeader(0, 1, 0, 77),
                                    WeightsHeader(1001, 2, 0, 5)], ids=["v0.2", "v0.1-seen32", "transposed"])
def test_every_layer_kind_round_trips(tmp_path: Path, flavor: str, header: WeightsHeader) -> None:
    """conv(+BN, groups), [batchnorm] (3 or 4 arrays), [local], [connected](+BN, transpose flag)."""
    cfg = tmp_path / "mixed.cfg"
    cfg.write_text(MIXED_CFG)
    graph = build_graph(parse_cfg(cfg), flavor)
    assert {n.kind for n in graph.nodes if n.params} == {"convolutional", "batchnorm", "local", "connected"}
    src = tmp_path / "src.weights"
    write_weights(src, header, graph, random_weights(graph, seed=1))
    rep = convert(cfg, src, tmp_path / "m", flavor=flavor)
    export(rep.caffemodel, tmp_path / "back.weights")
    _same_bytes(tmp_path / "back.weights", src)
    convert(cfg, src, tmp_path / "t", flavor=flavor, train=True)
    export(tmp_path / "t" / "mixed_train.caffemodel", tmp_path / "train.weights")
    _same_bytes(tmp_path / "train.weights", src)


def test_seen_is_carried_and_overridable(tmp_path: Path) -> None:
    convert(TINY_CFG, TINY_WEIGHTS, tmp_path / "m")
    rep = export(tmp_path / "m", tmp_path / "a.weights", seen=640)
    assert rep.header.seen == 640
    raw = (tmp_path / "a.weights").read_bytes()
    assert raw[:12] == TINY_WEIGHTS.read_bytes()[:12]
    assert int.from_bytes(raw[12:20], "little") == 640
    assert raw[20:] == TINY_WEIGHTS.read_bytes()[20:]


# --------------------------------------------------------------------------------------------
# BN variance inversion
# --------------------------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(min_value=0.0, max_value=1e6, width=32, allow_subnormal=True), min_size=1, max_size=64))
def test_inverse_always_reproduces_the_stored_variance(values: list[float]) -> None:
    """Whatever the exported var, converting it again gives the same var' bit for bit."""
    var = np.array(values, F32)
    stored = pjreddie_variance_forward(var)
    back, stats = invert_bn_variance(stored, 1.0, CAFFE_TINY_EPS, "pjreddie")
    assert stats.inexact == 0
    np.testing.assert_array_equal(pjreddie_variance_forward(back).view(np.uint32), stored.view(np.uint32))


def test_inverse_is_identity_on_a_million_variances() -> None:
    """Ambiguous preimages are rare: count them (measured: 3 in 10^6 uniform [0.5, 2))."""
    var = np.random.default_rng(0).uniform(0.5, 2.0, 10 ** 6).astype(F32)
    back, stats = invert_bn_variance(pjreddie_variance_forward(var), 1.0, CAFFE_TINY_EPS, "pjreddie")
    wrong = int((back.view(np.uint32) != var.view(np.uint32)).sum())
    assert stats.exact + stats.ambiguous == var.size
    assert wrong <= stats.ambiguous <= 20
    assert wrong > 0  # the map really is not injective; this is why the sidecar overrides exist


def test_zero_and_tiny_variances_export_as_zero() -> None:
    """Darknet's untrained rolling_variance is 0; every var below ~1e-29 is stored as 0."""
    stored = pjreddie_variance_forward(np.array([0.0, 1e-35, 1e-31], F32))
    assert np.all(stored == 0)
    back, _ = invert_bn_variance(stored, 1.0, CAFFE_TINY_EPS, "pjreddie")
    assert np.all(back.view(np.uint32) == 0)


def test_foreign_bn_keeps_the_denominator() -> None:
    """A BatchNorm not written by d2c (eps 1e-5, factor 7): Darknet's denominator equals Caffe's."""
    var_blob = np.array([0.7, 3.5, 70.0], F32)
    var, stats = invert_bn_variance(var_blob, 7.0, 1e-5, "pjreddie")
    assert stats.inexact == 3
    caffe_den = np.sqrt(var_blob.astype(np.float64) / 7 + F32(1e-5))
    np.testing.assert_allclose(np.sqrt(var.astype(np.float64)) + F32(1e-6), caffe_den, rtol=1e-6)
    var_ab, _ = invert_bn_variance(var_blob, 7.0, 1e-3, "alexeyab")
    np.testing.assert_allclose(np.sqrt(var_ab.astype(np.float64) + F32(ALEXEYAB_EPS_INSIDE)),
                               np.sqrt(var_blob / 7.0 + F32(1e-3)), rtol=1e-6)


def test_unscale_finds_a_float_that_scales_back() -> None:
    x = np.random.default_rng(1).normal(size=10000).astype(F32)
    blob = (x * F32(100)).astype(F32)
    back, stats = unscale(blob, 100.0)
    np.testing.assert_array_equal((back * F32(100)).astype(F32), blob)
    assert stats.inexact == 0 and stats.ambiguous > 0


def _ambiguous_variances(count: int) -> np.ndarray:
    """Float32 variances that the inversion maps to a different float (a colliding neighbour)."""
    found: list[float] = []
    for top in (1.0, 2.0, 4.0, 8.0, 0.5, 0.25):
        var = np.arange(-4000, 0, dtype=np.int64)
        var = (np.float32(top).view(np.int32) + var).astype(np.int32).view(F32)
        back, _ = invert_bn_variance(pjreddie_variance_forward(var), 1.0, CAFFE_TINY_EPS, "pjreddie")
        found.extend(var[back != var][:count].tolist())
    assert len(found) >= count
    return np.array(found[:count], F32)


def test_sidecar_overrides_make_ambiguous_variances_exact(tmp_path: Path) -> None:
    cfg = tmp_path / "bn.cfg"
    cfg.write_text("[net]\nwidth=4\nheight=4\nchannels=3\n[convolutional]\nfilters=8\nsize=1\n"
                   "batch_normalize=1\nactivation=leaky\n")
    graph = build_graph(parse_cfg(cfg))
    arrays = random_weights(graph, seed=2)
    arrays[0]["rolling_variance"] = _ambiguous_variances(8)
    src = tmp_path / "src.weights"
    write_weights(src, WeightsHeader(), graph, arrays)
    rep = convert(cfg, src, tmp_path / "m")
    # convert records the exact variances in the sidecar, keyed by the stored var' bits ...
    overrides = exact_variance_overrides(graph, arrays)
    assert len(overrides["0"]) == 8
    sidecar = json.loads(rep.sidecar.read_text())
    assert sidecar["bn_exact"] == overrides
    # ... without them the float32 var' alone cannot tell the 8 variances from their neighbours.
    rep.sidecar.write_text(json.dumps({k: v for k, v in sidecar.items() if k != "bn_exact"}))
    plain = export(rep.caffemodel, tmp_path / "plain.weights")
    assert plain.variance.ambiguous == 8
    assert (tmp_path / "plain.weights").read_bytes() != src.read_bytes()
    rep.sidecar.write_text(json.dumps(sidecar))
    fixed = export(rep.caffemodel, tmp_path / "fixed.weights")
    assert fixed.variance.overridden == 8
    _same_bytes(tmp_path / "fixed.weights", src)
    # A stale override (the model was trained since) is ignored: var' no longer matches.
    net = read_caffemodel_net(rep.caffemodel)
    bn = next(layer for layer in net.layers if layer.name == "layer000_bn")
    bn.blobs[1] = np.nextafter(bn.blobs[1], F32(np.inf))
    write_caffemodel(net, rep.caffemodel)
    stale = export(rep.caffemodel, tmp_path / "stale.weights")
    assert stale.variance.overridden == 0


# --------------------------------------------------------------------------------------------
# BN-folded models
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def folded_export(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("folded")
    rep = convert(TINY_CFG, TINY_WEIGHTS, tmp / "m", fold_bn=True)
    exp = export(tmp / "m", tmp / "folded.weights")
    return tmp, exp


def test_folded_export_equals_the_folded_arrays(folded_export) -> None:
    tmp, exp = folded_export
    graph = load_graph(TINY_CFG)
    _, original = read_weights(TINY_WEIGHTS, graph)
    bn_layers = [n.index for n in graph.nodes if n.attrs.get("bn")]
    assert exp.folded == bn_layers and len(bn_layers) == 11
    assert exp.cfg_written == tmp / "folded.cfg"
    folded_graph = load_graph(exp.cfg_written)
    assert not any(n.attrs.get("bn") for n in folded_graph.nodes)
    _, got = read_weights(tmp / "folded.weights", folded_graph)
    for node in graph.nodes:
        a = original.get(node.index) or {}
        if node.index in bn_layers:
            w, b = fold_batchnorm(a["weights"], a["scales"], a["biases"], a["rolling_mean"],
                                  a["rolling_variance"], "pjreddie")
            np.testing.assert_array_equal(got[node.index]["weights"], w)
            np.testing.assert_array_equal(got[node.index]["biases"], b)
        elif a:
            for name, arr in a.items():
                np.testing.assert_array_equal(got[node.index][name], arr)
    # Only the batch_normalize lines changed.
    old = TINY_CFG.read_text().split("\n")
    new = exp.cfg_written.read_text().split("\n")
    changed = [(o, n) for o, n in zip(old, new) if o != n]
    assert len(old) == len(new) and len(changed) == 11
    assert all(n == "batch_normalize=0" for _, n in changed)


def test_folded_export_runs_in_real_darknet(folded_export) -> None:
    """The written cfg + weights load in Debian's libdarknet and match the unfolded model."""
    from d2c.darknet.runtime import DarknetProcess
    tmp, exp = folded_export
    x = np.random.default_rng(5).uniform(0, 1, (1, 3, 416, 416)).astype(F32)
    outputs = {}
    for tag, cfg, weights in (("bn", TINY_CFG, TINY_WEIGHTS), ("folded", exp.cfg_written, exp.weights)):
        with DarknetProcess(cfg, weights) as net:
            net.forward(x)
            outputs[tag] = [net.layer_output(i) for i in (15, 22)]   # the raw inputs of both [yolo]
    for ref, got in zip(outputs["bn"], outputs["folded"]):
        scale = np.abs(ref).max()
        err = np.abs(got - ref).max() / scale
        assert err < 1e-5, err   # measured 1.6e-6 and 2.4e-6
        assert err > 0   # folding does change the float rounding: these are different nets


def test_folded_export_refuses_to_overwrite_its_cfg(tmp_path: Path) -> None:
    cfg = tmp_path / "tiny.cfg"
    cfg.write_text(TINY_CFG.read_text())
    convert(cfg, TINY_WEIGHTS, tmp_path / "m", fold_bn=True)
    with pytest.raises(D2CError, match="overwrite the source cfg"):
        export(tmp_path / "m", tmp_path / "tiny.weights")


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------

@pytest.fixture()
def tiny_model(tmp_path: Path) -> Path:
    rep = convert(TINY_CFG, TINY_WEIGHTS, tmp_path / "m")
    return rep.caffemodel


def test_wrong_cfg_names_the_layer(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as info:
        export(tiny_model, tmp_path / "x.weights", cfg="/usr/share/darknet/cfg/yolov2-tiny.cfg")
    message = str(info.value)
    # yolov2-tiny's first 13 layers fit; its layer 13 is a 3x3 conv where yolov3-tiny has a 1x1.
    assert "'layer013_conv'" in message and "[256, 1024, 1, 1]" in message
    assert "layer 13 /usr/share/darknet/cfg/yolov2-tiny.cfg:107 [convolutional] needs [512, 1024, 3, 3]" in message
    assert not (tmp_path / "x.weights").exists()


def test_missing_layer_names_it(tiny_model: Path, tmp_path: Path) -> None:
    net = read_caffemodel_net(tiny_model)
    net.layers = [layer for layer in net.layers if layer.name != "layer004_scale"]
    write_caffemodel(net, tiny_model)
    with pytest.raises(WeightsError, match=r"no Caffe layer 'layer004_scale' \(BN gamma/beta\) for layer 4 "
                                           r".*yolov3-tiny.cfg:49 \[convolutional\]"):
        export(tiny_model, tmp_path / "x.weights")


def test_wrong_blob_shape_names_it(tiny_model: Path, tmp_path: Path) -> None:
    net = read_caffemodel_net(tiny_model)
    layer = next(x for x in net.layers if x.name == "layer002_bn")
    layer.blobs[0] = np.zeros(31, F32)
    write_caffemodel(net, tiny_model)
    with pytest.raises(WeightsError, match=r"'layer002_bn' blob 0 \(mean\) has shape \[31\], layer 2 "
                                           r".*yolov3-tiny.cfg:\d+ \[convolutional\] needs \[32\]"):
        export(tiny_model, tmp_path / "x.weights")


def test_shorter_cfg_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    text = TINY_CFG.read_text()
    cut = tmp_path / "cut.cfg"
    cut.write_text(text[: text.index("[maxpool]", text.index("[maxpool]") + 1)])   # 3 layers
    with pytest.raises(WeightsError, match="beyond the cfg's 3 layers"):
        export(tiny_model, tmp_path / "x.weights", cfg=cut)


def test_caffemodel_without_sidecar_needs_cfg(tiny_model: Path, tmp_path: Path) -> None:
    lone = tmp_path / "lone" / "model.caffemodel"
    lone.parent.mkdir()
    lone.write_bytes(tiny_model.read_bytes())
    with pytest.raises(D2CError, match="pass --cfg"):
        export(lone, tmp_path / "x.weights")
    rep = export(lone, tmp_path / "x.weights", cfg=TINY_CFG, seen=32013312)
    assert rep.header == WeightsHeader(0, 2, 0, 32013312)
    _same_bytes(tmp_path / "x.weights", TINY_WEIGHTS)


def test_cli_reports_errors_in_one_line(tiny_model: Path, tmp_path: Path, capsys) -> None:
    code = cli_main(["export", str(tiny_model), "-o", str(tmp_path / "x.weights"),
                     "--cfg", "/usr/share/darknet/cfg/yolov2-tiny.cfg"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("d2c export: error:") and "'layer013_conv'" in err and err.count("\n") == 1
    assert cli_main(["export", str(tiny_model.parent), "-o", str(tmp_path / "ok.weights")]) == 0
    assert "wrote" in capsys.readouterr().out
    _same_bytes(tmp_path / "ok.weights", TINY_WEIGHTS)


@pytest.mark.parametrize("train", [False, True], ids=["deploy", "train-exact-bn"])
def test_caffemodel_saved_by_real_caffe_exports_identically(tmp_path: Path, train: bool) -> None:
    """BVLC Caffe's own writer (pycaffe Net.save, as a training snapshot is written) round-trips too."""
    from d2c.engines import import_caffe
    caffe = import_caffe()
    rep = convert(TINY_CFG, TINY_WEIGHTS, tmp_path / "m", train=train)
    stem = "yolov3-tiny_train" if train else "yolov3-tiny"
    net = caffe.Net(str(tmp_path / "m" / f"{stem}.prototxt"), str(tmp_path / "m" / f"{stem}.caffemodel"),
                    caffe.TRAIN if train else caffe.TEST)
    snapshot = tmp_path / "snap" / "iter_0.caffemodel"
    snapshot.parent.mkdir()
    net.save(str(snapshot))
    assert snapshot.read_bytes() != (tmp_path / "m" / f"{stem}.caffemodel").read_bytes()   # Caffe's own encoding
    export(snapshot, tmp_path / "snap.weights", sidecar=rep.sidecar)
    _same_bytes(tmp_path / "snap.weights", TINY_WEIGHTS)
