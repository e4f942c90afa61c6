"""[local] (YOLOv1 locally connected): per-cell Crop + InnerProduct, against the real Darknet."""
from __future__ import annotations

import numpy as np
import pytest

from d2c.errors import D2CError
from d2c.layers.local import local_reference

from .conftest import assert_close, build_bundle, max_rel_err, net_header, section

# (filters, size, stride, pad, activation)
VARIANTS = {
    "yolov1-like": (4, 3, 1, 1, "leaky"),
    "valid": (3, 3, 1, 0, "linear"),
    "stride2-pad": (2, 3, 2, 1, "logistic"),
    "1x1": (3, 1, 1, 0, "relu"),
    "2x2-s2": (2, 2, 2, 0, "leaky"),
}


def local_section(filters: int, size: int, stride: int, pad: int, activation: str) -> str:
    return section("local", filters=filters, size=size, stride=stride, pad=pad, activation=activation)


# Debian Darknet bug: make_local_layer sets workspace_size in floats, parse_network_cfg allocates
# net->workspace in bytes, so a net whose largest im2col is a [local] layer's overflows the heap
# (SIGABRT). YOLOv1's convolutions have larger workspaces; this conv (3x3, pad 1, same input)
# reserves size*size*c*h*w floats, which covers every variant here.
WORKSPACE = section("convolutional", filters=1, size=3, stride=1, pad=1, activation="linear")


@pytest.fixture(scope="module", params=[(3, 5, 6), (2, 4, 4)], ids=["odd", "even"])
def local_bundle(request, tmp_path_factory):
    variants = {k: local_section(*v) for k, v in VARIANTS.items()}
    variants["darknet-workspace"] = WORKSPACE
    return build_bundle(tmp_path_factory.mktemp("local"), request.param, variants)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_against_darknet(local_bundle, variant):
    case = local_bundle.case
    out = local_bundle.check(variant)
    index = local_bundle.last(variant)
    filters, size, stride, pad, act = VARIANTS[variant]
    a = case.arrays[index]
    z = local_reference(case.x, a["weights"], a["biases"], size, stride, pad)
    if act == "linear":
        assert_close(out[index], z, f"{variant}: numpy model of forward_local_layer")
    # Negative: one shared filter bank (a plain convolution with location 0's weights) is not [local].
    shared = np.broadcast_to(a["weights"][:1], a["weights"].shape)
    z_shared = local_reference(case.x, shared, a["biases"], size, stride, pad)
    assert max_rel_err(z_shared, z) > 1e-2


def test_inconsistent_pad_refused(make_case):
    """size 5 with pad=1: Darknet's output grid (in-1) and its im2col grid (in-3) disagree."""
    with pytest.raises(D2CError) as info:
        make_case(net_header(2, 6, 6) + local_section(2, 5, 1, 1, "linear"))
    assert "[local] 'pad'" in info.value.render()


# --------------------------------------------------------------------------------------------
# The rest of [local]'s life, all in d2c/layers/local.py: export and Darknet's random init
# --------------------------------------------------------------------------------------------

LOCAL_NET = net_header(2, 5, 4) + local_section(3, 3, 1, 1, "leaky")


def _local_graph(tmp_path):
    from d2c.darknet.cfg import parse_cfg
    from d2c.darknet.graph import build_graph

    cfg = tmp_path / "local.cfg"
    cfg.write_text(LOCAL_NET)
    return build_graph(parse_cfg(cfg))


def test_export_reads_every_cell_back_bit_for_bit(tmp_path):
    """(Train nets, which need a head, round trip in tests/test_export.py's mixed cfg.)"""
    from d2c.caffe.emitter import ConvertOptions
    from d2c.convert import build_conversion
    from d2c.darknet.weights import WeightsHeader, random_weights
    from d2c.export import caffe_to_darknet

    graph = _local_graph(tmp_path)
    arrays = random_weights(graph, seed=3)
    conversion = build_conversion(graph, arrays, WeightsHeader(), ConvertOptions(flavor=graph.flavor))
    back = caffe_to_darknet(graph, conversion.net.layers).arrays[0]
    assert sorted(back) == ["biases", "weights"]
    for name in back:
        np.testing.assert_array_equal(back[name].view(np.uint32), arrays[0][name].view(np.uint32), err_msg=name)
    # A missing cell is named, not silently left as garbage.
    layers = [layer for layer in conversion.net.layers if layer.name != "layer000_y01x02_fc"]
    with pytest.raises(D2CError, match=r"no Caffe layer 'layer000_y01x02_fc' \(cell \(1, 2\)\)"):
        caffe_to_darknet(graph, layers)


def test_darknet_init_is_make_local_layer(tmp_path):
    from d2c.train import darknet_init

    graph = _local_graph(tmp_path)
    arrays = darknet_init(graph, seed=11)[0]
    np.testing.assert_array_equal(arrays["biases"], 0)
    weights = arrays["weights"]
    assert weights.dtype == np.float32 and weights.shape == (5 * 4, 3, 2, 3, 3)
    bound = np.float32(np.sqrt(2.0 / (3 * 3 * 2)))          # sqrt(2/(k*k*c)) * U(-1, 1)
    assert np.abs(weights).max() <= bound and np.abs(weights).max() > 0.9 * bound
    assert abs(float(weights.mean())) < 0.1 * bound           # uniform, not N(0, 1) scaled
    np.testing.assert_array_equal(darknet_init(graph, seed=11)[0]["weights"], weights)
