"""The preprocessing contract (d2c.preprocess): written by convert, spelled per toolchain, proven on pycaffe.

What is checked: the sidecar states Darknet's input for each lineage (pjreddie letterbox, AlexeyAB
stretch unless letter_box=1, YOLOv1 stretch); each toolchain's config divides uint8 bytes by 255 and
swaps channels only for BGR frames; a uint8 frame through the caffe config gives the heads Darknet's
float input gives (to the byte rounding of the input), and the classic mistake (std 1) does not.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from d2c.convert import convert
from d2c.detect import Engine, load_model_files
from d2c.errors import D2CError
from d2c.image import letterbox, load_image_rgb
from d2c.preprocess import (LETTERBOX_FILL_U8, TARGETS, contract, deploy_preprocess, from_uint8_frame,
                            make_contract, to_uint8_frame)

ROOT = Path(__file__).resolve().parents[1]
SYS_CFG = Path("/usr/share/darknet/cfg")
DOG = Path("/usr/share/darknet/data/dog.jpg")
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    convert(SYS_CFG / "yolov3-tiny.cfg", TINY_WEIGHTS, out)
    return out


def test_sidecar_carries_the_contract(tiny: Path) -> None:
    sidecar = json.loads((tiny / "yolov3-tiny.json").read_text())
    pre = sidecar["preprocess"]
    assert pre["channel_order"] == "RGB" and pre["layout"] == "NCHW" and pre["resize"] == "letterbox"
    assert_allclose(pre["scale"], 1 / 255, rtol=0, atol=0)
    assert pre["mean"] == [0.0, 0.0, 0.0] and pre["letterbox_fill"] == 0.5
    assert (pre["width"], pre["height"]) == (416, 416)
    # A sidecar written before the field: the same contract, derived.
    old = {k: v for k, v in sidecar.items() if k != "preprocess"}
    assert contract(old) == pre


@pytest.mark.parametrize("flavor, letter_box, kinds, expected", [
    ("pjreddie", 0, ["yolo"], "letterbox"), ("pjreddie", 0, ["region"], "letterbox"),
    ("alexeyab", 0, ["yolo"], "stretch"), ("alexeyab", 1, ["yolo"], "letterbox"),
    ("pjreddie", 0, ["detection"], "stretch"), ("pjreddie", 0, [], None)])
def test_resize_rule_per_lineage(flavor: str, letter_box: int, kinds: list[str], expected: str | None) -> None:
    pre = make_contract(416, 416, 3, flavor, letter_box, kinds)
    assert pre["resize"] == expected
    assert pre["letterbox_fill"] == (0.5 if expected == "letterbox" else None)


@pytest.mark.parametrize("target", TARGETS)
def test_every_target_divides_bytes_by_255(tiny: Path, target: str) -> None:
    sidecar = load_model_files(tiny).sidecar
    rgb, bgr = deploy_preprocess(sidecar, target, "RGB"), deploy_preprocess(sidecar, target, "BGR")
    for pre in (rgb, bgr):
        assert pre["mean_values"] == [0.0] * 3 and pre["std_values"] == [255.0] * 3
        assert pre["letterbox"] and pre["pad_value"] == LETTERBOX_FILL_U8 and pre["input_dtype"] == "uint8"
    assert not rgb["reverse_channels"] and bgr["reverse_channels"]
    text_rgb, text_bgr = json.dumps(rgb["config"]), json.dumps(bgr["config"])
    assert ("255" in text_rgb) or ("0.00392156862745098" in text_rgb)
    assert text_rgb != text_bgr      # the channel swap is in the toolchain's own terms


def test_toolchain_spellings(tiny: Path) -> None:
    sidecar = load_model_files(tiny).sidecar
    assert deploy_preprocess(sidecar, "rknn")["config"] == {
        "mean_values": [[0.0, 0.0, 0.0]], "std_values": [[255.0, 255.0, 255.0]], "host_reverse_channels": False}
    assert deploy_preprocess(sidecar, "openvino", "BGR")["config"]["mo_args"] == [
        "--mean_values", "data[0,0,0]", "--scale_values", "data[255,255,255]", "--reverse_input_channels"]
    mnn = deploy_preprocess(sidecar, "mnn", "BGR")["config"]["image_process"]
    assert (mnn["sourceFormat"], mnn["destFormat"]) == ("BGR", "RGB")
    assert_allclose(mnn["normal"], [1 / 255] * 3, rtol=1e-15, atol=0)
    tpu = deploy_preprocess(sidecar, "tpu-mlir")["config"]["model_transform_args"]
    assert "--keep_aspect_ratio" in tpu and tpu[tpu.index("--pixel_format") + 1] == "rgb"


def test_bad_target_and_order_are_one_line_errors(tiny: Path) -> None:
    sidecar = load_model_files(tiny).sidecar
    with pytest.raises(D2CError, match="unknown target 'tensorrt'"):
        deploy_preprocess(sidecar, "tensorrt")
    with pytest.raises(D2CError, match="frame channel order 'YUV'"):
        deploy_preprocess(sidecar, "rknn", "YUV")
    with pytest.raises(D2CError, match="uint8 frame"):
        from_uint8_frame(np.zeros((4, 4, 3), np.float32), deploy_preprocess(sidecar, "rknn"))


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_uint8_frame_round_trip(order: str) -> None:
    tensor = letterbox(load_image_rgb(DOG), 416, 416)
    frame = to_uint8_frame(tensor, order)
    assert frame.shape == (416, 416, 3) and frame.dtype == np.uint8
    assert frame[0, 0].tolist() == [LETTERBOX_FILL_U8] * 3     # the 0.5 canvas
    side = {"input": {"width": 416, "height": 416, "channels": 3}, "heads": [{"kind": "yolo"}]}
    back = from_uint8_frame(frame, deploy_preprocess(side, "rknn", order))[0]
    assert_allclose(back, tensor, rtol=0, atol=0.5 / 255 + 1e-7)


def test_uint8_frames_through_the_contract_give_darknets_heads(tiny: Path) -> None:
    """pycaffe as the toolchain: the caffe config on a uint8 frame reproduces the heads of Darknet's
    float input to within the input's byte rounding; std 1 (bytes fed unscaled) does not."""
    files = load_model_files(tiny)
    engine = Engine(files, "caffe")
    tensor = letterbox(load_image_rgb(DOG), 416, 416)
    reference = engine.forward(tensor)
    pre = deploy_preprocess(files.sidecar, "caffe", "BGR")
    frame = to_uint8_frame(tensor, "BGR")
    got = engine.forward(from_uint8_frame(frame, pre)[0])
    wrong = engine.forward(from_uint8_frame(frame, dict(pre, std_values=[1.0] * 3))[0])
    swapped = engine.forward(from_uint8_frame(frame, dict(pre, reverse_channels=False))[0])
    for blob, ref in reference.items():
        scale = float(np.abs(ref).max())
        assert_allclose(got[blob], ref, rtol=0, atol=0.02 * scale)
        assert float(np.abs(wrong[blob] - ref).max()) > 0.5 * scale
        assert float(np.abs(swapped[blob] - ref).max()) > 0.05 * scale
    exact = engine.forward(from_uint8_frame(frame, pre)[0])
    for blob in reference:
        assert_array_equal(exact[blob], got[blob])
