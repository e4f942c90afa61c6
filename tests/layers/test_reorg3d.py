"""[reorg3d] (AlexeyAB): true space-to-depth (and AlexeyAB's reverse=1 permutation), bit-exact.

No runnable AlexeyAB Darknet here and OpenCV's Darknet importer has no [reorg3d], so the oracle is
a numpy model written index by index from reorg_cpu's formula, as forward_reorg_layer calls it."""
from __future__ import annotations

import numpy as np
import pytest

from d2c.errors import D2CError
from d2c.layers.reorg import reorg_reference
from d2c.layers.reorg3d import (depth_to_space_reference, reorg3d_reverse_reference, reorg_cpu_reference,
                                space_to_depth_reference)

from .conftest import _cv2, assert_close, build_bundle, max_rel_err, net_header, section

FORWARD = {"c3-s2": ((3, 4, 6), 2), "c2-s3": ((2, 6, 3), 3), "c4-s1": ((4, 3, 3), 1), "c5-s2": ((5, 2, 8), 2)}
REVERSE = {"c16-s2": ((16, 2, 3), 2), "c32-s2": ((32, 1, 2), 2)}


@pytest.fixture(scope="module", params=list(FORWARD) + [f"reverse-{k}" for k in REVERSE])
def reorg3d_bundle(request, tmp_path_factory):
    reverse = request.param.startswith("reverse-")
    shape, stride = (REVERSE if reverse else FORWARD)[request.param.removeprefix("reverse-")]
    keys = {"stride": stride, **({"reverse": 1} if reverse else {})}
    variants = {"plain": section("reorg3d", **keys),
                "conv": section("convolutional", filters=shape[0], size=3, pad=1, activation="leaky")
                + section("reorg3d", **keys)}
    return build_bundle(tmp_path_factory.mktemp(f"reorg3d-{request.param}"), shape, variants, flavor="alexeyab")


@pytest.mark.parametrize("variant", ["plain", "conv"])
def test_against_reorg_cpu_oracle(reorg3d_bundle, variant):
    case = reorg3d_bundle.case
    out = reorg3d_bundle.check(variant)
    node = case.graph.nodes[reorg3d_bundle.last(variant)]
    x = case.caffe()[node.inputs[0]]
    s = node.attrs["stride"]
    c_out, h_out, w_out = node.out_shape
    # forward_reorg_layer: reorg_cpu(input, out_w, out_h, out_c, batch, stride, reverse, output)
    oracle = reorg_cpu_reference(x, w_out, h_out, c_out, s, forward=node.attrs["reverse"]).reshape(out[node.index].shape)
    assert_close(out[node.index], oracle, "pycaffe vs reorg_cpu oracle", rtol=0, atol_scale=0)
    if not node.attrs["reverse"]:
        assert_close(out[node.index], space_to_depth_reference(x, s), "space-to-depth", rtol=0, atol_scale=0)
        if s > 1:
            # Negative: pjreddie's [reorg] order (and OpenCV's Reorg) is not [reorg3d].
            if x.shape[1] % (s * s) == 0:
                odd = np.stack([reorg_reference(image, s) for image in x])
                assert max_rel_err(out[node.index], odd) > 0.1
            # Negative: channel-major (c*s*s + phase) order is not AlexeyAB's phase-major order.
            n, c, h, w = x.shape
            channel_major = x.reshape(n, c, h // s, s, w // s, s).transpose(0, 1, 3, 5, 2, 4).reshape(out[node.index].shape)
            assert max_rel_err(out[node.index], channel_major) > 0.1
    else:
        assert_close(out[node.index], reorg3d_reverse_reference(x, s), "reverse reference", rtol=0, atol_scale=0)
        # Negative: reverse=1 is not plain depth-to-space.
        assert max_rel_err(out[node.index], depth_to_space_reference(x, s).reshape(out[node.index].shape)) > 0.1


def test_opencv_darknet_has_no_reorg3d(make_case):
    """Documented limitation (OpenCV 4.x): if this ever starts to pass, compare against OpenCV too."""
    case = make_case(net_header(3, 4, 4) + section("reorg3d", stride=2), flavor="alexeyab")
    cv2 = _cv2()
    with pytest.raises(cv2.error, match="reorg3d"):
        cv2.dnn.readNetFromDarknet(str(case.cfg_path), str(case.weights_path))


@pytest.mark.parametrize("keys,shape,key", [({"stride": 2}, (3, 5, 4), "stride"),
                                            ({"stride": 2, "reverse": 1}, (8, 2, 2), "reverse")])
def test_bad_shapes_named(make_case, keys, shape, key):
    with pytest.raises(D2CError) as info:
        make_case(net_header(*shape) + section("reorg3d", **keys))
    assert f"[reorg3d] '{key}'" in info.value.render()
