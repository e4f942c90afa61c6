"""The newcomer's training flow on the CLI: d2c shapes -> d2c train -> d2c detect RUN -> d2c train --resume RUN.

Also the loader's edges (a planned draw too many, a broken image named, close twice) and
`--gpus` on this CPU-only build.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from d2c.augment import PlannedImage, ReplayRand, render_planned
from d2c.dataset import DataSpec, load_split
from d2c.errors import DatasetError
from d2c.loader import LoaderSettings, PrefetchLoader
from d2c.train import override_net_keys

ROOT = Path(__file__).resolve().parents[1]
D2C = Path(sys.executable).parent / "d2c"


def d2c(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(D2C), *args], capture_output=True, text=True, timeout=900, cwd=cwd)


@pytest.fixture(scope="module")
def flow(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("flow")
    made = d2c("shapes", str(root / "shapes"), "--count", "24", "--size", "96")
    assert made.returncode == 0, made.stderr
    assert "wrote 19 train + 5 valid images" in made.stdout
    cfg = root / "tiny.cfg"
    cfg.write_text(override_net_keys((ROOT / "cfg" / "yolov3-tiny-shapes.cfg").read_text(),
                                     {"width": "96", "height": "96", "batch": "2", "subdivisions": "1"}))
    return {"root": root, "data": root / "shapes" / "shapes.data", "cfg": cfg}


def test_train_then_detect_and_resume_the_run_directory(flow):
    run = flow["root"] / "run"
    first = d2c("train", str(flow["data"]), str(flow["cfg"]), str(ROOT / "weights" / "yolov3-tiny.weights"),
                "--load-upto", "15", "--max-batches", "2", "--seed", "3", "--out", str(run), "--quiet")
    assert first.returncode == 0, first.stderr
    image = sorted((flow["root"] / "shapes" / "images").glob("*.jpg"))[0]
    det = d2c("detect", str(run), str(image), "--thresh", "0.01", "--json")
    assert det.returncode == 0, det.stderr
    rows = json.loads(det.stdout)[0]["detections"]
    assert rows and {r["name"] for r in rows} <= {"circle", "square", "triangle"}   # names from the .data
    snap = run / "snapshots" / "iter_000002"
    again = d2c("detect", str(snap / "tiny.weights"), str(image), "--thresh", "0.01", "--json")
    assert again.returncode == 0 and json.loads(again.stdout)[0]["detections"] == rows
    # --resume RUN_DIR alone: DATA and CFG come from the run; from another working directory too
    resumed = d2c("train", "--resume", str(run), "--max-batches", "3", "--quiet", cwd=flow["root"] / "shapes")
    assert resumed.returncode == 0, resumed.stderr
    log = json.loads((run / "train_log.json").read_text())
    assert [r["iteration"] for r in log["rows"]] == [1, 2, 3]
    assert json.loads((run / "latest.json").read_text())["iteration"] == 3
    missing = d2c("train", "--resume", str(flow["root"] / "nowhere"))
    assert missing.returncode == 2 and "no run.json here" in missing.stderr


def test_gpus_is_a_clear_error_on_this_build(flow):
    proc = d2c("train", str(flow["data"]), str(flow["cfg"]), "--gpus", "2")
    assert proc.returncode == 2 and "CPU-only" in proc.stderr and "Traceback" not in proc.stderr


def test_replay_refuses_a_draw_too_many():
    src = ReplayRand((5, 7))
    assert (src.rand(), src.rand()) == (5, 7)
    with pytest.raises(ValueError, match="more than the 2 planned draws"):
        src.rand()


def test_render_planned_checks_the_draw_count(flow):
    samples, _ = load_split(DataSpec.load(flow["data"]), "train", classes=3)
    sample = samples[0]
    image = np.full((3, 96, 96), 0.5, np.float32)
    short = PlannedImage(0, tuple(range(3)))   # fewer than DRAWS_PER_IMAGE + boxes
    with pytest.raises(ValueError):
        render_planned(image, sample, short, 64, 64)


def test_loader_names_a_broken_image_and_closes_twice(flow, tmp_path):
    samples, _ = load_split(DataSpec.load(flow["data"]), "train", classes=3)
    broken = tmp_path / "images" / "broken.jpg"
    broken.parent.mkdir()
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    bad = [type(samples[0])(image_path=broken, label_path=samples[0].label_path, boxes=samples[0].boxes)]
    settings = LoaderSettings(batch=2, subdivisions=1, width=64, height=64, record_boxes=90, loader_boxes=90)
    loader = PrefetchLoader(bad, settings, np.random.default_rng(0), workers=1)
    with pytest.raises(DatasetError, match="broken.jpg"):
        loader.next_minibatch()
    loader.close()
    loader.close()
    assert loader.closed


def test_d2c_train_prefetch_gives_the_in_process_batches_and_stops_its_workers(flow, tmp_path):
    """d2c train renders batches in worker processes; the tensors, losses and the Generator
    state a snapshot stores are those of loading in the training process (workers=0)."""
    import time

    from d2c.train import TrainOptions, Trainer
    runs = {}
    for workers in (0, 2):
        trainer = Trainer(TrainOptions(data=flow["data"], cfg=flow["cfg"], out=tmp_path / f"w{workers}", seed=5,
                                       max_batches=3, snapshot_every=100, progress=False, verbose=False,
                                       workers=workers))
        rows, batches, states = [], [], []
        for _ in range(3):
            rows.append(trainer.step()["loss"])
            batches.append([(x.copy(), t.copy()) for x, t in trainer.last_batches])
            states.append(trainer._rng_state())
        pids = getattr(trainer.source, "worker_pids", [])
        runs[workers] = (rows, batches, states, pids)
        if workers:
            assert len(pids) == 2
            trainer.source.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
                time.sleep(0.05)
            assert not any(Path(f"/proc/{p}/stat").exists() and Path(f"/proc/{p}/stat").read_text().split()[2] != "Z"
                           for p in pids), "close() must stop the loader workers"
            assert trainer._rng_state() == states[-1]    # wound back to the batches used
    (rows0, batches0, states0, _), (rows2, batches2, states2, _) = runs[0], runs[2]
    assert rows0 == rows2 and states0 == states2
    for one, two in zip(batches0, batches2):
        for (x0, t0), (x2, t2) in zip(one, two):
            np.testing.assert_array_equal(x0, x2)
            np.testing.assert_array_equal(t0, t2)


def test_convert_train_solver_max_iter_is_never_zero_and_data_needs_train(flow, tmp_path):
    from d2c.caffe.proto import parse_prototxt
    coco = ROOT / "weights" / "yolov3-tiny.weights"
    cfg = Path("/usr/share/darknet/cfg/yolov3-tiny.cfg")
    proc = d2c("convert", str(cfg), str(coco), "-o", str(tmp_path / "a"), "--train")
    assert proc.returncode == 0, proc.stderr
    text = (tmp_path / "a" / "yolov3-tiny_solver.prototxt").read_text()
    fields = parse_prototxt(text, "solver", "SolverParameter")
    assert fields["max_iter"] == 500200 and "as with Darknet's -clear" in text    # the COCO weights saw them all
    proc = d2c("convert", str(flow["cfg"]), "-o", str(tmp_path / "b"), "--train", "--data", str(flow["data"]),
               "--max-iter", "7")
    assert proc.returncode == 0, proc.stderr
    fields = parse_prototxt((tmp_path / "b" / "tiny_solver.prototxt").read_text(), "solver", "SolverParameter")
    assert fields["max_iter"] == 7 and Path(fields["net"]).is_absolute() and Path(fields["net"]).is_file()
    train_net = (tmp_path / "b" / "tiny_train.prototxt").read_text()
    assert "DarknetDetectionData" in train_net and 'type: "Input"' not in train_net
    for bad, message in ((["--data", str(flow["data"])], "add --train"), (["--train", "--max-iter", "0"], ">= 1")):
        proc = d2c("convert", str(flow["cfg"]), "-o", str(tmp_path / "c"), *bad)
        assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "c").exists()
