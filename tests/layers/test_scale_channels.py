"""[scale_channels] (AlexeyAB squeeze-excitation): from * per-channel scale (C x 1 x 1), or with
scale_wh=1 from * per-pixel scale (1 x H x W). OpenCV's Darknet importer (per-channel only) and numpy."""
from __future__ import annotations

import numpy as np
import pytest

from d2c.errors import D2CError
from d2c.layers.scale_channels import scale_channels_reference

from .conftest import assert_close, build_bundle, max_rel_err, net_header, section


def conv(filters: int, act: str, size: int = 3) -> str:
    return section("convolutional", filters=filters, size=size, pad=1 if size > 1 else 0, activation=act)


PER_CHANNEL = {
    "se-block": conv(4, "leaky") + section("avgpool") + conv(2, "relu", 1) + conv(4, "logistic", 1)
                + section("scale_channels", **{"from": -4}),
    "se-linear-act": conv(5, "mish") + section("avgpool") + conv(5, "logistic", 1)
                     + section("scale_channels", **{"from": -3}, activation="leaky"),
}
PER_PIXEL = {
    "scale-wh": conv(4, "leaky") + conv(1, "logistic", 1) + section("scale_channels", **{"from": -2}, scale_wh=1),
    "scale-wh-logistic": conv(3, "mish") + conv(1, "linear", 1)
                         + section("scale_channels", **{"from": -2}, scale_wh=1, activation="logistic"),
}


@pytest.fixture(scope="module", params=[(3, 5, 4), (2, 4, 6)], ids=["odd", "even"])
def sc_bundle(request, tmp_path_factory):
    """Per-channel variants only: OpenCV's importer cannot load a net that contains scale_wh."""
    return build_bundle(tmp_path_factory.mktemp("scale-channels"), request.param, PER_CHANNEL, flavor="alexeyab")


@pytest.fixture(scope="module", params=[(3, 5, 4), (2, 4, 6)], ids=["odd", "even"])
def wh_bundle(request, tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("scale-wh"), request.param, PER_PIXEL, flavor="alexeyab")


def check_reference(bundle, variant: str) -> None:
    case = bundle.case
    index = bundle.last(variant)
    node = case.graph.nodes[index]
    caffe = case.caffe()
    reference = scale_channels_reference(caffe[node.inputs[0]], caffe[node.inputs[1]], node.attrs["scale_wh"])
    act = node.attrs["activation"]
    if act == "leaky":
        reference = reference * (1 + (reference < 0) * -0.9)
    elif act == "logistic":
        reference = 1 / (1 + np.exp(-reference))
    assert_close(caffe[index], reference, f"{variant}: numpy reference")


@pytest.mark.parametrize("variant", list(PER_CHANNEL))
def test_per_channel(sc_bundle, variant):
    """OpenCV's importer supports only the per-channel form (and only one image per forward)."""
    sc_bundle.check(variant, opencv_darknet=True)
    check_reference(sc_bundle, variant)


@pytest.mark.parametrize("variant", list(PER_PIXEL))
def test_per_pixel_scale_wh(wh_bundle, variant):
    """scale_wh has no OpenCV support (its importer asserts): numpy reference only."""
    wh_bundle.check(variant)
    check_reference(wh_bundle, variant)
    # Negative: broadcasting the 1 x H x W map along the wrong axes is not scale_wh.
    case = wh_bundle.case
    node = case.graph.nodes[wh_bundle.last(variant)]
    scales = case.caffe()[node.inputs[0]]            # N x 1 x H x W
    source = case.caffe()[node.inputs[1]]
    wrong = source * scales.transpose(0, 1, 3, 2).reshape(scales.shape)  # rows and columns swapped
    assert max_rel_err(case.caffe()[node.index], wrong) > 1e-2


@pytest.mark.parametrize("cfg_tail,key", [
    (conv(4, "linear") + section("scale_channels", **{"from": -2}), "from"),
    (conv(4, "linear") + conv(2, "linear", 1) + section("scale_channels", **{"from": -2}, scale_wh=1), "scale_wh"),
    (conv(4, "linear") + section("avgpool") + section("scale_channels", **{"from": -2}, activation="mish"), "activation"),
])
def test_bad_shapes_named(make_case, cfg_tail, key):
    with pytest.raises(D2CError) as info:
        make_case(net_header(3, 4, 4) + cfg_tail, flavor="alexeyab")
    assert f"[scale_channels] '{key}'" in info.value.render()
