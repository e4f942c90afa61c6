"""`d2c train` end to end on a tiny generated shapes dataset, and mAP.

What must hold: the loss falls with a sane rate schedule; logs, plot and snapshots are written;
a resume (after a clean stop, Ctrl-C, kill -9 of the process, or a disk-full snapshot) gives
bit-identical losses to an uninterrupted run; NaN stops with a usable snapshot; bad data is
reported with file:line; and the same schedule in the real Darknet gives the same losses, the
same weights and, after export, the same detections.
"""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from d2c.cli import main as cli_main
from d2c.convert import convert, load_graph
from d2c.darknet.runtime import DarknetProcess
from d2c.darknet.weights import WeightsHeader, random_weights, read_weights, write_weights
from d2c.detect import Engine, detections_to_json, load_model_files
from d2c.errors import D2CError, DatasetError, NumericError
from d2c.metrics import (CaffeDetector, average_precision, evaluate, iou_xywh, map_on_list, map_on_samples,
                         predictions_from_detections)
from d2c.parity import caffe_arrays
from d2c.plots import _wants_log, plot_curves, plot_panels
from d2c.shapes import make_shapes_dataset
from d2c.train import (LATEST, LOG_CSV, LOG_JSON, LOSS_PNG, TrainOptions, Trainer, darknet_init,
                       override_net_keys, train)

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "cfg" / "train_tiny.cfg"
SEED = 7
MAX = 20
COMPARED = ("iteration", "seen", "loss", "avg_loss", "rate", "avg_iou", "recall50", "recall75", "obj", "no_obj",
            "class", "count")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shapes")
    return make_shapes_dataset(root, count=24, size=96, seed=3).data_file


