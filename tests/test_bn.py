"""Darknet's training BatchNorm: numpy reference, Caffe Python layer, and the real Darknet.

The reference is checked three ways: against straightforward scalar re-implementations of the
C loops (sums in Darknet's order and precision), against a finite-difference gradient of the
function whose exact gradient the §5.3 backward formula is, and bit for bit against Debian's
libdarknet.so (training forward, rolling statistics, inference, backward delta). The stock
Caffe BatchNorm mode is measured against the same engine, with its documented error bounds.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("GLOG_minloglevel", "2")

from d2c.caffe.proto import CaffeLayer, CaffeNet, to_prototxt, write_caffemodel  # noqa: E402
from d2c.darknet.runtime import DarknetProcess  # noqa: E402
from d2c.engines import import_caffe  # noqa: E402
from d2c.errors import NumericError, ParamError  # noqa: E402
from d2c.loss import bn  # noqa: E402
from d2c.loss.params import dump_params  # noqa: E402

F32 = np.float32
F64 = np.float64


def sample(shape: tuple[int, int, int, int], seed: int) -> np.ndarray:
    """Activations with per-channel offsets and scales (incl. near-constant channels)."""
    rng = np.random.default_rng(seed + 1000)  # independent of sample()
    b, c, h, w = shape
    scale = rng.uniform(0.01, 5.0, (1, c, 1, 1))
    offset = rng.normal(0.0, 3.0, (1, c, 1, 1))
    return (rng.normal(0.0, 1.0, shape) * scale + offset).astype(F32)


# ------------------------------------------------------------------------------------------
# Reference against scalar transcriptions of the C loops
# ------------------------------------------------------------------------------------------

def scalar_mean(x: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    out = np.zeros(c, F32)
    scale = F32(1.0 / (b * h * w))
    for i in range(c):
        acc = F32(0)
        for j in range(b):
            for v in x[j, i].reshape(-1):
                acc = F32(acc + v)
        out[i] = F32(acc * scale)
    return out


def scalar_variance(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    b, c, h, w = x.shape
    out = np.zeros(c, F32)
    scale = F32(1.0 / (b * h * w - 1))
    for i in range(c):
        acc = F32(0)
        for j in range(b):
            for v in x[j, i].reshape(-1):
                d = F64(F32(v - mean[i]))
                acc = F32(F64(acc) + d * d)
        out[i] = F32(acc * scale)
    return out


@pytest.mark.parametrize("shape,seed", [((1, 3, 4, 5), 0), ((2, 4, 3, 3), 1), ((3, 2, 7, 1), 2), ((1, 1, 1, 2), 3)])
def test_batch_statistics_match_scalar_loops(shape, seed):
    x = sample(shape, seed)
    mean = bn.batch_mean(x)
    np.testing.assert_array_equal(mean, scalar_mean(x))
    np.testing.assert_array_equal(bn.batch_variance(x, mean, "always"), scalar_variance(x, mean))


def test_fast_variance_is_within_two_ulp_of_the_exact_loop():
    x = sample((2, 5, 64, 64), 4)   # m = 8192
    mean = bn.batch_mean(x)
    exact = bn.batch_variance(x, mean, "always")
    fast = bn.batch_variance(x, mean, "never")
    assert np.max(np.abs(fast - exact) / np.spacing(exact)) <= 2
    # numpy's own float64 variance is *not* Darknet's value: the sequential float sum drifts.
    np.testing.assert_array_equal(bn.batch_variance(x, mean, "auto"), exact)


def test_normalize_and_rolling_update_formulas():
    x = sample((2, 3, 4, 4), 5)
    mean = np.array([0.5, -1.0, 2.0], F32)
    var = np.array([0.0, 1e-8, 4.0], F32)   # zero variance: Darknet divides by 1e-6
    got = bn.normalize(x, mean, var, "pjreddie")
    want = ((x - mean.reshape(1, -1, 1, 1)).astype(F32).astype(F64)
            / (np.sqrt(var.astype(F64)) + F64(F32(1e-6))).reshape(1, -1, 1, 1)).astype(F32)
    np.testing.assert_array_equal(got, want)
    ab = bn.normalize(x, mean, var, "alexeyab")
    np.testing.assert_allclose(ab, (x - mean.reshape(1, -1, 1, 1)) / np.sqrt(var + 1e-5).reshape(1, -1, 1, 1),
                               rtol=1e-6, atol=0)
    want_ab = ((x - mean.reshape(1, -1, 1, 1)).astype(F32).astype(F64)
               / np.sqrt((var + F32(1e-5)).astype(F32).astype(F64)).reshape(1, -1, 1, 1)).astype(F32)
    np.testing.assert_array_equal(ab, want_ab)
    r = np.array([1.0, 2.0, 3.0], F32)
    v = np.array([0.1, 0.2, 0.3], F32)
    np.testing.assert_array_equal(bn.rolling_update(r, v), (r * F32(0.99)).astype(F32) + (F32(0.01) * v).astype(F32))
    np.testing.assert_array_equal(bn.rolling_update(r, v, 0.9), (r * F32(0.9)).astype(F32) + (F32(0.1) * v).astype(F32))
    with pytest.raises(ParamError, match="flavor"):
        bn.normalize(x, mean, var, "tf")


# ------------------------------------------------------------------------------------------
# The backward formula (§5.3) by finite differences of the function it is the gradient of
# ------------------------------------------------------------------------------------------

def surrogate_loss(x: np.ndarray, dy: np.ndarray, eps_eff: np.ndarray) -> float:
    """sum(dy * (x - mu)/sqrt(var_biased + eps_eff)) in float64, eps_eff per channel.

    Darknet's backward is the textbook biased-variance BN gradient evaluated with (unbiased
    var + 1e-5); with eps_eff = 1e-5 + var_unbiased(x0) - var_biased(x0) frozen at the
    evaluation point x0 this function's exact gradient at x0 is that formula.
    """
    mu = x.mean(axis=(0, 2, 3), keepdims=True)
    vb = ((x - mu) ** 2).mean(axis=(0, 2, 3), keepdims=True)
    return float(np.sum(dy * (x - mu) / np.sqrt(vb + eps_eff.reshape(1, -1, 1, 1))))


@pytest.mark.parametrize("shape,seed", [((2, 3, 3, 3), 6), ((1, 2, 5, 4), 7), ((4, 1, 2, 2), 8)])
def test_backward_is_the_documented_formula(shape, seed):
    x = sample(shape, seed).astype(F64)
    rng = np.random.default_rng(seed + 100)
    dy = rng.normal(0.0, 1.0, shape)
    m = shape[0] * shape[2] * shape[3]
    mean = x.mean(axis=(0, 2, 3))
    var_unbiased = x.var(axis=(0, 2, 3), ddof=1)
    eps_eff = 1e-5 + var_unbiased - x.var(axis=(0, 2, 3))
    h = 1e-4
    fd = np.zeros(shape)
    for idx in np.ndindex(*shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd[idx] = (surrogate_loss(xp, dy, eps_eff) - surrogate_loss(xm, dy, eps_eff)) / (2 * h)
    got = bn.bn_backward(dy.astype(F32), x.astype(F32), mean.astype(F32), var_unbiased.astype(F32))
    scale = np.max(np.abs(fd))
    np.testing.assert_allclose(got, fd, rtol=1e-4, atol=1e-4 * scale)
    # ...and it is *not* the gradient of Darknet's own forward (unbiased var, eps outside):
    def true_loss(z):
        mu = z.mean(axis=(0, 2, 3), keepdims=True)
        vu = ((z - mu) ** 2).sum(axis=(0, 2, 3), keepdims=True) / (m - 1)
        return float(np.sum(dy * (z - mu) / (np.sqrt(vu) + 1e-6)))
    fd_true = np.zeros(shape)
    for idx in np.ndindex(*shape):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        fd_true[idx] = (true_loss(xp) - true_loss(xm)) / (2 * h)
    assert np.max(np.abs(got - fd_true)) > 10 * 1e-4 * scale


def test_alexeyab_backward_first_term_has_eps_outside():
    x = sample((2, 2, 3, 3), 9)
    dy = np.random.default_rng(9).normal(0, 1, x.shape).astype(F32)
    mean = bn.batch_mean(x)
    var = bn.batch_variance(x, mean)
    pj = bn.bn_backward(dy, x, mean, var, "pjreddie").astype(F64)
    ab = bn.bn_backward(dy, x, mean, var, "alexeyab").astype(F64)
    v = var.astype(F64).reshape(1, -1, 1, 1)
    expected = dy.astype(F64) * (1 / (np.sqrt(v) + 1e-5) - 1 / np.sqrt(v + 1e-5))
    np.testing.assert_allclose(ab - pj, expected, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Against the real Darknet (Debian libdarknet.so, in a child process)
# ------------------------------------------------------------------------------------------

BN_CFG = """[net]
batch={b}
subdivisions=1
width={w}
height={h}
channels={c}

