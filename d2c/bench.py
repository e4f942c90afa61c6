"""`d2c bench`: conversion, forward and training speed side by side, reported as ratios.

Why ratios measured in one run: absolute times on shared machines drift by 2x from one minute to
the next, while engines timed in the same run, interleaved round by round, drift together.

Why child processes everywhere:
- peak RSS is a per-process number, so each conversion (and its numpy read+write baseline) runs
  in a fresh interpreter and reports `ru_maxrss` itself;
- libdarknet.so switches on FTZ/DAZ for the process that loads it, and OpenBLAS reads its thread
  count once at load time, so every engine lives in its own worker with its own environment;
- times are taken *inside* the worker around the engine call (no pipe or pickling in them).

Darknet is driven through `d2c.darknet.runtime.DarknetNet` inside such a worker (the same class
`DarknetProcess` runs in its child; `DarknetProcess` itself has no timing hook).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from d2c.child import Child
from d2c.engines import caffe_build_info
from d2c.errors import D2CError, EngineError, ParamError

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CFG = Path("/usr/share/darknet/cfg/yolov3-tiny.cfg")
TINY_WEIGHTS = REPO_ROOT / "weights" / "yolov3-tiny.weights"
YOLOV3_CFG = Path("/usr/share/darknet/cfg/yolov3.cfg")
SAMPLE_IMAGE = Path("/usr/share/darknet/data/dog.jpg")

FORWARD_ENGINES = ("darknet", "caffe", "caffe_folded", "opencv_darknet", "opencv_caffe")
ONE_THREAD_ENGINES = ("caffe_folded", "opencv_caffe")   # repeated at 1 thread, like Darknet
PROFILED_ENGINES = ("caffe_folded", "opencv_caffe", "opencv_caffe_no_winograd", "caffe_folded_1t",
                    "opencv_caffe_1t")
ENGINE_GAP_S = 0.1         # idle time between engines: lets BLAS spin-waiting threads go to sleep
BOXES_PER_IMAGE = 6        # random truth boxes per training image

# Targets of issue 6 (limits; `ok` is computed against these).
TARGET_CONVERT_RATIO = 2.0
TARGET_PEAK_RSS_RATIO = 1.5
TARGET_DARKNET_SPEEDUP = 6.7
TARGET_OPENCV_RATIO = 1.2
TARGET_LOSS_SHARE = 0.05
TARGET_TRAIN_RATIO = 1.0


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cfg", nargs="?", help="Darknet .cfg (default: yolov3-tiny with real weights, "
                                          "plus yolov3 with seeded random weights)")
    p.add_argument("weights", nargs="?", help=".weights for CFG (default: seeded random weights)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed runs per engine after warm-up (default 7; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per engine first (default 1)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for Caffe (OpenBLAS) and OpenCV (default: all cores); Darknet is single-threaded")
    p.add_argument("--size", type=int, default=None,
                   help="input width=height for the given CFG (default: the cfg's own; yolov3 default: 416)")
    p.add_argument("--train", action="store_true", help="also time a training iteration of the given CFG")
    p.add_argument("--train-batch", type=int, default=None, help="training mini-batch (default 16; 2 with --quick)")
    p.add_argument("--bn", choices=["exact", "stock", "frozen"], default="exact",
                   help="BatchNorm mode of the Caffe training net (as `d2c convert --train --bn`)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed runs per engine and model before the run count is cut "
                        "(at least 2 runs; default 15)")
    p.add_argument("--no-parity", action="store_true", help="skip timing `d2c parity`")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: yolov3-tiny only, 2 runs, training at batch 2, no parity, no 1-thread rows")
    p.add_argument("--json", dest="json_out", help="write the results here (JSON)")
    p.add_argument("--workdir", help="keep converted models and inputs here (default: a temp dir, removed)")


@dataclass
class ModelSpec:
    """One model to bench: weights None means seeded random weights written by the bench."""

    name: str
    cfg: Path
    weights: Path | None
    size: int | None = None
    train: bool = False


@dataclass
class BenchOptions:
    repeat: int = 7
    warmup: int = 1
    threads: int = 2
    train_batch: int = 16
    bn: str = "exact"
    budget_s: float = 15.0
    convert_runs: int = 3
    one_thread_rows: bool = True
    parity: bool = True
    quick: bool = False


def options_from_args(args: argparse.Namespace) -> BenchOptions:
    quick = bool(args.quick)
    opts = BenchOptions(
        repeat=args.repeat if args.repeat is not None else (2 if quick else 7),
        warmup=args.warmup,
        threads=args.threads or len(os.sched_getaffinity(0)),
        train_batch=args.train_batch or (2 if quick else 16),
        bn=args.bn,
        budget_s=args.budget if args.budget is not None else (10.0 if quick else 15.0),
        convert_runs=1 if quick else 3,
        one_thread_rows=not quick,
        parity=not (quick or args.no_parity),
        quick=quick)
    if opts.repeat < 1 or opts.warmup < 0 or opts.threads < 1 or opts.train_batch < 1 or opts.budget_s <= 0:
        raise ParamError("--repeat, --threads and --train-batch must be >= 1, --warmup >= 0, --budget > 0")
    return opts


def models_from_args(args: argparse.Namespace) -> list[ModelSpec]:
    if args.cfg:
        cfg = Path(args.cfg)
        if not cfg.is_file():
            raise ParamError(f"{cfg}: no such cfg file")
        weights = Path(args.weights) if args.weights else None
        if weights is not None and not weights.is_file():
            raise ParamError(f"{weights}: no such weights file")
        return [ModelSpec(cfg.stem, cfg, weights, args.size, train=bool(args.train or args.quick))]
    if args.weights:
        raise ParamError("WEIGHTS needs a CFG before it")
    if not TINY_WEIGHTS.is_file():
        raise ParamError(f"{TINY_WEIGHTS}: the real yolov3-tiny weights are missing; run `make setup`")
    models = [ModelSpec("yolov3-tiny", TINY_CFG, TINY_WEIGHTS, args.size, train=True)]
    if not args.quick:
        models.append(ModelSpec("yolov3", YOLOV3_CFG, None, args.size or 416, train=False))
    return models


def run(args: argparse.Namespace) -> int:
    if args.json_out:
        from d2c.fsutil import check_output_file
        check_output_file(args.json_out, "--json")
    opts = options_from_args(args)
    models = models_from_args(args)
    if args.size is not None and args.size < 1:
        raise ParamError(f"--size {args.size}: must be >= 1")
    if args.cfg:    # the cfg's own mistakes name its file and lines, not the bench's working copy
        from d2c.darknet.cfg import parse_cfg
        from d2c.darknet.graph import build_graph
        build_graph(parse_cfg(args.cfg))
    with _workdir(args.workdir) as work:
        report = bench(models, opts, work)
    print(format_report(report))
    if args.json_out:
        from d2c.fsutil import atomic_write_text
        atomic_write_text(args.json_out, json.dumps(report, indent=1, default=_json_default) + "\n")
        print(f"wrote {args.json_out}")
    return 0


@contextlib.contextmanager
def _workdir(keep: str | None) -> Iterator[Path]:
    if keep:
        path = Path(keep)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="d2c-bench-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ----------------------------------------------------------------------------------------------
# Orchestration
# ----------------------------------------------------------------------------------------------

def bench(models: list[ModelSpec], opts: BenchOptions, work: Path) -> dict[str, Any]:
    """Run every measurement; returns the JSON report (top-level keys summarise, `models` has all)."""
    from tqdm import tqdm

    started = time.perf_counter()
    machine = machine_info(opts)
    per_model_steps = 4
    bar = tqdm(total=len(models) * per_model_steps + 1, desc="bench", unit="step", leave=False,
               file=sys.stderr, disable=None)
    results: list[dict[str, Any]] = []
    try:
        for spec in models:
            results.append(bench_model(spec, opts, work / spec.name, bar))
        bar.set_postfix_str("parity")
        parity = time_parity(work / "parity") if opts.parity else {
            "seconds": None, "reason": "skipped (--quick or --no-parity)"}
        bar.update(1)
    finally:
        bar.close()
    loader = bench_loader(work / "loader", opts)
    machine["load_average_end"] = list(os.getloadavg())
    machine.update(_engine_versions(results))
    report = summarise(results, parity, machine, opts)
    report["loader"] = loader
    report["targets"] += loader_targets(loader)
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    return report


def bench_loader(work: Path, opts: BenchOptions) -> dict[str, Any]:
    """d2c's data loader against Darknet's load_data_detection, and its share of a training
    iteration with prefetch (d2c.loader_bench; the share is skipped with --quick)."""
    from d2c.loader_bench import measure_loader
    try:
        return measure_loader(work, cores=opts.threads, tiny_weights=TINY_WEIGHTS if TINY_WEIGHTS.is_file() else None,
                              share=not opts.quick, pairs=1 if opts.quick else 5, photos=not opts.quick)
    except (D2CError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
        return {"reason": f"loader bench failed: {exc}"}


def loader_targets(loader: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    if "per_core_ratio" in loader:
        ratio = loader["per_core_ratio"]
        out.append({"target": "d2c loader images/s per core / Darknet's", "model": "shapes 416", "value": ratio,
                    "limit": 1.0, "ok": ratio >= 1.0})
    if "loader_share" in loader:
        share = loader["loader_share"]
        out.append({"target": "loader share of a training iteration (prefetch)", "model": "yolov3-tiny",
                    "value": share, "limit": TARGET_LOSS_SHARE, "ok": share <= TARGET_LOSS_SHARE})
    return out


def bench_model(spec: ModelSpec, opts: BenchOptions, work: Path, bar: Any) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    bar.set_postfix_str(f"{spec.name}: inputs")
    cfg, weights, random = prepare_model(spec, work)
    record: dict[str, Any] = {"name": spec.name, "cfg": str(spec.cfg), "bench_cfg": str(cfg),
                              "weights": str(spec.weights) if spec.weights else "seeded random (seed 0)",
                              "weights_bytes": weights.stat().st_size, "random_weights": random}
    bar.update(1)

    bar.set_postfix_str(f"{spec.name}: convert")
    record.update(measure_convert(cfg, weights, work, opts))
    bar.update(1)

    bar.set_postfix_str(f"{spec.name}: forward")
    x = forward_input(cfg, work)
    record["input_shape"] = list(x.shape)
    deploy, folded = work / "convert" / f"{cfg.stem}", work / "folded" / f"{cfg.stem}"
    record.update(measure_forward(cfg, weights, deploy, folded, work / "input.npy", opts, bar, spec.name))
    bar.update(1)

    bar.set_postfix_str(f"{spec.name}: train")
    if spec.train:
        record.update(measure_train(cfg, weights, work, opts))
    else:
        record.update(train={"reason": "not requested for this model (only yolov3-tiny is trained by "
                                       "default; use --train with a CFG)"},
                      loss_layer_share=None, train_iter_ratio=None)
    bar.update(1)
    return record


def prepare_model(spec: ModelSpec, work: Path) -> tuple[Path, Path, bool]:
    """The cfg the bench runs (a copy at the requested size, batch 1) and a weights file."""
    from d2c.convert import load_graph
    from d2c.darknet.weights import WeightsHeader, random_weights, write_weights

    cfg = write_cfg_copy(spec.cfg, work / spec.cfg.name, width=spec.size, height=spec.size)
    if spec.weights is not None:
        return cfg, spec.weights, False
    weights = work / f"{spec.cfg.stem}-random.weights"
    graph = load_graph(cfg)
    write_weights(weights, WeightsHeader(), graph, random_weights(graph, seed=0))
    return cfg, weights, True


def write_cfg_copy(cfg: Path, out: Path, **net_keys: int | None) -> Path:
    """A copy of `cfg` with [net] keys replaced (or added); None leaves a key as it is.

    Only [net] changes, so the layers (and the .weights layout) stay the same.
    """
    wanted = {k: v for k, v in net_keys.items() if v is not None}
    lines = cfg.read_text().splitlines()
    out_lines: list[str] = []
    in_net, seen_net, done = False, False, set()
    for line in lines:
        stripped = "".join(line.split())
        if stripped.startswith("["):
            if in_net:  # leaving [net]: add the keys it did not have
                out_lines.extend(f"{k}={v}" for k, v in wanted.items() if k not in done)
            in_net = stripped in ("[net]", "[network]") and not seen_net
            seen_net = seen_net or in_net
        key = stripped.split("=", 1)[0] if "=" in stripped and not stripped.startswith("#") else None
        if in_net and key in wanted:
            line = f"{key}={wanted[key]}"
            done.add(key)
        out_lines.append(line)
    if in_net:
        out_lines.extend(f"{k}={v}" for k, v in wanted.items() if k not in done)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(out_lines) + "\n")
    return out


def forward_input(cfg: Path, work: Path) -> np.ndarray:
    """Darknet's letterboxed dog.jpg at the net size (realistic activations, unlike noise)."""
    from d2c.convert import load_graph
    from d2c.image import letterbox, load_image_rgb

    net = load_graph(cfg).net
    if SAMPLE_IMAGE.is_file() and net.channels == 3:
        x = letterbox(load_image_rgb(SAMPLE_IMAGE), net.width, net.height)[None]
    else:
        x = np.random.default_rng(0).random((1, net.channels, net.height, net.width), dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    np.save(work / "input.npy", x)
    return x


# ----------------------------------------------------------------------------------------------
# Conversion: d2c convert vs a numpy read+write of the same bytes, each in a fresh process
# ----------------------------------------------------------------------------------------------

def measure_convert(cfg: Path, weights: Path, work: Path, opts: BenchOptions) -> dict[str, Any]:
    size = weights.stat().st_size
    runs: dict[str, list[dict[str, Any]]] = {"baseline": [], "convert": [], "convert_folded": []}
    for _ in range(opts.convert_runs):  # interleaved, so drift hits both alike
        runs["baseline"].append(run_once({"op": "baseline", "weights": str(weights),
                                          "out": str(work / "baseline.bin")}))
        runs["convert"].append(run_once({"op": "convert", "cfg": str(cfg), "weights": str(weights),
                                         "out": str(work / "convert"), "fold_bn": False}))
        runs["convert_folded"].append(run_once({"op": "convert", "cfg": str(cfg), "weights": str(weights),
                                                "out": str(work / "folded"), "fold_bn": True}))
    (work / "baseline.bin").unlink(missing_ok=True)

    def summary(name: str) -> dict[str, Any]:
        rs = runs[name]
        peak = max(r["peak_rss_mb"] for r in rs)
        start = min(r["start_rss_mb"] for r in rs)
        return {"seconds": statistics.median(r["seconds"] for r in rs),
                "seconds_all": [round(r["seconds"], 4) for r in rs],
                "start_rss_mb": round(start, 1), "peak_rss_mb": round(peak, 1),
                "peak_rss_ratio": peak * 2**20 / size,
                "peak_rss_over_start_ratio": (peak - start) * 2**20 / size}

    base, conv, folded = summary("baseline"), summary("convert"), summary("convert_folded")
    for item in (conv, folded):
        item["ratio"] = item["seconds"] / base["seconds"]
    return {"convert": conv, "convert_folded": folded, "baseline": base,
            "convert_ratio": conv["ratio"], "peak_rss_ratio": conv["peak_rss_ratio"]}


# ----------------------------------------------------------------------------------------------
# Forward: one worker per engine, all loaded at once, timed round-robin
# ----------------------------------------------------------------------------------------------

@dataclass
class EngineSpec:
    name: str
    load: dict[str, Any]
    threads: int
    env: dict[str, str] = field(default_factory=dict)


def forward_engines(cfg: Path, weights: Path, deploy: Path, folded: Path, x_path: Path,
                    opts: BenchOptions) -> list[EngineSpec]:
    t = opts.threads

    def caffe(stem: Path, threads: int) -> dict[str, Any]:
        return {"op": "load", "engine": "caffe", "prototxt": f"{stem}.prototxt",
                "caffemodel": f"{stem}.caffemodel", "input": str(x_path), "threads": threads}

    def opencv_caffe(stem: Path, threads: int, winograd: bool = True) -> dict[str, Any]:
        return {"op": "load", "engine": "opencv_caffe", "prototxt": f"{stem}.prototxt",
                "caffemodel": f"{stem}.caffemodel", "input": str(x_path), "threads": threads,
                "winograd": winograd}

    specs = [
        EngineSpec("darknet", {"op": "load", "engine": "darknet", "cfg": str(cfg), "weights": str(weights),
                               "input": str(x_path)}, 1),
        EngineSpec("caffe", caffe(deploy, t), t, blas_env(t)),
        EngineSpec("caffe_folded", caffe(folded, t), t, blas_env(t)),
        EngineSpec("opencv_darknet", {"op": "load", "engine": "opencv_darknet", "cfg": str(cfg),
                                      "weights": str(weights), "input": str(x_path), "threads": t}, t),
        EngineSpec("opencv_caffe", opencv_caffe(folded, t), t),
        # OpenCV's lead over Caffe is its Winograd 3x3 convolution (Caffe has only im2col + GEMM):
        # the same files with Winograd off show the like-for-like algorithm.
        EngineSpec("opencv_caffe_no_winograd", opencv_caffe(folded, t, winograd=False), t),
    ]
    if opts.one_thread_rows and t != 1:
        specs += [EngineSpec("caffe_folded_1t", caffe(folded, 1), 1, blas_env(1)),
                  EngineSpec("opencv_caffe_1t", opencv_caffe(folded, 1), 1)]
    return specs


def blas_env(threads: int) -> dict[str, str]:
    """OpenBLAS (pthread or OpenMP build) reads these once, when the library loads."""
    return {"OPENBLAS_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}


def measure_forward(cfg: Path, weights: Path, deploy: Path, folded: Path, x_path: Path,
                    opts: BenchOptions, bar: Any, model: str) -> dict[str, Any]:
    """Median of N after warm-up per engine, interleaved round by round; an engine that cannot
    load this model (e.g. Debian's Darknet on an AlexeyAB cfg) is reported, not fatal."""
    specs = forward_engines(cfg, weights, deploy, folded, x_path, opts)
    workers: dict[str, Worker] = {}
    info: dict[str, Any] = {}
    failed: dict[str, str] = {}
    times: dict[str, list[float]] = {s.name: [] for s in specs}
    cpu: dict[str, list[float]] = {s.name: [] for s in specs}
    try:
        for s in specs:
            bar.set_postfix_str(f"{model}: loading {s.name}")
            worker = Worker(s.name, s.env)
            try:
                info[s.name] = worker.request(s.load)
                worker.request({"op": "forward"})  # a first forward proves the engine runs this model
            except EngineError as exc:
                failed[s.name] = str(exc)
                worker.close()
                continue
            workers[s.name] = worker
        if not workers:
            raise EngineError(f"no engine could run {model}: " + "; ".join(f"{k}: {v}" for k, v in failed.items()))
        warm: dict[str, float] = {}
        for name, w in workers.items():
            bar.set_postfix_str(f"{model}: warm-up {name}")
            elapsed = 0.0
            for _ in range(opts.warmup):
                elapsed = w.request({"op": "forward"})["ms"] / 1e3
                time.sleep(ENGINE_GAP_S)
            warm[name] = elapsed
        # Slow engines (Darknet on yolov3 takes ~10 s a forward) get fewer runs, never fewer than 2.
        planned = {name: opts.repeat if warm[name] <= 0 else
                   max(min(2, opts.repeat), min(opts.repeat, int(opts.budget_s / warm[name])))
                   for name in workers}
        for round_index in range(max(planned.values())):
            for name, w in workers.items():
                if round_index >= planned[name]:
                    continue
                bar.set_postfix_str(f"{model}: {name} {round_index + 1}/{planned[name]}")
                reply = w.request({"op": "forward"})
                times[name].append(reply["ms"])
                cpu[name].append(reply["cpu_ms"])
                time.sleep(ENGINE_GAP_S)
        for name in PROFILED_ENGINES:
            if name in workers:
                bar.set_postfix_str(f"{model}: per-layer profile of {name}")
                info[name]["profile"] = workers[name].request({"op": "profile", "runs": min(3, opts.repeat)})
                info[name]["profile"].pop("ok", None)
                time.sleep(ENGINE_GAP_S)
    finally:
        for w in workers.values():
            w.close()
    forward: dict[str, Any] = {}
    for s in specs:
        ts = times[s.name]
        if s.name in failed:
            forward[s.name] = {"error": failed[s.name], "threads": s.threads, "files": _forward_files(s.name)}
            continue
        forward[s.name] = {"median_ms": statistics.median(ts), "min_ms": min(ts), "runs": len(ts),
                           "cpu_ms": statistics.median(cpu[s.name]), "threads": s.threads,
                           "files": _forward_files(s.name), **{k: v for k, v in info[s.name].items()
                                                              if k in ("blas", "opencv_threads", "profile")}}

    def ms(name: str) -> float | None:
        value = forward.get(name, {}).get("median_ms")
        return None if value is None else round(value, 2)

    def ratio(a: str, b: str) -> float | None:
        x, y = ms(a), ms(b)
        return None if x is None or y is None else x / y

    forward_ms = {name: ms(name) for name in FORWARD_ENGINES}
    one_thread = {name[:-3]: ms(name) for name in forward if name.endswith("_1t")}
    ratios = {"darknet_over_caffe": ratio("darknet", "caffe"),
              "darknet_over_caffe_folded": ratio("darknet", "caffe_folded"),
              "caffe_folded_over_opencv_caffe": ratio("caffe_folded", "opencv_caffe"),
              "caffe_folded_over_opencv_darknet": ratio("caffe_folded", "opencv_darknet"),
              "caffe_folded_over_opencv_caffe_no_winograd": ratio("caffe_folded", "opencv_caffe_no_winograd")}
    if one_thread:
        ratios["darknet_over_caffe_folded_1t"] = ratio("darknet", "caffe_folded_1t")
        ratios["caffe_folded_over_opencv_caffe_1t"] = ratio("caffe_folded_1t", "opencv_caffe_1t")
    return {"forward_ms": forward_ms, "forward_ms_1thread": one_thread or None, "forward": forward,
            "forward_ratios": ratios, "forward_errors": failed or None}


def _forward_files(engine: str) -> str:
    base = engine.removesuffix("_1t").removesuffix("_no_winograd")
    return {"darknet": "darknet cfg+weights", "caffe": "d2c convert", "caffe_folded": "d2c convert --fold-bn",
            "opencv_darknet": "darknet cfg+weights", "opencv_caffe": "d2c convert --fold-bn"}[base]


# ----------------------------------------------------------------------------------------------
# Training: one iteration (forward, backward, update) at batch B in Darknet and in Caffe
# ----------------------------------------------------------------------------------------------

def measure_train(cfg: Path, weights: Path, work: Path, opts: BenchOptions) -> dict[str, Any]:
    from d2c.convert import convert, load_graph

    b = opts.train_batch
    train_cfg = write_cfg_copy(cfg, work / "train" / cfg.name, batch=b, subdivisions=1)
    graph = load_graph(train_cfg)
    net = graph.net
    rng = np.random.default_rng(1)
    x = rng.random((b, net.channels, net.height, net.width), dtype=np.float32)
    truth = random_truth(rng, graph, b)
    np.save(work / "train" / "x.npy", x)
    np.save(work / "train" / "truth.npy", truth)
    try:
        rep = convert(train_cfg, weights, work / "train", train=True, bn=opts.bn, batch=b, name="train")
    except D2CError as exc:
        return {"train": {"reason": f"cannot build the Caffe training net: {exc}"},
                "loss_layer_share": None, "train_iter_ratio": None}
    files = {p.name: p for p in rep.extra}
    caffe_runs = 1
    common = {"x": str(work / "train" / "x.npy"), "truth": str(work / "train" / "truth.npy")}
    caffe_w = Worker("caffe_train", blas_env(opts.threads))
    try:
        caffe_w.request({"op": "load_train", "engine": "caffe", "cfg": str(train_cfg),
                         "prototxt": str(files["train_train.prototxt"]),
                         "caffemodel": str(files["train_train.caffemodel"]), "batch": b, **common})
        caffe_w.request({"op": "train"})       # warm-up: the first pass allocates every blob and diff
        caffe_iters = [caffe_w.request({"op": "train"}) for _ in range(caffe_runs)]
    except EngineError as exc:
        return {"train": {"reason": f"Caffe training iteration failed: {exc}"},
                "loss_layer_share": None, "train_iter_ratio": None}
    finally:
        caffe_w.close()
    # Darknet allocates everything when it parses the cfg: one iteration, no warm-up (it is slow).
    dark_w = Worker("darknet_train", {})
    try:
        dark_w.request({"op": "load_train", "engine": "darknet", "cfg": str(train_cfg),
                        "weights": str(weights), "batch": b, **common})
        dark_iter = dark_w.request({"op": "train"})
    except EngineError as exc:
        return {"train": {"reason": f"Darknet training iteration failed: {exc}"},
                "loss_layer_share": None, "train_iter_ratio": None}
    finally:
        dark_w.close()
    caffe_ms = statistics.median(r["ms"] for r in caffe_iters)
    loss_ms = statistics.median(r["loss_ms"] for r in caffe_iters)
    bn_ms = statistics.median(r["bn_ms"] for r in caffe_iters)
    train = {"batch": b, "size": [net.height, net.width], "bn_mode": opts.bn, "threads_caffe": opts.threads,
             "threads_darknet": 1, "caffe_ms": caffe_ms, "caffe_runs": len(caffe_iters),
             "caffe_ms_all": [round(r["ms"], 1) for r in caffe_iters],
             "loss_layer_ms": loss_ms, "python_bn_ms": bn_ms, "python_bn_share": bn_ms / caffe_ms,
             "darknet_ms": dark_iter["ms"], "darknet_runs": 1,
             "caffe_loss": caffe_iters[-1]["loss"], "darknet_loss": dark_iter["loss"]}
    return {"train": train, "loss_layer_share": loss_ms / caffe_ms, "train_iter_ratio": caffe_ms / dark_iter["ms"]}


def random_truth(rng: np.random.Generator, graph: Any, batch: int) -> np.ndarray:
    """Darknet truth records (x, y, w, h, class) per image, zero-padded to the net's box count."""
    from d2c.head_params import PJREDDIE_YOLO_TRUTHS, REGION_MAX_TRUTHS, yolo_default

    heads = graph.heads()
    if not heads:
        raise ParamError("training needs a [yolo] or [region] head")
    boxes = REGION_MAX_TRUTHS if heads[-1].kind == "region" else PJREDDIE_YOLO_TRUTHS
    if graph.flavor != "pjreddie" and heads[-1].kind == "yolo":
        boxes = max(int(h.attrs.get("max_boxes") or yolo_default("max_boxes", graph.flavor)) for h in heads)
    classes = max(1, int(heads[-1].attrs.get("classes") or 1))
    truth = np.zeros((batch, boxes, 5), np.float32)
    k = min(BOXES_PER_IMAGE, boxes)
    truth[:, :k, 0:2] = rng.uniform(0.15, 0.85, (batch, k, 2))
    truth[:, :k, 2:4] = rng.uniform(0.05, 0.4, (batch, k, 2))
    truth[:, :k, 4] = rng.integers(0, classes, (batch, k))
    return truth.reshape(batch, boxes * 5)


# ----------------------------------------------------------------------------------------------
# d2c parity wall time
# ----------------------------------------------------------------------------------------------

def time_parity(work: Path) -> dict[str, Any]:
    """Wall time of `d2c parity` on the default model, as a user runs it (a fresh process)."""
    if not (REPO_ROOT / "d2c" / "parity.py").is_file():
        return {"seconds": None, "reason": "d2c/parity.py does not exist yet"}
    work.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "d2c.cli", "parity", str(TINY_CFG), str(TINY_WEIGHTS),
           "--json", str(work / "parity.json")]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=work, env=_child_env({}), timeout=1800)
    seconds = time.perf_counter() - start
    out = {"seconds": seconds, "exit_code": proc.returncode, "command": "d2c " + " ".join(cmd[3:])}
    if proc.returncode not in (0, 1):  # 1 = ran to the end, some check out of tolerance: still timed
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        out.update(seconds=None, reason=f"`d2c parity` failed (exit {proc.returncode}): {tail}")
    elif proc.returncode == 1:
        out["note"] = "parity ran to the end but reported a check out of tolerance"
    return out


