"""`d2c verify MODEL [IMAGES...] --target NAME`: the converted model inside the real toolchain.

Why: a deploy toolchain that loads a file is not yet one that computes the same thing. This runs the
toolchain's own converter and runtime on CPU (in its venv, as a child process: d2c/targets/runner.py),
feeds it the very tensors pycaffe gets, compares every head with pycaffe, and the final detections
(Darknet's decode and NMS over the toolchain's heads) with pycaffe's, or with the real Darknet when
`--weights` is given. Exit 0 only when everything is within the precision's tolerances.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from d2c.errors import D2CError, EngineError
from d2c.targets import REGISTRY, get_target
from d2c.targets.base import Target, toolchain_python

RUNNER = Path(__file__).with_name("runner.py")


@dataclass(frozen=True)
class Tolerances:
    """What `ok` demands: heads against pycaffe, and detections against the reference."""

    head_max_rel: float
    box_max_diff: float       # Darknet box (x, y, w, h relative to the image), max abs difference
    score_max_diff: float
    min_iou: float            # a reference detection is kept by a same-class target box with IoU >= this


F32_TOL = Tolerances(head_max_rel=1e-4, box_max_diff=1e-3, score_max_diff=1e-3, min_iou=0.9)
FP16_TOL = Tolerances(head_max_rel=1e-2, box_max_diff=1e-2, score_max_diff=1e-2, min_iou=0.5)


def tolerances(target: Target) -> Tolerances:
    return FP16_TOL if target.precision.startswith("fp16") else F32_TOL


def model_findings(target: Target, prototxt: Path) -> list[str]:
    """The target's lint over a converted model's prototxt (a model converted for another target)."""
    from d2c.caffe.proto import net_from_prototxt
    net = net_from_prototxt(prototxt.read_text(), str(prototxt))
    return [f.line() for f in target.findings(net.layers, lambda name: str(prototxt))]


def run_toolchain(target: Target, prototxt: Path, caffemodel: Path, x: np.ndarray, outputs: dict[str, list[str]],
                  shapes: dict[str, list[int]], timeout: float = 3600.0,
                  extra: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Convert + run in the toolchain's venv; (blob -> (N, ...) float32, meta). `extra`: more request
    keys (e.g. "mo_args", the preprocessing contract in Model Optimizer's terms)."""
    python = toolchain_python(target)
    with tempfile.TemporaryDirectory(prefix=f"d2c-{target.name}-") as tmp_s:
        tmp = Path(tmp_s)
        np.save(tmp / "x.npy", np.ascontiguousarray(x, dtype=np.float32))
        req = {"target": target.name, "prototxt": str(prototxt.resolve()), "caffemodel": str(caffemodel.resolve()),
               "work": str(tmp), "inputs": str(tmp / "x.npy"), "outputs": outputs, "shapes": shapes,
               "result": str(tmp / "result.npz"), **(extra or {})}
        (tmp / "request.json").write_text(json.dumps(req))
        try:
            done = subprocess.run([str(python), "-P", str(RUNNER), str(tmp / "request.json")], capture_output=True,
                                  text=True, timeout=timeout, cwd=tmp)
        except subprocess.TimeoutExpired:
            raise EngineError(f"{target.name}: the toolchain did not finish within {timeout:.0f} s") from None
        if done.returncode != 0 or not (tmp / "result.npz").exists():
            lines = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
            raise EngineError(f"{target.name} toolchain failed on {prototxt}: "
                              f"{lines[-1] if lines else f'exit status {done.returncode}'}")
        with np.load(tmp / "result.npz") as result:
            meta = json.loads(str(result["meta"]))
            return {b: np.array(result[b]) for b in outputs}, meta


def _iou(a: list[float], b: list[float]) -> float:
    """IoU of two Darknet boxes (centre x, centre y, w, h)."""
    w = min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2)
    h = min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2)
    inter = max(w, 0.0) * max(h, 0.0)
    union = a[2] * a[3] + b[2] * b[3] - inter
    return inter / union if union > 0 else 0.0


def match_detections(ref: list[dict[str, Any]], got: list[dict[str, Any]], min_iou: float) -> dict[str, Any]:
    """Each reference detection against the best unused same-class target one (greedy, reference order)."""
    used: set[int] = set()
    kept, worst_iou, box_diff, score_diff = 0, 1.0, 0.0, 0.0
    for det in ref:
        best, best_iou = None, -1.0
        for j, cand in enumerate(got):
            if j not in used and cand["class"] == det["class"]:
                iou = _iou(det["box"], cand["box"])
                if iou > best_iou:
                    best, best_iou = j, iou
        if best is None or best_iou < min_iou:
            continue
        used.add(best)
        kept += 1
        worst_iou = min(worst_iou, best_iou)
        box_diff = max(box_diff, max(abs(u - v) for u, v in zip(det["box"], got[best]["box"])))
        score_diff = max(score_diff, abs(det["score"] - got[best]["score"]))
    return {"count_ref": len(ref), "count_target": len(got), "kept": kept, "extra": len(got) - kept,
            "class_mismatches": len(ref) - kept, "min_iou": worst_iou if kept else None,
            "max_box_diff": box_diff, "max_score_diff": score_diff}