def options(data: Path, out: Path, **kw) -> TrainOptions:
    base = dict(data=data, cfg=CFG, out=out, seed=SEED, snapshot_every=5, progress=False, verbose=False,
                max_batches=MAX)
    base.update(kw)
    return TrainOptions(**base)


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """An uninterrupted 20-iteration run with augmentation (seeded): the rows every resume must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    return train(options(dataset, out)), out


def same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert {k: a[k] for k in COMPARED} == {k: b[k] for k in COMPARED}, (a, b)


# --------------------------------------------------------------------------------------------
# Training, logs, snapshots
# --------------------------------------------------------------------------------------------

def test_loss_falls_with_a_sane_rate_and_everything_is_written(reference) -> None:
    result, out = reference
    rows = result.rows
    assert [r["iteration"] for r in rows] == list(range(1, MAX + 1))
    assert [r["seen"] for r in rows] == [8 * k for k in range(1, MAX + 1)]
    losses = np.array([r["loss"] for r in rows])
    assert np.all(np.isfinite(losses))
    # burn_in=4, power 4: 0.002*(k/4)^4 for k < 4, then 0.002 (steps=30 is beyond this run)
    np.testing.assert_allclose([r["rate"] for r in rows[:5]], [0.002 * (k / 4) ** 4 for k in range(1, 4)]
                               + [0.002, 0.002], rtol=1e-6)
    assert losses[-5:].mean() < 0.25 * losses[:2].mean(), losses
    avg = np.array([r["avg_loss"] for r in rows])
    assert avg[-1] < 0.5 * avg[0] and np.all(np.diff(avg[4:]) < 0), avg
    assert rows[-1]["avg_iou"] is not None and 0 < rows[-1]["avg_iou"] < 1
    # CSV/JSON logs, PNG plot
    csv_lines = (out / LOG_CSV).read_text().splitlines()
    assert csv_lines[0].startswith("iteration,seen,loss,avg_loss,rate") and len(csv_lines) == MAX + 1
    assert float(csv_lines[-1].split(",")[2]) == rows[-1]["loss"]
    doc = json.loads((out / LOG_JSON).read_text())
    same_rows(doc["rows"], rows)
    import cv2
    img = cv2.imread(str(out / LOSS_PNG))
    assert img is not None and img.shape == (540, 960, 3) and img.std() > 10
    # snapshots: 5, 10, 15, 20; three kept; latest points at 20; the final weights are its export
    snaps = sorted(p.name for p in (out / "snapshots").iterdir())
    assert snaps == ["iter_000010", "iter_000015", "iter_000020"]
    assert json.loads((out / LATEST).read_text())["dir"] == "snapshots/iter_000020"
    final = (out / "train_tiny_final.weights").read_bytes()
    assert final == (out / "snapshots" / "iter_000020" / "train_tiny.weights").read_bytes()
    graph = load_graph(out / "train_tiny.cfg")
    header, _ = read_weights(out / "train_tiny_final.weights", graph)
    assert header.seen == 8 * MAX


def test_snapshot_exports_with_d2c_export(reference, tmp_path) -> None:
    """The snapshot directory is self-contained: `d2c export` on its train caffemodel gives its .weights."""
    _result, out = reference
    snap = out / "snapshots" / "iter_000020"
    assert cli_main(["export", str(snap / "train_tiny_train.caffemodel"), "-o", str(tmp_path / "e.weights")]) == 0
    assert (tmp_path / "e.weights").read_bytes() == (snap / "train_tiny.weights").read_bytes()


def test_resume_is_bit_identical(dataset, reference, tmp_path) -> None:
    result, _ = reference
    first = train(options(dataset, tmp_path, max_batches=8))
    same_rows(first.rows, result.rows[:8])
    resumed = train(options(dataset, tmp_path, resume=True, seed=None))
    assert resumed.start_iteration == 8
    same_rows(resumed.rows, result.rows)
    assert (tmp_path / "train_tiny_final.weights").read_bytes() == \
        (reference[1] / "train_tiny_final.weights").read_bytes()


def test_stock_bn_trains_and_resumes_exactly(dataset, tmp_path) -> None:
    """--bn stock (Caffe BatchNorm, approximate): the snapshot/resume path holds for its blobs too."""
    straight = train(options(dataset, tmp_path / "a", bn="stock", max_batches=4, snapshot_every=2))
    assert all(math.isfinite(r["loss"]) for r in straight.rows)
    train(options(dataset, tmp_path / "b", bn="stock", max_batches=2, snapshot_every=2))
    resumed = train(options(dataset, tmp_path / "b", resume=True, seed=None, max_batches=4))
    same_rows(resumed.rows, straight.rows)
    exact = train(options(dataset, tmp_path / "c", max_batches=2))
    assert exact.rows[0]["loss"] != straight.rows[0]["loss"]     # the BN choice is really applied


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "d2c.cli", "train", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ, GLOG_minloglevel="2")
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _wait_for_snapshot(out: Path, proc: subprocess.Popen, at_least: int, timeout: float = 90) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"training ended early: {proc.returncode} {proc.stderr.read() if proc.stderr else ''}")
        try:
            iteration = json.loads((out / LATEST).read_text())["iteration"]
        except (FileNotFoundError, ValueError):
            iteration = 0
        if iteration >= at_least:
            return iteration
        time.sleep(0.05)
    raise AssertionError("no snapshot in time")


def _start_cli_training(dataset, out: Path, snapshot_every: int) -> subprocess.Popen:
    """`d2c train` in a child process, so a test can signal it mid-run."""
    return subprocess.Popen(_cli(str(dataset), str(CFG), "--out", str(out), "--seed", str(SEED),
                                 "--snapshot-every", str(snapshot_every), "--max-batches", str(MAX), "--quiet"),
                            cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_kill_9_then_resume_is_bit_identical(dataset, reference, tmp_path) -> None:
    """SIGKILL a training process at a random point after its second snapshot; --resume finishes the run."""
    result, _ = reference
    proc = _start_cli_training(dataset, tmp_path, snapshot_every=2)
    try:
        _wait_for_snapshot(tmp_path, proc, at_least=4)
        time.sleep(0.3)   # somewhere in a later iteration or snapshot
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    latest = json.loads((tmp_path / LATEST).read_text())["iteration"]
    assert 4 <= latest < MAX
    resumed = train(options(dataset, tmp_path, resume=True, seed=None))
    assert resumed.start_iteration == latest
    same_rows(resumed.rows, result.rows)
    assert not [p for p in (tmp_path / "snapshots").iterdir() if p.name.startswith(".")]


def test_sigint_snapshots_and_exits_130(dataset, reference, tmp_path) -> None:
    """Ctrl-C on the CLI: finish the iteration, snapshot, exit 130; --resume continues exactly."""
    result, _ = reference
    proc = _start_cli_training(dataset, tmp_path, snapshot_every=3)
    try:
        _wait_for_snapshot(tmp_path, proc, at_least=3)
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    stopped = json.loads((tmp_path / LATEST).read_text())["iteration"]
    assert f"interrupted at iteration {stopped}" in err
    rows = json.loads((tmp_path / LOG_JSON).read_text())["rows"]
    assert rows[-1]["iteration"] == stopped
    same_rows(rows, result.rows[:stopped])
    same_rows(train(options(dataset, tmp_path, resume=True, seed=None)).rows, result.rows)


def test_keyboard_interrupt_in_the_loop(dataset, reference, tmp_path, monkeypatch) -> None:
    """KeyboardInterrupt after an iteration snapshots it; inside one, the iteration is undone first."""
    result, _ = reference

    def stop_after_4(trainer, row) -> None:
        if row["iteration"] == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(options(dataset, tmp_path), callback=stop_after_4)
    assert json.loads((tmp_path / LATEST).read_text())["iteration"] == 4
    # Resume, then interrupt in the middle of iteration 7 (after its first mini-batch and seen += b).
    trainer = Trainer(options(dataset, tmp_path, resume=True, seed=None))
    real = trainer.sgd.train_minibatch
    calls = {"n": 0}

    def interrupted(net, x, truth):
        calls["n"] += 1
        out = real(net, x, truth)
        if calls["n"] == 2 * 2 + 1:   # iterations 5, 6 done; first mini-batch of 7
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(trainer.sgd, "train_minibatch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    assert json.loads((tmp_path / LATEST).read_text())["iteration"] == 6
    same_rows(train(options(dataset, tmp_path, resume=True, seed=None)).rows, result.rows)


def test_disk_full_during_a_snapshot_keeps_the_previous_one(dataset, reference, tmp_path, monkeypatch) -> None:
    result, _ = reference
    import d2c.darknet.weights as weights_module
    real_write = weights_module.write_weights
    calls = {"n": 0}

    def full_disk(path, header, graph, arrays):
        calls["n"] += 1
        if calls["n"] == 2:   # the second snapshot (iteration 6) runs out of space half-way
            Path(path).write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, header, graph, arrays)

    monkeypatch.setattr(weights_module, "write_weights", full_disk)
    with pytest.raises(D2CError, match=r"iteration 6 .*disk full.*previous snapshot .*iter_000003.* is intact"):
        train(options(dataset, tmp_path, snapshot_every=3))
    monkeypatch.setattr(weights_module, "write_weights", real_write)
    assert json.loads((tmp_path / LATEST).read_text())["iteration"] == 3
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["iter_000003"]
    same_rows(train(options(dataset, tmp_path, resume=True, seed=None, snapshot_every=3)).rows, result.rows)


def test_disk_full_while_logging_is_a_clear_error(dataset, tmp_path, monkeypatch) -> None:
    real = Trainer._write_logs

    def full(self) -> None:
        if len(self.rows) >= 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(self)

    monkeypatch.setattr(Trainer, "_write_logs", full)
    with pytest.raises(D2CError, match=r"cannot write the training log .*disk full; the last snapshot is "
                                       r".*iter_000002"):
        train(options(dataset, tmp_path, snapshot_every=2))


def test_nan_loss_stops_with_a_snapshot(dataset, tmp_path, monkeypatch) -> None:
    from d2c.solver import DarknetSGD
    real = DarknetSGD.train_minibatch

    def nan_at_iteration_3(self, net, x, truth):
        err, updated = real(self, net, x, truth)
        return (float("nan") if self.seen > 2 * 8 else err), updated

    monkeypatch.setattr(DarknetSGD, "train_minibatch", nan_at_iteration_3)
    with pytest.raises(NumericError, match=r"iteration 3: the loss is nan .*state after iteration 2 is saved in "
                                           r".*iter_000002"):
        train(options(dataset, tmp_path, snapshot_every=100))
    assert json.loads((tmp_path / LATEST).read_text())["iteration"] == 2
    rows = json.loads((tmp_path / LOG_JSON).read_text())["rows"]
    assert [r["iteration"] for r in rows] == [1, 2]


def test_non_finite_weights_keep_the_last_good_snapshot(dataset, tmp_path) -> None:
    """NaN weights (here planted after iteration 3) fail the next forward; no NaN snapshot is written."""
    def poison(trainer, row) -> None:
        if row["iteration"] == 3:
            trainer.net.params["layer000_conv"][0].data[0, 0, 0, 0] = np.nan

    with pytest.raises(NumericError, match=r"iteration 4: .*NaN.*non-finite after iteration 3.*last good snapshot "
                                           r"is .*iter_000002"):
        train(options(dataset, tmp_path, snapshot_every=2), callback=poison)
    assert json.loads((tmp_path / LATEST).read_text())["iteration"] == 2


def test_cli_nan_exit_code_2(dataset, tmp_path, monkeypatch, capsys) -> None:
    from d2c.solver import DarknetSGD
    real = DarknetSGD.train_minibatch

    def nan_input(self, net, x, truth):
        if self.seen >= 8:
            x = np.array(x, copy=True)
            x[0, 0, 0, 0] = np.inf
        return real(self, net, x, truth)

    monkeypatch.setattr(DarknetSGD, "train_minibatch", nan_input)
    code = cli_main(["train", str(dataset), str(CFG), "--out", str(tmp_path), "--seed", "1", "--max-batches", "5",
                     "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert "iteration 2:" in err and "NaN/inf" in err and "iter_000001" in err


# --------------------------------------------------------------------------------------------
# Options, weights, data problems
# --------------------------------------------------------------------------------------------

def test_evaluate_map_reads_the_live_net(dataset, tmp_path) -> None:
    """`train --map` scores the net's current arrays: the same as a detector built from those weights."""
    from d2c.dataset import load_split
    graph = load_graph(CFG)
    full = random_weights(graph, 5)
    write_weights(tmp_path / "w.weights", WeightsHeader(0, 2, 0, 0), graph, full)
    trainer = Trainer(options(dataset, tmp_path / "run", weights=tmp_path / "w.weights"))
    got = trainer.evaluate_map().to_json()
    samples, _ = load_split(trainer.spec, "valid", classes=trainer.classes, skip_bad=True)
    detector = CaffeDetector.from_arrays(graph, full)
    want = map_on_samples(lambda p: detector.detect(p), samples, trainer.classes).to_json()
    assert sum(c["detections"] for c in want["per_class"]) > 0      # the comparison sees boxes
    assert [c["detections"] for c in got["per_class"]] == [c["detections"] for c in want["per_class"]]
    np.testing.assert_allclose(got["map"], want["map"], rtol=0, atol=1e-12)


