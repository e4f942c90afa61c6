"""[convolutional]: geometry, groups, BN (pjreddie and AlexeyAB eps), folding, activations.

pjreddie cfgs run against the real Darknet; AlexeyAB activations (mish, swish) against OpenCV's
Darknet importer and a numpy reference of AlexeyAB's formulas.
"""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from .conftest import (ATOL_SCALE, RTOL, assert_close, build_bundle, check_all_engines, max_rel_err,
                       net_header, section)

# (filters, size, stride, pad, padding, groups) on input channels 4
GEOMETRIES = {
    "3x3-s1-pad": (4, 3, 1, 1, None, 1),
    "3x3-s2-pad": (5, 3, 2, 1, None, 1),
    "1x1": (3, 1, 1, 0, None, 1),
    "5x5-pad": (2, 5, 1, 1, None, 1),
    "3x3-valid": (2, 3, 1, 0, None, 1),
    "3x3-s2-padding2": (3, 3, 2, 0, 2, 1),
    "2x2-s2": (3, 2, 2, 0, None, 1),
    "groups2": (6, 3, 1, 1, None, 2),
    "depthwise": (4, 3, 1, 1, None, 4),
}
SHAPES = {"odd": (4, 7, 9), "even": (4, 8, 6)}
ACTIVATIONS = ["leaky", "logistic", "relu", "linear", "tanh", "elu"]


def conv_section(filters: int, size: int, stride: int, pad: int, padding: int | None, groups: int,
                 activation: str, bn: bool) -> str:
    keys = {"filters": filters, "size": size, "stride": stride, "pad": pad, "groups": groups,
            "activation": activation}
    if padding is not None:
        keys["padding"] = padding
    if bn:
        keys["batch_normalize"] = 1
    return section("convolutional", **keys)


def geometry_variants() -> dict[str, str]:
    return {f"{g}-{'bn' if bn else 'bias'}": conv_section(*GEOMETRIES[g], "leaky", bn)
            for g in GEOMETRIES for bn in (False, True)}


@pytest.fixture(scope="module", params=list(SHAPES))
def geometry_bundle(request, tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp(f"conv-{request.param}"), SHAPES[request.param],
                        geometry_variants())


@pytest.mark.parametrize("variant", list(geometry_variants()))
def test_geometry_against_darknet(geometry_bundle, variant):
    geometry_bundle.check(variant)


def activation_variants() -> dict[str, str]:
    return {f"{act}-{'bn' if bn else 'bias'}": conv_section(4, 3, 1, 1, None, 1, act, bn)
            for act in ACTIVATIONS for bn in (False, True)}


@pytest.fixture(scope="module", params=[False, True], ids=["unfolded", "fold-bn"])
def activation_bundle(request, tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("conv-act"), (3, 6, 5), activation_variants(),
                        fold_bn=request.param)


@pytest.mark.parametrize("variant", list(activation_variants()))
def test_activations_against_darknet(activation_bundle, variant):
    """Every pjreddie activation d2c maps, with and without BN, unfolded and with --fold-bn."""
    bundle = activation_bundle
    if bundle.case.conversion.options.fold_bn:
        assert not [layer for layer in bundle.case.net.layers if layer.type == "BatchNorm"]
    bundle.check(variant)


def small_variance_case(make_case, fold_bn: bool = False):
    """BN whose rolling variances are tiny, where the eps placement decides the result."""
    cfg = net_header(2, 5, 5) + section("convolutional", filters=3, size=3, pad=1, batch_normalize=1,
                                        activation="linear")
    arrays = copy.deepcopy(make_case(cfg).arrays)
    arrays[0]["rolling_variance"] = np.array([2e-6, 1e-5, 3e-4], np.float32)
    # Rebuilt with the edited arrays, so the .weights file and the Caffe model agree.
    return make_case(cfg, fold_bn=fold_bn, arrays=arrays)


@pytest.mark.parametrize("fold_bn", [False, True], ids=["bn-scale", "folded"])
def test_bn_tiny_variance_against_darknet(make_case, fold_bn):
    """pjreddie's sqrt(var) + 1e-6 matters when var is tiny; d2c's stored var' reproduces it."""
    case = small_variance_case(make_case, fold_bn)
    check_all_engines(case)


def test_negative_caffe_default_bn_eps_is_wrong(make_case):
    """The naive mapping (raw variance, Caffe's default eps 1e-5) is visibly wrong on tiny variances."""
    case = small_variance_case(make_case)
    naive = copy.deepcopy(case.net)
    for layer in naive.layers:
        if layer.type == "BatchNorm":
            layer.blobs[1] = case.arrays[0]["rolling_variance"].copy()
            layer.params["batch_norm_param"] = {"use_global_stats": True, "eps": 1e-5}
    got = case.with_net(naive, "naive_bn")([0])[0]
    err = max_rel_err(got.reshape(case.shape(0)), case.darknet()[0])
    assert err > 100 * RTOL, f"naive BN mapping should be far from Darknet, max rel err {err:.3g}"


