"""[upsample]: nearest neighbour x stride times `scale` (depthwise Deconvolution), and the
negative-stride sum-pool (depthwise Convolution), against the real Darknet."""
from __future__ import annotations

import numpy as np
import pytest

from .conftest import assert_close, build_bundle, max_rel_err, section

VARIANTS = {
    "s2": section("upsample", stride=2),
    "s3": section("upsample", stride=3),
    "s2-scale": section("upsample", stride=2, scale=0.5),
    "default": section("upsample"),
    "s1": section("upsample", stride=1),
    "reverse-s2": section("maxpool", size=1, stride=1) + section("upsample", stride=2)
                  + section("upsample", stride=-2, scale=0.25),
}
SHAPES = {"odd": (3, 3, 5), "even": (2, 4, 4)}


@pytest.fixture(scope="module", params=list(SHAPES))
def upsample_bundle(request, tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp(f"upsample-{request.param}"), SHAPES[request.param], VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_against_darknet(upsample_bundle, variant):
    out = upsample_bundle.check(variant)
    node = upsample_bundle.case.graph.nodes[upsample_bundle.last(variant)]
    x = upsample_bundle.case.caffe()[node.inputs[0]]
    s, scale = node.attrs["stride"], node.attrs["scale"]
    if s > 0:
        reference = np.repeat(np.repeat(x, s, axis=2), s, axis=3) * np.float32(scale)
        assert_close(out[node.index], reference, f"{variant}: nearest neighbour", rtol=0, atol_scale=0)
        # Negative: bilinear-style smoothing (any mixing of neighbours) is not Darknet's upsample.
        if s > 1:
            mixed = reference.copy()
            mixed[:, :, 1:, :] = 0.5 * (reference[:, :, 1:, :] + reference[:, :, :-1, :])
            assert max_rel_err(out[node.index], mixed) > 1e-2
    else:
        n, c, h, w = x.shape
        k = -s
        reference = x.reshape(n, c, h // k, k, w // k, k).sum(axis=(3, 5)) * scale
        assert_close(out[node.index], reference, f"{variant}: sum-pool (not average)")
        assert max_rel_err(out[node.index], reference / (k * k)) > 0.5
