"""Whole models: every layer of the converted net against the real Darknet (and OpenCV).

Debian's pjreddie Darknet runs every YOLO cfg it ships; AlexeyAB-only cfgs are checked against
OpenCV 4.x's Darknet importer, the only runnable implementation of their layers here.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from d2c.caffe.emitter import ConvertOptions
from d2c.caffe.runtime import caffe_forward, load_caffe
from d2c.convert import build_conversion
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.forward_check import (compare_forward, diff, format_table, prepare, random_input,
                               with_input_size)
from shared_cfgs import shared_cfg_dir

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_CFG = Path("/usr/share/darknet/cfg")
SHARED_CFG = shared_cfg_dir()
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"

# Convolution sums in a different order (BLAS, FMA) than Darknet's gemm, so ~1e-6 relative per
# layer is the floor; deep nets accumulate it. Relative to each blob's largest magnitude.
SHALLOW_REL = 1e-5
DEEP_REL = 2e-5
OPENCV_CAFFE_REL = 1e-5      # OpenCV running our Caffe files vs pycaffe
OPENCV_DARKNET_REL = 1e-4    # OpenCV's own Darknet importer (its own BN arithmetic) vs pycaffe

STOCK_LAYERS = {"Input", "Convolution", "Deconvolution", "BatchNorm", "Scale", "ReLU", "Sigmoid", "TanH",
                "BNLL", "ELU", "Eltwise", "Pooling", "Crop", "Concat", "Slice", "Reshape", "InnerProduct",
                "Softmax", "Dropout", "Flatten", "Power", "Bias"}

DEBIAN_YOLO = ["yolov2-tiny.cfg", "yolov2-tiny-voc.cfg", "yolov2.cfg", "yolov2-voc.cfg", "yolov3.cfg",
               "yolov3-tiny.cfg", "yolov3-spp.cfg", "yolov3-voc.cfg", "yolov3-openimages.cfg"]


def test_real_yolov3_tiny_every_layer_matches_darknet() -> None:
    report = compare_forward(DEBIAN_CFG / "yolov3-tiny.cfg", TINY_WEIGHTS)
    print(format_table(report))
    assert len(report.layers) == 24
    for layer in report.layers:
        assert layer.max_rel <= SHALLOW_REL, f"layer {layer.index} {layer.kind}: {layer.max_rel:.3g}"
    assert max(report.opencv.values()) <= OPENCV_CAFFE_REL, report.opencv


def test_real_yolov3_tiny_folded_bn_matches_darknet() -> None:
    report = compare_forward(DEBIAN_CFG / "yolov3-tiny.cfg", TINY_WEIGHTS, fold_bn=True, with_opencv=False)
    assert report.max_rel <= SHALLOW_REL


@pytest.mark.parametrize("name", DEBIAN_YOLO)
def test_debian_yolo_cfgs_match_darknet_with_random_weights(name: str, tmp_path: Path) -> None:
    cfg = with_input_size(DEBIAN_CFG / name, 160, 160, tmp_path)
    report = compare_forward(cfg, None, seed=7)
    limit = SHALLOW_REL if len(report.layers) < 40 else DEEP_REL
    worst = max(report.layers, key=lambda d: d.max_rel)
    assert worst.max_rel <= limit, f"{name}: layer {worst.index} {worst.kind} rel {worst.max_rel:.3g}"
    assert max(report.opencv.values()) <= OPENCV_CAFFE_REL, report.opencv


def test_batch_of_two_images() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = with_input_size(DEBIAN_CFG / "yolov2-tiny-voc.cfg", 96, 96, Path(tmp))
        report = compare_forward(cfg, None, batch=2, seed=3, with_opencv=False)
    assert report.layers[0].shape[0] == 2
    assert report.max_rel <= SHALLOW_REL


def test_yolo9000_is_a_clear_unsupported_error() -> None:
    with pytest.raises(Exception) as info:
        build_graph(parse_cfg(DEBIAN_CFG / "yolo9000.cfg"))
    assert "yolo9000.cfg:217 [region] 'tree'" in info.value.render()


def opencv_head_blob_names(graph, heads) -> list[str]:
    """OpenCV's Darknet importer names a conv's activation `<act>_<index+1>`."""
    names = []
    for head in heads:
        conv = graph.nodes[head.index - 1]
        act = conv.attrs.get("activation", "linear")
        names.append(f"conv_{conv.index}" if act == "linear" else f"{act}_{head.index}")
    return names


@pytest.mark.parametrize("name, size", [
    ("yolov4.cfg", 160), ("yolov4-tiny.cfg", 160), ("yolov4-csp.cfg", 160), ("yolov4-csp-swish.cfg", 160),
    ("yolov7.cfg", 160), ("yolov7-tiny.cfg", 160), ("yolov3-tiny-prn.cfg", 160), ("yolov3_5l.cfg", 160),
    ("yolov3-spp.cfg", 160),
])
def test_alexeyab_cfgs_match_opencv_darknet_importer(name: str, size: int, tmp_path: Path) -> None:
    import cv2
    cfg = with_input_size(SHARED_CFG / name, size, size, tmp_path)
    graph, header, arrays, weights = prepare(cfg, None, tmp_path, seed=5)
    x = random_input(graph, 1, 5)
    conv = build_conversion(graph, arrays, header, ConvertOptions(flavor=graph.flavor))
    blobs = caffe_forward(load_caffe(conv.net), {"data": x})
    reference = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
    reference.setInput(x)
    heads = conv.emitter.heads
    assert heads, name
    for head, cv_name in zip(heads, opencv_head_blob_names(graph, heads)):
        theirs = reference.forward(cv_name)
        rel = diff(theirs, blobs[head.blob])[1]
        assert rel <= OPENCV_DARKNET_REL, f"{name} head {head.index} ({cv_name}): rel {rel:.3g}"


def test_sam_reorg3d_cfg_runs_identically_in_pycaffe_and_opencv(tmp_path: Path) -> None:
    """OpenCV's Darknet importer has no [reorg3d]; those layers are proven per layer against numpy.
    Here the whole model must give the same outputs in both Caffe runtimes."""
    from d2c.caffe.runtime import opencv_forward
    cfg = with_input_size(SHARED_CFG / "yolov4-sam-mish-csp-reorg-bfm.cfg", 256, 256, tmp_path)
    graph, header, arrays, _ = prepare(cfg, None, tmp_path, seed=5)
    assert {n.kind for n in graph.nodes} >= {"sam", "reorg3d"}
    x = random_input(graph, 1, 5)
    conv = build_conversion(graph, arrays, header, ConvertOptions(flavor=graph.flavor))
    blobs = caffe_forward(load_caffe(conv.net), {"data": x})
    heads = [h.blob for h in conv.emitter.heads]
    cv = opencv_forward(conv.net, x, heads)
    for blob in heads:
        assert np.all(np.isfinite(blobs[blob]))
        assert diff(blobs[blob], cv[blob])[1] <= OPENCV_CAFFE_REL


@pytest.mark.parametrize("cfg", sorted(DEBIAN_CFG.glob("yolov[23]*.cfg")) + sorted(SHARED_CFG.glob("*.cfg")),
                         ids=lambda p: p.name)
def test_converted_models_use_only_stock_layers(cfg: Path) -> None:
    graph = build_graph(parse_cfg(cfg))
    from d2c.darknet.weights import WeightsHeader, random_weights
    for fold in (False, True):
        conv = build_conversion(graph, random_weights(graph), WeightsHeader(),
                                ConvertOptions(flavor=graph.flavor, fold_bn=fold))
        used = {layer.type for layer in conv.net.layers}
        assert used <= STOCK_LAYERS, used - STOCK_LAYERS
        # the deploy outputs are exactly the head inputs, in cfg order
        consumed = {b for layer in conv.net.layers for b in layer.bottom if b not in layer.top}
        produced = [t for layer in conv.net.layers for t in layer.top]
        dangling = sorted({t for t in produced if t not in consumed})
        assert dangling == sorted(h.blob for h in conv.emitter.heads)
        assert [h.blob for h in conv.emitter.heads] == sorted(h.blob for h in conv.emitter.heads)


def test_mutation_caffe_default_bn_eps_is_caught() -> None:
    """The check can fail: Caffe's usual BN (eps 1e-5 inside the root, raw variance) on real weights."""
    from d2c.layers import convolutional

    original = convolutional.caffe_bn_blobs

    def wrong(mean, variance, flavor):
        return [mean.astype(np.float32), variance.astype(np.float32), np.ones(1, np.float32)], 1e-5

    convolutional.caffe_bn_blobs = wrong
    try:
        report = compare_forward(DEBIAN_CFG / "yolov3-tiny.cfg", TINY_WEIGHTS, with_opencv=False)
    finally:
        convolutional.caffe_bn_blobs = original
    assert report.max_rel > SHALLOW_REL, report.max_rel
