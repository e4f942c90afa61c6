"""[detection] (YOLOv1 head): no Caffe layer; the raw input (a [connected] output) is the net output.
Darknet's [detection] output is that vector, with softmax=1 a softmax over each cell's class block."""
from __future__ import annotations

import numpy as np
import pytest

from d2c.errors import D2CError

from .conftest import assert_close, check_all_engines, max_rel_err, net_header, section


def v1_cfg(side: int, num: int, classes: int, coords: int, softmax: int) -> str:
    outputs = side * side * ((1 + coords) * num + classes)
    return (net_header(3, 6, 6) + section("convolutional", filters=4, size=3, stride=2, pad=1, activation="leaky")
            + section("connected", output=outputs, activation="linear")
            + section("dropout", probability=0.5)
            + section("detection", side=side, num=num, classes=classes, coords=coords, softmax=softmax,
                      rescore=1, sqrt=1))


def darknet_detection(raw: np.ndarray, side: int, classes: int, softmax: bool) -> np.ndarray:
    """forward_detection_layer at inference on (N, outputs): copy, softmax per cell's class block."""
    out = raw.reshape(raw.shape[0], -1).astype(np.float64).copy()
    if softmax:
        block = out[:, : side * side * classes].reshape(raw.shape[0], side * side, classes)
        e = np.exp(block - block.max(axis=2, keepdims=True))
        out[:, : side * side * classes] = (e / e.sum(axis=2, keepdims=True)).reshape(raw.shape[0], -1)
    return out.reshape(raw.shape).astype(np.float32)


@pytest.mark.parametrize("softmax", [0, 1])
@pytest.mark.parametrize("side,num,classes", [(2, 2, 3), (3, 1, 2)])
def test_head_against_darknet(make_case, side, num, classes, softmax):
    case = make_case(v1_cfg(side, num, classes, 4, softmax))
    node = case.graph.nodes[-1]
    head = case.conversion.emitter.heads[0]
    assert head.kind == "detection" and head.index == node.index
    assert head.blob == case.blob(1)             # through the deploy-time identity dropout
    assert head.attrs["side"] == side and head.attrs["softmax"] == softmax and head.attrs["sqrt"] == 1
    assert not [layer for layer in case.net.layers if head.blob in layer.bottom]
    check_all_engines(case, layers=[0, 1, 2])
    raw = case.caffe()[node.index]
    darknet = case.darknet()[node.index]
    assert_close(darknet_detection(raw, side, classes, bool(softmax)), darknet, "decoded head vs Darknet")
    if softmax:
        assert max_rel_err(raw, darknet) > 1e-2       # the raw blob is not Darknet's softmaxed output
    sidecar = case.conversion.sidecar["heads"][0]
    assert sidecar["kind"] == "detection" and sidecar["blob"] == head.blob


def test_size_mismatch_named(make_case):
    cfg = v1_cfg(2, 2, 3, 4, 0).replace("side=2", "side=3")
    with pytest.raises(D2CError) as info:
        make_case(cfg)
    assert "[detection]" in info.value.render() and "side 3" in info.value.render()
