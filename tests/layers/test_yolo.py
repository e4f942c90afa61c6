"""[yolo]: no Caffe layer; the raw conv output is the net output. Darknet's [yolo] output is that
blob with logistic on x, y, objectness and classes (not w, h): checked against the real Darknet."""
from __future__ import annotations

import numpy as np
import pytest

from d2c.errors import D2CError

from .conftest import (_caffe, assert_close, check_all_engines, max_rel_err, net_header, run_pycaffe,
                       section)

ANCHORS = [10, 14, 23, 27, 37, 58, 81, 82, 135, 169, 344, 319]


def yolo_logistic(raw: np.ndarray, n_anchors: int, classes: int, entries: str = "darknet") -> np.ndarray:
    """Darknet's forward_yolo_layer on (N, n*(5+C), H, W): logistic on e in {0, 1, 4..4+C}."""
    out = raw.astype(np.float64).copy()
    n, _, h, w = raw.shape
    view = out.reshape(n, n_anchors, 5 + classes, h, w)
    picked = [0, 1, *range(4, 5 + classes)] if entries == "darknet" else list(range(5 + classes))
    view[:, :, picked] = 1.0 / (1.0 + np.exp(-view[:, :, picked]))
    return out.astype(np.float32)


def yolo_cfg(classes: int, masks: list[list[int]], hw: tuple[int, int] = (5, 6)) -> str:
    text = net_header(3, *hw)
    text += section("convolutional", filters=4, size=3, pad=1, activation="leaky")
    for k, mask in enumerate(masks):
        if k:
            text += section("route", layers=-3)
        text += section("convolutional", filters=len(mask) * (5 + classes), size=1, activation="linear")
        text += section("yolo", mask=mask, anchors=ANCHORS, classes=classes, num=6)
    return text


@pytest.mark.parametrize("classes", [1, 3])
@pytest.mark.parametrize("masks", [[[0, 1, 2]], [[3, 4, 5], [0, 1]]], ids=["one-head", "two-heads"])
def test_head_against_darknet(make_case, classes, masks):
    case = make_case(yolo_cfg(classes, masks))
    heads = case.conversion.emitter.heads
    yolo_nodes = [n for n in case.graph.nodes if n.kind == "yolo"]
    assert [h.index for h in heads] == [n.index for n in yolo_nodes]
    check_all_engines(case, layers=[n.inputs[0] for n in yolo_nodes])
    caffe, darknet = case.caffe(), case.darknet()
    for head, node, mask in zip(heads, yolo_nodes, masks):
        assert head.blob == case.blob(node.inputs[0]) and head.kind == "yolo"
        assert head.attrs["mask"] == mask and head.attrs["anchors"] == [float(a) for a in ANCHORS]
        # No Caffe layer reads the head blob: it is a net output.
        assert not [layer.name for layer in case.net.layers if head.blob in layer.bottom]
        decoded = yolo_logistic(caffe[node.index], len(mask), classes)
        assert_close(decoded, darknet[node.index], f"layer {node.index}: logistic(head blob) vs Darknet [yolo]")
        # Negative: logistic on every entry (w, h too) is not Darknet's [yolo] output.
        assert max_rel_err(yolo_logistic(caffe[node.index], len(mask), classes, "all"), darknet[node.index]) > 1e-2
    # Net outputs come out in cfg order (zero-padded names), which decoding relies on.
    pycaffe = _caffe()
    net = pycaffe.Net(str(case.prototxt), str(case.caffemodel), pycaffe.TEST)
    assert list(net.outputs) == [h.blob for h in heads]


def test_alexeyab_keys_recorded(make_case):
    cfg = yolo_cfg(2, [[0, 1, 2]]).replace("[yolo]\n", "[yolo]\nscale_x_y=1.05\nnew_coords=0\niou_loss=ciou\n")
    case = make_case(cfg)
    assert case.flavor == "alexeyab"
    head = case.conversion.emitter.heads[0]
    assert head.attrs["scale_x_y"] == pytest.approx(1.05) and head.attrs["iou_loss"] == "ciou"
    assert head.attrs["max_boxes"] == 200 and head.attrs["iou_normalizer"] == pytest.approx(0.75)
    sidecar_head = case.conversion.sidecar["heads"][0]
    assert sidecar_head["blob"] == head.blob and sidecar_head["mask"] == [0, 1, 2]
    out = run_pycaffe(case.prototxt, case.caffemodel, case.x, [head.blob])[head.blob]
    assert_close(case.opencv()[head.index], out, "OpenCV-Caffe vs pycaffe head blob")


def test_channel_mismatch_names_line(make_case):
    cfg = yolo_cfg(2, [[0, 1, 2]]).replace("filters=21", "filters=20")
    with pytest.raises(D2CError) as info:
        make_case(cfg)
    assert "[yolo]" in info.value.render() and "21" in info.value.render()