# ----------------------------------------------------------------------------------------------
# Workers: a `_Handler` in a child process (d2c.child, the protocol the Darknet engines use too)
# ----------------------------------------------------------------------------------------------

def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("GLOG_minloglevel", "2")
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra)
    return env


class Worker(Child):
    """A child interpreter whose `_Handler` answers one request dict at a time; its output goes to a log."""

    def __init__(self, name: str, env: dict[str, str]) -> None:
        super().__init__("d2c.bench:_Handler", name=f"bench worker '{name}'", env=env)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """The handler's reply to {"op": ..., ...}; EngineError if it failed or the worker died."""
        return {"ok": True, **self.call("handle", message)}


def run_once(message: dict[str, Any]) -> dict[str, Any]:
    """A fresh worker for one request (conversions: peak RSS must be this request's alone)."""
    w = Worker(message["op"], {})
    try:
        return w.request(message)
    finally:
        w.close()


def _rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


class _Handler:
    """What a worker can do; state (the loaded engine) lives on the instance."""

    def __init__(self) -> None:
        self.forward: Callable[[], None] | None = None
        self.profile_fn: Callable[[int], dict[str, Any]] | None = None
        self.train: Callable[[], float] | None = None
        self.timers: dict[str, float] = {"loss": 0.0, "bn": 0.0}

    def handle(self, m: dict[str, Any]) -> dict[str, Any]:
        """Dispatch one request by its "op"."""
        ops: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "baseline": self.baseline, "convert": self.convert, "load": self.load,
            "forward": self.do_forward, "profile": self.do_profile, "load_train": self.load_train,
            "train": self.do_train}
        if m.get("op") not in ops:
            raise ParamError(f"unknown request {m.get('op')!r}")
        return ops[m["op"]](m)

    # --- one-shot measurements --------------------------------------------------------------
    def baseline(self, m: dict[str, Any]) -> dict[str, Any]:
        """Read the .weights with numpy and write the same bytes (fsync + rename, as convert does)."""
        start_rss = _rss_mb()
        t0 = time.perf_counter()
        data = np.fromfile(m["weights"], dtype=np.uint8)
        out = Path(m["out"])
        tmp = out.with_name(f".{out.name}.tmp")
        with open(tmp, "wb") as handle:
            handle.write(memoryview(data))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "start_rss_mb": start_rss, "peak_rss_mb": _peak_rss_mb()}

    def convert(self, m: dict[str, Any]) -> dict[str, Any]:
        from d2c.convert import convert
        import d2c.caffe.proto  # noqa: F401 - imports are not conversion time
        import d2c.layers  # noqa: F401
        start_rss = _rss_mb()
        t0 = time.perf_counter()
        convert(m["cfg"], m["weights"], m["out"], fold_bn=m["fold_bn"])
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "start_rss_mb": start_rss, "peak_rss_mb": _peak_rss_mb()}

    # --- forward engines ----------------------------------------------------------------------
    def load(self, m: dict[str, Any]) -> dict[str, Any]:
        x = np.load(m["input"])
        engine = m["engine"]
        info: dict[str, Any] = {}
        if engine == "darknet":
            from d2c.darknet.runtime import DarknetNet
            net = DarknetNet(m["cfg"], m["weights"], batch=1, quiet=True)
            self.forward = lambda: net.forward(x)
        elif engine == "caffe":
            from d2c.engines import import_caffe
            caffe = import_caffe()
            cnet = caffe.Net(m["prototxt"], m["caffemodel"], caffe.TEST)
            data = cnet.blobs["data"]
            if tuple(data.data.shape) != x.shape:
                data.reshape(*x.shape)
                cnet.reshape()

            def caffe_forward() -> None:
                data.data[...] = x
                cnet.forward()
            self.forward = caffe_forward
            self.profile_fn = lambda runs: caffe_profile(cnet, x, runs)
            info["blas"] = blas_info()
        elif engine in ("opencv_darknet", "opencv_caffe"):
            from d2c.engines import import_cv2
            cv2 = import_cv2()
            cv2.setNumThreads(int(m["threads"]))
            if engine == "opencv_darknet":
                cvnet = cv2.dnn.readNetFromDarknet(m["cfg"], m["weights"])
            else:
                cvnet = cv2.dnn.readNetFromCaffe(m["prototxt"], m["caffemodel"])
            if not m.get("winograd", True):
                cvnet.enableWinograd(False)
            cvnet.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
            cvnet.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
            names = cvnet.getUnconnectedOutLayersNames()

            def cv_forward() -> None:
                cvnet.setInput(x)
                cvnet.forward(names)
            self.forward = cv_forward
            self.profile_fn = lambda runs: opencv_profile(cv2, cvnet, x, names, runs)
            info["opencv_threads"] = cv2.getNumThreads()
        else:
            raise ParamError(f"unknown engine {engine!r}")
        return info

    def do_forward(self, m: dict[str, Any]) -> dict[str, Any]:
        if self.forward is None:
            raise ParamError("forward before load")
        c0, t0 = time.process_time(), time.perf_counter()
        self.forward()
        t1, c1 = time.perf_counter(), time.process_time()
        return {"ms": (t1 - t0) * 1e3, "cpu_ms": (c1 - c0) * 1e3}

    def do_profile(self, m: dict[str, Any]) -> dict[str, Any]:
        if self.profile_fn is None:
            raise ParamError("this engine has no per-layer profile")
        return self.profile_fn(int(m.get("runs", 3)))

    # --- training ----------------------------------------------------------------------------
    def load_train(self, m: dict[str, Any]) -> dict[str, Any]:
        x, truth = np.load(m["x"]), np.load(m["truth"])
        if m["engine"] == "darknet":
            from d2c.darknet.runtime import DarknetNet
            net = DarknetNet(m["cfg"], m["weights"], batch=int(m["batch"]), quiet=True)
            self.train = lambda: net.train_datum(x, truth)
            return {}
        from d2c.darknet.cfg import parse_cfg
        from d2c.engines import import_caffe
        from d2c.solver import DarknetSGD, TrainConfig
        caffe = import_caffe()
        self._time_python_layers()
        cnet = caffe.Net(m["prototxt"], m["caffemodel"], caffe.TRAIN)
        cfg = TrainConfig.from_section(parse_cfg(m["cfg"]).net, batch=int(m["batch"]))
        sgd = DarknetSGD(cnet, m["prototxt"], cfg)
        self.train = lambda: sgd.step(cnet, [(x, truth)])
        return {"blas": blas_info()}

    def _time_python_layers(self) -> None:
        """Wrap the Python layers' forward/backward with timers (this worker's classes only)."""
        from d2c.loss import caffe_layers

        def timed(fn: Callable, bucket: str) -> Callable:
            def wrapper(layer: Any, *args: Any) -> Any:
                t0 = time.perf_counter()
                try:
                    return fn(layer, *args)
                finally:
                    self.timers[bucket] += time.perf_counter() - t0
            return wrapper

        for cls_name, bucket in (("YoloLoss", "loss"), ("RegionLoss", "loss"), ("DarknetBatchNorm", "bn")):
            cls = getattr(caffe_layers, cls_name, None)
            if cls is not None:
                cls.forward = timed(cls.forward, bucket)
                cls.backward = timed(cls.backward, bucket)

    def do_train(self, m: dict[str, Any]) -> dict[str, Any]:
        if self.train is None:
            raise ParamError("train before load_train")
        self.timers = {"loss": 0.0, "bn": 0.0}
        t0 = time.perf_counter()
        loss = self.train()
        ms = (time.perf_counter() - t0) * 1e3
        return {"ms": ms, "loss": float(loss), "loss_ms": self.timers["loss"] * 1e3,
                "bn_ms": self.timers["bn"] * 1e3}


