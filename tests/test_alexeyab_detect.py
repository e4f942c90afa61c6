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

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2c.convert import convert
from d2c.darknet.runtime import DarknetProcess
from d2c.darknet.weights import write_weights
from d2c.detect import Engine, detections_to_json, load_model_files
from d2c.darknet.alexeyab import build_dir
from d2c.detect_alexeyab import nms_overlap, network_input
from d2c.numerics import Box
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


def _overlap(kind: str, a: np.ndarray, b: np.ndarray, beta: float = 0.6) -> np.ndarray:
    return nms_overlap(kind, beta)(Box(*np.asarray(a, np.float32)), Box(*np.asarray(b, np.float32).T))


def test_nms_overlap_values() -> None:
    """Hand values: same-centre boxes have d = 0 (DIoU = IoU); disjoint boxes go below 0."""
    a = np.array([0.5, 0.5, 0.2, 0.2], np.float32)
    same_centre = np.array([[0.5, 0.5, 0.4, 0.4]], np.float32)
    for kind in ("default", "greedynms", "diounms"):
        np.testing.assert_allclose(_overlap(kind, a, same_centre), [0.25], rtol=1e-6)
    apart = np.array([[0.9, 0.5, 0.2, 0.2]], np.float32)     # d = 0.16, enclosing 0.6 x 0.2: c = 0.4
    np.testing.assert_allclose(_overlap("diounms", a, apart, 1.0), [-0.4], rtol=1e-5)
    np.testing.assert_allclose(_overlap("greedynms", a, apart, 1.0), [-(0.4 ** 0.6)], rtol=1e-5)  # beta ignored
    np.testing.assert_allclose(_overlap("diounms", a, apart, 0.6), [-(0.4 ** 0.6)], rtol=1e-5)
    assert _overlap("default", a, apart) == 0 and _overlap("default", a * 0, a[None] * 0) == 0   # zero guard


# The engine's own box_iou / box_diou / box_diounms, called in a child process (a crash there is one
# failed test), on float32 pairs read from a .npy; results written back as float32.
_ENGINE_OVERLAPS = """
import ctypes, sys
import numpy as np
lib = ctypes.CDLL(sys.argv[1])
class Box(ctypes.Structure):
    _fields_ = [(k, ctypes.c_float) for k in "xywh"]
for name, extra in (("box_iou", []), ("box_diou", []), ("box_diounms", [ctypes.c_float])):
    getattr(lib, name).argtypes, getattr(lib, name).restype = [Box, Box, *extra], ctypes.c_float
pairs = np.load(sys.argv[2])
a, b, beta = pairs[:, :4].tolist(), pairs[:, 4:8].tolist(), pairs[:, 8].tolist()
out = [[lib.box_iou(Box(*p), Box(*q)) for p, q in zip(a, b)],
       [lib.box_diou(Box(*p), Box(*q)) for p, q in zip(a, b)],
       [lib.box_diounms(Box(*p), Box(*q), t) for p, q, t in zip(a, b, beta)]]
np.save(sys.argv[3], np.asarray(out, np.float32))
"""


def _random_pairs(n: int) -> np.ndarray:
    """(n, 9) float32: box a, box b near it (often overlapping), beta_nms; plus degenerate rows."""
    rng = np.random.default_rng(15)
    a = np.concatenate([rng.uniform(0, 1, (n, 2)), rng.uniform(0.01, 0.6, (n, 2))], 1)
    b = np.concatenate([a[:, :2] + rng.normal(0, 0.1, (n, 2)), a[:, 2:] * rng.uniform(0.5, 1.5, (n, 2))], 1)
    pairs = np.concatenate([a, b, rng.uniform(0.3, 1.5, (n, 1))], 1).astype(np.float32)
    pairs[:4, :8] = [[0.5, 0.5, 0, 0, 0.5, 0.5, 0, 0],          # c == 0: the IoU alone (0 by the guard)
                     [0.5, 0.5, 0.2, 0.2, 0.5, 0.5, 0.2, 0.2],  # identical
                     [0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.1, 0.1],  # disjoint
                     [0.3, 0.3, 0, 0.2, 0.4, 0.3, 0.2, 0]]      # zero-area boxes, apart
    return pairs


def _engine_overlaps(pairs: np.ndarray, tmp_path: Path) -> np.ndarray:
    np.save(tmp_path / "pairs.npy", pairs)
    proc = subprocess.run([sys.executable, "-c", _ENGINE_OVERLAPS, str(build_dir() / "libdarknet.so"),
                           str(tmp_path / "pairs.npy"), str(tmp_path / "out.npy")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.load(tmp_path / "out.npy")


def test_nms_overlaps_equal_the_engines_bit_for_bit(tmp_path: Path) -> None:
    """default / greedynms / diounms overlaps equal the engine's box_iou / box_diou / box_diounms for
    every one of 20,000 random pairs (before d2c had its own DIoU, ~18% differed by an ulp: the power
    term was subtracted in double instead of being rounded to float first, as box.c does)."""
    pairs = _random_pairs(20000)
    theirs = _engine_overlaps(pairs, tmp_path)
    a, b = Box(*pairs[:, :4].T), Box(*pairs[:, 4:8].T)
    for row, kind in enumerate(("default", "greedynms", "diounms")):
        ours = np.array([nms_overlap(kind, float(t))(Box(*p[:4]), Box(*p[4:8, None]))[0]
                         for p, t in zip(pairs, pairs[:, 8])], np.float32) if kind == "diounms" \
            else nms_overlap(kind, 0.6)(a, b).astype(np.float32)
        np.testing.assert_array_equal(ours.view(np.uint32), theirs[row].view(np.uint32), err_msg=kind)
    # The comparison can fail: the old expression, (IoU - power) in double rounded once, differs.
    from d2c.numerics import box_iou
    iou = box_iou(a, b, zero_guard=True)
    top, bot = np.minimum(a.y - a.h / 2, b.y - b.h / 2), np.maximum(a.y + a.h / 2, b.y + b.h / 2)
    left, right = np.minimum(a.x - a.w / 2, b.x - b.w / 2), np.maximum(a.x + a.w / 2, b.x + b.w / 2)
    c = (right - left) * (right - left) + (bot - top) * (bot - top)
    d = (a.x - b.x) * (a.x - b.x) + (a.y - b.y) * (a.y - b.y)
    with np.errstate(divide="ignore", invalid="ignore"):
        once = np.where(c == 0, iou, (iou.astype(np.float64) - np.power((d / c).astype(np.float64), 0.6))
                        .astype(np.float32))
    assert np.count_nonzero(once.view(np.uint32) != theirs[1].view(np.uint32)) > 1000
