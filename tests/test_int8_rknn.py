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
                           rknn_python, rows)
from d2c.preprocess import to_uint8_frame

from int8_models import CFG, tiny_split  # noqa: F401 (tiny_split is a fixture)

IMAGES = sorted(Path("/usr/share/darknet/data").glob("*.jpg"))


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
    parsed = parse_analysis(tmp_path / "error_analysis.txt")
    assert [r["tensor"] for r in parsed] == ["data", "layer000_scale", "layer000_leaky", "layer002_scale",
                                           "layer015_conv_wh"]
    # entire-cosine lost per block: 0 loses 1 - 0.99944, 2 loses 0.99944 - 0.99976 (none), 15 loses
    # 0.99976 - 0.97075 (its previous row is layer002_scale: the unparsed row is skipped).
    members = {0: [0, 1], 2: [2, 3], 15: [15, 16]}
    assert rank_blocks(parsed, members) == [(15, 0.02901), (0, 0.00056), (2, -0.00032)]


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
    rc = main(["quantize", str(tiny_split), "--data", str(data), "--max-fp16", "1", "--order", "depth",
               "-o", str(out)])
    report = json.loads((out / "quantize.json").read_text())
    assert rc == (0 if report["ok"] else 1)
    assert {"ok", "target", "precision", "kept", "total", "extra", "worst_iou", "worst_score_diff", "fp16_layers",
            "preprocess", "sensitivity", "steps"} <= set(report)
    assert 1 <= len(report["steps"]) <= 2 and report["steps"][0]["fp16_blocks"] == []
    assert sorted(s["block"] for s in report["sensitivity"]) == [0, 2, 4, 6, 8, 10, 12, 13, 14, 15, 18, 21, 22]
    assert report["total"] >= 13 and report["kept"] >= report["total"] - 2
    assert (out / "yolov3-tiny.rknn").stat().st_size > 1_000_000 and (out / "sensitivity.png").stat().st_size > 1000
    assert "sensitivity" in capsys.readouterr().out


TOY_CFG = """[net]
width=64
height=64
channels=3

[convolutional]
batch_normalize=1
filters=8
size=3
stride=1
pad=1
activation=leaky

[maxpool]
size=2
stride=2

[convolutional]
size=1
stride=1
pad=1
filters=18
activation=linear

[yolo]
mask=0,1,2
anchors=10,14,23,27,37,58
classes=1
num=3
"""


def test_damage_ranks_lost_boxes_before_shifts() -> None:
    """The ablation score: 0 for a perfect build, one per lost or extra box, plus the worst IoU loss
    or score diff in units of the target's 0.05 margins (no builds)."""
    from d2c.int8_ablation import ablation_order, damage
    perfect = {"kept": 5, "total": 5, "extra": 0, "worst_iou": 1.0, "worst_score_diff": 0.0}
    assert damage(perfect) == 0.0
    assert_allclose(damage({**perfect, "worst_iou": 0.95}), 1.0, rtol=1e-12)
    assert_allclose(damage({**perfect, "worst_iou": 0.97, "worst_score_diff": 0.04}), 0.8, rtol=1e-12)
    assert_allclose(damage({**perfect, "kept": 4, "extra": 1, "worst_iou": 0.99}), 2.2, rtol=1e-12)
    scores = [{"block": 0, "damage": 0.4, "head_rel": 0.1}, {"block": 2, "damage": 1.5, "head_rel": 0.1},
              {"block": 4, "damage": 0.4, "head_rel": 0.3}]
    assert ablation_order(scores) == [2, 4, 0]