def test_load_upto_is_darknet_partial_loading(dataset, tmp_path) -> None:
    graph = load_graph(CFG)
    full = random_weights(graph, 5)
    write_weights(tmp_path / "w.weights", WeightsHeader(0, 2, 0, 123456), graph, full)
    trainer = Trainer(options(dataset, tmp_path / "run", weights=tmp_path / "w.weights", load_upto=4))
    assert trainer.sgd.seen == 0        # like `darknet partial`
    arrays = caffe_arrays(trainer.net, trainer.conversion)
    for index in (0, 2):               # loaded
        for name, value in full[index].items():
            np.testing.assert_array_equal(arrays[index][name], value)
    for index in (4, 6):               # Darknet init
        a = arrays[index]
        np.testing.assert_array_equal(a["biases"], 0)
        if "scales" in a:
            np.testing.assert_array_equal(a["scales"], 1)
            np.testing.assert_array_equal(a["rolling_mean"], 0)
            np.testing.assert_array_equal(a["rolling_variance"], 1)
        fan_in = int(np.prod(a["weights"].shape[1:]))
        assert abs(a["weights"].std() / math.sqrt(2 / fan_in) - 1) < 0.15
        assert not np.array_equal(a["weights"], full[index]["weights"])
    # without --load-upto the whole file is read and seen continues (unless --clear)
    whole = Trainer(options(dataset, tmp_path / "run2", weights=tmp_path / "w.weights", max_batches=20000))
    assert whole.sgd.seen == 123456 and whole.iteration == 123456 // 8
    cleared = Trainer(options(dataset, tmp_path / "run3", weights=tmp_path / "w.weights", clear=True))
    assert cleared.sgd.seen == 0


