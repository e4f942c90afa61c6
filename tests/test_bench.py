"""`d2c bench`: a quick smoke run against the real engines, plus its small pure helpers.

Speed targets are not asserted here (timings on shared machines are not test material); the
smoke run checks that every engine ran, that the JSON has the keys other tools read, and that
the numbers are in physically possible ranges.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2c.bench import TINY_CFG, TINY_WEIGHTS, random_truth, write_cfg_copy
from d2c.convert import load_graph

ROOT = Path(__file__).resolve().parents[1]
REQUIRED_KEYS = ("convert_ratio", "peak_rss_ratio", "forward_ms", "loss_layer_share", "train_iter_ratio",
                 "parity_s", "machine")
ENGINES = ("darknet", "caffe", "caffe_folded", "opencv_darknet", "opencv_caffe")


def _d2c(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "d2c.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = _d2c("bench", "--quick", "--repeat", "1", "--train-batch", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "targets:" in proc.stdout and "forward, batch 1" in proc.stdout
    return json.loads(out.read_text())


def test_quick_report_has_the_keys_other_tools_read(quick_report: dict) -> None:
    for key in REQUIRED_KEYS:
        assert key in quick_report, key
    assert set(ENGINES) <= set(quick_report["forward_ms"])
    machine = quick_report["machine"]
    for key in ("cpu", "cores", "threads", "date", "numpy", "opencv", "caffe", "load_average_start"):
        assert key in machine, key
    assert machine["threads"]["darknet"] == 1
    assert quick_report["parity_s"] is None and quick_report["parity"]["reason"]


def test_quick_report_matches_the_documented_schema(quick_report: dict) -> None:
    from d2c.schemas import BENCH_REPORT, validate
    assert validate(quick_report, BENCH_REPORT) == []


def test_quick_report_numbers_are_physical(quick_report: dict) -> None:
    for engine in ENGINES:
        ms = quick_report["forward_ms"][engine]
        assert math.isfinite(ms) and 0.5 < ms < 120_000, (engine, ms)
    model = quick_report["models"]["yolov3-tiny"]
    assert model["weights_bytes"] == TINY_WEIGHTS.stat().st_size
    # Converting reads every byte and writes about as many: it cannot beat a bare copy by 10x,
    # and peak RSS is at least the interpreter plus something.
    assert 0.1 < quick_report["convert_ratio"] < 100
    conv = model["convert"]
    assert conv["peak_rss_mb"] > conv["start_rss_mb"] > 5
    assert quick_report["peak_rss_ratio"] == pytest.approx(conv["peak_rss_mb"] * 2**20 / model["weights_bytes"],
                                                           rel=1e-3)  # peak_rss_mb is rounded to 0.1 MB
    assert 0 < quick_report["loss_layer_share"] < 1
    assert quick_report["train_iter_ratio"] > 0
    train = model["train"]
    assert train["batch"] == 1 and train["loss_layer_ms"] > 0
    # Same weights, same images, same truth: the two losses are the same Darknet cost.
    assert np.isfinite(train["caffe_loss"]) and np.isfinite(train["darknet_loss"])
    assert {t["target"] for t in quick_report["targets"]} >= {"convert time / read+write baseline"}
    loader = quick_report["loader"]    # --quick: loader images/s rows, no training share
    assert loader["darknet_per_core_ips"] > 0 and loader["d2c_per_core_ips"] > 0 and loader["d2c_workers_ips"] > 0


def test_bench_rejects_missing_files(tmp_path: Path) -> None:
    proc = _d2c("bench", str(tmp_path / "nope.cfg"), timeout=60)
    assert proc.returncode == 2
    assert "nope.cfg" in proc.stderr and "Traceback" not in proc.stderr
    proc = _d2c("bench", str(TINY_CFG), str(tmp_path / "nope.weights"), timeout=60)
    assert proc.returncode == 2 and "nope.weights" in proc.stderr


@pytest.mark.parametrize("width,height,batch,subdivisions", [(416, 416, None, None), (320, 256, 16, 1),
                                                              (None, None, 4, 2)])
def test_write_cfg_copy_changes_only_net_keys(tmp_path: Path, width, height, batch, subdivisions) -> None:
    src = tmp_path / "src.cfg"
    src.write_text("[net]\n# width=1\nwidth = 608\nheight=608\nchannels=3\n\n"
                   "[convolutional]\nfilters=16\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
                   "width=7\n\n[maxpool]\nsize=2\nstride=2\n")
    out = write_cfg_copy(src, tmp_path / "out" / "copy.cfg", width=width, height=height, batch=batch,
                         subdivisions=subdivisions)
    text = out.read_text()
    net_part, layers_part = text.split("[convolutional]")
    expected = {"width": width or 608, "height": height or 608, "batch": batch, "subdivisions": subdivisions}
    for key, value in expected.items():
        lines = [ln for ln in net_part.splitlines() if ln.replace(" ", "").startswith(f"{key}=")]
        if value is None:
            assert not lines
        else:
            assert len(lines) == 1 and lines[0].replace(" ", "") == f"{key}={value}"
    assert "# width=1" in net_part
    assert layers_part == src.read_text().split("[convolutional]")[1]  # layers untouched


def test_random_truth_is_darknet_layout() -> None:
    graph = load_graph(TINY_CFG)
    truth = random_truth(np.random.default_rng(3), graph, 4)
    assert truth.shape == (4, 90 * 5) and truth.dtype == np.float32
    boxes = truth.reshape(4, 90, 5)
    live = boxes[:, :, 0] > 0
    assert live[:, :6].all() and not live[:, 6:].any()  # Darknet stops at the first x == 0
    assert ((boxes[live][:, :4] > 0) & (boxes[live][:, :4] < 1)).all()
    classes = boxes[live][:, 4]
    assert (classes == np.round(classes)).all() and classes.min() >= 0 and classes.max() < 80
