"""[batchnorm] (stand-alone): pjreddie's 3 arrays (beta = 0) against the real Darknet; AlexeyAB's
4 arrays (biases first) and sqrt(var + 1e-5) against a numpy reference."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from d2c.caffe.emitter import TRAIN, ConvertOptions, Emitter
from d2c.darknet.weights import read_weights
from d2c.errors import WeightsError
from d2c.layers import REGISTRY
from d2c.layers.batchnorm import batchnorm_reference

from .conftest import assert_close, build_bundle, check_all_engines, max_rel_err, net_header, section

CONV = section("convolutional", filters=4, size=3, pad=1, activation="leaky")
VARIANTS = {
    "plain": section("batchnorm"),
    "after-conv": CONV + section("batchnorm"),
    "then-route-back": CONV + section("batchnorm") + section("route", layers=[-1, -2]),
    "twice": section("batchnorm") + section("batchnorm"),
}
SHAPES = {"odd": (3, 5, 3), "even": (2, 4, 4)}


@pytest.fixture(scope="module", params=list(SHAPES))
def bn_bundle(request, tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp(f"batchnorm-{request.param}"), SHAPES[request.param], VARIANTS)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_pjreddie_against_darknet(bn_bundle, variant):
    case = bn_bundle.case
    out = bn_bundle.check(variant)
    for index in bn_bundle.layers(variant):
        node = case.graph.nodes[index]
        if node.kind != "batchnorm":
            continue
        assert [p.name for p in node.params] == ["scales", "rolling_mean", "rolling_variance"]
        a = case.arrays[index]
        zero = np.zeros_like(a["scales"])
        reference = batchnorm_reference(case.darknet()[node.inputs[0]], a["scales"], zero, a["rolling_mean"],
                                        a["rolling_variance"], "pjreddie")
        assert_close(out[index], reference, f"{variant}: pycaffe vs numpy (sqrt(var) + 1e-6, beta 0)")


def test_tiny_variance_against_darknet(make_case):
    """With variances near 1e-6 the eps placement dominates; the stored var' keeps Darknet's."""
    cfg = net_header(3, 3, 4) + section("batchnorm")
    first = make_case(cfg)
    arrays = copy.deepcopy(first.arrays)
    arrays[0]["rolling_variance"] = np.array([1e-6, 4e-6, 2e-4], np.float32)
    case = make_case(cfg, arrays=arrays)
    check_all_engines(case)


def ab_variants() -> dict[str, str]:
    return {"plain": section("batchnorm"), "after-conv": CONV.replace("leaky", "mish") + section("batchnorm")}


@pytest.fixture(scope="module")
def ab_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("batchnorm-ab"), (3, 4, 5), ab_variants(), flavor="alexeyab")


@pytest.mark.parametrize("variant", list(ab_variants()))
def test_alexeyab(ab_bundle, variant):
    """OpenCV's Darknet importer has no [batchnorm]: numpy reference of AlexeyAB's forward only."""
    case = ab_bundle.case
    out = ab_bundle.check(variant, darknet=False)
    index = ab_bundle.last(variant)
    node = case.graph.nodes[index]
    assert [p.name for p in node.params] == ["biases", "scales", "rolling_mean", "rolling_variance"]
    a = case.arrays[index]
    reference = batchnorm_reference(case.caffe()[node.inputs[0]], a["scales"], a["biases"], a["rolling_mean"],
                                    a["rolling_variance"], "alexeyab")
    assert_close(out[index], reference, f"{variant}: pycaffe vs numpy (sqrt(var + 1e-5), beta loaded)")
    # Negative: pjreddie's formula (eps outside, beta 0) is not AlexeyAB's.
    wrong = batchnorm_reference(case.caffe()[node.inputs[0]], a["scales"], np.zeros_like(a["biases"]),
                                a["rolling_mean"], a["rolling_variance"], "pjreddie")
    assert max_rel_err(out[index], wrong) > 1e-3


def test_file_layout_differs_between_lineages(make_case):
    """Same cfg: a pjreddie file has 3*C floats for the layer, an AlexeyAB file 4*C; reading one as the
    other is a byte-count error that names the layer, not a silent misread."""
    cfg = net_header(5, 2, 2) + section("batchnorm")
    pj = make_case(cfg, flavor="pjreddie")
    ab = make_case(cfg, flavor="alexeyab")
    assert ab.weights_path.stat().st_size - pj.weights_path.stat().st_size == 5 * 4
    with pytest.raises(WeightsError) as info:
        read_weights(pj.weights_path, ab.graph)
    assert "layer 0" in str(info.value) and "[batchnorm]" in str(info.value)
    with pytest.raises(WeightsError):
        read_weights(ab.weights_path, pj.graph)


@pytest.mark.parametrize("flavor", ["pjreddie", "alexeyab"])
def test_train_net_copies_and_freezes(make_case, flavor):
    """Training form: a copy first (the input blob is left intact for other readers); pjreddie never
    updates a [batchnorm] layer, so its Scale has lr_mult 0."""
    case = make_case(net_header(2, 3, 3) + CONV + section("batchnorm") + section("route", layers=-2),
                     flavor=flavor)
    em = Emitter(net_name="train", options=ConvertOptions(mode=TRAIN, bn="stock", batch=2), input_shape=(2, 3, 3))
    for node in case.graph.nodes:
        REGISTRY[node.kind].emit(node, em, case.arrays.get(node.index, {}))
    conv_blob = em.blob(0)
    writers = [layer for layer in em.layers if conv_blob in layer.top]
    assert [layer.type for layer in writers] == ["Convolution", "ReLU"]
    scale = next(layer for layer in em.layers if layer.type == "Scale" and layer.name.startswith("layer001"))
    lr = [spec["lr_mult"] for spec in scale.params["param"]]
    assert lr == ([0.0, 0.0] if flavor == "pjreddie" else [1.0, 1.0])
