"""[sam] (AlexeyAB spatial attention): act(prev * from), elementwise. OpenCV's Darknet importer and numpy."""
from __future__ import annotations

import numpy as np
import pytest

from d2c.errors import D2CError

from .conftest import assert_close, build_bundle, max_rel_err, net_header, section


def conv(filters: int, act: str) -> str:
    return section("convolutional", filters=filters, size=3, pad=1, activation=act)


VARIANTS = {
    "linear": conv(4, "leaky") + conv(4, "logistic") + section("sam", **{"from": -2}),
    "logistic": conv(4, "leaky") + conv(4, "linear") + section("sam", **{"from": -2}, activation="logistic"),
    "from-route": conv(3, "mish") + section("sam", **{"from": -2}),
    "v4-style": conv(4, "mish") + conv(4, "logistic") + section("sam", **{"from": -2})
                + conv(2, "leaky"),
}


@pytest.fixture(scope="module", params=[(3, 5, 4), (3, 4, 6)], ids=["odd", "even"])
def sam_bundle(request, tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("sam"), request.param, VARIANTS, flavor="alexeyab")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_against_opencv_darknet_and_numpy(sam_bundle, variant):
    case = sam_bundle.case
    out = sam_bundle.check(variant, opencv_darknet=True)
    caffe = case.caffe()
    for index in sam_bundle.layers(variant):
        node = case.graph.nodes[index]
        if node.kind != "sam":
            continue
        product = caffe[node.inputs[0]].astype(np.float64) * caffe[node.inputs[1]]
        if node.attrs["activation"] == "logistic":
            product = 1 / (1 + np.exp(-product))
        assert_close(out[index], product, f"{variant}: numpy prev*from")
        # Negative: activation before the product (on prev only) is not AlexeyAB's order.
        if node.attrs["activation"] == "logistic":
            wrong = caffe[node.inputs[1]] / (1 + np.exp(-caffe[node.inputs[0]].astype(np.float64)))
            assert max_rel_err(out[index], wrong) > 1e-2


def test_shape_mismatch_named(make_case):
    cfg = net_header(3, 4, 4) + conv(4, "linear") + conv(2, "linear") + section("sam", **{"from": -2})
    with pytest.raises(D2CError) as info:
        make_case(cfg)
    assert "[sam] 'from'" in info.value.render() and "equal shapes" in info.value.render()


def test_swish_refused(make_case):
    cfg = net_header(3, 4, 4) + conv(4, "linear") + conv(4, "linear") + section("sam", **{"from": -2},
                                                                                 activation="swish")
    with pytest.raises(D2CError) as info:
        make_case(cfg)
    assert "[sam] 'activation'" in info.value.render()
