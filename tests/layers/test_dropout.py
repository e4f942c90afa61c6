"""[dropout]: the identity at inference (it shares the previous buffer), in-place Dropout in training."""
from __future__ import annotations

import numpy as np
import pytest

from d2c.caffe.emitter import ConvertOptions, Emitter, TRAIN
from d2c.caffe.proto import CaffeNet
from d2c.layers import REGISTRY

from .conftest import _caffe, build_bundle, net_header, section, write_net

VARIANTS = {
    "after-conv": section("convolutional", filters=3, size=3, pad=1, activation="leaky")
                  + section("dropout", probability=0.5),
    "then-route-back": section("convolutional", filters=3, size=1, activation="linear")
                       + section("dropout", probability=0.2) + section("route", layers=[-1, -2]),
    "chain": section("dropout") + section("convolutional", filters=2, size=1, activation="logistic")
             + section("dropout", probability=0.9),
}


@pytest.fixture(scope="module")
def dropout_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("dropout"), (2, 4, 5), VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_identity_at_inference_against_darknet(dropout_bundle, variant):
    case = dropout_bundle.case
    dropout_bundle.check(variant, rtol=1e-5)
    for index in dropout_bundle.layers(variant):
        node = case.graph.nodes[index]
        if node.kind == "dropout":
            assert case.blob(index) == case.blob(node.inputs[0])  # no Caffe layer at all in deploy
    assert not [layer for layer in case.net.layers if layer.type == "Dropout"]


@pytest.mark.parametrize("probability", [0.25, 0.5])
def test_train_net_drops_in_place(make_case, tmp_path, probability):
    """Train nets: Dropout in place on the previous blob, so every reader sees the dropped values,
    as every reader of Darknet's shared buffer does; kept values are scaled by 1/(1-p)."""
    cfg = (net_header(2, 8, 8, batch=4) + section("convolutional", filters=16, size=1, activation="linear")
           + section("dropout", probability=probability) + section("route", layers=-2))
    case = make_case(cfg, batch=4)
    em = Emitter(net_name="train", options=ConvertOptions(mode=TRAIN, batch=4), input_shape=(2, 8, 8))
    for node in case.graph.nodes:
        REGISTRY[node.kind].emit(node, em, case.arrays.get(node.index, {}))
    drop = [layer for layer in em.layers if layer.type == "Dropout"]
    assert len(drop) == 1 and drop[0].bottom == drop[0].top == [em.blob(0)]
    assert drop[0].params["dropout_param"]["dropout_ratio"] == pytest.approx(probability)
    net = em.net()
    prototxt, caffemodel = write_net(CaffeNet(name="train", inputs=net.inputs, layers=net.layers), tmp_path, "train")
    caffe = _caffe()
    model = caffe.Net(str(prototxt), str(caffemodel), caffe.TRAIN)
    model.blobs["data"].data[...] = case.x
    model.forward()
    clean = case.caffe()[0]
    dropped = model.blobs[em.blob(2)].data        # the route reads the conv blob after the dropout
    kept = dropped != 0
    assert abs(kept.mean() - (1 - probability)) < 0.05
    np.testing.assert_allclose(dropped[kept], clean[kept] / (1 - probability), rtol=1e-6, atol=1e-7)