def verify(model: str | Path, images: list[str | Path] | None = None, target: str | None = None, *,
           weights: str | Path | None = None, thresh: float = 0.25, nms: float = 0.45, seed: int = 0,
           timeout: float = 3600.0) -> dict[str, Any]:
    """Run MODEL in the target's toolchain and compare; returns the JSON report (see module doc)."""
    from d2c.detect import Engine, detections_to_json, load_model_files
    from d2c.image import load_image_rgb

    files = load_model_files(model)
    name = target or (files.sidecar.get("target") or {}).get("name", "caffe")
    tgt = get_target(name)
    problems = model_findings(tgt, files.prototxt)
    if problems:
        raise D2CError(f"{files.prototxt}: not converted for {name} (it would reject {len(problems)} layer(s)); "
                       f"convert with --target {name}", problems)
    heads = files.sidecar["heads"]
    if images and (not heads or any(h["kind"] not in ("yolo", "region") for h in heads)):
        raise D2CError(f"{files.prototxt}: detections need [yolo]/[region] heads; verify without images "
                       "compares the heads only")
    tol = tolerances(tgt)
    reference = Engine(files, "caffe")
    tensors: list[np.ndarray] = []
    ref_heads: list[dict[str, np.ndarray]] = []
    ref_dets: list[list[dict[str, Any]]] = []
    real_forward = reference.forward

    def recording(tensor: np.ndarray) -> dict[str, np.ndarray]:
        tensors.append(np.array(tensor, dtype=np.float32))
        out = real_forward(tensor)
        ref_heads.append(out)
        return out

    reference.forward = recording           # type: ignore[method-assign]
    loaded = [load_image_rgb(p) for p in images or []]
    for image in loaded:
        dets, _ = reference.detect_image(image, thresh, nms=nms)
        ref_dets.append(detections_to_json(dets, thresh))
    if not loaded:
        c = int(files.sidecar["input"].get("channels", 3))
        w, h = files.input_size
        recording(np.random.default_rng(seed).uniform(0, 1, (c, h, w)).astype(np.float32))
    if weights is not None and loaded:
        ref_dets = darknet_detections(files.sidecar, weights, images or [], thresh, nms)
    from d2c.int8_heads import output_blobs
    blobs = output_blobs(files.sidecar) or _last_blob(files.prototxt)    # split heads: their three parts
    outputs = {b: [b] for b in blobs}     # the sidecar's names must be the toolchain's output names
    shapes = {b: list(ref_heads[0][b].shape[1:]) for b in blobs} if heads else {}
    start = time.perf_counter()
    x = np.stack(tensors)
    if tgt.name == "caffe":
        got, meta = {b: np.concatenate([r[b] for r in ref_heads]) for b in blobs}, {"toolchain_version": "pycaffe"}
    elif tgt.name == "opencv":
        opencv = Engine(files, "opencv")
        got = {b: np.concatenate([opencv.forward(t)[b] for t in tensors]) for b in blobs}
        import cv2
        meta = {"toolchain_version": f"OpenCV {cv2.__version__}"}
    else:
        got, meta = run_toolchain(tgt, files.prototxt, files.caffemodel, x, outputs, shapes, timeout)
    seconds = time.perf_counter() - start
    head_rows = []
    for b in blobs:
        ref = np.concatenate([r[b] for r in ref_heads]).astype(np.float64)
        err = float(np.abs(ref - got[b].reshape(ref.shape)).max())
        mag = float(np.abs(ref).max())
        head_rows.append({"name": b, "max_abs": err, "max_rel": err / mag if mag else err})
    det_rows = []
    for k, image in enumerate(loaded):
        replay = Engine.__new__(Engine)
        replay.__dict__.update(reference.__dict__)
        replay.forward = lambda tensor, k=k: {b: got[b][k:k + 1] for b in blobs}  # type: ignore[method-assign]
        dets, _ = replay.detect_image(image, thresh, nms=nms)
        row = match_detections(ref_dets[k], detections_to_json(dets, thresh), tol.min_iou)
        det_rows.append({"image": str(images[k]), **row})
    ok = (all(r["max_rel"] <= tol.head_max_rel for r in head_rows)
          and all(r["kept"] == r["count_ref"] and r["extra"] == 0 and r["max_box_diff"] <= tol.box_max_diff
                  and r["max_score_diff"] <= tol.score_max_diff for r in det_rows))
    return {"ok": ok, "target": tgt.name, "toolchain_version": str(meta.get("toolchain_version")),
            "precision": tgt.precision, "reference": "darknet" if weights is not None and loaded else "pycaffe",
            "tolerances": tol.__dict__, "model": str(files.prototxt), "inputs": len(tensors),
            "convert_seconds": meta.get("convert_seconds"), "seconds": seconds,
            "heads": head_rows, "detections": det_rows}


