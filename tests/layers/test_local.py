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
