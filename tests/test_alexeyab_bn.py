"""d2c's Darknet BatchNorm reference (d2c/loss/bn.py, flavor alexeyab, CPU factor 0.9) against AlexeyAB's
CPU build bit for bit: training forward x̂, rolling statistics, backward delta, inference forward.

How x̂ and the deltas are read exactly: layer 0 and layer 2 are identity 1x1 convolutions (one product
by 1 and exact zeros), so layer 1's output is the engine's x̂ (gamma 1, beta 0, linear), the delta
its backward receives is the [yolo] head's own delta, and layer 0's delta is the BN backward.
Found by this comparison: the engine divides (x - mean) by sqrt(var + 1e-5f) in double; an all-float
division (d2c before) is 1 ulp off in about a quarter of the elements.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from d2c.darknet.runtime import DarknetProcess
from d2c.loss import bn

F32, F64 = np.float32, np.float64
CPU_MOMENTUM = 0.9
CFG = """[net]
batch={b}
subdivisions=1
width={w}
height={h}
channels=6

[convolutional]
filters=6
size=1
stride=1
activation=linear

[convolutional]
batch_normalize=1
filters=6
size=1
stride=1
activation=linear

[convolutional]
filters=6
size=1
stride=1
activation=linear

[yolo]
mask=0
anchors=10,14
classes=1
num=1
"""


def engine_bn_run(tmp_path: Path, x: np.ndarray, r_mean: np.ndarray, r_var: np.ndarray, truth: np.ndarray):
    """One training forward/backward and one inference forward in the engine; what its BN did."""
    b, c, h, w = x.shape
    cfg = tmp_path / "bn.cfg"
    cfg.write_text(CFG.format(b=b, h=h, w=w))
    eye = np.eye(c, dtype=F32).reshape(c, c, 1, 1)
    zeros = np.zeros(c, F32)
    with DarknetProcess(cfg, engine="alexeyab") as dn:
        dn.set_layer_params(0, weights=eye, biases=zeros)
        dn.set_layer_params(1, weights=eye, biases=zeros, scales=np.ones(c, F32),
                            rolling_mean=r_mean, rolling_variance=r_var)
        dn.set_layer_params(2, weights=eye, biases=zeros)
        dn.forward(x, train=True, truth=truth)
        x_norm = dn.layer_output(1)
        params = dn.layer_params(1)
        dn.backward()
        dy, dx = dn.layer_delta(3), dn.layer_delta(0)
        dn.forward(x, train=False)
        infer = dn.layer_output(1)
    return x_norm, params, dy, dx, infer


@pytest.mark.parametrize("shape,seed", [((2, 6, 13, 13), 1), ((2, 6, 5, 5), 2)])
def test_alexeyab_bn_is_bit_exact_against_the_engine(tmp_path: Path, shape, seed) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.normal(0.3, 2.0, shape) * rng.uniform(0.01, 3, (1, shape[1], 1, 1))).astype(F32)
    r_mean = rng.normal(0, 1, shape[1]).astype(F32)
    r_var = rng.uniform(0.1, 2, shape[1]).astype(F32)
    truth = np.zeros((shape[0], 5 * 3), F32)
    truth[:, :5] = [0.4, 0.6, 0.3, 0.2, 0]
    truth[:, 5:10] = [0.7, 0.2, 0.1, 0.4, 0]
    x_norm, params, dy, dx, infer = engine_bn_run(tmp_path, x, r_mean, r_var, truth)
    res = bn.bn_train_forward(x, r_mean, r_var, flavor="alexeyab", momentum=CPU_MOMENTUM)
    np.testing.assert_array_equal(res.x_norm, x_norm)
    np.testing.assert_array_equal(res.rolling_mean, params["rolling_mean"])
    np.testing.assert_array_equal(res.rolling_variance, params["rolling_variance"])
    assert np.count_nonzero(dy) > 10, "the head must pass a gradient back"
    np.testing.assert_array_equal(bn.bn_backward(dy, x, res.mean, res.variance, flavor="alexeyab"), dx)
    np.testing.assert_array_equal(
        bn.bn_infer_forward(x, params["rolling_mean"], params["rolling_variance"], flavor="alexeyab"), infer)
    # Negative control: the all-float division d2c used before is not the engine's value.
    centred = (x - res.mean.reshape(1, -1, 1, 1)).astype(F32)
    all_float = centred / np.sqrt((res.variance + F32(1e-5)).astype(F32)).reshape(1, -1, 1, 1)
    assert np.count_nonzero(all_float != x_norm) > 0.05 * x.size
    np.testing.assert_allclose(all_float, x_norm, rtol=2.5e-7, atol=0)
