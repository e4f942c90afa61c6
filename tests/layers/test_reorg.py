"""[reorg] (pjreddie, YOLOv2 passthrough): the odd index order, not space-to-depth, bit-exact."""
from __future__ import annotations

import numpy as np
import pytest

from d2c.layers.reorg import reorg_reference
from d2c.layers.reorg3d import reorg_cpu_reference, space_to_depth_reference

from .conftest import assert_close, build_bundle, max_rel_err, section

# (input shape, stride): channels must divide by stride^2 and the map by stride
CASES = {
    "c4-s2": ((4, 4, 6), 2),
    "c8-s2": ((8, 6, 2), 2),
    "c12-s2": ((12, 2, 4), 2),
    "c9-s3": ((9, 3, 6), 3),
    "c4-s1": ((4, 3, 3), 1),
}


@pytest.fixture(scope="module", params=list(CASES))
def reorg_bundle(request, tmp_path_factory):
    shape, stride = CASES[request.param]
    variants = {"reorg": section("reorg", stride=stride),
                "conv-reorg": section("convolutional", filters=shape[0], size=3, pad=1, activation="leaky")
                + section("reorg", stride=stride)}
    return build_bundle(tmp_path_factory.mktemp(f"reorg-{request.param}"), shape, variants)


@pytest.mark.parametrize("variant", ["reorg", "conv-reorg"])
def test_against_darknet(reorg_bundle, variant):
    out = reorg_bundle.check(variant)
    node = reorg_bundle.case.graph.nodes[reorg_bundle.last(variant)]
    stride = node.attrs["stride"]
    x = reorg_bundle.case.caffe()[node.inputs[0]]
    darknet = reorg_bundle.case.darknet()
    dn = darknet[node.index]
    by_reference = np.stack([reorg_reference(image, stride) for image in darknet[node.inputs[0]]])
    assert_close(dn, by_reference, "Darknet vs d2c.layers.reorg.reorg_reference", rtol=0, atol_scale=0)
    c, h, w = node.in_shape
    literal = reorg_cpu_reference(x, w, h, c, stride, forward=False).reshape(out[node.index].shape)
    assert_close(out[node.index], literal, "pycaffe vs reorg_cpu(input dims) oracle", rtol=0, atol_scale=0)
    if stride > 1:
        # Negative: plain space-to-depth (what [reorg3d] does) is not pjreddie's reorg.
        assert max_rel_err(dn, space_to_depth_reference(x, stride)) > 0.1
