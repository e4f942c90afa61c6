"""int8-friendly split heads (d2c.int8_heads): stock layers only, exact against the plain heads.

What is checked, on the real engines: pycaffe's split outputs are the plain head's values (w/h to BLAS's
summation order, 1e-6; x/y and objectness+classes its logistic to the float rounding); `d2c detect` decodes the
split form of real yolov3-tiny to the plain form's detections on the 7 sample images (pycaffe) and on
dog.jpg (OpenCV); AlexeyAB heads (scale_x_y on yolov4-tiny, new_coords on yolov7-tiny, random
weights) decode the same; a negative control decodes split outputs as raw logits and differs;
[region] heads are refused in one line.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from d2c.convert import convert
from d2c.detect import Engine, decode_heads, do_nms_sort, load_model_files
from d2c.errors import D2CError
from d2c.image import letterbox, load_image_rgb
from d2c.int8_heads import merge_split, output_blobs
from d2c.numerics import logistic_darknet
from shared_cfgs import shared_cfg_dir

ROOT = Path(__file__).resolve().parents[1]
SYS_CFG = Path("/usr/share/darknet/cfg")
IMAGES = sorted(Path("/usr/share/darknet/data").glob("*.jpg"))
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory) -> tuple[Path, Path]:
    out = tmp_path_factory.mktemp("split")
    convert(SYS_CFG / "yolov3-tiny.cfg", TINY_WEIGHTS, out / "plain")
    rep = convert(SYS_CFG / "yolov3-tiny.cfg", TINY_WEIGHTS, out / "split", split_heads=True)
    assert rep.outputs == [f"layer0{i}_conv_{p}" for i in (15, 22) for p in ("xy", "wh", "oc")]
    return out / "plain", out / "split"


def _stock_types(prototxt: Path) -> set[str]:
    return set(re.findall(r'type: "(\w+)"', prototxt.read_text()))


def test_split_outputs_are_the_plain_heads(tiny_pair: tuple[Path, Path]) -> None:
    plain_files, split_files = (load_model_files(p) for p in tiny_pair)
    assert _stock_types(split_files.prototxt) - _stock_types(plain_files.prototxt) == {"Sigmoid"}
    assert [h["split"]["form"] for h in split_files.sidecar["heads"]] == ["conv", "conv"]
    tensor = letterbox(load_image_rgb(IMAGES[0]), 416, 416)
    plain = Engine(plain_files).forward(tensor)
    split = Engine(split_files).forward(tensor)
    for head in split_files.sidecar["heads"]:
        names, (_, h, w) = head["split"], head["shape"]
        grid = plain[head["blob"]].reshape(3, 85, h * w)
        assert_allclose(split[names["wh"]][0].reshape(3, 2, h * w), grid[:, 2:4], rtol=1e-5, atol=1e-5)
        # Caffe's float Sigmoid against Darknet's double logistic: the same to the float rounding.
        assert_allclose(split[names["xy"]][0].reshape(3, 2, h * w), logistic_darknet(grid[:, 0:2]), rtol=1e-5, atol=1e-7)
        assert_allclose(split[names["oc"]][0].reshape(3, 81, h * w), logistic_darknet(grid[:, 4:]), rtol=1e-5, atol=1e-7)


def _compare(ref: list, got: list) -> None:
    assert len(got) == len(ref)
    for a, b in zip(ref, got, strict=True):
        assert_array_equal(np.nonzero(a.prob)[0], np.nonzero(b.prob)[0])
        assert_allclose(b.bbox, a.bbox, rtol=2e-6, atol=1e-7)
        assert_allclose(b.prob, a.prob, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("engine", ["caffe", "opencv"])
def test_split_decodes_to_the_plain_detections(tiny_pair: tuple[Path, Path], engine: str) -> None:
    plain, split = (Engine(load_model_files(p), engine) for p in tiny_pair)
    kept = 0
    for image in IMAGES if engine == "caffe" else IMAGES[:1]:
        ref, _ = plain.detect(image)
        got, _ = split.detect(image)
        _compare(ref, got)
        kept += sum(int(np.count_nonzero(d.prob > np.float32(0.25))) for d in ref)
    assert kept >= (24 if engine == "caffe" else 1)


def test_negative_control_split_outputs_as_logits(tiny_pair: tuple[Path, Path]) -> None:
    """Decoding the split outputs as if they were raw logits (the logistic applied twice) is wrong."""
    files = load_model_files(tiny_pair[1])
    outputs = Engine(files).forward(letterbox(load_image_rgb(IMAGES[0]), 416, 416))   # dog.jpg, 768x576
    sidecar = files.sidecar
    right = do_nms_sort(decode_heads(outputs, sidecar, 768, 576, 0.25), 80, 0.45)
    as_raw = {h["blob"]: merge_split(outputs, h, "pjreddie").reshape(1, *h["shape"]) for h in sidecar["heads"]}
    plain_sidecar = dict(sidecar, heads=[{k: v for k, v in h.items() if k != "split"} for h in sidecar["heads"]])
    wrong = decode_heads(as_raw, plain_sidecar, 768, 576, 0.25)     # no NMS: thousands of candidates
    strong = sum(int(np.count_nonzero(d.prob > np.float32(0.25))) for d in right)
    assert strong == 6 and len(wrong) > 100 * len(right)


def _small_cfg(source: Path, out: Path, size: int = 128) -> Path:
    text = re.sub(r"(?m)^width\s*=.*$", f"width={size}", source.read_text())
    cfg = out / source.name
    cfg.write_text(re.sub(r"(?m)^height\s*=.*$", f"height={size}", text))
    return cfg


@pytest.mark.parametrize("name", ["yolov4-tiny", "yolov7-tiny"])
def test_alexeyab_heads_split_exactly(tmp_path: Path, name: str) -> None:
    """scale_x_y (applied by the decoder after the network's logistic) and new_coords (no Sigmoid)."""
    cfg = _small_cfg(shared_cfg_dir() / f"{name}.cfg", tmp_path)
    convert(cfg, None, tmp_path / "plain", seed=5)
    convert(cfg, None, tmp_path / "split", seed=5, split_heads=True)
    plain_files, split_files = load_model_files(tmp_path / "plain"), load_model_files(tmp_path / "split")
    heads = split_files.sidecar["heads"]
    assert [h["split"]["sigmoid"] for h in heads] == [name == "yolov4-tiny"] * len(heads)
    plain, split = Engine(plain_files), Engine(split_files)
    for image in IMAGES[:2]:   # before NMS: every candidate box above the threshold
        _compare(plain.detect(image, thresh=0.1, nms=0)[0], split.detect(image, thresh=0.1, nms=0)[0])
    assert len(output_blobs(split_files.sidecar)) == 3 * len(heads)


def test_region_heads_are_refused(tmp_path: Path) -> None:
    with pytest.raises(D2CError, match=r"only \[yolo\] heads can be split; heads\[0\] .* is a \[region\] head"):
        convert(SYS_CFG / "yolov2-tiny-voc.cfg", None, tmp_path / "m", split_heads=True)
    assert not (tmp_path / "m").exists()
