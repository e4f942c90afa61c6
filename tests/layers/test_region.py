"""[region] (YOLOv2 head): raw conv output is the net output. Darknet's [region] output is that
blob with logistic on x, y, objectness and softmax (or logistic) over the classes at each cell."""
from __future__ import annotations

import numpy as np
import pytest

from d2c.errors import D2CError

from .conftest import assert_close, check_all_engines, max_rel_err, net_header, section

ANCHORS = [0.57, 0.68, 1.87, 2.06, 3.34, 5.47]


def region_activate(raw: np.ndarray, num: int, classes: int, softmax: bool, class_axis_softmax: bool = True
                    ) -> np.ndarray:
    """Darknet's forward_region_layer (inference) on (N, num*(4+1+C), H, W)."""
    out = raw.astype(np.float64).reshape(raw.shape[0], num, 5 + classes, *raw.shape[2:]).copy()
    logistic = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    out[:, :, [0, 1, 4]] = logistic(out[:, :, [0, 1, 4]])
    cls = out[:, :, 5:]
    if softmax:
        if class_axis_softmax:
            e = np.exp(cls - cls.max(axis=2, keepdims=True))
            out[:, :, 5:] = e / e.sum(axis=2, keepdims=True)
        else:  # negative model: softmax over the cells instead of the classes
            flat = cls.reshape(*cls.shape[:3], -1)
            e = np.exp(flat - flat.max(axis=3, keepdims=True))
            out[:, :, 5:] = (e / e.sum(axis=3, keepdims=True)).reshape(cls.shape)
    else:
        out[:, :, 5:] = logistic(cls)
    return out.reshape(raw.shape).astype(np.float32)


@pytest.mark.parametrize("softmax", [True, False], ids=["softmax", "logistic"])
@pytest.mark.parametrize("num,classes", [(3, 2), (1, 4)])
def test_head_against_darknet(make_case, softmax, num, classes):
    cfg = (net_header(3, 5, 4) + section("convolutional", filters=4, size=3, pad=1, activation="leaky")
           + section("convolutional", filters=num * (5 + classes), size=1, activation="linear")
           + section("region", anchors=ANCHORS[: 2 * num], classes=classes, num=num, coords=4,
                     softmax=int(softmax)))
    case = make_case(cfg)
    head = case.conversion.emitter.heads[0]
    node = case.graph.nodes[-1]
    assert head.kind == "region" and head.blob == case.blob(node.inputs[0]) and head.index == node.index
    assert head.attrs["anchors"] == pytest.approx(ANCHORS[: 2 * num]) and head.attrs["softmax"] == int(softmax)
    assert not [layer for layer in case.net.layers if head.blob in layer.bottom]
    check_all_engines(case, layers=[node.inputs[0]])
    decoded = region_activate(case.caffe()[node.index], num, classes, softmax)
    darknet = case.darknet()[node.index]
    assert_close(decoded, darknet, "activated head blob vs Darknet [region]")
    if softmax:
        assert max_rel_err(region_activate(case.caffe()[node.index], num, classes, True, False), darknet) > 1e-2


def test_tree_refused_with_key(make_case):
    cfg = (net_header(3, 4, 4) + section("convolutional", filters=8, size=1, activation="linear")
           + section("region", classes=3, num=1, tree="data/9k.tree"))
    with pytest.raises(D2CError) as info:
        make_case(cfg)
    assert "[region] 'tree'" in info.value.render()