def test_darknet_init_values() -> None:
    graph = load_graph(CFG)
    arrays = darknet_init(graph, seed=0, start=6)
    assert sorted(arrays) == [6, 7]
    np.testing.assert_array_equal(arrays[6]["rolling_variance"], 1)
    np.testing.assert_array_equal(arrays[7]["biases"], 0)
    assert arrays[7]["weights"].shape == (24, 32, 1, 1)


def test_net_overrides_and_refusals(dataset, tmp_path) -> None:
    text = "[net]\nbatch = 64\nsubdivisions=16\nbatch=3\n# width=1\n[convolutional]\nbatch=9\n"
    got = override_net_keys(text, {"batch": "8", "width": "32"})
    assert got == "[net]\nbatch=8\nsubdivisions=16\n# width=1\nwidth=32\n[convolutional]\nbatch=9\n"
    trainer = Trainer(options(dataset, tmp_path, batch=2, subdivisions=3, size=(64, 64), max_batches=1))
    assert (trainer.b, trainer.S, trainer.width) == (2, 3, 64)
    assert trainer.net.blobs["data"].data.shape == (2, 3, 64, 64)
    trainer.run()
    with pytest.raises(D2CError, match="already holds a training run"):
        Trainer(options(dataset, tmp_path))
    with pytest.raises(D2CError, match="--bn stock"):
        Trainer(options(dataset, tmp_path, resume=True, bn="stock"))
    with pytest.raises(D2CError, match="--resume: .*no training run"):
        Trainer(options(dataset, tmp_path / "empty", resume=True))
    with pytest.raises(D2CError, match="nothing to train"):
        Trainer(options(dataset, tmp_path / "done", max_batches=0)).run()


