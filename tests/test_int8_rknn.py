"""int8 on RKNN's simulator (d2c.calibration, d2c.int8_rknn): calibration sets, scoring, real builds.

What is checked: calibration images come from a .data train list (Darknet's path rules), a list or
a folder, with one-line errors naming the list line; prepared tensors are the contract's uint8 frames
and are cached; the agreement score (kept / extra / worst IoU / worst score diff) on hand-made
detections; RKNN's analysis rows are parsed and ranked. Then the real toolchain (never skipped: a
missing RKNN venv fails): fp16 heads agree with pycaffe, int8 with the contract (std 255) keeps
Darknet's boxes, and the classic mistake (uint8 frames with std 1) loses them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from d2c.calibration import calibration_images, leave_one_out, prepare
from d2c.convert import convert
from d2c.detect import load_model_files
from d2c.errors import DatasetError
from d2c.image import letterbox, load_image_rgb
from d2c.int8_rknn import (Agreement, Build, block_members, measure, parse_analysis, rank_blocks, references,
                           rknn_python)
from d2c.preprocess import to_uint8_frame

ROOT = Path(__file__).resolve().parents[1]
CFG = Path("/usr/share/darknet/cfg/yolov3-tiny.cfg")
IMAGES = sorted(Path("/usr/share/darknet/data").glob("*.jpg"))
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-split")
    convert(CFG, TINY_WEIGHTS, out, split_heads=True)
    return out


def _dataset(root: Path, names: list[str]) -> Path:
    (root / "images").mkdir(parents=True)
    for name in names:
        shutil.copy(f"/usr/share/darknet/data/{name}.jpg", root / "images" / f"{name}.jpg")
    (root / "train.txt").write_text("".join(f"images/{n}.jpg\n" for n in names))
    (root / "obj.data").write_text("classes = 80\ntrain = train.txt\nvalid = train.txt\nnames = x.names\n")
    return root / "obj.data"


def test_calibration_sources(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "ds", ["dog", "eagle", "horses"])
    images = calibration_images(data)
    assert [p.name for p in images] == ["dog.jpg", "eagle.jpg", "horses.jpg"] and all(p.is_file() for p in images)
    assert [p.name for p in calibration_images(data, 2)] == ["dog.jpg", "horses.jpg"]
    assert calibration_images(tmp_path / "ds" / "images") == images
    assert calibration_images(tmp_path / "ds" / "train.txt") == images
    assert leave_one_out(images, images[1]) == [images[0], images[2]]
    with pytest.raises(DatasetError, match="at least two"):
        leave_one_out(images[:1], images[0])


def test_calibration_errors_are_one_line(tmp_path: Path) -> None:
    data = _dataset(tmp_path / "ds", ["dog"])
    (tmp_path / "ds" / "train.txt").write_text("images/dog.jpg\nimages/missing.jpg\n")
    with pytest.raises(DatasetError, match=r"train.txt:2: image 'images/missing.jpg' not found"):
        calibration_images(data)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        calibration_images(tmp_path / "empty")
    with pytest.raises(DatasetError, match="no such .data file, image list or folder"):
        calibration_images(tmp_path / "nope.data")
    with pytest.raises(DatasetError, match="--images 0"):
        calibration_images(tmp_path / "ds" / "images", 0)


def test_prepared_tensors_are_the_contract_and_cached(tiny_split: Path) -> None:
    sidecar = load_model_files(tiny_split).sidecar
    first = prepare(IMAGES[:2], sidecar, "uint8", "t")
    array = np.load(first.tensors[IMAGES[0]])
    assert array.dtype == np.uint8 and array.shape == (1, 3, 416, 416)
    assert_array_equal(array[0].transpose(1, 2, 0), to_uint8_frame(letterbox(load_image_rgb(IMAGES[0]), 416, 416)))
    stamp = first.tensors[IMAGES[0]].stat().st_mtime_ns
    again = prepare(IMAGES[:2], sidecar, "uint8", "t")
    assert again.list_file == first.list_file and again.tensors[IMAGES[0]].stat().st_mtime_ns == stamp
    assert first.list_file.read_text().split() == [str(first.tensors[p]) for p in IMAGES[:2]]


def test_agreement_scoring() -> None:
    box = np.array([0.5, 0.5, 0.2, 0.2])
    ref = [(1, 0.9, box), (2, 0.6, np.array([0.2, 0.2, 0.1, 0.1]))]
    shifted = box + np.array([0.02, 0, 0, 0])
    got = [(1, 0.85, shifted), (2, 0.6, np.array([0.8, 0.8, 0.1, 0.1])), (3, 0.5, box)]
    a = Agreement()
    a.add("x", ref, got, 0.01)
    assert (a.kept, a.total, a.extra) == (1, 2, 2)
    assert_allclose(a.worst_iou, 0.18 * 0.2 / (0.08 - 0.18 * 0.2), rtol=1e-12)
    assert_allclose(a.worst_score_diff, 0.05, rtol=1e-9)
    assert not a.ok_target
    same = Agreement()
    same.add("y", ref, list(ref), 0.0)
    assert (same.kept, same.extra, same.worst_score_diff) == (2, 0, 0.0) and same.ok_target
    assert_allclose(same.worst_iou, 1.0, rtol=1e-12)
    wrong_class = Agreement()     # negative control: a same-place box of another class is not kept
    wrong_class.add("z", ref[:1], [(7, 0.9, box)], 0.0)
    assert (wrong_class.kept, wrong_class.extra) == (0, 1)


def test_analysis_rows_and_ranking(tmp_path: Path) -> None:
    text = ("layer_name  simulator_error\n"
            "[Input] data                 1.00000 | 0.00000   1.00000 | 0.00000\n"
            "[Conv] layer000_scale        0.99991 | 81.68221  0.99990 | 81.68221\n"
            "[LeakyRelu] layer000_leaky   0.99944 | 123.17   0.99963 | 102.09\n"
            "[Conv] layer002_scale        0.99976 | 116.14   0.99980 | 104.79\n"
            "[Split] layer015_conv_oc_raw\n"
            "[Conv] layer015_conv_wh      0.97075 | 490.1    0.97130 | 489.3\n")
    (tmp_path / "error_analysis.txt").write_text(text)
    rows = parse_analysis(tmp_path / "error_analysis.txt")
    assert [r["tensor"] for r in rows] == ["data", "layer000_scale", "layer000_leaky", "layer002_scale",
                                           "layer015_conv_wh"]
    # entire-cosine lost per block: 0 loses 1 - 0.99944, 2 loses 0.99944 - 0.99976 (none), 15 loses
    # 0.99976 - 0.97075 (its previous row is layer002_scale: the unparsed row is skipped).
    members = {0: [0, 1], 2: [2, 3], 15: [15, 16]}
    assert rank_blocks(rows, members) == [(15, 0.02901), (0, 0.00056), (2, -0.00032)]


def test_blocks_take_their_pools_and_routes(tmp_path: Path) -> None:
    """Hybrid fp16 blocks cover a conv and the non-conv layers after it (see block_members)."""
    sidecar = load_model_files(convert(CFG, None, tmp_path, split_heads=True).prototxt).sidecar
    members = block_members(sidecar)
    assert list(members) == [0, 2, 4, 6, 8, 10, 12, 13, 14, 15, 18, 21, 22]
    assert members[0] == [0, 1] and members[15] == [15, 16, 17] and members[18] == [18, 19, 20]


def test_rknn_fp16_and_int8_with_the_contract(tiny_split: Path, tmp_path: Path) -> None:
    """Real RKNN-Toolkit2 builds of real yolov3-tiny (split heads), calibrated on 3 sample images and
    scored on 2 of them: fp16 heads match pycaffe; int8 with the contract keeps Darknet's boxes; the
    same frames with std 1 (the classic mistake: bytes fed as if they were 0..1) do not."""
    assert rknn_python().is_file()
    files = load_model_files(tiny_split)
    scored = [IMAGES[0], IMAGES[3]]                    # dog, horses
    calib = [IMAGES[0], IMAGES[2], IMAGES[3]]
    refs = references(files, scored, "uint8")
    fp16, _, _ = measure(files, Build("fp16", quantize=False, calibration="none"), scored, tmp_path / "f", refs=refs)
    assert fp16.head_rel < 2e-2 and fp16.kept == fp16.total and fp16.extra == 0 and fp16.worst_iou > 0.98
    good, _, _ = measure(files, Build("int8"), scored, tmp_path / "g", refs=refs, calibration=calib)
    bad, _, _ = measure(files, Build("std1", std_override=1.0), scored, tmp_path / "b", refs=refs, calibration=calib)
    assert good.total >= 9 and good.kept >= good.total - 1 and good.worst_iou > 0.7
    assert bad.kept <= good.kept // 2


def test_quantize_cli_from_a_data_file(tiny_split: Path, tmp_path: Path, capsys) -> None:
    """`d2c quantize` end to end on 3 calibration images (a .data train list) and its valid list, one
    fallback step at most: the report, the exported .rknn and the sensitivity plot are written."""
    from d2c.cli import main
    data = _dataset(tmp_path / "ds", ["dog", "giraffe", "horses"])
    out = tmp_path / "q"
    rc = main(["quantize", str(tiny_split), "--data", str(data), "--max-fp16", "1", "-o", str(out)])
    report = json.loads((out / "quantize.json").read_text())
    assert rc == (0 if report["ok"] else 1)
    assert {"ok", "target", "precision", "kept", "total", "extra", "worst_iou", "worst_score_diff", "fp16_layers",
            "preprocess", "sensitivity", "steps"} <= set(report)
    assert 1 <= len(report["steps"]) <= 2 and report["steps"][0]["fp16_blocks"] == []
    assert sorted(s["block"] for s in report["sensitivity"]) == [0, 2, 4, 6, 8, 10, 12, 13, 14, 15, 18, 21, 22]
    assert report["total"] >= 13 and report["kept"] >= report["total"] - 2
    assert (out / "yolov3-tiny.rknn").stat().st_size > 1_000_000 and (out / "sensitivity.png").stat().st_size > 1000
    assert "sensitivity" in capsys.readouterr().out
