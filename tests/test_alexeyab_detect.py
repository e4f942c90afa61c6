"""`d2c detect` on AlexeyAB-semantics models equals AlexeyAB's own detector (test_detector's pipeline:
resize_image or letterbox per `[net] letter_box`, get_network_boxes with its letter flag, greedynms /
diounms / default NMS per the last head), run by the real engine on Darknet's 7 sample images.

The images are the sample JPEGs re-encoded losslessly as PNG: the engine is built without OpenCV and
decodes JPEG with its bundled stb_image, d2c (like Debian's OpenCV build) with libjpeg, and the two
decoders differ by up to 3/255 per pixel on these JPEGs; on PNG both give the same bytes, so the
whole remaining pipeline is compared. Weights are seeded random with the head convolutions scaled
x3, so scores spread over (0, 1) instead of all sitting near 0.25.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from d2c.convert import convert
from d2c.darknet.runtime import DarknetProcess
from d2c.darknet.weights import write_weights
from d2c.detect import Engine, detections_to_json, load_model_files
from d2c.detect_alexeyab import box_diou_nms, network_input
from d2c.forward_check import prepare, with_input_size
from d2c.image import load_image_rgb
from shared_cfgs import shared_cfg_dir

SAMPLES = ["dog.jpg", "horses.jpg", "person.jpg", "eagle.jpg", "giraffe.jpg", "kite.jpg", "scream.jpg"]
DARKNET_DATA = Path("/usr/share/darknet/data")
THRESH = 0.4
SCORE_TOL = 1e-5        # measured worst 2.4e-7 (float-order differences of the forward)
BOX_TOL = 1e-5          # measured worst 1.2e-6
HEAD_SCALE = 3.0


def png_samples(directory: Path) -> list[Path]:
    import cv2
    directory.mkdir(exist_ok=True)
    out = []
    for name in SAMPLES:
        target = directory / name.replace(".jpg", ".png")
        assert cv2.imwrite(str(target), cv2.imread(str(DARKNET_DATA / name)))
        out.append(target)
    return out


def match(theirs: list[dict], ours: list[dict], window: int = 8) -> int:
    """Assert both lists hold the same (class, score, box) in the same order, except that entries
    whose scores tie within SCORE_TOL may trade places (the sort's order for near-equal keys is
    float noise). Returns how many entries moved."""
    assert len(theirs) == len(ours)
    used: set[int] = set()
    moved = 0
    for i, a in enumerate(theirs):
        candidates = [j for j in range(max(0, i - window), min(len(ours), i + window + 1))
                      if j not in used and ours[j]["class"] == a["class"]
                      and abs(ours[j]["score"] - a["score"]) <= SCORE_TOL
                      and np.max(np.abs(np.subtract(ours[j]["box"], a["box"]))) <= BOX_TOL]
        assert candidates, f"engine detection {i} {a} has no counterpart near position {i}: {ours[i]}"
        j = min(candidates, key=lambda k: abs(k - i))
        moved += j != i
        used.add(j)
    return moved


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return png_samples(tmp_path_factory.mktemp("png"))


def model(cfg_name: str, tmp: Path) -> tuple[Path, Path, Path]:
    cfg = with_input_size(shared_cfg_dir() / cfg_name, 160, 160, tmp)
    graph, header, arrays, weights = prepare(cfg, None, tmp, seed=7, flavor="alexeyab")
    for head in graph.heads():
        for key in ("weights", "biases"):
            arrays[head.index - 1][key] = arrays[head.index - 1][key] * np.float32(HEAD_SCALE)
    write_weights(weights, header, graph, arrays)
    convert(cfg, weights, tmp / "model", flavor="alexeyab")
    return cfg, weights, tmp / "model"


@pytest.mark.parametrize("cfg_name, letter_box, nms_kind", [
    ("yolov4-tiny.cfg", 0, "greedynms"), ("yolov7-tiny.cfg", 0, "diounms"), ("yolov4-csp.cfg", 1, "diounms"),
])
def test_detect_equals_alexeyab_detector(cfg_name: str, letter_box: int, nms_kind: str, samples: list[Path],
                                         tmp_path: Path) -> None:
    cfg, weights, model_dir = model(cfg_name, tmp_path)
    engine = Engine(load_model_files(model_dir))
    sidecar = engine.files.sidecar
    assert sidecar["input"]["letter_box"] == letter_box and sidecar["heads"][-1]["nms_kind"] == nms_kind
    total = moved = 0
    with DarknetProcess(cfg, weights, engine="alexeyab", batch=1) as dn:
        for image in samples:
            ours_input = network_input(load_image_rgb(image), 160, 160, bool(letter_box))
            np.testing.assert_array_equal(dn.letterbox(image), ours_input)      # the sized image, bit for bit
            theirs = dn.detect(image, thresh=THRESH)
            dets, _ = engine.detect(image, THRESH)
            ours = detections_to_json(dets, THRESH)
            assert len(theirs) > 50, (image.name, len(theirs))
            moved += match(theirs, ours)
            total += len(theirs)
    print(f"{cfg_name}: {total} detections on {len(samples)} images, {moved} near-tie position swaps")
    assert moved <= total // 100


def test_fused_engine_detector_agrees_too(samples: list[Path], tmp_path: Path) -> None:
    """test_detector fuses BN into the convolutions; on yolov4-tiny that changes nothing visible."""
    cfg, weights, model_dir = model("yolov4-tiny.cfg", tmp_path)
    engine = Engine(load_model_files(model_dir))
    with DarknetProcess(cfg, weights, engine="alexeyab", batch=1, fuse_bn=True) as dn:
        for image in samples[:3]:
            match(dn.detect(image, thresh=THRESH), detections_to_json(engine.detect(image, THRESH)[0], THRESH))


def test_mutation_iou_nms_instead_of_diou_is_caught(samples: list[Path], tmp_path: Path) -> None:
    """The check can fail: yolov7-tiny decoded with plain IoU NMS (pjreddie's) keeps other boxes."""
    cfg, weights, model_dir = model("yolov7-tiny.cfg", tmp_path)
    engine = Engine(load_model_files(model_dir))
    for head in engine.files.sidecar["heads"]:
        head["nms_kind"] = "default"
    with DarknetProcess(cfg, weights, engine="alexeyab", batch=1) as dn:
        with pytest.raises(AssertionError):
            for image in samples:
                match(dn.detect(image, thresh=THRESH), detections_to_json(engine.detect(image, THRESH)[0], THRESH))


def test_box_diou_nms_values() -> None:
    """Hand values: same-centre boxes have d = 0 (DIoU = IoU); disjoint boxes go below 0."""
    a = np.array([0.5, 0.5, 0.2, 0.2], np.float32)
    same_centre = np.array([[0.5, 0.5, 0.4, 0.4]], np.float32)
    np.testing.assert_allclose(box_diou_nms(a, same_centre, 0.6), [0.25], rtol=1e-6)
    apart = np.array([[0.9, 0.5, 0.2, 0.2]], np.float32)     # d = 0.16, enclosing 0.6 x 0.2: c = 0.4
    np.testing.assert_allclose(box_diou_nms(a, apart, 1.0), [-0.4], rtol=1e-5)
    np.testing.assert_allclose(box_diou_nms(a, apart, 0.6), [-(0.4 ** 0.6)], rtol=1e-5)
