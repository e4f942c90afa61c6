"""`caffe train` the stock way: the DarknetDetectionData layer, convert --train --data, the real caffe binary.

What is proven here, against the real engines:
- the data layer's mini-batches equal d2c train's (BatchSource) for the same seed, bit for bit,
  over several iterations with S > 1, augmentation on and off;
- its worker processes stop when the net is deleted, when the owning process is killed, and
  when the `caffe` binary finishes (no orphans);
- Caffe's own `caffe train` binary runs the converted train net on the shapes dataset, the
  loss falls, and the snapshot exports to .weights that Debian's Darknet loads (its arrays are
  the snapshot's) and detects with.
"""
from __future__ import annotations

import gc
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.weights import WeightsHeader, read_weights, write_weights
from d2c.engines import import_caffe
from d2c.shapes import make_shapes_dataset
from d2c.train import BatchSource, initial_weights, override_net_keys

ROOT = Path(__file__).resolve().parents[1]
SHAPES_CFG = ROOT / "cfg" / "yolov3-tiny-shapes.cfg"
COCO = ROOT / "weights" / "yolov3-tiny.weights"
SIZE = 128
CAFFE_TOOL = Path(sys.executable).parent / "caffe"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict:
    """A small shapes dataset, the shapes cfg at 128 px / batch 4, and start weights (COCO backbone)."""
    root = tmp_path_factory.mktemp("caffe_train")
    ds = make_shapes_dataset(root / "shapes", count=48, size=SIZE, seed=0)
    text = override_net_keys(SHAPES_CFG.read_text(), {"width": str(SIZE), "height": str(SIZE), "batch": "4",
                                                      "subdivisions": "1"})
    cfg = root / "tiny.cfg"
    cfg.write_text(text)
    graph = build_graph(parse_cfg(cfg, text))
    _header, arrays, _seen, _notes = initial_weights(graph, COCO, load_upto=15, seed=1, clear=False)
    weights = root / "tiny.weights"
    write_weights(weights, WeightsHeader(0, 2, 0, 0), graph, arrays)
    return {"root": root, "data": ds.data_file, "cfg": cfg, "weights": weights, "valid": ds.valid}


def data_layer_net(tmp_path: Path, data: Path, *, batch: int, subdivisions: int, seed: int, no_augment: bool,
                   workers: int = 2) -> Path:
    from d2c.caffe.proto import CaffeLayer, CaffeNet, to_prototxt
    from d2c.loss.params import dump_params
    params = {"data": str(data), "classes": 3, "batch": batch, "subdivisions": subdivisions, "width": 96,
              "height": 80, "record_boxes": 90, "loader_boxes": 90, "jitter": 0.3, "hue": 0.1, "saturation": 1.5,
              "exposure": 1.5, "no_augment": no_augment, "seed": seed, "workers": workers}
    layer = CaffeLayer("data", "Python", [], ["data", "truth"],
                       {"python_param": {"module": "d2c.caffe_layers", "layer": "DarknetDetectionData",
                                         "param_str": dump_params(params)}})
    path = tmp_path / f"data_{seed}_{int(no_augment)}.prototxt"
    path.write_text(to_prototxt(CaffeNet("d", [], [layer])))
    return path


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], seconds: float = 10.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize("no_augment", [False, True])
def test_data_layer_batches_equal_d2c_train(shapes, tmp_path, no_augment):
    from d2c.dataset import DataSpec, load_split
    caffe = import_caffe()
    b, s, seed = 3, 2, 11
    net = caffe.Net(str(data_layer_net(tmp_path, shapes["data"], batch=b, subdivisions=s, seed=seed,
                                       no_augment=no_augment)), caffe.TRAIN)
    samples, _ = load_split(DataSpec.load(shapes["data"]), "train", classes=3)
    source = BatchSource(samples, b, s, 96, 80, rng=np.random.default_rng(seed), record_boxes=90, loader_boxes=90,
                         jitter=0.3, hue=0.1, saturation=1.5, exposure=1.5, no_augment=no_augment)
    for iteration in range(3):
        for k, (x, truth) in enumerate(source.next()):
            net.forward()
            np.testing.assert_array_equal(net.blobs["data"].data, x, err_msg=f"iteration {iteration} pass {k}")
            np.testing.assert_array_equal(net.blobs["truth"].data, truth, err_msg=f"iteration {iteration} pass {k}")
    if not no_augment:   # the check can fail: another seed gives other batches
        other = np.random.default_rng(seed + 1)
        moved = BatchSource(samples, b, s, 96, 80, rng=other, record_boxes=90, loader_boxes=90, jitter=0.3,
                            hue=0.1, saturation=1.5, exposure=1.5, no_augment=False).next()[0][0]
        net.forward()
        assert not np.array_equal(net.blobs["data"].data, moved)
    pids = net.layers[0].worker_pids
    assert len(pids) == 2 and all(alive(p) for p in pids)
    del net
    gc.collect()
    assert wait_gone(pids) == [], "deleting the net must stop its loader workers"


