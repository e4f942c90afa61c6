"""[softmax]: one softmax per contiguous chunk of the flat C*H*W vector (groups), with temperature.
Against the real Darknet; negative check: Caffe's (and OpenCV's Darknet importer's) per-pixel
channel softmax is not Darknet's on spatial maps."""
from __future__ import annotations

import numpy as np
import pytest

from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.weights import WeightsHeader, write_weights
from d2c.errors import D2CError
from d2c.layers.softmax import softmax_reference

from .conftest import _cv2, assert_close, build_bundle, max_rel_err, net_header, section

CONV = section("convolutional", filters=4, size=1, activation="linear")
VARIANTS = {
    "spatial": CONV + section("softmax"),
    "groups2": CONV + section("softmax", groups=2),
    "groups4": CONV + section("softmax", groups=4),
    "groups-odd-split": CONV + section("softmax", groups=5),
    "temperature-half": CONV + section("softmax", temperature=0.5),
    "temperature-3-groups2": CONV + section("softmax", groups=2, temperature=3),
    "classifier": section("avgpool") + section("connected", output=6, activation="linear") + section("softmax"),
    "after-avgpool": CONV + section("avgpool") + section("softmax"),
}


@pytest.fixture(scope="module")
def softmax_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("softmax"), (3, 3, 5), VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_against_darknet(softmax_bundle, variant):
    case = softmax_bundle.case
    out = softmax_bundle.check(variant)
    node = case.graph.nodes[softmax_bundle.last(variant)]
    x = case.darknet()[node.inputs[0]]
    reference = softmax_reference(x, node.attrs["groups"], node.attrs["temperature"])
    assert_close(out[node.index], reference, f"{variant}: pycaffe vs softmax_reference")
    per_chunk = out[node.index].reshape(x.shape[0], node.attrs["groups"], -1).sum(axis=2)
    np.testing.assert_allclose(per_chunk, 1.0, rtol=1e-5)


def test_negative_per_pixel_softmax_is_wrong(softmax_bundle):
    """Softmax over channels at each pixel (Caffe's axis-1 default, and OpenCV's Darknet importer)."""
    case = softmax_bundle.case
    index = softmax_bundle.last("spatial")
    darknet = case.darknet()[index]
    x = case.darknet()[index - 1]
    e = np.exp(x - x.max(axis=1, keepdims=True))
    per_pixel = e / e.sum(axis=1, keepdims=True)
    assert max_rel_err(per_pixel, darknet) > 0.1
    # OpenCV's Darknet importer does exactly that per-pixel softmax for this cfg.
    cv2 = _cv2()
    text = net_header(3, 3, 5) + CONV + section("softmax")
    cfg_path = case.directory / "spatial.cfg"
    cfg_path.write_text(text)
    weights_path = case.directory / "spatial.weights"
    graph = build_graph(parse_cfg(cfg_path))
    write_weights(weights_path, WeightsHeader(), graph, {0: case.arrays[softmax_bundle.layers("spatial")[0]]})
    model = cv2.dnn.readNetFromDarknet(str(cfg_path), str(weights_path))
    model.setInput(case.x)
    opencv = model.forward()
    assert_close(opencv, per_pixel, "OpenCV's Darknet importer = per-pixel softmax")


def test_tree_refused(make_case):
    cfg = net_header(4, 1, 1) + section("softmax", tree="data/9k.tree")
    with pytest.raises(D2CError) as info:
        make_case(cfg)
    assert "[softmax] 'tree'" in info.value.render() and "net.cfg:" in info.value.render()


@pytest.mark.parametrize("keys,key", [({"groups": 3}, "groups"), ({"temperature": 0}, "temperature")])
def test_bad_keys_named(make_case, keys, key):
    cfg = net_header(2, 2, 2) + section("softmax", **keys)
    with pytest.raises(D2CError) as info:
        make_case(cfg)
    assert f"[softmax] '{key}'" in info.value.render()