def test_1x1_stride2_refused_for_pjreddie(make_case):
    from d2c.errors import CfgError
    cfg = net_header(3, 6, 6) + section("convolutional", filters=2, size=1, stride=2, activation="linear")
    with pytest.raises(CfgError) as info:
        make_case(cfg)
    assert re.search(r"net\.cfg:\d+ \[convolutional\] 'size'.*1x1", info.value.render())


# --------------------------------------------------------------------------------------------
# AlexeyAB activations and BN: OpenCV's Darknet importer + numpy references
# --------------------------------------------------------------------------------------------

def alexeyab_mish(x: np.ndarray) -> np.ndarray:
    """AlexeyAB's mish: x * tanh(softplus(x)) with softplus thresholds at +-20, in float."""
    x = x.astype(np.float32)
    sp = np.where(x > 20, x, np.where(x < -20, np.exp(x), np.log1p(np.exp(x)))).astype(np.float32)
    return (x * np.tanh(sp)).astype(np.float32)


def alexeyab_swish(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return (x / (1 + np.exp(-x))).astype(np.float32)


def conv_reference(x: np.ndarray, weights: np.ndarray, padding: int, stride: int) -> np.ndarray:
    """Plain float64 convolution (groups 1) on (N, C, H, W)."""
    n, c, h, w = x.shape
    f, _, k, _ = weights.shape
    xp = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    oh = (h + 2 * padding - k) // stride + 1
    ow = (w + 2 * padding - k) // stride + 1
    out = np.zeros((n, f, oh, ow))
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, :, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride]
            out += np.einsum("nchw,fc->nfhw", patch, weights[:, :, ky, kx].astype(np.float64))
    return out


AB_ACTIVATIONS = ["mish", "swish", "leaky", "logistic"]


def alexeyab_variants() -> dict[str, str]:
    return {f"{act}-{'bn' if bn else 'bias'}": conv_section(4, 3, 1, 1, None, 1, act, bn)
            for act in AB_ACTIVATIONS for bn in (False, True)}


@pytest.fixture(scope="module")
def alexeyab_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("conv-ab"), (3, 6, 5), alexeyab_variants(), flavor="alexeyab")


@pytest.mark.parametrize("variant", list(alexeyab_variants()))
def test_alexeyab_activations(alexeyab_bundle, variant):
    """AlexeyAB BN (sqrt(var + 1e-5)) and activations: numpy reference and OpenCV's Darknet importer."""
    bundle = alexeyab_bundle
    activation, bn = variant.split("-")[0], variant.endswith("-bn")
    index = bundle.last(variant)
    caffe = bundle.check(variant, darknet=False)[index]
    a = bundle.case.arrays[index]
    z = conv_reference(bundle.case.x, a["weights"], 1, 1)
    shape = (1, -1, 1, 1)
    if bn:
        z = ((z - a["rolling_mean"].reshape(shape))
             / np.sqrt(a["rolling_variance"].astype(np.float64) + 1e-5).reshape(shape)
             * a["scales"].reshape(shape) + a["biases"].reshape(shape))
    else:
        z = z + a["biases"].reshape(shape)
    z = z.astype(np.float32)
    reference = {"mish": alexeyab_mish, "swish": alexeyab_swish,
                 "leaky": lambda v: np.where(v > 0, v, np.float32(0.1) * v),
                 "logistic": lambda v: 1 / (1 + np.exp(-v))}[activation](z)
    assert_close(caffe, reference, f"{variant} pycaffe vs AlexeyAB numpy reference")
    # OpenCV's importer normalises with sqrt(var + 1e-6), AlexeyAB with sqrt(var + 1e-5): with
    # variances in [0.5, 2] that is at most 9e-6 relative, hence the wider bound for BN only.
    bound = 2e-5 if bn else RTOL
    assert_close(caffe, bundle.case.opencv_darknet(index), f"{variant} pycaffe vs OpenCV Darknet importer",
                 rtol=bound, atol_scale=max(bound, ATOL_SCALE))


def test_mish_falls_back_to_relu_for_pjreddie(make_case):
    """mish makes a cfg AlexeyAB when inferred; forced to pjreddie it runs as ReLU, exactly as the
    Debian Darknet does ("Couldn't find activation function mish, going with ReLU")."""
    cfg = net_header(3, 5, 5) + conv_section(3, 3, 1, 1, None, 1, "mish", False)
    case = make_case(cfg, flavor="pjreddie")
    assert any("ReLU instead" in w for w in case.conversion.warnings)
    check_all_engines(case)
