"""[avgpool]: global average (Pooling AVE global_pooling) against the real Darknet."""
from __future__ import annotations

import pytest

from d2c.layers.avgpool import avgpool_reference

from .conftest import assert_close, build_bundle, section

SHAPES = {"odd": (3, 5, 7), "even": (4, 6, 4), "1x1": (5, 1, 1)}
VARIANTS = {
    "plain": section("avgpool"),
    "after-conv": section("convolutional", filters=6, size=3, pad=1, activation="leaky") + section("avgpool"),
    "then-conv": section("avgpool") + section("convolutional", filters=3, size=1, activation="linear"),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def avgpool_bundle(request, tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp(f"avgpool-{request.param}"), SHAPES[request.param], VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_against_darknet(avgpool_bundle, variant):
    out = avgpool_bundle.check(variant)
    for index in avgpool_bundle.layers(variant):
        node = avgpool_bundle.case.graph.nodes[index]
        if node.kind == "avgpool":
            x = avgpool_bundle.case.darknet()[node.inputs[0]]
            assert_close(out[index], avgpool_reference(x), "pycaffe vs avgpool_reference (Darknet's sum order)")
            assert_close(avgpool_bundle.case.darknet()[index], avgpool_reference(x),
                         "Darknet vs avgpool_reference", rtol=0, atol_scale=0)