def caffe_profile(net: Any, x: np.ndarray, runs: int) -> dict[str, Any]:
    """Per-layer wall time (each layer run alone, `runs` times) and the convolutions' GFLOP/s.

    Why: where Caffe is slower than OpenCV, this says whether GEMM or Caffe's own single-threaded
    loops (im2col, pooling, crop) take the time.
    """
    names = list(net._layer_names)
    total = np.zeros(len(names))
    net.blobs["data"].data[...] = x
    net.forward()
    for _ in range(runs):
        for i in range(len(names)):
            t0 = time.perf_counter()
            net._forward(i, i)
            total[i] += time.perf_counter() - t0
    total = total / runs * 1e3
    types = [net.layers[i].type for i in range(len(names))]
    tops = {name: list(net.top_names[name]) for name in names}
    conv_flops = 0.0
    conv_ms = 0.0
    for i, name in enumerate(names):
        if types[i] == "Convolution":
            w = net.params[name][0].data
            out = net.blobs[tops[name][0]].data
            conv_flops += 2.0 * out.size * int(np.prod(w.shape[1:]))
            conv_ms += total[i]
    return _profile_summary(names, types, total, conv_flops, conv_ms)


def opencv_profile(cv2: Any, net: Any, x: np.ndarray, outputs: Any, runs: int) -> dict[str, Any]:
    """OpenCV's own per-layer timings (getPerfProfile), averaged over `runs` forwards."""
    names = list(net.getLayerNames())
    total = np.zeros(len(names))
    for _ in range(runs):
        net.setInput(x)
        net.forward(outputs)
        _, per_layer = net.getPerfProfile()
        per_layer = np.asarray(per_layer, dtype=np.float64).reshape(-1)
        total[:min(len(names), per_layer.size)] += per_layer[:len(names)]
    total = total / runs * 1e3 / cv2.getTickFrequency()
    types = [net.getLayer(name).type for name in names]
    return _profile_summary(names, types, total, None, None)


