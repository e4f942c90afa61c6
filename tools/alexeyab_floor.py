#!/usr/bin/env python3
"""The float-order floor of training parity against AlexeyAB's Darknet: the engine against itself.

Why: after training steps d2c and the engine can differ by far more than one rounding (yolov4's head
deltas by ~5e-4 after one step), while every layer of d2c's training forward, fed the engine's own
inputs, matches it to a few 1e-6 (and the non-convolution layers bit for bit). To tell float order
from a semantic difference, the same engine source is built a second time with its own `AVX=1`
Makefile option (8-wide vectorised loops: the same arithmetic summed in another order) and both
builds run the very protocol of `d2c parity`: same cfg, random weights, images and truth. What the
two builds of one engine disagree by is a floor no port can beat; d2c against the engine is then
judged against it. The variant is built once into the d2c cache (`alexeyab-floor-<key>-avx`,
which the runtime never picks) from the source the shipped build was made from.

Usage: .venv/bin/python tools/alexeyab_floor.py CFG [--size 160] [--seed 3] [--lr 0.0001] [--steps 1]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2c.errors import D2CError, EngineError  # noqa: E402

VARIANT_MAKE = ["GPU=0", "CUDNN=0", "OPENCV=0", "OPENMP=0", "AVX=1", "LIBSO=1"]


def variant_dir() -> Path:
    """The AVX=1 build of the engine's own source (built here once, cached beside the shipped build)."""
    from d2c.darknet.alexeyab import _cache_root, version_info

    info = version_info()
    if not info.get("available"):
        raise EngineError(info.get("error", "AlexeyAB's Darknet is not built"))
    source = Path(info.get("source", ""))
    if not source.exists():
        raise EngineError(f"the engine's source {source} is gone; rebuild with tools/build_alexeyab.sh")
    target = _cache_root() / f"alexeyab-floor-{info.get('source_key', 'unknown')}-avx"
    if (target / ".built").is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="d2c-floor-build-") as tmp:
        build = Path(tmp) / "src"
        if source.is_file():
            build.mkdir()
            with tarfile.open(source) as tar:
                for member in tar.getmembers():          # drop the top directory, as --strip-components=1
                    parts = Path(member.name).parts
                    if len(parts) > 1:
                        member.name = str(Path(*parts[1:]))
                        tar.extract(member, build, filter="data")
        else:
            shutil.copytree(source, build, ignore=shutil.ignore_patterns(".git", "*.o", "*.so"))
        print(f"[alexeyab_floor] building the AVX=1 variant of {source} (about 45 s)", file=sys.stderr)
        done = subprocess.run(["make", "-C", str(build), f"-j{os.cpu_count() or 2}", *VARIANT_MAKE],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise EngineError(f"building the AVX=1 variant failed: {done.stderr.strip()[-400:]}")
        stage = Path(str(target) + ".tmp")
        shutil.rmtree(stage, ignore_errors=True)
        (stage / "include").mkdir(parents=True)
        shutil.copy2(build / "libdarknet.so", stage)
        shutil.copy2(build / "include" / "darknet.h", stage / "include")
        (stage / "build-info.json").write_text(json.dumps({"make": "make " + " ".join(VARIANT_MAKE),
                                                           "source": str(source)}) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        stage.rename(target)
        (target / ".built").touch()
    return target


def _rel(theirs: np.ndarray, ours: np.ndarray) -> float:
    t, o = np.asarray(theirs, np.float64), np.asarray(ours, np.float64).reshape(np.shape(theirs))
    mag = float(np.max(np.abs(t))) if t.size else 0.0
    err = float(np.max(np.abs(t - o))) if t.size else 0.0
    return err / mag if mag else err


def engine_floor(cfg_path: str | Path, *, size: int = 160, seed: int = 3, lr: str | None = "0.0001",
                 steps: int = 1, batch: int = 2) -> dict[str, Any]:
    """The shipped engine against its AVX=1 build on `d2c parity`'s protocol (no burn-in, `lr`):
    loss rel (max over mini-batches), head delta rel (each head's delta and what reaches the layer
    below), learned arrays max abs with their largest change, BN statistics rel."""
    from d2c.darknet.runtime import DarknetProcess
    from d2c.darknet.weights import WeightsHeader, random_weights, read_weights, write_weights
    from d2c.parity import DARKNET_DATA, DEFAULT_IMAGES, STATISTICS, _build_copy, load_images, random_truth, \
        training_cfg

    if steps < 1:
        raise D2CError(f"--steps must be >= 1, got {steps}")
    other = variant_dir()
    with tempfile.TemporaryDirectory(prefix="d2c-floor-") as tmp_s:
        tmp = Path(tmp_s)
        overrides = {"burn_in": "0", **({"learning_rate": lr} if lr else {})}
        cfg = training_cfg(cfg_path, tmp, batch, 1, (size, size), overrides)
        graph = _build_copy(cfg_path, cfg, "alexeyab")
        heads = graph.heads()
        header, arrays = WeightsHeader(), random_weights(graph, seed)
        wfile = tmp / "start.weights"
        write_weights(wfile, header, graph, arrays)
        arrays = read_weights(wfile, graph)[1]
        needed = steps * batch
        x_all = load_images([DARKNET_DATA / DEFAULT_IMAGES[k % len(DEFAULT_IMAGES)] for k in range(needed)],
                            size, size)
        truth_all = random_truth(needed, heads[0].attrs["classes"], max(h.attrs["max_boxes"] for h in heads),
                                 seed + 1)
        shipped = DarknetProcess(cfg, wfile, clear=True, engine="alexeyab")
        saved = os.environ.get("D2C_ALEXEYAB_DIR")
        os.environ["D2C_ALEXEYAB_DIR"] = str(other)
        try:
            variant = DarknetProcess(cfg, wfile, clear=True, engine="alexeyab")
        finally:
            if saved is None:
                del os.environ["D2C_ALEXEYAB_DIR"]
            else:
                os.environ["D2C_ALEXEYAB_DIR"] = saved
        with shipped, variant:
            losses, delta_rel = [], 0.0
            for k in range(steps):
                xs, ts = x_all[k * batch:(k + 1) * batch], truth_all[k * batch:(k + 1) * batch]
                a, b = shipped.train_datum(xs, ts), variant.train_datum(xs, ts)
                losses.append(abs(a - b) / max(abs(a), 1e-30))
                if k == 0:
                    for h in heads:
                        for index in (h.index, h.index - 1):
                            delta_rel = max(delta_rel, _rel(shipped.layer_delta(index), variant.layer_delta(index)))
            shipped.save_weights(tmp / "a.weights")
            variant.save_weights(tmp / "b.weights")
        theirs, ours = read_weights(tmp / "a.weights", graph)[1], read_weights(tmp / "b.weights", graph)[1]
        learned, stats, change = 0.0, 0.0, 0.0
        for index, named in theirs.items():
            for name, value in named.items():
                a, b = np.asarray(value, np.float64), np.asarray(ours[index][name], np.float64)
                if name in STATISTICS:
                    stats = max(stats, _rel(a, b))
                else:
                    learned = max(learned, float(np.max(np.abs(a - b))))
                    change = max(change, float(np.max(np.abs(a - arrays[index][name]))))
    return {"cfg": str(cfg_path), "size": size, "seed": seed, "lr": lr, "steps": steps,
            "variant": "make " + " ".join(VARIANT_MAKE), "loss_rel": max(losses), "head_delta_rel": delta_rel,
            "learned_max_abs": learned, "largest_change": change, "stats_max_rel": stats}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cfg", type=Path)
    ap.add_argument("--size", type=int, default=160)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--lr", default="0.0001", help="learning_rate override ('cfg' keeps the cfg's)")
    ap.add_argument("--steps", type=int, default=1)
    args = ap.parse_args()
    try:
        result = engine_floor(args.cfg, size=args.size, seed=args.seed, lr=None if args.lr == "cfg" else args.lr,
                              steps=args.steps)
    except D2CError as exc:
        print(f"alexeyab_floor: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
