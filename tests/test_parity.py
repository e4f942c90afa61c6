"""`d2c parity` against the real Darknet: it passes on correct conversions and fails on wrong ones."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from d2c import parity
from d2c.cli import main
from d2c.parity import TOLERANCES, run_parity

ROOT = Path(__file__).resolve().parents[1]
CFG = Path("/usr/share/darknet/cfg")
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"
SMALL = (96, 96)
MOVING = {"burn_in": "0", "learning_rate": "0.001"}   # weights really move in one step


def test_yolov3_tiny_real_weights(tmp_path: Path, capsys) -> None:
    """Real weights, b=2, several steps with parity's burn_in=0: every check has a bound beside it."""
    code = main(["parity", str(CFG / "yolov3-tiny.cfg"), str(TINY_WEIGHTS), "--batch", "2", "--steps", "3",
                 "--size", "160", "160", "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png")])
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "p.json").read_text())
    assert code == 0, out
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["ok"] and report["tolerances"] == TOLERANCES and report["net_defaults"] == {"burn_in": "0"}
    checks = {c["name"]: c for c in report["checks"]}
    assert {"forward", "loss", "layer 16 delta", "layer 16 delta formula", "layer 23 propagated", "update",
            "momentum", "BN statistics", "learned change (ulps)"} <= set(checks)
    for check in checks.values():
        assert check["ok"] and check["bound"] > 0, check
    assert checks["layer 16 delta formula"]["value"] <= 1.0          # d2c's loss on Darknet's input: exact
    assert report["loss"]["rel"] <= report["loss"]["bound"] <= TOLERANCES["loss_rel"]
    assert report["update"]["largest_change"] > 1e-3 and report["update"]["seen_darknet"] == 6
    assert len(report["forward"]["layers"]) == 24
    assert "burn_in=0 (parity's default" in out and "<=" in out and "OK" in out


def test_burn_in_restored_makes_the_update_check_vacuous_and_fail(capsys) -> None:
    """--set burn_in=1000 (the cfg's): the rate is ~1e-12, the weights move by less than an ulp, and
    parity says so instead of passing an update check that compared nothing."""
    code = main(["parity", str(CFG / "yolov3-tiny.cfg"), str(TINY_WEIGHTS), "--batch", "1", "--steps", "2",
                 "--size", "96", "96", "--set", "burn_in=1000"])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "vacuous update" in out and "burn_in=0" not in out


def test_yolov3_tiny_update_with_moving_weights() -> None:
    report = run_parity(CFG / "yolov3-tiny.cfg", TINY_WEIGHTS, batch=2, subdivisions=2, steps=1, size=SMALL,
                        net_overrides=MOVING)
    assert report.ok, parity.format_report(report)
    moved = max(row["moved"] for row in report.update["arrays"] if row["array"] == "weights")
    assert moved > 1e-3, "the comparison must see real updates"
    assert report.update["largest_change"] >= moved


def test_region_head_with_darknet_compat() -> None:
    report = run_parity(CFG / "yolov2-tiny-voc.cfg", None, batch=2, steps=2, size=SMALL, net_overrides=MOVING)
    assert report.ok, parity.format_report(report)
    assert any("region" in note for note in report.emulated_defects)
    checks = report.grad["checks"]
    assert checks["layer 15 delta"]["magnitude"] > 0.1          # the loss delta itself is compared
    assert checks["layer 15 propagated"]["magnitude"] == 0.0     # Debian's CPU region passes nothing


def test_darknet53_one_by_one_overwrite_is_emulated() -> None:
    report = run_parity(CFG / "yolov3.cfg", None, batch=2, steps=0, size=SMALL)
    assert len([n for n in report.emulated_defects if "overwrites the delta" in n]) == 23
    assert report.loss["rel"] <= TOLERANCES["loss_rel"]


# Mutation tests: deliberately wrong conversions must make parity fail.

def test_mutation_flipped_gradient_sign(monkeypatch) -> None:
    from d2c.loss import caffe_layers
    monkeypatch.setattr(caffe_layers.YoloLoss, "gradient",
                        lambda self, result, batch: (result.delta / batch).astype(np.float32))
    report = run_parity(CFG / "yolov3-tiny.cfg", TINY_WEIGHTS, batch=2, steps=0, size=SMALL)
    assert not report.ok and report.grad["max_rel"] > 1.0


def test_mutation_wrong_anchor(monkeypatch) -> None:
    from d2c.layers.yolo import Yolo
    original = Yolo.build

    def build(self, sec, graph):
        node = original(self, sec, graph)
        node.attrs["anchors"] = [a * 1.5 for a in node.attrs["anchors"]]
        return node

    monkeypatch.setattr(Yolo, "build", build)
    report = run_parity(CFG / "yolov3-tiny.cfg", TINY_WEIGHTS, batch=2, steps=0, size=SMALL)
    assert not report.ok and report.loss["rel"] > TOLERANCES["loss_rel"]


def test_mutation_bn_eps_off(monkeypatch) -> None:
    from d2c.layers import convolutional
    monkeypatch.setattr(convolutional, "caffe_bn_blobs",
                        lambda mean, var, flavor: ([mean.astype(np.float32), var.astype(np.float32),
                                                    np.ones(1, np.float32)], 1e-5))
    report = run_parity(CFG / "yolov3-tiny.cfg", TINY_WEIGHTS, batch=2, steps=0, size=SMALL)
    assert not report.ok and report.forward["max_rel"] > TOLERANCES["forward_max_rel"]


def test_mutation_transposed_weight(monkeypatch) -> None:
    from d2c.layers.convolutional import Convolutional
    original = Convolutional.emit

    def emit(self, node, em, arrays):
        if node.index == 2:
            arrays = dict(arrays, weights=np.ascontiguousarray(np.swapaxes(arrays["weights"], 2, 3)))
        return original(self, node, em, arrays)

    monkeypatch.setattr(Convolutional, "emit", emit)
    report = run_parity(CFG / "yolov3-tiny.cfg", TINY_WEIGHTS, batch=2, steps=0, size=SMALL)
    assert not report.ok and report.forward["layers"][2]["max_rel"] > 1e-3


def test_bad_truth_file_is_a_clear_error(tmp_path: Path, capsys) -> None:
    (tmp_path / "t.json").write_text('[[[0.5, 0.5, 0.2, 0.2, 99]]]')
    code = main(["parity", str(CFG / "yolov3-tiny.cfg"), "--truth", str(tmp_path / "t.json"), "--steps", "0",
                 "--size", "96", "96"])
    assert code == 2
    assert "t.json: entry 0 box 0" in capsys.readouterr().err