def _profile_summary(names: list[str], types: list[str], ms: np.ndarray, conv_flops: float | None,
                     conv_ms: float | None) -> dict[str, Any]:
    by_type: dict[str, float] = {}
    for t, v in zip(types, ms):
        by_type[t] = by_type.get(t, 0.0) + float(v)
    order = np.argsort(-ms)[:8]
    out: dict[str, Any] = {"total_ms": round(float(ms.sum()), 2),
                           "by_type_ms": {k: round(v, 2) for k, v in sorted(by_type.items(), key=lambda kv: -kv[1])},
                           "top_layers_ms": [[names[i], types[i], round(float(ms[i]), 2)] for i in order]}
    if conv_flops:
        out["conv_gflop"] = round(conv_flops / 1e9, 3)
        out["conv_gflops_per_s"] = round(conv_flops / 1e9 / (conv_ms / 1e3), 1) if conv_ms else None
    return out


def blas_info() -> dict[str, Any]:
    """Which BLAS this process loaded (from /proc/self/maps) and how OpenBLAS configured itself."""
    import ctypes
    libs = set()
    with open("/proc/self/maps") as handle:
        for line in handle:
            path = line.split()[-1] if "/" in line else ""
            if any(key in Path(path).name for key in ("openblas", "blis", "libblas", "mkl")):
                libs.add(path)
    info: dict[str, Any] = {"libraries": sorted(libs)}
    # numpy/scipy wheels bundle their own OpenBLAS (under *.libs/): Caffe's is the system one.
    for path in sorted(libs, key=lambda p: ".libs/" in p):
        if "openblas" not in path:
            continue
        with contextlib.suppress(OSError, AttributeError):
            lib = ctypes.CDLL(path)
            lib.openblas_get_config.restype = ctypes.c_char_p
            lib.openblas_get_corename.restype = ctypes.c_char_p
            info.update(config=lib.openblas_get_config().decode(), core=lib.openblas_get_corename().decode(),
                        threads=int(lib.openblas_get_num_threads()),
                        parallel={0: "sequential", 1: "pthreads", 2: "openmp"}.get(
                            int(lib.openblas_get_parallel()), "unknown"))
            break
    return info


