"""Loader speed for `d2c bench`: d2c's loader against Darknet's own, and its share of a training iteration.

What is measured (each in a child process, so engines and thread pools do not mix):
- per core: Darknet's load_data_detection (Debian libdarknet, the function train_detector's loader
  threads call) and d2c's loader (d2c.augment.detection_batch, set up as a loader worker is) on the
  same list, yolov3-tiny's augmentation at 416, every image decoded as Darknet does. Speed is
  images per CPU second of the process (the median of a few rounds after a warm-up), so other jobs
  on the machine do not count as loader time; the two run alternately in `pairs` pairs, so load that
  comes and goes hits both alike, and the ratio is taken pair by pair (median and spread). Lists:
  the shapes dataset (416 px JPEGs, the training demo's) and Darknet's sample photos (768-1600 px);
- throughput (wall clock): `cores` Darknet processes at once, and d2c.loader.PrefetchLoader with
  `cores` workers;
- the loader's share of a yolov3-tiny batch-16 training iteration (416, exact BN) with prefetch:
  the same net and solver steps timed with the batch already in memory and with each batch taken
  from the PrefetchLoader, whose workers render the next batches while Caffe computes;
  share = the time the training loop waits for its batch / the iteration time; the iteration time
  with and without the loader is reported too (its difference is the workers' CPU contention,
  within the noise of a shared machine).
Run alone: `python -m d2c.loader_bench [--pairs N] [--no-share] [--json OUT]` prints the table.
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


def _rounds(job: dict[str, Any], one_round: Any) -> None:
    """Warm up, then time `rounds` calls of one_round() (wall and this process's CPU seconds)."""
    one_round(2)                                  # page cache, first allocations, lazy imports
    walls, cpus = [], []
    for _ in range(job["rounds"]):
        wall, cpu = time.perf_counter(), time.process_time()
        one_round(job["n"])
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    print(json.dumps({"images": job["n"], "wall_s": walls, "cpu_s": cpus}))


def _darknet_loader_child() -> None:
    """Time libdarknet's load_data_detection on n images per round (stdin job, JSON on stdout)."""
    import ctypes

    from d2c.augment import darknet_load_data_detection
    job = json.loads(sys.stdin.read())
    lib, fn = darknet_load_data_detection()
    paths = job["paths"]
    c_paths = (ctypes.c_char_p * len(paths))(*(p.encode() for p in paths))
    lib.libc.srand(job["seed"])
    a = job["augment"]

    def one_round(n: int) -> None:
        data = fn(n, c_paths, len(paths), job["size"], job["size"], BOXES, 3, a["jitter"], a["hue"],
                  a["saturation"], a["exposure"])
        lib.dll.free_data(data)

    _rounds(job, one_round)


def _d2c_loader_child() -> None:
    """Time d2c's loader: detection_batch in this process (workers 0, decoding every image as
    Darknet does), or the PrefetchLoader with `workers` processes (wall clock only)."""
    job = json.loads(sys.stdin.read())
    from d2c.augment import detection_batch
    from d2c.augment_kernel import keep_freed_memory
    from d2c.dataset import DataSpec, load_split
    from d2c.loader import LoaderSettings, PrefetchLoader
    samples, _ = load_split(DataSpec.load(job["data"]), "train", classes=3)
    size, workers = job["size"], job["workers"]
    if workers == 0:
        import cv2
        keep_freed_memory()                       # what the loader's worker processes do
        cv2.setNumThreads(0)
        rng = np.random.default_rng(job["seed"])
        _rounds(job, lambda n: detection_batch(samples, n, size, size, rng=rng, max_boxes=BOXES, **job["augment"]))
        return
    batch = 16
    settings = LoaderSettings(batch=batch, subdivisions=1, width=size, height=size, record_boxes=BOXES,
                              loader_boxes=BOXES, **job["augment"])
    with PrefetchLoader(samples, settings, np.random.default_rng(job["seed"]), workers=workers, slots=2) as loader:
        loader.next_minibatch()                                     # warm-up: workers started, first batch
        start = time.perf_counter()
        batches = max(1, job["n"] // batch)
        for _ in range(batches):
            loader.next_minibatch()
        seconds = time.perf_counter() - start
        print(json.dumps({"images": batches * batch, "wall_s": [seconds], "cpu_s": [seconds]}))


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


PHOTOS = ("dog", "eagle", "giraffe", "horses", "kite", "person", "scream")   # Debian darknet's data/*.jpg


def photos_dataset(root: Path) -> Path:
    """Darknet's sample photos (768x576 to 1050x1600 JPEGs) as a 3-class list with seeded boxes:
    the loader on camera-sized images, where every image is resized (the shapes list is 416 px)."""
    from d2c.fsutil import atomic_write_text
    source = Path("/usr/share/darknet/data")
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for name in PHOTOS:
        image = root / "images" / f"{name}.jpg"
        if not image.is_file():
            image.write_bytes((source / f"{name}.jpg").read_bytes())
        boxes = [f"{rng.integers(0, 3)} {x:.4f} {y:.4f} {w:.4f} {h:.4f}"
                 for x, y, w, h in rng.uniform([0.2, 0.2, 0.05, 0.05], [0.8, 0.8, 0.4, 0.4], (4, 4))]
        atomic_write_text(root / "labels" / f"{name}.txt", "\n".join(boxes) + "\n")
        paths.append(str(image.resolve()))
    atomic_write_text(root / "train.txt", "\n".join(paths) + "\n")
    atomic_write_text(root / "photos.names", "a\nb\nc\n")
    data = root / "photos.data"
    atomic_write_text(data, f"classes = 3\ntrain = {root / 'train.txt'}\nnames = {root / 'photos.names'}\n")
    return data


def paired_per_core(paths: list[str], data: Path, *, pairs: int, n: int = 32, rounds: int = 3) -> dict[str, Any]:
    """Darknet's load_data_detection and d2c's detection_batch, one process each, run alternately
    `pairs` times (so a busy machine slows both alike); per-core speed = images per CPU second of
    the process (the median round), the ratio taken pair by pair."""
    darknet, d2c, ratios = [], [], []
    for k in range(pairs):
        job = {"n": n, "rounds": rounds, "size": SIZE, "seed": 1 + k, "augment": AUGMENT}
        dk = _child("_darknet_loader_child", {**job, "paths": paths}, timeout=600)
        ours = _child("_d2c_loader_child", {**job, "data": str(data), "workers": 0}, timeout=600)
        dk_ms = float(np.median(dk["cpu_s"])) / n * 1e3
        ours_ms = float(np.median(ours["cpu_s"])) / n * 1e3
        darknet.append(dk_ms)
        d2c.append(ours_ms)
        ratios.append(dk_ms / ours_ms)
    return {"pairs": pairs, "darknet_ms": darknet, "d2c_ms": d2c, "ratios": ratios,
            "darknet_per_core_ips": 1e3 / float(np.median(darknet)), "d2c_per_core_ips": 1e3 / float(np.median(d2c)),
            "per_core_ratio": float(np.median(ratios)), "per_core_ratio_min": min(ratios),
            "per_core_ratio_max": max(ratios)}


def measure_loader(work: Path, *, cores: int, tiny_weights: Path | None, share: bool = True,
                   images: int = 48, pairs: int = 5, photos: bool = True) -> dict[str, Any]:
    """Every loader number `d2c bench` prints (see the module docstring)."""
    from d2c.shapes import make_shapes_dataset
    work.mkdir(parents=True, exist_ok=True)
    ds = make_shapes_dataset(work / "shapes", count=images + max(2, images // 8), size=SIZE, seed=0,
                             valid_fraction=0.1, absolute_paths=True)
    paths = [str(p.resolve()) for p in ds.train]
    n = 32
    out: dict[str, Any] = {"size": SIZE, "images_listed": len(paths), "augment": AUGMENT, "cores": cores,
                           "load_average_start": list(os.getloadavg())}
    out.update(paired_per_core(paths, ds.data_file, pairs=pairs, n=n))
    if photos and Path("/usr/share/darknet/data/dog.jpg").is_file():
        photo_data = photos_dataset(work / "photos")
        photo_paths = (work / "photos" / "train.txt").read_text().split()
        out["photos"] = paired_per_core(photo_paths, photo_data, pairs=max(1, pairs // 2), n=16)
    procs = [subprocess.Popen([sys.executable, "-c", "from d2c.loader_bench import _darknet_loader_child as f; f()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
             for _ in range(cores)]
    results = []
    for k, proc in enumerate(procs):
        stdout, _ = proc.communicate(json.dumps({"paths": paths, "n": n, "rounds": 1, "size": SIZE, "seed": 2 + k,
                                                 "augment": AUGMENT}), timeout=600)
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    out["darknet_threads_ips"] = sum(r["images"] for r in results) / max(r["wall_s"][0] for r in results)
    d2c_workers = _child("_d2c_loader_child", {"data": str(ds.data_file), "n": 4 * n, "rounds": 1, "size": SIZE,
                                               "seed": 1, "workers": cores, "augment": AUGMENT}, timeout=600)
    out["d2c_workers_ips"] = d2c_workers["images"] / d2c_workers["wall_s"][0]
    if share and tiny_weights is not None:
        result = _child("_share_child", {"work": str(work / "share"), "cfg": str(TINY_CFG),
                                         "weights": str(tiny_weights), "data": str(ds.data_file), "batch": 16,
                                         "size": SIZE, "seed": 1, "workers": cores, "iterations": 3,
                                         "augment": AUGMENT}, timeout=1800)
        plain = float(np.median(result["plain_s"]))
        loaded = float(np.median(result["loader_s"]))
        waited = float(np.median(result["waited_s"]))
        out.update(iteration_s=plain, iteration_with_loader_s=loaded, waited_s=waited, loader_share=waited / loaded,
                   contention=(loaded - plain) / loaded, raw=result)
    out["load_average_end"] = list(os.getloadavg())
    return out


def _per_core_row(kind: str, r: dict[str, Any]) -> str:
    return (f"| {kind} | {r['darknet_per_core_ips']:.1f} ({1e3 / r['darknet_per_core_ips']:.1f} ms) | "
            f"{r['d2c_per_core_ips']:.1f} ({1e3 / r['d2c_per_core_ips']:.1f} ms) | {r['per_core_ratio']:.2f} "
            f"({r['per_core_ratio_min']:.2f}-{r['per_core_ratio_max']:.2f}, {r['pairs']} pairs) |")


def format_rows(loader: dict[str, Any]) -> list[str]:
    """The bench report's loader lines (a table of the per-core pairs, then the throughput and share)."""
    lines = [f"loader at {loader['size']} (yolov3-tiny augmentation), images per CPU second, Darknet and d2c "
             f"run alternately (load average {loader['load_average_start'][0]:.1f} at start, "
             f"{loader['load_average_end'][0]:.1f} at end):", "",
             "| list | Darknet load_data_detection | d2c loader | d2c / Darknet (min-max) |", "|---|---|---|---|",
             _per_core_row("shapes (416 px)", loader)]
    if "photos" in loader:
        lines.append(_per_core_row("photos (768-1600 px)", loader["photos"]))
    lines += ["", f"loader throughput, shapes: Darknet {loader['darknet_threads_ips']:.1f} images/s on "
                  f"{loader['cores']} processes, d2c {loader['d2c_workers_ips']:.1f} with {loader['cores']} workers"]
    if "loader_share" in loader:
        lines.append(f"loader share of a yolov3-tiny batch-16 iteration at {loader['size']} with prefetch: "
                     f"{100 * loader['loader_share']:.2f}% (waited {loader['waited_s'] * 1e3:.0f} ms of a "
                     f"{loader['iteration_with_loader_s']:.2f} s iteration; {loader['iteration_s']:.2f} s with the "
                     f"batch already in memory)")
    return lines


def main(argv: list[str] | None = None) -> int:
    """`python -m d2c.loader_bench`: the loader rows of `d2c bench` alone, with more pairs if wanted."""
    import argparse
    import tempfile
    from d2c.bench import TINY_WEIGHTS
    parser = argparse.ArgumentParser(prog="python -m d2c.loader_bench", description=main.__doc__)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-share", action="store_true", help="skip the training-iteration share")
    parser.add_argument("--no-photos", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="d2c-loader-bench-") as tmp:
        result = measure_loader(Path(tmp), cores=args.cores, share=not args.no_share, pairs=args.pairs,
                                photos=not args.no_photos,
                                tiny_weights=TINY_WEIGHTS if TINY_WEIGHTS.is_file() else None)
    print("\n".join(format_rows(result)))
    if args.json:
        from d2c.fsutil import atomic_write_text
        atomic_write_text(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
