"""[activation]: a stand-alone activation that leaves its input blob intact (Darknet copies first).
Against the real Darknet; negative check: the in-place form corrupts a later [route] to the input."""
from __future__ import annotations

import copy

import pytest

from d2c.errors import D2CError

from .conftest import build_bundle, max_rel_err, net_header, section

ACTIVATIONS = ["leaky", "relu", "logistic", "tanh", "linear", "elu"]
CONV = section("convolutional", filters=3, size=3, pad=1, activation="linear")


def variants() -> dict[str, str]:
    out = {act: CONV + section("activation", activation=act) + section("route", layers=[-1, -2])
           for act in ACTIVATIONS}
    out["default-linear"] = CONV + section("activation")
    out["twice"] = CONV + section("activation", activation="leaky") + section("activation", activation="logistic")
    return out


@pytest.fixture(scope="module")
def act_bundle(tmp_path_factory):
    return build_bundle(tmp_path_factory.mktemp("activation"), (2, 4, 5), variants())


@pytest.mark.parametrize("variant", list(variants()))
def test_against_darknet(act_bundle, variant):
    act_bundle.check(variant)


@pytest.mark.parametrize("act", ["leaky", "logistic"])
def test_negative_in_place_corrupts_the_input(act_bundle, act):
    """If the activation wrote in place, the route's copy of the conv output would be activated too."""
    case = act_bundle.case
    conv_index, act_index, route_index = act_bundle.layers(act)
    in_place = copy.deepcopy(case.net)
    old_top, new_top = case.blob(act_index), case.blob(conv_index)
    for layer in in_place.layers:
        if layer.name.startswith(case.graph.nodes[act_index].prefix):
            layer.top = [new_top]
        layer.bottom = [new_top if b == old_top else b for b in layer.bottom]
    run = case.with_net(in_place, f"inplace-{act}")
    got = run([route_index])[route_index]
    darknet = case.darknet()[route_index]
    assert max_rel_err(got.reshape(darknet.shape), darknet) > 1e-2


@pytest.mark.parametrize("act", ["mish", "swish", "hard_mish"])
def test_alexeyab_zeroing_activations_refused(make_case, act):
    cfg = net_header(2, 3, 3) + CONV + section("activation", activation=act)
    with pytest.raises(D2CError) as info:
        make_case(cfg, flavor="alexeyab")
    assert "[activation] 'activation'" in info.value.render() and "returns 0" in info.value.render()


def test_pjreddie_unknown_activation_runs_relu(make_case):
    case = make_case(net_header(2, 3, 3) + CONV + section("activation", activation="mish"), flavor="pjreddie")
    assert any("ReLU instead" in w for w in case.conversion.warnings)
    case_dn = case.darknet()
    from .conftest import assert_close
    assert_close(case.caffe()[1], case_dn[1], "mish->ReLU fallback vs Darknet")


def _node(act: str):
    from d2c.darknet.node import Node
    return Node(index=3, kind="convolutional", section=None, inputs=[2], in_shapes=[(2, 2, 2)], out_shape=(2, 2, 2),
                attrs={"activation": act})


@pytest.mark.parametrize("act, slope", [("leaky", 0.1), ("relu", 0.0)])
def test_activation_flips_are_the_sign_disagreements(act, slope):
    """A branch activation's gradient factor is picked by the output's sign on both sides: the flips
    are exactly the elements whose signs differ, with the engine's factor minus Caffe's there."""
    import numpy as np
    from numpy.testing import assert_allclose

    from d2c.layers import REGISTRY

    theirs = np.array([[[[0.5, -0.2], [1e-8, -1e-8]]]], np.float32)
    ours = theirs.copy()
    layer, same = REGISTRY["convolutional"].activation_flips(_node(act), theirs, ours)
    assert layer == f"layer003_{act}"                          # the layer emit_activation names
    assert_allclose(same, 0.0, atol=0)                        # negative control: equal outputs, no flip
    ours[0, 0, 1] = -ours[0, 0, 1]                            # the two near-zero elements take the other sign
    _, factor = REGISTRY["convolutional"].activation_flips(_node(act), theirs, ours)
    assert_allclose(factor, [[[[0, 0], [1 - slope, slope - 1]]]], atol=1e-7)


def test_smooth_activations_have_no_flips():
    import numpy as np

    from d2c.layers import REGISTRY

    x = np.array([[[[1e-8]]]], np.float32)
    assert all(REGISTRY["convolutional"].activation_flips(_node(act), x, -x) is None
               for act in ("linear", "logistic", "mish"))
