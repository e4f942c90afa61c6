"""[connected]: InnerProduct over Darknet's channel-major flattening, optional BN whose arrays come
after the weights in the file, activations; the transposed-weights header. Against the real Darknet."""
from __future__ import annotations

import copy

import numpy as np
import pytest

from d2c.darknet.weights import WeightsHeader, read_weights

from .conftest import build_bundle, check_all_engines, max_rel_err, net_header, section

ACTIVATIONS = ["leaky", "logistic", "linear", "relu"]


def fc(output: int, activation: str, bn: bool) -> str:
    keys = {"output": output, "activation": activation}
    if bn:
        keys["batch_normalize"] = 1
    return section("connected", **keys)


def variants() -> dict[str, str]:
    out = {f"{act}-{'bn' if bn else 'bias'}": fc(7, act, bn) for act in ACTIVATIONS for bn in (False, True)}
    out["conv-then-fc"] = section("convolutional", filters=3, size=3, stride=2, pad=1, activation="leaky") + fc(5, "linear", True)
    out["fc-fc"] = fc(6, "leaky", False) + fc(4, "logistic", True)
    out["fc-then-conv"] = fc(6, "leaky", False) + section("convolutional", filters=2, size=1, activation="linear")
    out["default-activation"] = section("connected", output=3)
    return out


@pytest.fixture(scope="module", params=[False, True], ids=["unfolded", "fold-bn"])
def fc_bundle(request, tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("connected"), (3, 4, 5), variants(), fold_bn=request.param)


@pytest.mark.parametrize("variant", list(variants()))
def test_against_darknet(fc_bundle, variant):
    fc_bundle.check(variant)


def raw_layer_floats(case, index: int) -> np.ndarray:
    """The layer's floats exactly as stored in the .weights file."""
    header_size = WeightsHeader().size
    offset = header_size + 4 * sum(n.param_count() for n in case.graph.nodes if n.index < index)
    count = case.graph.nodes[index].param_count()
    return np.fromfile(case.weights_path, np.float32, count=count, offset=offset)


def test_negative_conv_order_of_bn_arrays(make_case):
    """Reading [connected] BN arrays in [convolutional] order (BN triple before the weights) is wrong."""
    case = make_case(net_header(2, 3, 3) + fc(4, "linear", True))
    raw = raw_layer_floats(case, 0)
    out_n, in_n = 4, 18
    wrong = copy.deepcopy(case.arrays)
    parts = np.split(raw, np.cumsum([out_n, out_n, out_n, out_n]))
    wrong[0].update(biases=parts[0], scales=parts[1], rolling_mean=parts[2],
                    rolling_variance=np.abs(parts[3]) + 0.1, weights=parts[4].reshape(out_n, in_n))
    misread = make_case(net_header(2, 3, 3) + fc(4, "linear", True), arrays=wrong)
    darknet = case.darknet()[0]
    check_all_engines(case)     # the right order matches...
    assert max_rel_err(misread.caffe()[0], darknet) > 1e-2   # ...the conv order does not


@pytest.mark.parametrize("minor", [2, 1001], ids=["plain", "transposed-header"])
def test_weights_header_transpose(make_case, minor):
    """minor > 1000 stores the matrix inputs x outputs; Darknet and d2c's reader both transpose it back."""
    cfg = net_header(3, 2, 3) + section("convolutional", filters=2, size=1, activation="leaky") + fc(5, "linear", False)
    header = WeightsHeader(major=0, minor=minor, revision=0)
    case = make_case(cfg, header=header)
    _, arrays = read_weights(case.weights_path, case.graph)
    np.testing.assert_array_equal(arrays[1]["weights"], case.arrays[1]["weights"])
    if header.transpose:
        stored = raw_layer_floats_for(case, header)
        assert not np.array_equal(stored, case.arrays[1]["weights"].ravel())
    check_all_engines(case)


def raw_layer_floats_for(case, header: WeightsHeader) -> np.ndarray:
    conv = case.graph.nodes[0].param_count()
    out_n = case.graph.nodes[1].attrs["output"]
    count = case.graph.nodes[1].param_count() - out_n
    return np.fromfile(case.weights_path, np.float32, count=count, offset=header.size + 4 * (conv + out_n))