def darknet_detections(sidecar: dict[str, Any], weights: str | Path, images: list[str | Path], thresh: float,
                       nms: float) -> list[list[dict[str, Any]]]:
    """The real Darknet's detections on the images (the engine of the model's flavor)."""
    from d2c.darknet.runtime import DarknetProcess
    engine = "alexeyab" if sidecar.get("flavor") == "alexeyab" else "debian"
    with DarknetProcess(sidecar["cfg"], weights, engine=engine, batch=1) as net:
        return [net.detect(str(p), thresh=thresh, nms=nms) for p in images]


def _last_blob(prototxt: Path) -> list[str]:
    from d2c.caffe.proto import net_from_prototxt
    from d2c.targets.base import net_outputs
    net = net_from_prototxt(prototxt.read_text(), str(prototxt))
    return sorted(net_outputs(net.layers))


def table(report: dict[str, Any]) -> str:
    lines = [f"d2c verify: {report['model']} in {report['target']} ({report['toolchain_version']}, "
             f"{report['precision']}), {report['inputs']} input(s), {report['seconds']:.1f} s",
             f"  {'head':28s} {'max abs':>10s} {'max rel':>10s}"]
    lines += [f"  {r['name']:28s} {r['max_abs']:10.3g} {r['max_rel']:10.3g}" for r in report["heads"]]
    if report["detections"]:
        lines.append(f"  detections vs {report['reference']}: {'image':24s} ref target kept extra  min IoU  box diff "
                     f"score diff")
        for r in report["detections"]:
            iou = f"{r['min_iou']:.4f}" if r["min_iou"] is not None else "-"
            lines.append(f"  {'':25s}{Path(r['image']).name:24s} {r['count_ref']:3d} {r['count_target']:6d} "
                         f"{r['kept']:4d} {r['extra']:5d} {iou:>8s} {r['max_box_diff']:9.2g} {r['max_score_diff']:10.2g}")
    lines.append(f"  {'OK' if report['ok'] else 'FAILED'} (tolerances: {report['tolerances']})")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="output directory of `d2c convert --target NAME` or its .prototxt")
    p.add_argument("images", nargs="*", help="images for the detection comparison (none: one seeded random input, "
                                             "heads only)")
    p.add_argument("--target", choices=sorted(REGISTRY),
                   help="toolchain to run in (default: the target the model was converted for)")
    p.add_argument("--weights", help="the Darknet .weights the model came from: detections are then compared with "
                                     "the real Darknet (the sidecar's cfg) instead of pycaffe")
    p.add_argument("--thresh", type=float, default=0.25, help="detection threshold (default 0.25)")
    p.add_argument("--nms", type=float, default=0.45, help="NMS IoU (default 0.45)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random input when no image is given")
    p.add_argument("--json", metavar="OUT", help="also write the report as JSON to OUT")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--uint8", action="store_true",
                      help="feed uint8 frames and let the toolchain scale them with the sidecar's preprocessing "
                           "contract; compare with pycaffe on the same bytes and with Darknet's detections")
    mode.add_argument("--int8", action="store_true",
                      help="(rknn) build int8 calibrated on --data, else leave-one-out over the images; score "
                           "against Darknet's fp32 detections (kept, extra, worst IoU, worst score diff)")
    p.add_argument("--data", help="with --int8: calibration images (.data train list, image list or folder)")
    p.add_argument("--fp16-blocks", type=int, nargs="+", metavar="LAYER",
                   help="with --int8: Darknet conv layer indices kept in fp16 (RKNN hybrid quantization)")


def run(args: argparse.Namespace) -> int:
    from d2c.fsutil import atomic_write_text, check_output_file
    if args.json:
        check_output_file(args.json, "--json")
    if (args.data or args.fp16_blocks) and not args.int8:
        raise D2CError("--data and --fp16-blocks describe an int8 build: add --int8")
    if args.uint8 or args.int8:
        from d2c import verify_int8 as v8
        images = [Path(p) for p in args.images]
        target = args.target or "rknn"
        report = (v8.verify_int8(args.model, images, target, data=args.data, fp16_blocks=args.fp16_blocks,
                                 thresh=args.thresh) if args.int8 else
                  v8.verify_uint8(args.model, images, target, thresh=args.thresh))
        print(v8.table(report))
        if args.json:
            atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
        return 0 if report["ok"] else 1
    report = verify(args.model, args.images, args.target, weights=args.weights, thresh=args.thresh, nms=args.nms,
                    seed=args.seed)
    print(table(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    return 0 if report["ok"] else 1
