"""Loader speed for `d2c bench`: d2c's loader against Darknet's own, and its share of a training iteration.

What is measured (each in a child process, so engines and thread pools do not mix):
- images/s of Darknet's load_data_detection (Debian libdarknet, the function train_detector's
  loader threads call, each thread on its share of the batch) on the shapes list at 416 with the
  yolov3-tiny augmentation settings: one process (per core), and `cores` processes at once (what
  its `cores` threads would do);
- images/s of d2c's loader on the same list and settings: d2c.augment.detection_batch in one
  process (per core), and d2c.loader.PrefetchLoader with `cores` workers;
- the loader's share of a yolov3-tiny batch-16 training iteration (416, exact BN) with prefetch:
  the same net and solver steps timed with the batch already in memory and with each batch taken
  from the PrefetchLoader, whose workers render the next batches while Caffe computes;
  share = the time the training loop waits for its batch / the iteration time; the iteration time
  with and without the loader is reported too (its difference is the workers' CPU contention,
  within the noise of a shared machine).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZE = 416
TINY_CFG = Path("/usr/share/darknet/cfg/yolov3-tiny.cfg")
AUGMENT = {"jitter": 0.3, "hue": 0.1, "saturation": 1.5, "exposure": 1.5}   # yolov3-tiny.cfg's values
BOXES = 90


def _child(function: str, job: dict[str, Any], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    package_root = str(Path(__file__).resolve().parents[1])
    child_env = dict(os.environ, **(env or {}))
    child_env["PYTHONPATH"] = package_root + (os.pathsep + child_env["PYTHONPATH"] if child_env.get("PYTHONPATH") else "")
    proc = subprocess.run([sys.executable, "-c", f"from d2c.loader_bench import {function}; {function}()"],
                          input=json.dumps(job), capture_output=True, text=True, timeout=timeout, env=child_env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{function} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-1500:]}")
    return json.loads(lines[-1])


def _darknet_loader_child() -> None:
    """Time libdarknet's load_data_detection on n images (stdin job, JSON on stdout)."""
    import ctypes

    from d2c.augment import darknet_load_data_detection
    job = json.loads(sys.stdin.read())
    lib, fn = darknet_load_data_detection()
    paths = job["paths"]
    c_paths = (ctypes.c_char_p * len(paths))(*(p.encode() for p in paths))
    lib.libc.srand(job["seed"])
    a = job["augment"]
    fn(2, c_paths, len(paths), job["size"], job["size"], BOXES, 3, a["jitter"], a["hue"], a["saturation"],
       a["exposure"])   # warm-up (page cache, first allocations); its data is leaked deliberately
    start = time.perf_counter()
    data = fn(job["n"], c_paths, len(paths), job["size"], job["size"], BOXES, 3, a["jitter"], a["hue"],
              a["saturation"], a["exposure"])
    seconds = time.perf_counter() - start
    lib.dll.free_data(data)
    print(json.dumps({"images": job["n"], "seconds": seconds}))