[convolutional]
filters={c}
size=1
stride=1
activation=linear

[convolutional]
batch_normalize=1
filters={c}
size=1
stride=1
activation=linear

[cost]
type=sse
"""


def darknet_bn_run(tmp_path: Path, x: np.ndarray, r_mean: np.ndarray, r_var: np.ndarray, target: np.ndarray):
    """Identity 1x1 conv -> conv(identity)+BN(gamma 1, beta 0) -> sse cost, one train forward/backward.

    Identity 1x1 convolutions are exact (one product by 1 plus exact zeros), so layer 1's output
    is Darknet's x̂ and layer 0's delta is its BN backward of delta = target - x̂.
    """
    b, c, h, w = x.shape
    cfg = tmp_path / "bn.cfg"
    cfg.write_text(BN_CFG.format(b=b, c=c, h=h, w=w))
    eye = np.eye(c, dtype=F32).reshape(c, c, 1, 1)
    with DarknetProcess(cfg) as dn:
        dn.set_layer_params(0, weights=eye, biases=np.zeros(c, F32))
        dn.set_layer_params(1, weights=eye, biases=np.zeros(c, F32), scales=np.ones(c, F32),
                            rolling_mean=r_mean, rolling_variance=r_var)
        dn.forward(x, train=True, truth=target.reshape(b, -1))
        out = dn.layer_output(1)
        params = dn.layer_params(1)
        dn.backward()
        dx = dn.layer_delta(0)
        dn.forward(x, train=False)
        out_infer = dn.layer_output(1)
    return out, params, dx, out_infer


@pytest.mark.parametrize("shape,seed", [((2, 6, 4, 5), 2), ((1, 8, 13, 13), 4), ((4, 3, 26, 26), 6)])
def test_reference_is_bit_exact_against_darknet(tmp_path, shape, seed):
    x = sample(shape, seed)
    rng = np.random.default_rng(seed + 1000)  # independent of sample()
    r_mean = rng.normal(0, 1, shape[1]).astype(F32)
    r_var = rng.uniform(0.1, 2, shape[1]).astype(F32)
    target = rng.normal(0, 1, shape).astype(F32)
    out, params, dx, out_infer = darknet_bn_run(tmp_path, x, r_mean, r_var, target)
    res = bn.bn_train_forward(x, r_mean, r_var)
    np.testing.assert_array_equal(res.x_norm, out)
    np.testing.assert_array_equal(res.rolling_mean, params["rolling_mean"])
    np.testing.assert_array_equal(res.rolling_variance, params["rolling_variance"])
    delta = (target - out).astype(F32)
    np.testing.assert_array_equal(bn.bn_backward(delta, x, res.mean, res.variance), dx)
    np.testing.assert_array_equal(bn.bn_infer_forward(x, params["rolling_mean"], params["rolling_variance"]),
                                  out_infer)


def caffe_net_file(tmp_path: Path, layers: list[CaffeLayer], shape, name="bn") -> tuple[Path, Path]:
    net = CaffeNet(name, [("data", tuple(shape))], layers)
    proto, model = tmp_path / f"{name}.prototxt", tmp_path / f"{name}.caffemodel"
    proto.write_text("force_backward: true\n" + to_prototxt(net))
    write_caffemodel(net, model)
    return proto, model


def dbn_layer(name: str, blobs, **extra) -> CaffeLayer:
    return CaffeLayer(name, "Python", ["data"], ["data"], {
        "python_param": {"module": "d2c.loss.caffe_layers", "layer": "DarknetBatchNorm",
                         "param_str": dump_params({"name": name, **extra})},
        "param": [{"lr_mult": 0.0, "decay_mult": 0.0}] * 2}, list(blobs))


def test_caffe_layer_equals_darknet_training_and_inference(tmp_path):
    """The Python layer in a real pycaffe net (in place, as emitted) against libdarknet.so."""
    caffe = import_caffe()
    shape = (2, 5, 6, 7)
    x = sample(shape, 11)
    rng = np.random.default_rng(1011)
    r_mean, r_var = rng.normal(0, 1, 5).astype(F32), rng.uniform(0.1, 2, 5).astype(F32)
    target = rng.normal(0, 1, shape).astype(F32)
    out, params, dx, out_infer = darknet_bn_run(tmp_path, x, r_mean, r_var, target)
    proto, model = caffe_net_file(tmp_path, [dbn_layer("bn0", [r_mean, r_var])], shape)
    net = caffe.Net(str(proto), str(model), caffe.TRAIN)
    net.blobs["data"].data[...] = x
    net.forward()
    np.testing.assert_array_equal(net.blobs["data"].data, out)
    np.testing.assert_array_equal(net.params["bn0"][0].data, params["rolling_mean"])
    np.testing.assert_array_equal(net.params["bn0"][1].data, params["rolling_variance"])
    net.blobs["data"].diff[...] = -(target - out)   # Caffe's diff is minus Darknet's delta
    net.backward()
    np.testing.assert_array_equal(-net.blobs["data"].diff, dx)
    # TEST phase: the rolling statistics with Darknet's denominator (loaded from the caffemodel)
    test_net = caffe.Net(str(proto), str(model), caffe.TEST)
    test_net.params["bn0"][0].data[...] = params["rolling_mean"]
    test_net.params["bn0"][1].data[...] = params["rolling_variance"]
    test_net.blobs["data"].data[...] = x
    test_net.forward()
    np.testing.assert_array_equal(test_net.blobs["data"].data, out_infer)
    np.testing.assert_array_equal(test_net.params["bn0"][1].data, params["rolling_variance"])  # unchanged


def test_stock_batchnorm_mode_error_against_darknet(tmp_path):
    """Stock Caffe BatchNorm (factor 100, maf 0.99, eps 1e-5), measured: running statistics
    agree to float rounding, x̂ and the gradient do not (biased variance, eps placement)."""
    caffe = import_caffe()
    shape = (1, 8, 13, 13)
    x = sample(shape, 4)
    rng = np.random.default_rng(1004)
    r_mean, r_var = rng.normal(0, 1, 8).astype(F32), rng.uniform(0.1, 2, 8).astype(F32)
    target = rng.normal(0, 1, shape).astype(F32)
    out, params, dx, _ = darknet_bn_run(tmp_path, x, r_mean, r_var, target)
    layer = CaffeLayer("bn", "BatchNorm", ["data"], ["y"],
                       {"batch_norm_param": {"use_global_stats": False, "moving_average_fraction": 0.99, "eps": 1e-5}},
                       [r_mean * 100, r_var * 100, np.full(1, 100, F32)])
    proto, model = caffe_net_file(tmp_path, [layer], shape, "stock")
    net = caffe.Net(str(proto), str(model), caffe.TRAIN)
    net.blobs["data"].data[...] = x
    net.forward()
    s = net.params["bn"][2].data[0]
    np.testing.assert_allclose(net.params["bn"][0].data / s, params["rolling_mean"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(net.params["bn"][1].data / s, params["rolling_variance"], rtol=0, atol=1e-6)
    xnorm_err = np.max(np.abs(net.blobs["y"].data - out))
    # m = 169: x̂ differs by the factor sqrt((m-1)/m), ~0.3 %, i.e. ~1e-2 at |x̂| ~ 3
    assert 1e-3 < xnorm_err < 5e-2
    net.blobs["y"].diff[...] = -(target - out)
    net.backward()
    grad_rel = np.max(np.abs(-net.blobs["data"].diff - dx)) / np.max(np.abs(dx))
    assert 1e-5 < grad_rel < 1e-2     # measured 5.3e-5 here (0.028 at m = 40, 1e-5 at m = 86528)


# ------------------------------------------------------------------------------------------
# Layer errors and the emission helper
# ------------------------------------------------------------------------------------------

def test_caffe_layer_rejects_bad_params_and_nan(tmp_path):
    caffe = import_caffe()
    shape = (2, 3, 2, 2)
    proto, model = caffe_net_file(tmp_path, [dbn_layer("bnx", [np.zeros(3, F32)] * 2, momentum_typo=0.9)], shape)
    with pytest.raises(ParamError, match=r"'bnx'.*unknown key\(s\) 'momentum_typo'"):
        caffe.Net(str(proto), caffe.TRAIN)
    proto, model = caffe_net_file(tmp_path, [dbn_layer("bny", [np.zeros(3, F32)] * 2)], shape)
    net = caffe.Net(str(proto), str(model), caffe.TRAIN)
    x = np.ones(shape, F32)
    x[1, 2, 0, 1] = np.nan
    net.blobs["data"].data[...] = x
    with pytest.raises(NumericError, match="'bny'.*NaN"):
        net.forward()


def test_darknet_bn_layer_emits_python_bn_and_scale():
    from d2c.caffe.emitter import TRAIN, ConvertOptions, Emitter
    from d2c.darknet.cfg import parse_cfg
    from d2c.darknet.graph import build_graph

    text = "[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional]\nbatch_normalize=1\nfilters=4\nsize=3\n" \
           "pad=1\nlearning_rate=0.5\nactivation=leaky\n"
    graph = build_graph(parse_cfg("t.cfg", text))
    node = graph.nodes[0]
    em = Emitter("t", ConvertOptions(mode=TRAIN, bn="exact", batch=2), (3, 8, 8))
    arrays = {"rolling_mean": np.arange(4, dtype=F32), "rolling_variance": np.full(4, 2, F32),
              "scales": np.ones(4, F32), "biases": np.zeros(4, F32)}
    bn.darknet_bn_layer(em, node, "blob", arrays, "pjreddie", 0.5)
    py, scale = em.layers
    assert (py.type, py.name, py.bottom, py.top) == ("Python", "layer000_dbn", ["blob"], ["blob"])
    assert py.params["python_param"]["layer"] == "DarknetBatchNorm"
    assert py.params["param"] == [{"lr_mult": 0.0, "decay_mult": 0.0}] * 2
    np.testing.assert_array_equal(py.blobs[0], arrays["rolling_mean"])
    assert scale.type == "Scale" and scale.params["param"] == [{"lr_mult": 0.5, "decay_mult": 0.0}] * 2