def _bad_dataset(root: Path) -> Path:
    ds = make_shapes_dataset(root, count=6, size=96, seed=4)
    labels = root / "labels"
    (labels / "shape_0001.txt").write_text("0 0.5 0.5 0.2 0.2\n7 0.5 0.5 0.1 0.1\n")
    (labels / "shape_0002.txt").write_text("1 0.5 1.5 0.2 0.2\n")
    (labels / "shape_0003.txt").unlink()
    return ds.data_file


def test_bad_samples_are_reported_with_file_and_line(tmp_path) -> None:
    data = _bad_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError) as info:
        Trainer(options(data, tmp_path / "run"))
    text = info.value.render()
    assert "shape_0001.txt:2: class 7 is outside 0..2" in text
    assert "shape_0002.txt:1: y=1.5 out of range" in text
    assert "shape_0003.txt: label file not found" in text
    trainer = Trainer(options(data, tmp_path / "run2", skip_bad=True, max_batches=1))
    assert trainer.dropped == 3 and len(trainer.samples) == 2
    trainer.run()


def test_cli_reports_bad_data_and_skip_bad_count(tmp_path, capsys) -> None:
    data = _bad_dataset(tmp_path / "ds")
    assert cli_main(["train", str(data), str(CFG), "--out", str(tmp_path / "a"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "3 of 5 listed image(s) have problems" in err and "shape_0001.txt:2:" in err
    assert cli_main(["train", str(data), str(CFG), "--out", str(tmp_path / "b"), "--quiet", "--skip-bad",
                     "--max-batches", "1", "--seed", "0"]) == 0
    out = capsys.readouterr()
    assert "dropped 3 bad sample(s)" in out.err and "dropped samples   : 3 (--skip-bad)" in out.out


def test_classes_must_match_the_cfg(dataset, tmp_path) -> None:
    text = dataset.read_text().replace("classes = 3", "classes = 4")
    other = dataset.with_name("four.data")
    other.write_text(text)
    with pytest.raises(DatasetError, match=r"four.data:1 'classes'.*4 classes.*classes=3"):
        Trainer(options(other, tmp_path))


def test_multiscale_rebuilds_the_net_and_keeps_every_blob(dataset, tmp_path) -> None:
    """random=1: the first iteration resizes to (rand()%10+10)*32; blobs and momentum carry over exactly."""
    cfg = tmp_path / "train_tiny_random.cfg"
    cfg.write_text(CFG.read_text().replace("random=0", "random=1"))
    trainer = Trainer(options(dataset, tmp_path / "run", cfg=cfg, max_batches=1))
    assert trainer.random
    before = {k: [b.data.copy() for b in v] for k, v in trainer.net.params.items()}
    trainer.resize(64, 64)
    assert trainer.net.blobs["data"].data.shape == (4, 3, 64, 64)
    for name, blobs in trainer.net.params.items():
        for blob, old in zip(blobs, before[name]):
            np.testing.assert_array_equal(blob.data, old)
    trainer.resize(96, 96)
    row = trainer.run().rows[0]
    assert row["width"] == row["height"] and row["width"] % 32 == 0 and 320 <= row["width"] <= 608
    assert math.isfinite(row["loss"])
    # the same first iteration without the round trip through 64x64 gives the same loss
    again = Trainer(options(dataset, tmp_path / "run2", cfg=cfg, max_batches=1)).run().rows[0]
    assert again["loss"] == row["loss"]


# --------------------------------------------------------------------------------------------
# Against the real Darknet
# --------------------------------------------------------------------------------------------

def test_same_schedule_in_darknet_and_export_detections(dataset, tmp_path) -> None:
    """5 iterations, --no-augment, same weights and batches: Darknet's train_network losses and
    weights equal d2c train's; the exported .weights detect the same boxes in Darknet and Caffe."""
    graph = load_graph(CFG)
    write_weights(tmp_path / "start.weights", WeightsHeader(), graph, random_weights(graph, 11))
    batches: list[tuple[np.ndarray, np.ndarray]] = []

    def keep(trainer, row) -> None:
        batches.append((np.concatenate([x for x, _ in trainer.last_batches]),
                        np.concatenate([t for _, t in trainer.last_batches])))

    result = train(options(dataset, tmp_path / "run", weights=tmp_path / "start.weights", no_augment=True,
                           seed=5, max_batches=5), callback=keep)
    cfg = tmp_path / "run" / "train_tiny.cfg"
    with DarknetProcess(cfg, tmp_path / "start.weights", clear=True) as dn:
        theirs = [dn.train_step(x, t) for x, t in batches]
        dn.save_weights(tmp_path / "darknet.weights")
    ours = [r["loss"] for r in result.rows]
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    assert ours[-1] < 0.5 * ours[0]
    _, dn_arrays = read_weights(tmp_path / "darknet.weights", graph)
    _, our_arrays = read_weights(result.final_weights, graph)
    for index, arrays in dn_arrays.items():
        for name, value in arrays.items():
            np.testing.assert_allclose(our_arrays[index][name], value, atol=1e-5, rtol=1e-4,
                                       err_msg=f"layer {index} {name}")
    # detections of the exported weights: real Darknet vs d2c detect on the converted model
    image = sorted((dataset.parent / "images").glob("*.jpg"))[-1]
    with DarknetProcess(cfg, result.final_weights, batch=1) as dn:
        d_dets = dn.detect(image, thresh=0.02)
    convert(cfg, result.final_weights, tmp_path / "conv")
    dets, _ = Engine(load_model_files(tmp_path / "conv")).detect(image, thresh=0.02)
    c_dets = detections_to_json(dets, 0.02)
    assert len(d_dets) == len(c_dets) > 10
    for a, b in zip(d_dets, c_dets):
        assert a["class"] == b["class"]
        np.testing.assert_allclose(a["score"], b["score"], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(a["box"], b["box"], atol=1e-5)


# --------------------------------------------------------------------------------------------
# mAP
# --------------------------------------------------------------------------------------------

def test_average_precision_all_point() -> None:
    # TP, FP, TP with 2 ground truths: recall .5 .5 1, precision 1 .5 .667 -> .5*1 + .5*.667
    np.testing.assert_allclose(average_precision(np.array([.5, .5, 1]), np.array([1, .5, 2 / 3])),
                               0.5 + 0.5 * 2 / 3, rtol=1e-12)
    assert average_precision(np.array([]), np.array([])) == 0.0


def test_evaluate_matching_rules() -> None:
    truth = [np.array([[0, .3, .3, .2, .2], [1, .7, .7, .2, .2]]), np.array([[0, .5, .5, .4, .4]])]
    perfect = [[(0, .9, (.3, .3, .2, .2)), (1, .8, (.7, .7, .2, .2))], [(0, .7, (.5, .5, .4, .4))]]
    result = evaluate(perfect, truth, classes=3, names=["a", "b", "c"])
    assert result.map50 == 1.0 and result.per_class[2].ap is None      # class c: no ground truth, left out
    # a duplicate of a matched box is a false positive; a wrong class never matches
    dup = [[(0, .9, (.3, .3, .2, .2)), (0, .95, (.31, .3, .2, .2)), (1, .8, (.3, .3, .2, .2))],
           [(0, .7, (.5, .5, .4, .4))]]
    r = evaluate(dup, truth, classes=2)
    assert r.per_class[0].true_positives == 2 and r.per_class[0].detections == 3
    # ranked: .95 TP (the shifted box matches first), .9 FP (its box is taken), .7 TP
    np.testing.assert_allclose(r.per_class[0].ap, 0.5 + 0.5 * 2 / 3, rtol=1e-12)
    assert r.per_class[1].ap == 0.0
    np.testing.assert_allclose(r.map50, (0.5 + 0.5 * 2 / 3) / 2, rtol=1e-12)
    # IoU just below / above 0.5 decides
    np.testing.assert_allclose(iou_xywh((.3, .5, .4, .4), np.array([[.3, .5, .4, .4], [.9, .5, .2, .2]])),
                               [1.0, 0.0], rtol=1e-12)
    assert iou_xywh((.5, .5, .5, .25), np.array([[.5, .5, .5, .5]]))[0] == 0.5   # exact in binary
    half = evaluate([[(0, .9, (.5, .5, .5, .25))]], [np.array([[0, .5, .5, .5, .5]])], classes=1)
    assert half.map50 == 1.0                                     # IoU exactly 0.5 counts
    below = evaluate([[(0, .9, (.5, .5, .5, .24))]], [np.array([[0, .5, .5, .5, .5]])], classes=1)
    assert below.map50 == 0.0


def test_map_on_the_live_net_and_a_converted_model_agree(reference, dataset, tmp_path) -> None:
    result, out = reference
    graph = load_graph(out / "train_tiny.cfg")
    convert(out / "train_tiny.cfg", result.final_weights, tmp_path / "conv")
    _, arrays = read_weights(result.final_weights, graph)
    from d2c.dataset import DataSpec
    valid = DataSpec.load(dataset).valid
    live = map_on_list(CaffeDetector.from_arrays(graph, arrays), valid, 3)
    files = map_on_list(CaffeDetector.from_model(tmp_path / "conv"), valid, 3)
    assert live.map50 == files.map50 and 0.0 <= live.map50 <= 1.0
    dets = CaffeDetector.from_model(tmp_path / "conv").detect(sorted(valid.parent.glob("images/*.jpg"))[-1])
    assert predictions_from_detections(dets, 0.005)


def test_plot_curves_handles_empty_and_log_scale(tmp_path) -> None:
    import cv2
    plot_curves(tmp_path / "a.png", [("x", [1, 2, 3], [100.0, 10.0, 0.5], "tab:red")], title="t")
    plot_curves(tmp_path / "b.png", [("x", [], [], "tab:red")], title="empty")
    plot_curves(tmp_path / "c.png", [("x", [1], [float("nan")], "tab:red")], title="nan")
    plot_panels(tmp_path / "d.png", [("one", [("x", [1, 2], [1.0, 2.0], "tab:blue")]),
                                     ("two", [("y", [1, 2], [3.0, float("inf")], "tab:green")])])
    for name in "abcd":
        assert cv2.imread(str(tmp_path / f"{name}.png")) is not None
    assert cv2.imread(str(tmp_path / "d.png")).shape[:2] == (2 * 540, 960)   # two panels stacked
    assert _wants_log([("x", [1, 2, 3], [100.0, 10.0, 0.5], "k")])
    assert not _wants_log([("x", [1, 2], [1.0, 10.0], "k")]) and not _wants_log([("x", [1, 2], [-1.0, 100.0], "k")])