def test_quantize_ablation_order_on_a_toy_model(tmp_path: Path, monkeypatch) -> None:
    """`d2c quantize --order ablation` on a two-block toy model (64x64, random weights): one RKNN
    build per block with it alone int8, scored on detections, the fallback moving the most damaging
    block first; the scores are cached, so the second ablation does no build (RKNN blocked), and a
    different threshold (negative control) misses the cache."""
    import d2c.int8_ablation as abl
    import d2c.int8_rknn as rk
    from d2c.quantize import quantize
    monkeypatch.setattr(abl, "cache_dir", lambda: tmp_path / "cache" / "calibration")
    (tmp_path / "toy.cfg").write_text(TOY_CFG)
    convert(tmp_path / "toy.cfg", None, tmp_path / "m", split_heads=True, seed=3)
    files = load_model_files(tmp_path / "m")
    calib, evaluate = IMAGES[:3], IMAGES[:2]
    (tmp_path / "calib.txt").write_text("".join(f"{p}\n" for p in calib))
    report = quantize(tmp_path / "m", tmp_path / "calib.txt", tmp_path / "q", eval_images=evaluate, max_fp16=1,
                      order="ablation")
    scores = report["ablation"]
    assert [s["block"] for s in scores] == [0, 2] and sorted(report["sequence"]) == [0, 2]
    assert report["sequence"] == abl.ablation_order(scores)
    for s in scores:
        assert s["total"] > 0 and 0 <= s["kept"] <= s["total"]
        assert_allclose(s["damage"], abl.damage(s), atol=1e-6)
    assert report["steps"][0]["fp16_blocks"] == []
    if len(report["steps"]) > 1:
        assert report["steps"][1]["fp16_blocks"] == report["sequence"][:1]
    cache = abl.ablation_cache(files, calib, evaluate, 0.25)
    assert cache.is_file()

    def blocked(*_a, **_k):
        raise AssertionError("an ablation build ran although its scores are cached")
    monkeypatch.setattr(rk, "run_rknn", blocked)
    refs = references(files, evaluate, "uint8")
    again = abl.ablate(files, calib, evaluate, refs, tmp_path / "w2")
    assert [(s["block"], s["damage"]) for s in again] == [(s["block"], s["damage"]) for s in scores]
    assert abl.ablation_cache(files, calib, evaluate, 0.3) != cache
    with pytest.raises(AssertionError, match="cached"):
        abl.ablate(files, calib, evaluate, refs, tmp_path / "w3", thresh=0.3)


def test_map50_pair_scores_toolchain_outputs_against_labels(tiny_split: Path, tmp_path: Path) -> None:
    """quantize's mAP@0.5 pair (no builds): labels made from Darknet's fp32 boxes give fp32 mAP 1;
    pycaffe's heads on the uint8 frames standing in for the toolchain's outputs score the same to
    0.02; the same heads with the w/h logits shifted by 0.5 (boxes 65% too big; negative control)
    lose it; an image without a label file gives no mAP."""
    from d2c.detect import Engine
    from d2c.quantize import map50_pair
    files = load_model_files(tiny_split)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    images = []
    engine = Engine(files, "caffe")
    for name in ("dog", "horses"):
        image = tmp_path / "images" / f"{name}.jpg"
        shutil.copy(f"/usr/share/darknet/data/{name}.jpg", image)
        dets, _ = engine.detect(image)
        (tmp_path / "labels" / f"{name}.txt").write_text("".join(
            f"{c} {b[0]:.6f} {b[1]:.6f} {b[2]:.6f} {b[3]:.6f}\n" for c, _, b in rows(dets)))
        images.append(image)
    heads = {r.image: r.heads for r in references(files, images, "uint8")}
    fp32, same = map50_pair(files, heads, images)
    assert_allclose(fp32, 1.0, atol=1e-9)
    assert_allclose(same, fp32, atol=0.02)
    wh = [blob for blob in next(iter(heads.values())) if blob.endswith("_wh")]
    assert wh, "split heads have w/h outputs"
    shifted = {image: {b: v + np.float32(0.5) if b in wh else v for b, v in out.items()} for image, out in heads.items()}
    _, bad = map50_pair(files, shifted, images)
    assert bad < fp32 - 0.3
    (tmp_path / "labels" / "dog.txt").unlink()
    assert map50_pair(files, heads, images) == (None, None)
