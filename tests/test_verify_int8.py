"""`d2c verify --uint8 / --int8` in the real toolchains (never skipped: a missing toolchain fails).

What is checked on real yolov3-tiny (split heads) and two sample images: uint8 frames scaled by each
toolchain's own config (OpenCV, OpenVINO's Model Optimizer, RKNN's mean/std) keep every Darknet
detection with heads close to pycaffe on the same bytes; the same frames through OpenVINO without the
contract's scaling lose them (negative control); `verify --int8` (RKNN, leave-one-out) writes the
issue's JSON keys with the contract as written into the toolchain's config.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d2c.calibration import toolchain_tensor
from d2c.cli import main
from d2c.detect import load_model_files
from d2c.int8_heads import output_blobs
from d2c.int8_rknn import Agreement, detect_outputs, references, rows
from d2c.targets import get_target
from d2c.targets.verify import run_toolchain
from d2c.verify_int8 import UINT8_HEAD_REL, verify_uint8

from int8_models import tiny_split  # noqa: F401 (a fixture)

DATA = Path("/usr/share/darknet/data")
IMAGES = [DATA / "dog.jpg", DATA / "horses.jpg"]


@pytest.mark.parametrize("target", ["opencv", "openvino", "rknn"])
def test_uint8_frames_scaled_by_the_toolchain(tiny_split: Path, target: str) -> None:
    report = verify_uint8(tiny_split, IMAGES, target)
    assert report["ok"], report
    assert report["kept"] == report["total"] >= 13 and report["extra"] == 0
    assert report["head_rel"] <= UINT8_HEAD_REL[target]
    assert report["preprocess"]["std_values"] == [255.0] * 3 and report["preprocess"]["letterbox"]


def test_negative_control_openvino_without_the_contract(tiny_split: Path) -> None:
    """The same uint8 frames through Model Optimizer without --scale_values: Darknet's boxes are lost."""
    files = load_model_files(tiny_split)
    refs = references(files, IMAGES, "uint8")
    frames = np.stack([toolchain_tensor(r.image, files.sidecar, "uint8")[0] for r in refs]).astype(np.float32)
    blobs = output_blobs(files.sidecar)
    got, _ = run_toolchain(get_target("openvino"), files.prototxt, files.caffemodel, frames, {b: [b] for b in blobs},
                           {b: list(refs[0].heads[b].shape[1:]) for b in blobs})
    agreement = Agreement()
    for k, ref in enumerate(refs):
        out = {b: got[b][k:k + 1] for b in blobs}
        agreement.add(ref.image.name, ref.rows, rows(detect_outputs(out, files.sidecar, *ref.size)), 0.0)
    assert agreement.kept <= agreement.total // 2


def test_verify_int8_cli_json(tiny_split: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.json"
    rc = main(["verify", str(tiny_split), *map(str, IMAGES), "--target", "rknn", "--int8", "--json", str(out)])
    report = json.loads(out.read_text())
    assert {"ok", "target", "precision", "kept", "total", "extra", "worst_iou", "worst_score_diff", "map50_fp32",
            "map50_int8", "fp16_layers", "preprocess"} <= set(report)
    assert rc == (0 if report["ok"] else 1) and report["target"] == "rknn" and report["precision"] == "int8"
    assert report["preprocess"]["mean_values"] == [0.0] * 3 and report["preprocess"]["std_values"] == [255.0] * 3
    assert report["preprocess"]["channel_order"] == "RGB" and report["preprocess"]["letterbox"] is True
    assert report["total"] >= 13 and report["kept"] >= report["total"] - 2 and report["worst_iou"] > 0.5
    assert "kept" in capsys.readouterr().out
