"""YOLOv1 [detection] heads: d2c's decode against Debian's Darknet, bit for bit, and end to end.

Why: `d2c detect` on a converted yolov1 must print what `darknet yolo test` prints. The
reference runs in a child process (libdarknet.so switches on FTZ/DAZ where it is loaded):
Darknet's forward on the same stretched input, then get_network_boxes(w=1, h=1, relative=0)
and do_nms_sort, as examples/yolo.c does. yolov1-tiny runs at 64x64 here (the [connected]
layer still gives 7x7 cells), with seeded random weights, softmax off (the cfg) and on.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

import d2c
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.weights import WeightsHeader, random_weights, write_weights
from d2c.decode_v1 import decode_detection
from d2c.detect import Detection, do_nms_sort, load_model_files
from d2c.image import load_image_rgb, resize_image

ROOT = Path(__file__).resolve().parents[1]
CFG = Path("/usr/share/darknet/cfg/yolov1-tiny.cfg")
DOG = Path("/usr/share/darknet/data/dog.jpg")
SIZE = 64
THRESH = 0.2
NMS = 0.4     # examples/yolo.c test_yolo

CHILD = textwrap.dedent("""
    import ctypes, sys
    import numpy as np
    from d2c.darknet.runtime import DarknetNet
    cfg, weights, x_path, thresh, nms, out = sys.argv[1:7]
    net = DarknetNet(cfg, weights, batch=1, quiet=True)
    net.forward(np.load(x_path)[None])
    dll, n = net.lib.dll, net.net
    last = net.n_layers - 1
    res = {"head_input": net.layer_output(last - 1)}
    classes = int(n.layers[n.n - 1].classes)
    count = ctypes.c_int(0)
    dets = dll.get_network_boxes(net._net, 1, 1, float(thresh), 0.0, None, 0, ctypes.byref(count))
    def dump(tag):
        k = count.value
        res[tag + "_bbox"] = np.array([[dets[i].bbox.x, dets[i].bbox.y, dets[i].bbox.w, dets[i].bbox.h]
                                       for i in range(k)], np.float32).reshape(k, 4)
        res[tag + "_obj"] = np.array([dets[i].objectness for i in range(k)], np.float32)
        res[tag + "_classes"] = np.array([dets[i].classes for i in range(k)], np.int64)
        res[tag + "_prob"] = np.array([[dets[i].prob[c] for c in range(classes)] for i in range(k)],
                                      np.float32).reshape(k, classes)
    dump("raw")
    dll.do_nms_sort(dets, count.value, classes, float(nms))
    dump("nms")
    np.savez(out, **res)
""")


@pytest.fixture(scope="module", params=["softmax0-sqrt1", "softmax1-sqrt0"])
def case(request, tmp_path_factory) -> dict:
    """cfg + random weights + converted model + Darknet's reference for one head variant."""
    softmax, sqrt = ("1", "0") if request.param == "softmax1-sqrt0" else ("0", "1")
    work = tmp_path_factory.mktemp(request.param)
    text = CFG.read_text().replace("height=448", f"height={SIZE}").replace("width=448", f"width={SIZE}")
    text = text.replace("softmax=0", f"softmax={softmax}").replace("sqrt=1", f"sqrt={sqrt}")
    cfg = work / "yolov1-tiny.cfg"
    cfg.write_text(text)
    graph = build_graph(parse_cfg(cfg))
    weights = work / "random.weights"
    arrays = random_weights(graph, seed=3)
    head_layer = graph.nodes[-2].index          # the [connected] layer: outputs of O(1), like a trained net
    arrays[head_layer] = {k: v * np.float32(8) for k, v in arrays[head_layer].items()}
    write_weights(weights, WeightsHeader(), graph, arrays)
    d2c.convert(cfg, weights, work / "model")
    x = resize_image(load_image_rgb(DOG), SIZE, SIZE)
    np.save(work / "x.npy", x)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg), str(weights), str(work / "x.npy"), str(THRESH),
                           str(NMS), str(work / "ref.npz")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(work / "ref.npz") as data:
        ref = {k: data[k] for k in data.files}
    head = load_model_files(work / "model").sidecar["heads"][0]
    assert head["kind"] == "detection" and (head["softmax"], head["sqrt"]) == (int(softmax), int(sqrt))
    return {"ref": ref, "head": head, "model": work / "model", "name": request.param}


def _ours(raw: np.ndarray, head: dict) -> list[Detection]:
    boxes, obj, probs = decode_detection(raw, head, THRESH)
    return [Detection(bbox=boxes[k], objectness=obj[k], prob=probs[k], classes=0) for k in range(len(obj))]


def _check(dets: list[Detection], ref: dict, tag: str) -> None:
    assert len(dets) == len(ref[f"{tag}_obj"]) == 7 * 7 * 2
    assert_array_equal([d.classes for d in dets], ref[f"{tag}_classes"])
    assert_array_equal(np.array([d.objectness for d in dets]), ref[f"{tag}_obj"])
    assert_array_equal(np.stack([d.bbox for d in dets]), ref[f"{tag}_bbox"])
    assert_array_equal(np.stack([d.prob for d in dets]), ref[f"{tag}_prob"])


def test_decode_and_nms_equal_darknet_bit_for_bit(case) -> None:
    """On Darknet's own head input: every box, confidence and probability, before and after NMS."""
    ref, head = case["ref"], case["head"]
    dets = _ours(ref["head_input"], head)
    _check(dets, ref, "raw")
    assert np.count_nonzero(ref["raw_prob"]) > 0, "some probabilities pass the threshold"
    _check(do_nms_sort(dets, int(head["classes"]), NMS), ref, "nms")


def test_detect_end_to_end_matches_darknet(case) -> None:
    """The Caffe model through d2c.Detector: the same (class, box) list as Darknet's, to forward precision."""
    ref = case["ref"]
    record = d2c.Detector(case["model"])(DOG, thresh=THRESH, nms=NMS)
    theirs = [(int(j), ref["nms_bbox"][k]) for k in range(len(ref["nms_obj"]))
              for j in np.nonzero(ref["nms_prob"][k] > np.float32(THRESH))[0]]
    assert [d["class"] for d in record["detections"]] == [j for j, _ in theirs]
    assert theirs, "the check needs detections"
    assert_allclose([d["box"] for d in record["detections"]], [b for _, b in theirs], atol=1e-4, rtol=0)
