"""The converted models inside the real deploy toolchains (OpenVINO MO + CPU, MNN, RKNN's simulator).

Why: tests/test_targets.py proves the rewrites in pycaffe; this shows each toolchain accepts what
`convert --target` writes and computes the same heads and detections, and that the unrewritten form
is refused or differs (the negative controls). A missing toolchain venv is a failure, never a skip:
`make test` builds them (`make targets`). Heavy cases are few: the Model Optimizer alone takes minutes
on yolov4, so the deep nets run at 64 px.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2c.convert import convert
from d2c.errors import D2CError, EngineError
from d2c.forward_check import with_input_size
from d2c.targets import get_target
from d2c.targets.base import toolchain_python
from d2c.targets.verify import F32_TOL, FP16_TOL, run_toolchain, verify
from shared_cfgs import shared_cfg_dir

ROOT = Path(__file__).resolve().parents[1]
SHARED = shared_cfg_dir()
TINY_CFG = Path("/usr/share/darknet/cfg/yolov3-tiny.cfg")
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"
SAMPLES = sorted(Path("/usr/share/darknet/data").glob("*.jpg"))
TARGETS = ["openvino", "mnn", "rknn"]
# Measured on this machine (yolov3-tiny real, 7 images): 24 Darknet detections at 0.25, all kept.
TINY_DETECTIONS = 24


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("targets")


def test_every_toolchain_is_installed():
    """`make test` runs `make targets` first; a missing venv must fail here, not skip below."""
    for name in TARGETS:
        assert toolchain_python(get_target(name)).exists()


@pytest.mark.parametrize("target", TARGETS)
def test_real_yolov3_tiny_detections_match_darknet(work, target):
    out = work / f"tiny-{target}"
    convert(TINY_CFG, TINY_WEIGHTS, out, target=target)
    report = verify(out, SAMPLES, weights=TINY_WEIGHTS)
    assert report["reference"] == "darknet" and report["target"] == target
    assert len(report["detections"]) == len(SAMPLES) == 7
    assert sum(r["count_ref"] for r in report["detections"]) == TINY_DETECTIONS
    assert sum(r["kept"] for r in report["detections"]) == TINY_DETECTIONS
    assert sum(r["extra"] for r in report["detections"]) == 0
    tol = FP16_TOL if target == "rknn" else F32_TOL
    assert max(r["max_rel"] for r in report["heads"]) <= tol.head_max_rel
    assert max(r["max_box_diff"] for r in report["detections"]) <= tol.box_max_diff
    assert max(r["max_score_diff"] for r in report["detections"]) <= tol.score_max_diff
    assert report["ok"], report


# yolov4 carries mish (72 sites) and SPP; yolov7-tiny logistic heads written in place; yolov4-tiny groups.
MODELS = [("yolov4-tiny", 64), ("yolov7-tiny", 64), ("yolov4", 64)]
# OpenVINO's Model Optimizer parses the caffemodel with the pure-Python protobuf its pin (protobuf<4) gets on
# Python 3.11: over 10 minutes of CPU for yolov4's 64M weights. The tests give it yolov4's whole topology
# (every mish, SPP, route and shortcut) with every non-head conv 8x thinner; the full width is in the matrix.
# yolov4-tiny and yolov7-tiny were never refused by MO and cost it 40-150 s each; they are in the measured
# matrix (tools/targets_matrix.py), and the in-place output control below covers yolov7-tiny's heads.
THIN = {("openvino", "yolov4"): 8}
CASES = [(t, m, s) for m, s in MODELS for t in TARGETS if t != "openvino" or m == "yolov4"]


def thin_cfg(cfg: Path, factor: int, directory: Path) -> Path:
    """A copy of `cfg` whose convolutions, except those feeding a [yolo] head, have filters // factor."""
    sections = re.split(r"(?m)^(?=\[)", cfg.read_text())
    for i, text in enumerate(sections):
        head_next = i + 1 < len(sections) and sections[i + 1].startswith("[yolo]")
        if text.startswith("[convolutional]") and not head_next:
            sections[i] = re.sub(r"(?m)^filters\s*=\s*(\d+)", lambda m: f"filters={max(1, int(m[1]) // factor)}", text)
    path = directory / f"{cfg.stem}-thin{factor}.cfg"
    path.write_text("".join(sections))
    return path