# ----------------------------------------------------------------------------------------------
# Machine description, summary, table
# ----------------------------------------------------------------------------------------------

def machine_info(opts: BenchOptions) -> dict[str, Any]:
    cpu = "unknown"
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_gb = round(int(Path("/proc/meminfo").read_text().split()[1]) / 2**20, 1)
    env_keys = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENCV_FOR_THREADS_NUM")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
        "simd": [f for f in ("sse4_2", "avx", "avx2", "fma", "avx512f") if f in flags],
        "memory_gb": mem_gb, "kernel": platform.release(), "python": platform.python_version(),
        "numpy": np.__version__,
        "threads": {"caffe_openblas": opts.threads, "opencv": opts.threads, "darknet": 1,
                    "note": "Debian's pjreddie Darknet CPU build has no threading; 1-thread rows "
                            "for Caffe and OpenCV give the like-for-like comparison"},
        "env": {k: os.environ.get(k) for k in env_keys},
        "load_average_start": list(os.getloadavg()),
    }


def _engine_versions(results: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        import cv2
        out["opencv"] = cv2.__version__
    import importlib.util
    found = importlib.util.find_spec("caffe")
    caffe_dir = Path(found.origin).parent if found and found.origin else None
    out["caffe"] = {"path": str(caffe_dir) if caffe_dir else None, "build": caffe_build_info(caffe_dir)}
    for record in results:
        blas = (record.get("forward", {}).get("caffe") or {}).get("blas")
        if blas:
            out["caffe"]["blas"] = blas
            break
    from d2c.engines import _dpkg_version
    out["darknet"] = f"Debian darknet {_dpkg_version('darknet')} (pjreddie, CPU)"
    return out


def summarise(results: list[dict[str, Any]], parity: dict[str, Any], machine: dict[str, Any],
              opts: BenchOptions) -> dict[str, Any]:
    """Top-level keys other tools read, each from the model its target is about."""
    by_name = {r["name"]: r for r in results}
    largest = max(results, key=lambda r: r["weights_bytes"])
    first = results[0]
    trained = next((r for r in results if r.get("train_iter_ratio") is not None), first)
    report: dict[str, Any] = {
        "convert_ratio": largest["convert_ratio"],
        "peak_rss_ratio": largest["peak_rss_ratio"],
        "peak_rss_mb": largest["convert"]["peak_rss_mb"],
        "forward_ms": first["forward_ms"],
        "loss_layer_share": trained.get("loss_layer_share"),
        "train_iter_ratio": trained.get("train_iter_ratio"),
        "parity_s": parity.get("seconds"),
        "machine": machine,
        "summary_models": {"convert_ratio": largest["name"], "peak_rss_ratio": largest["name"],
                           "forward_ms": first["name"], "loss_layer_share": trained["name"],
                           "train_iter_ratio": trained["name"], "parity_s": "yolov3-tiny"},
        "parity": parity,
        "options": {"repeat": opts.repeat, "warmup": opts.warmup, "threads": opts.threads,
                    "train_batch": opts.train_batch, "bn": opts.bn, "budget_s": opts.budget_s,
                    "quick": opts.quick},
        "models": by_name,
    }
    if trained.get("train_iter_ratio") is None:
        report["train_reason"] = (trained.get("train") or {}).get("reason")
    report["targets"] = targets(results, report)
    return report


def targets(results: list[dict[str, Any]], report: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, model: str, value: float | None, limit: float, higher_is_better: bool = False) -> None:
        ok = None if value is None else (value >= limit if higher_is_better else value <= limit)
        out.append({"target": name, "model": model, "value": value, "limit": limit, "ok": ok})

    # The conversion targets are about big files (yolov3, 248 MB): on a 34 MB file the fixed cost
    # of parsing the cfg and writing three files dominates, so only the largest model is judged.
    largest = max(results, key=lambda r: r["weights_bytes"])
    add("convert time / read+write baseline", largest["name"], largest["convert_ratio"], TARGET_CONVERT_RATIO)
    add("(convert peak RSS - interpreter RSS) / weights size", largest["name"],
        largest["convert"]["peak_rss_over_start_ratio"], TARGET_PEAK_RSS_RATIO)
    for r in results:
        fr = r["forward_ratios"]
        add("Darknet forward / Caffe --fold-bn forward", r["name"], fr["darknet_over_caffe_folded"],
            TARGET_DARKNET_SPEEDUP, higher_is_better=True)
        add("Caffe --fold-bn forward / OpenCV forward (same files)", r["name"],
            fr["caffe_folded_over_opencv_caffe"], TARGET_OPENCV_RATIO)
        if r.get("train_iter_ratio") is not None:
            add("Python loss layer share of a Caffe training iteration", r["name"], r["loss_layer_share"],
                TARGET_LOSS_SHARE)
            add("Caffe training iteration / Darknet's", r["name"], r["train_iter_ratio"], TARGET_TRAIN_RATIO)
    return out


def _fmt(value: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def format_report(report: dict[str, Any]) -> str:
    m = report["machine"]
    caffe = m.get("caffe") or {}
    build = caffe.get("build") or {}
    blas = caffe.get("blas") or {}
    lines = [
        f"d2c bench, {m['date']}: {m['cpu']}, {m['cores_usable']} cores ({', '.join(m['simd'])}), "
        f"{m['memory_gb']} GB, load {m['load_average_start'][0]:.1f} -> {m['load_average_end'][0]:.1f}",
        f"  Caffe: {build.get('cxxflags', '?')}, patches: {', '.join(build.get('patches') or ['none'])}, "
        f"BLAS {blas.get('config', '?')} "
        f"({blas.get('parallel', '?')}, core {blas.get('core', '?')}); OpenCV {m.get('opencv')}; "
        f"numpy {m['numpy']}; {m.get('darknet')}",
        f"  threads: Caffe/OpenCV {m['threads']['caffe_openblas']}, Darknet 1 (its CPU build has no threads)",
        "",
        f"{'conversion':14s} {'weights':>9s} {'convert':>9s} {'baseline':>9s} {'ratio':>6s} "
        f"{'peak RSS':>9s} {'/weights':>8s} {'(-start)':>8s} {'fold-bn':>9s} {'ratio':>6s} {'peak':>8s}",
    ]
    for r in report["models"].values():
        c, f, b = r["convert"], r["convert_folded"], r["baseline"]
        lines.append(
            f"{r['name']:14s} {r['weights_bytes'] / 2**20:7.1f}MB {c['seconds']:8.2f}s {b['seconds']:8.2f}s "
            f"{c['ratio']:6.2f} {c['peak_rss_mb']:7.0f}MB {c['peak_rss_ratio']:8.2f} "
            f"{c['peak_rss_over_start_ratio']:8.2f} {f['seconds']:8.2f}s {f['ratio']:6.2f} {f['peak_rss_mb']:6.0f}MB")
    lines += ["", "forward, batch 1, median ms (runs)"]
    engines = list(FORWARD_ENGINES) + ["opencv_caffe_no_winograd", "caffe_folded_1t", "opencv_caffe_1t"]
    widths = {e: max(17, len(e)) for e in engines}
    header = f"{'model':14s}" + "".join(f" {e:>{widths[e]}s}" for e in engines)
    lines.append(header)
    for r in report["models"].values():
        cells = []
        for e in engines:
            v, w = r["forward"].get(e), widths[e]
            cells.append(f" {'':>{w}s}" if v is None else f" {'failed':>{w}s}" if "error" in v else
                         f" {v['median_ms']:>{w - 8}.1f} ({v['runs']:2d},{v['threads']}t)")
        lines.append(f"{r['name']:14s}" + "".join(cells))
    lines += ["", "ratios: Darknet / Caffe --fold-bn (target >= 6.7), Caffe --fold-bn / OpenCV on the same files "
                  "(target <= 1.2)"]
    for r in report["models"].values():
        fr = r["forward_ratios"]
        extra = ""
        if "darknet_over_caffe_folded_1t" in fr:
            extra = (f"; at 1 thread: {_fmt(fr['darknet_over_caffe_folded_1t'], '.2f', 'x')}, "
                     f"{_fmt(fr['caffe_folded_over_opencv_caffe_1t'])}")
        lines.append(f"  {r['name']:14s} Darknet/Caffe {_fmt(fr['darknet_over_caffe'], '.2f', 'x')}, "
                     f"Darknet/Caffe-folded {_fmt(fr['darknet_over_caffe_folded'], '.2f', 'x')}, "
                     f"Caffe-folded/OpenCV-Caffe {_fmt(fr['caffe_folded_over_opencv_caffe'])}, "
                     f"/OpenCV-Darknet {_fmt(fr['caffe_folded_over_opencv_darknet'])}, "
                     f"/OpenCV-Caffe without Winograd "
                     f"{_fmt(fr.get('caffe_folded_over_opencv_caffe_no_winograd'))}{extra}")
        for engine, error in (r.get("forward_errors") or {}).items():
            lines.append(f"    {engine} failed: {error}")
    lines += ["", "where the time goes (per-layer profile, ms by layer type)"]
    for r in report["models"].values():
        for engine in PROFILED_ENGINES:
            prof = (r["forward"].get(engine) or {}).get("profile")
            if not prof:
                continue
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in list(prof["by_type_ms"].items())[:5])
            gf = f"; conv {prof['conv_gflop']:.1f} GFLOP at {prof['conv_gflops_per_s']} GFLOP/s" \
                if prof.get("conv_gflops_per_s") else ""
            lines.append(f"  {r['name']:14s} {engine:16s} total {prof['total_ms']:.1f}: {kinds}{gf}")
    lines.append("")
    for r in report["models"].values():
        t = r.get("train") or {}
        if "caffe_ms" not in t:
            continue
        lines.append(f"training iteration ({r['name']}, batch {t['batch']}, {t['size'][1]}x{t['size'][0]}, "
                     f"BN {t['bn_mode']}): Caffe {t['caffe_ms'] / 1e3:.2f}s ({t['threads_caffe']}t), "
                     f"Darknet {t['darknet_ms'] / 1e3:.2f}s (1t), ratio {r['train_iter_ratio']:.2f}; "
                     f"Python loss layer {t['loss_layer_ms']:.0f} ms = {100 * r['loss_layer_share']:.1f}%, "
                     f"Python BN layers {100 * t['python_bn_share']:.1f}%")
    if report.get("train_reason"):
        lines.append(f"training: n/a ({report['train_reason']})")
    p = report["parity"]
    lines.append(f"d2c parity: {_fmt(p.get('seconds'), '.1f', ' s')}" + (f" ({p['reason']})" if p.get("reason") else ""))
    loader = report.get("loader") or {}
    if "per_core_ratio" in loader:
        from d2c.loader_bench import format_rows
        lines += format_rows(loader)
    elif loader.get("reason"):
        lines.append(f"loader: n/a ({loader['reason']})")
    lines += ["", "targets:"]
    for t in report["targets"]:
        mark = "n/a " if t["ok"] is None else ("PASS" if t["ok"] else "MISS")
        op = ">=" if "Darknet forward /" in t["target"] or "per core" in t["target"] else "<="
        lines.append(f"  {mark} {t['target']} [{t['model']}]: {_fmt(t['value'], '.3f')} ({op} {t['limit']})")
    lines.append(f"bench took {report['bench_seconds']:.0f} s")
    return "\n".join(lines)
