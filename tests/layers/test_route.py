"""[route]: Concat of same-size inputs in the listed order; AlexeyAB's groups/group_id channel block.

pjreddie variants against the real Darknet; AlexeyAB groups against OpenCV's Darknet importer
and numpy. Negative check: a strided channel pick is not Darknet's contiguous group.
"""
from __future__ import annotations

import numpy as np
import pytest

from d2c.errors import D2CError

from .conftest import EXACT, assert_close, build_bundle, max_rel_err, net_header, section

CONV = {"size": 1, "activation": "leaky"}


def conv(filters: int, **extra) -> str:
    return section("convolutional", filters=filters, **CONV, **extra)


# Each variant: a few convs, then the route under test (the last layer). Indices are relative.
VARIANTS = {
    "two": conv(3) + conv(4) + section("route", layers=[-1, -2]),
    "three-with-input": conv(3) + conv(2) + section("route", layers=[-3, -1, -2]),
    "single-back": conv(3) + conv(4) + section("route", layers=-2),
    "repeat": conv(3) + section("route", layers=[-1, -1]),
}
GROUP_VARIANTS = {
    "g2-id0": conv(4) + section("route", layers=-1, groups=2, group_id=0),
    "g2-id1": conv(4) + section("route", layers=-1, groups=2, group_id=1),
    "g3-id2": conv(6) + section("route", layers=-1, groups=3, group_id=2),
    "g2-id1-two": conv(4) + conv(6) + section("route", layers=[-1, -2], groups=2, group_id=1),
}


@pytest.fixture(scope="module")
def route_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("route"), (3, 5, 6), VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_against_darknet(route_bundle, variant):
    out = route_bundle.check(variant)
    node = route_bundle.case.graph.nodes[route_bundle.last(variant)]
    caffe = route_bundle.case.caffe()
    expected = np.concatenate([caffe[i] for i in node.inputs], axis=1)
    assert_close(out[node.index], expected, f"{variant}: concat order", rtol=EXACT, atol_scale=EXACT)


@pytest.fixture(scope="module")
def group_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("route-groups"), (3, 4, 5), GROUP_VARIANTS)


@pytest.mark.parametrize("variant", list(GROUP_VARIANTS))
def test_alexeyab_groups(group_bundle, variant):
    """Each input's contiguous channel block [g*C/G, (g+1)*C/G), concatenated (OpenCV: one input only)."""
    case = group_bundle.case
    assert case.flavor == "alexeyab"
    node = case.graph.nodes[group_bundle.last(variant)]
    groups, group_id = node.attrs["groups"], node.attrs["group_id"]
    out = group_bundle.check(variant, opencv_darknet=len(node.inputs) == 1)
    caffe = case.caffe()
    blocks = []
    for i in node.inputs:
        c = caffe[i].shape[1] // groups
        blocks.append(caffe[i][:, group_id * c:(group_id + 1) * c])
    assert_close(out[node.index], np.concatenate(blocks, axis=1), f"{variant}: numpy", rtol=EXACT, atol_scale=EXACT)
    if len(node.inputs) == 1:
        # Negative: a strided pick (channels g, g+G, ...) is not Darknet's block.
        strided = caffe[node.inputs[0]][:, group_id::groups]
        assert max_rel_err(out[node.index], strided) > 1e-2


def test_different_sizes_refused_with_line(make_case):
    cfg = (net_header(2, 6, 6) + section("convolutional", filters=2, size=1, activation="linear")
           + section("maxpool", size=2, stride=2) + section("route", layers=[-1, -2]))
    with pytest.raises(D2CError) as info:
        make_case(cfg)
    text = info.value.render()
    assert "net.cfg:" in text and "[route] 'layers'" in text and "3x3" in text
