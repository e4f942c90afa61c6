"""[shortcut]: act(alpha*prev + beta*from). pjreddie against the real Darknet; AlexeyAB's unequal
channels (channel prefix) and several `from`s against OpenCV's Darknet importer and numpy."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from d2c.errors import D2CError

from .conftest import assert_close, build_bundle, max_rel_err, net_header, section


def conv(filters: int, act: str = "leaky", **extra) -> str:
    return section("convolutional", filters=filters, size=3, pad=1, activation=act, **extra)


VARIANTS = {
    "linear": conv(4) + conv(4) + section("shortcut", **{"from": -2}, activation="linear"),
    "leaky": conv(4) + conv(4) + section("shortcut", **{"from": -2}, activation="leaky"),
    "logistic": conv(4) + conv(4) + section("shortcut", **{"from": -2}, activation="logistic"),
    "from-input-copy": conv(3, "linear") + section("shortcut", **{"from": -2}),
    "absolute-from": conv(4) + conv(4) + conv(4) + section("shortcut", **{"from": 2}, activation="linear"),
    "alpha-beta": conv(4) + conv(4) + section("shortcut", **{"from": -2}, alpha=0.5, beta=2, activation="linear"),
}


@pytest.fixture(scope="module")
def shortcut_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("shortcut"), (3, 5, 6), VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_against_darknet(shortcut_bundle, variant):
    shortcut_bundle.check(variant)


def ab_variants() -> dict[str, str]:
    return {
        "fewer-from-channels": conv(6, "linear") + conv(4, "linear") + section("shortcut", **{"from": -2}),
        "more-from-channels": conv(2, "linear") + conv(5, "linear") + section("shortcut", **{"from": -2}),
        "mish": conv(4, "linear") + conv(4, "linear") + section("shortcut", **{"from": -2}, activation="mish"),
        "two-from": conv(4, "linear") + conv(4, "linear") + conv(4, "linear")
                    + section("shortcut", **{"from": [-2, -3]}),
    }


@pytest.fixture(scope="module")
def ab_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("shortcut-ab"), (3, 4, 5), ab_variants(), flavor="alexeyab")


@pytest.mark.parametrize("variant", list(ab_variants()))
def test_alexeyab(ab_bundle, variant):
    case = ab_bundle.case
    node = case.graph.nodes[ab_bundle.last(variant)]
    # OpenCV's importer reads a single `from` only.
    out = ab_bundle.check(variant, opencv_darknet=len(node.inputs) == 2)[node.index]
    caffe = case.caffe()
    total = caffe[node.inputs[0]].astype(np.float64).copy()
    for src in node.inputs[1:]:
        add = caffe[src]
        c = min(add.shape[1], total.shape[1])       # AlexeyAB: the channel prefix both have
        total[:, :c] += add[:, :c]
    if node.attrs["activation"] == "mish":
        total = total * np.tanh(np.log1p(np.exp(total)))
    assert_close(out, total, f"{variant}: numpy reference")


def test_negative_more_channels_is_not_zero_padding(ab_bundle):
    """prev has 6 channels, from 4: the tail 2 channels pass through unchanged (not summed with anything)."""
    case = ab_bundle.case
    node = case.graph.nodes[ab_bundle.last("fewer-from-channels")]
    caffe = case.caffe()
    out, prev = caffe[node.index], caffe[node.inputs[0]]
    assert_close(out[:, 4:], prev[:, 4:], "pass-through channels", rtol=0, atol_scale=0)
    assert max_rel_err(out[:, :4], prev[:, :4]) > 1e-2


def tiny_variance_arrays(case) -> dict:
    arrays = copy.deepcopy(case.arrays)
    for node in case.graph.nodes:
        if "rolling_variance" in arrays.get(node.index, {}):
            arrays[node.index]["rolling_variance"] = np.full_like(arrays[node.index]["rolling_variance"], 1e-4)
    return arrays


def test_pjreddie_unequal_channels_keeps_pjreddie_bn(make_case):
    cfg = (net_header(3, 4, 5) + conv(6, "linear", batch_normalize=1) + conv(4, "linear", batch_normalize=1)
           + section("shortcut", **{"from": -2}))
    first = make_case(cfg)
    case = make_case(cfg, arrays=tiny_variance_arrays(first))
    out = case.caffe()
    dn = case.darknet(any_flavor=True)   # the Debian Darknet runs this cfg, whatever d2c inferred
    for i in case.indices:
        assert_close(out[i], dn[i], f"layer {i}: pycaffe vs Darknet")


def test_strided_shortcut_refused(make_case):
    cfg = (net_header(2, 6, 6) + conv(2) + section("maxpool", size=2, stride=2) + conv(2)
           + section("shortcut", **{"from": -3}))
    with pytest.raises(D2CError) as info:
        make_case(cfg)
    assert "[shortcut] 'from'" in info.value.render()