def test_data_layer_workers_die_with_a_killed_parent(shapes, tmp_path):
    """SIGKILL leaves no chance to clean up: the workers must still go (PR_SET_PDEATHSIG)."""
    net_file = data_layer_net(tmp_path, shapes["data"], batch=2, subdivisions=1, seed=3, no_augment=False)
    script = textwrap.dedent(f"""
        import sys, time
        from d2c.engines import import_caffe
        caffe = import_caffe()
        net = caffe.Net({str(net_file)!r}, caffe.TRAIN)
        net.forward()
        print(" ".join(map(str, net.layers[0].worker_pids)), flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(alive(p) for p in pids)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    assert wait_gone(pids) == [], "loader workers outlived their killed parent"


def test_data_layer_rejects_bad_param_str(shapes, tmp_path):
    from d2c.caffe.proto import CaffeLayer, CaffeNet, to_prototxt
    caffe = import_caffe()
    layer = CaffeLayer("data", "Python", [], ["data", "truth"],
                       {"python_param": {"module": "d2c.caffe_layers", "layer": "DarknetDetectionData",
                                         "param_str": '{"data": "x.data", "classes": 3, "batch": 2, "width": 64, '
                                                      '"height": 64, "record_boxes": 90, "workerz": 2}'}})
    path = tmp_path / "bad.prototxt"
    path.write_text(to_prototxt(CaffeNet("d", [], [layer])))
    script = f"from d2c.engines import import_caffe; c = import_caffe(); c.Net({str(path)!r}, c.TRAIN)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown key(s) 'workerz'" in proc.stderr


def caffe_processes(marker: str) -> list[int]:
    """Processes whose command line mentions `marker` (the forked workers inherit the caffe binary's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace") and alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_caffe_binary_trains_the_converted_net_and_its_snapshot_runs_in_darknet(shapes, tmp_path):
    from d2c.convert import convert
    from d2c.darknet.runtime import DarknetProcess

    out = tmp_path / "out"
    iterations = 16
    convert(shapes["cfg"], shapes["weights"], out, train=True, data=shapes["data"], max_iter=iterations, seed=5)
    solver = out / "tiny_solver.prototxt"
    assert "darknet-semantics" not in solver.read_text() + (out / "tiny_train.prototxt").read_text()
    assert CAFFE_TOOL.is_file(), f"{CAFFE_TOOL}: make setup writes the caffe wrapper"
    env = dict(os.environ, GLOG_minloglevel="0", GLOG_logtostderr="1")
    start = time.monotonic()
    proc = subprocess.run([str(CAFFE_TOOL), "train", "-solver", str(solver), "-weights",
                           str(out / "tiny_train.caffemodel")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(v) for v in re.findall(r"Iteration \d+ \([^)]*\), loss = ([-+0-9.e]+)", proc.stderr)]
    assert len(losses) == iterations, proc.stderr[-2000:]
    first, last = losses[0], np.mean(losses[-4:])
    print(f"caffe train: {iterations} iterations in {seconds:.1f} s; loss {[round(v, 2) for v in losses]}")
    assert np.all(np.isfinite(losses)) and last < 0.5 * first, losses
    assert caffe_processes(str(solver)) == [], "the caffe binary left loader workers behind"

    snapshot = out / f"tiny_iter_{iterations}.caffemodel"
    exported = tmp_path / "trained.weights"
    cli = subprocess.run([str(Path(sys.executable).parent / "d2c"), "export", str(snapshot), "-o", str(exported)],
                         cwd=shapes["cfg"].parent, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    graph = build_graph(parse_cfg(shapes["cfg"]))
    _header, ours = read_weights(exported, graph)
    _header, start_arrays = read_weights(shapes["weights"], graph)
    assert not np.array_equal(ours[0]["weights"], start_arrays[0]["weights"]), "caffe train changed nothing"
    with DarknetProcess(shapes["cfg"], exported, batch=1) as dn:
        for index in (0, 15, 22):   # first conv (COCO start), the fresh head convs
            for key, value in dn.layer_params(index).items():
                if key in ours[index]:
                    np.testing.assert_array_equal(value.reshape(ours[index][key].shape), ours[index][key],
                                                  err_msg=f"layer {index} {key}")
        detections = dn.detect(shapes["valid"][0], thresh=0.05)
    assert isinstance(detections, list)


def test_caffe_tool_is_built_with_the_library_and_shown_by_info():
    """tools/build_caffe.sh puts Caffe's own `caffe` beside pycaffe, linked to the very libcaffe.so
    pycaffe uses (so it computes exactly what pycaffe computes), and `d2c info` names it."""
    from d2c.engines import caffe_tool
    caffe = import_caffe()
    caffe_dir = Path(caffe.__file__).parent
    tool = caffe_tool(caffe_dir)
    assert tool is not None and tool.parent.parent == caffe_dir.parent.parent
    linked = subprocess.run(["ldd", str(tool)], capture_output=True, text=True, check=True).stdout
    libcaffe = next(line.split("=>")[1].split()[0] for line in linked.splitlines() if "libcaffe.so" in line)
    assert Path(libcaffe).resolve() == (caffe_dir / "libcaffe.so").resolve()
    version = subprocess.run([str(CAFFE_TOOL), "--version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "caffe version 1.0.0" in version.stdout + version.stderr
    info = subprocess.run([str(Path(sys.executable).parent / "d2c"), "info"], capture_output=True, text=True,
                          timeout=120)
    assert info.returncode == 0 and f"caffe-tool {tool}" in info.stdout


def test_a_cached_build_without_the_tool_gets_it_without_a_rebuild(tmp_path):
    """An older cache (library, no bin/caffe): build_caffe.sh compiles only tools/caffe.cpp."""
    caffe = import_caffe()
    prefix = Path(caffe.__file__).parent.parent.parent
    cache = Path(os.environ.get("D2C_CACHE", Path.home() / ".cache" / "d2c"))
    assert prefix.parent == cache
    copy = tmp_path / prefix.name
    copy.mkdir()
    for name in ("python", "include", "build-info.json", ".built"):
        (copy / name).symlink_to(prefix / name)
    (tmp_path / "src").symlink_to(cache / "src")
    before = (prefix / "python" / "caffe" / "libcaffe.so").resolve().stat().st_mtime_ns
    start = time.monotonic()
    proc = subprocess.run(["bash", str(ROOT / "tools" / "build_caffe.sh"), sys.executable], capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, D2C_CACHE=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(copy / "python")
    assert "compiling the caffe tool" in proc.stderr and "building (about" not in proc.stderr
    assert (copy / "bin" / "caffe").is_file() and time.monotonic() - start < 600
    assert (prefix / "python" / "caffe" / "libcaffe.so").resolve().stat().st_mtime_ns == before
    again = subprocess.run(["bash", str(ROOT / "tools" / "build_caffe.sh"), sys.executable], capture_output=True,
                           text=True, timeout=120, env=dict(os.environ, D2C_CACHE=str(tmp_path)))
    assert again.returncode == 0 and "compiling" not in again.stderr    # cached: nothing to do