def _d2c_loader_child() -> None:
    """Time d2c's loader: detection_batch in this process, or the PrefetchLoader with workers."""
    job = json.loads(sys.stdin.read())
    from d2c.augment import detection_batch
    from d2c.dataset import DataSpec, load_split
    from d2c.loader import LoaderSettings, PrefetchLoader
    samples, _ = load_split(DataSpec.load(job["data"]), "train", classes=3)
    n, size, workers = job["n"], job["size"], job["workers"]
    if workers == 0:
        rng = np.random.default_rng(job["seed"])
        detection_batch(samples, 2, size, size, rng=rng, max_boxes=BOXES, **job["augment"])   # warm-up
        start = time.perf_counter()
        detection_batch(samples, n, size, size, rng=rng, max_boxes=BOXES, **job["augment"])
        print(json.dumps({"images": n, "seconds": time.perf_counter() - start}))
        return
    batch = 16
    settings = LoaderSettings(batch=batch, subdivisions=1, width=size, height=size, record_boxes=BOXES,
                              loader_boxes=BOXES, **job["augment"])
    with PrefetchLoader(samples, settings, np.random.default_rng(job["seed"]), workers=workers, slots=2) as loader:
        loader.next_minibatch()                                     # warm-up: workers started, first batch
        start = time.perf_counter()
        batches = max(1, n // batch)
        for _ in range(batches):
            loader.next_minibatch()
        print(json.dumps({"images": batches * batch, "seconds": time.perf_counter() - start}))


def _share_child() -> None:
    """A yolov3-tiny batch-16 training pass at 416 (forward + backward + DarknetSGD update),
    timed with the batch in memory and with each batch taken from the PrefetchLoader."""
    job = json.loads(sys.stdin.read())
    from d2c.convert import convert
    from d2c.dataset import DataSpec, load_split
    from d2c.engines import import_caffe
    from d2c.loader import LoaderSettings, PrefetchLoader
    from d2c.solver import DarknetSGD, TrainConfig
    from d2c.darknet.cfg import parse_cfg
    caffe = import_caffe()
    work = Path(job["work"])
    batch, size = job["batch"], job["size"]
    rep = convert(job["cfg"], job["weights"], work, train=True, batch=batch, name="share")
    files = {p.name: p for p in rep.extra}
    net = caffe.Net(str(files["share_train.prototxt"]), str(files["share_train.caffemodel"]), caffe.TRAIN)
    sgd = DarknetSGD(net, files["share_train.prototxt"], TrainConfig.from_section(parse_cfg(job["cfg"]).net,
                                                                                  batch=batch))
    samples, _ = load_split(DataSpec.load(job["data"]), "train", classes=3)
    record = net.blobs["truth"].data.shape[1] // 5
    settings = LoaderSettings(batch=batch, subdivisions=1, width=size, height=size, record_boxes=record,
                              loader_boxes=min(BOXES, record), **job["augment"])
    loader = PrefetchLoader(samples, settings, np.random.default_rng(job["seed"]), workers=job["workers"], slots=2)
    try:
        x, truth = loader.next_minibatch()
        sgd.step(net, [(x, truth)])                       # warm-up: every blob and diff allocated
        plain, with_loader, waited = [], [], []
        for _ in range(job["iterations"]):
            start = time.perf_counter()
            sgd.step(net, [(x, truth)])
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            fresh = loader.next_minibatch()
            wait = time.perf_counter() - start
            sgd.step(net, [fresh])
            with_loader.append(time.perf_counter() - start)
            waited.append(wait)
    finally:
        loader.close()
    print(json.dumps({"plain_s": plain, "loader_s": with_loader, "waited_s": waited}))


def measure_loader(work: Path, *, cores: int, tiny_weights: Path | None, share: bool = True,
                   images: int = 48) -> dict[str, Any]:
    """Every loader number `d2c bench` prints (see the module docstring)."""
    from d2c.shapes import make_shapes_dataset
    work.mkdir(parents=True, exist_ok=True)
    ds = make_shapes_dataset(work / "shapes", count=images + max(2, images // 8), size=SIZE, seed=0,
                             valid_fraction=0.1, absolute_paths=True)
    paths = [str(p.resolve()) for p in ds.train]
    n = 32
    out: dict[str, Any] = {"size": SIZE, "images_listed": len(paths), "augment": AUGMENT, "cores": cores}

    def rate(result: dict[str, Any]) -> float:
        return result["images"] / result["seconds"]

    darknet_one = _child("_darknet_loader_child", {"paths": paths, "n": n, "size": SIZE, "seed": 1,
                                                   "augment": AUGMENT}, timeout=600)
    out["darknet_per_core_ips"] = rate(darknet_one)
    procs = [subprocess.Popen([sys.executable, "-c", "from d2c.loader_bench import _darknet_loader_child as f; f()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
             for _ in range(cores)]
    results = []
    for k, proc in enumerate(procs):
        stdout, _ = proc.communicate(json.dumps({"paths": paths, "n": n, "size": SIZE, "seed": 2 + k,
                                                 "augment": AUGMENT}), timeout=600)
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    out["darknet_threads_ips"] = sum(r["images"] for r in results) / max(r["seconds"] for r in results)
    d2c_one = _child("_d2c_loader_child", {"data": str(ds.data_file), "n": n, "size": SIZE, "seed": 1,
                                           "workers": 0, "augment": AUGMENT}, timeout=600)
    out["d2c_per_core_ips"] = rate(d2c_one)
    d2c_workers = _child("_d2c_loader_child", {"data": str(ds.data_file), "n": 2 * n, "size": SIZE, "seed": 1,
                                               "workers": cores, "augment": AUGMENT}, timeout=600)
    out["d2c_workers_ips"] = rate(d2c_workers)
    out["per_core_ratio"] = out["d2c_per_core_ips"] / out["darknet_per_core_ips"]
    if share and tiny_weights is not None:
        result = _child("_share_child", {"work": str(work / "share"), "cfg": str(TINY_CFG),
                                         "weights": str(tiny_weights), "data": str(ds.data_file), "batch": 16,
                                         "size": SIZE, "seed": 1, "workers": cores, "iterations": 2,
                                         "augment": AUGMENT}, timeout=1800)
        plain = float(np.median(result["plain_s"]))
        loaded = float(np.median(result["loader_s"]))
        waited = float(np.median(result["waited_s"]))
        out.update(iteration_s=plain, iteration_with_loader_s=loaded, waited_s=waited, loader_share=waited / loaded,
                   contention=(loaded - plain) / loaded, raw=result)
    return out


def format_rows(loader: dict[str, Any]) -> list[str]:
    """The bench report's loader lines."""
    lines = [f"loader, shapes list at {loader['size']} (yolov3-tiny augmentation), images/s: "
             f"Darknet load_data_detection {loader['darknet_per_core_ips']:.1f} per core, "
             f"{loader['darknet_threads_ips']:.1f} on {loader['cores']} threads' worth; d2c "
             f"{loader['d2c_per_core_ips']:.1f} per core ({loader['per_core_ratio']:.2f}x Darknet), "
             f"{loader['d2c_workers_ips']:.1f} with {loader['cores']} workers"]
    if "loader_share" in loader:
        lines.append(f"loader share of a yolov3-tiny batch-16 iteration at {loader['size']} with prefetch: "
                     f"{100 * loader['loader_share']:.2f}% (waited {loader['waited_s'] * 1e3:.0f} ms of a "
                     f"{loader['iteration_with_loader_s']:.2f} s iteration; {loader['iteration_s']:.2f} s with the "
                     f"batch already in memory)")
    return lines