@pytest.mark.parametrize("target,model,size", CASES)
def test_alexeyab_models_heads_match_pycaffe(work, target, model, size):
    cfg = with_input_size(SHARED / f"{model}.cfg", size, size, work)
    if (target, model) in THIN:
        cfg = thin_cfg(cfg, THIN[target, model], work)
    out = work / f"{model}-{target}"
    convert(cfg, None, out, target=target, seed=5)
    report = verify(out, seed=1)
    tol = FP16_TOL if target == "rknn" else F32_TOL
    worst = max(r["max_rel"] for r in report["heads"])
    assert worst <= tol.head_max_rel, report["heads"]
    assert report["ok"] and len(report["heads"]) == (2 if model == "yolov4-tiny" else 3)
    (work / f"{model}-{target}.json").write_text(json.dumps(report))


def _tiny(work: Path, name: str, act: str, head_act: str) -> Path:
    cfg = work / f"{name}.cfg"
    cfg.write_text("[net]\nwidth=32\nheight=32\nchannels=3\n"
                   f"[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation={act}\n"
                   f"[convolutional]\nfilters=18\nsize=1\nactivation={head_act}\n"
                   "[yolo]\nmask=0,1,2\nanchors=4,5,8,9,12,13\nclasses=1\nnum=3\n")
    return cfg


def _run_plain(target: str, out: Path) -> tuple[dict, dict]:
    """The toolchain on a plain (caffe-target) model, bypassing verify's lint: the negative control."""
    from d2c.detect import Engine, load_model_files
    files = load_model_files(out)
    blobs = [h["blob"] for h in files.sidecar["heads"]]
    x = np.random.default_rng(0).uniform(0, 1, (3, 32, 32)).astype(np.float32)
    ref = Engine(files).forward(x)
    got, _ = run_toolchain(get_target(target), files.prototxt, files.caffemodel, x[None], {b: [b] for b in blobs},
                           {b: list(ref[b].shape[1:]) for b in blobs})
    return ref, got


def test_openvino_refuses_bnll_and_takes_the_sigmoid_mish(work):
    cfg = _tiny(work, "mish", "mish", "linear")
    convert(cfg, None, work / "mish-plain")
    with pytest.raises(EngineError, match="Model Optimizer refused the model.*BNLL|layer000_softplus"):
        _run_plain("openvino", work / "mish-plain")
    with pytest.raises(D2CError, match="not converted for openvino.*convert with --target openvino"):
        verify(work / "mish-plain", target="openvino")
    convert(cfg, None, work / "mish-ov", target="openvino")
    report = verify(work / "mish-ov")
    assert report["ok"] and max(r["max_rel"] for r in report["heads"]) <= F32_TOL.head_max_rel


@pytest.mark.parametrize("target", ["openvino", "mnn"])
def test_inplace_output_is_renamed_for_toolchains_that_name_outputs_by_layer(work, target):
    cfg = _tiny(work, f"logistic-{target}", "leaky", "logistic")
    convert(cfg, None, work / f"logistic-plain-{target}")
    with pytest.raises(EngineError, match=r"none of the output names \['layer001_conv'\].*layer001_logistic"):
        _run_plain(target, work / f"logistic-plain-{target}")
    convert(cfg, None, work / f"logistic-{target}", target=target)
    report = verify(work / f"logistic-{target}")
    assert [r["name"] for r in report["heads"]] == ["layer001_logistic"] and report["ok"]


def test_verify_cli_json_and_missing_toolchain(work, tmp_path):
    out = work / "tiny-mnn"
    if not out.exists():
        convert(TINY_CFG, TINY_WEIGHTS, out, target="mnn")
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    cmd = [sys.executable, "-m", "d2c.cli", "verify", str(out), str(SAMPLES[0]), "--json", str(tmp_path / "r.json")]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert {"ok", "target", "toolchain_version", "heads", "detections", "precision"} <= set(report)
    assert report["toolchain_version"] == "3.6.1" and report["detections"][0]["count_ref"] > 0
    missing = subprocess.run(cmd[:-2], capture_output=True, text=True, env={**env, "D2C_CACHE": str(tmp_path)})
    assert missing.returncode == 3 and "make targets" in missing.stderr and "Traceback" not in missing.stderr
    tpu = subprocess.run(cmd[:-2] + ["--target", "tpu-mlir"], capture_output=True, text=True, env=env)
    assert tpu.returncode in (2, 3) and "Traceback" not in tpu.stderr
