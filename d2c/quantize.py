"""`d2c quantize MODEL --target rknn --data obj.data`: int8 with calibration from the Darknet dataset,
RKNN's per-layer analysis, and an automatic fp16 fallback until int8 agrees with Darknet.

Why: an int8 build that "mostly works" loses boxes and shifts others; users cannot see which layers
are to blame. This calibrates on the model's own training images (the `.data` file's train list, a
list or a folder), preprocessed by the sidecar's contract; scores int8 against Darknet's fp32
detections on evaluation images (the `.data` valid list, else the calibration images); orders the
conv blocks (front to back, by the accumulated cosine each loses in RKNN's analysis, or by per-block
ablation scored on detections: d2c.int8_ablation) and moves them to fp16 one at a time until every
reference box is kept, none is extra, worst IoU >= 0.95 and worst score diff <= 0.05, or `--max-fp16`
blocks are spent. Where the evaluation images have Darknet label files, it also reports mAP@0.5 of
fp32 and of the chosen build. Writes OUT/<stem>.rknn (the chosen build), OUT/quantize.json,
OUT/sensitivity.png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from d2c.errors import D2CError

TARGETS = ("rknn",)
ORDERS = ("depth", "sensitivity", "ablation")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="output directory of `d2c convert` (use --split-heads for int8-friendly heads) "
                                 "or its .prototxt")
    p.add_argument("--target", choices=TARGETS, default="rknn", help="quantizing toolchain (default rknn: "
                                                                       "RKNN-Toolkit2's rk3588 simulator)")
    p.add_argument("--data", required=True, help="calibration images: a Darknet .data file (its train list), "
                                                 "an image list or a folder")
    p.add_argument("--images", type=int, help="use at most N calibration images (spread over the list)")
    p.add_argument("--eval", help="evaluation images (list, folder or .data: its valid list); default: the "
                                  ".data valid list, else the calibration images")
    p.add_argument("--eval-images", type=int, default=20, help="at most N evaluation images (default 20)")
    p.add_argument("--max-fp16", type=int, default=6, help="at most N conv blocks moved to fp16 (default 6)")
    p.add_argument("--order", choices=ORDERS, default="depth",
                   help="which conv blocks go to fp16 first: front to back (default; early int8 errors are carried "
                        "through the net), by the accumulated cosine each block loses in RKNN's accuracy analysis "
                        "(sensitivity), or by per-block ablation (one build per block with it alone int8, scored on "
                        "detections against Darknet fp32; cached)")
    p.add_argument("--thresh", type=float, default=0.25, help="detection threshold (default 0.25)")
    p.add_argument("-o", "--out", default="out/quantize", help="output directory (default out/quantize)")


def _eval_images(args: argparse.Namespace, calibration: list[Path]) -> list[Path]:
    from d2c.calibration import calibration_images
    from d2c.dataset import DataSpec
    if args.eval:
        source = Path(args.eval)
        if source.suffix == ".data":
            spec = DataSpec.load(source)
            return calibration_images(spec.valid, args.eval_images)
        return calibration_images(source, args.eval_images)
    if Path(args.data).suffix == ".data":
        spec = DataSpec.load(args.data)
        if spec.value("valid") is not None:
            return calibration_images(spec.valid, args.eval_images)
    return calibration[: args.eval_images]


def quantize(model: str | Path, data: str | Path, out: str | Path, *, images: int | None = None,
             eval_images: list[Path] | None = None, max_fp16: int = 6, thresh: float = 0.25,
             order: str = "depth") -> dict[str, Any]:
    """The whole flow; returns the report written to OUT/quantize.json."""
    from d2c.calibration import calibration_images
    from d2c.detect import load_model_files
    from d2c.fsutil import atomic_write_text
    from d2c.int8_rknn import Build, measure, references, sensitivity
    from d2c.preprocess import deploy_preprocess
    if max_fp16 < 0:
        raise D2CError(f"--max-fp16 {max_fp16}: must be >= 0")
    files = load_model_files(model)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    calib = calibration_images(data, images)
    evaluate = eval_images or calib
    refs = references(files, evaluate, "uint8", thresh)
    work = out_dir / ".work"
    analysis, ranking = sensitivity(files, calib, work / "analysis", probe=evaluate[0])
    _plot(out_dir / "sensitivity.png", analysis)
    steps = []
    chosen: list[int] = []
    stem = files.prototxt.stem
    ablation: list[dict[str, Any]] = []
    if order == "ablation":
        from d2c.int8_ablation import ablate, ablation_order
        ablation = ablate(files, calib, evaluate, refs, work, thresh)
        sequence = ablation_order(ablation)
    elif order == "depth":
        sequence = sorted(b for b, _ in ranking)
    elif order == "sensitivity":
        sequence = [b for b, _ in ranking]
    else:
        raise D2CError(f"--order {order}: choose one of {', '.join(ORDERS)}")
    outputs: dict[Path, dict[str, Any]] = {}
    for k in range(0, max_fp16 + 1):
        blocks = sequence[:k]
        build = Build(f"int8 + {k} fp16" if k else "int8", fp16_blocks=blocks if k else None)
        outputs.clear()
        agreement, fp16, seconds = measure(files, build, evaluate, work / f"step{k}", refs=refs, thresh=thresh,
                                           calibration=calib, export=out_dir / f"{stem}.rknn", outputs_into=outputs)
        step = {"fp16_blocks": blocks, "fp16_tensors": fp16, "seconds": round(seconds, 1),
                **{key: v for key, v in agreement.to_json().items() if key != "per_image"},
                "ok": agreement.ok_target}
        steps.append(step)
        print(f"  {build.label:14s} kept {agreement.kept}/{agreement.total} extra {agreement.extra} "
              f"worst IoU {agreement.worst_iou:.3f} worst score diff {agreement.worst_score_diff:.3f}", flush=True)
        chosen = blocks
        if agreement.ok_target or k >= len(sequence):
            break
    pre = deploy_preprocess(files.sidecar, "rknn")
    final = steps[-1]
    map_fp32, map_int8 = map50_pair(files, outputs, evaluate)
    report = {"ok": final["ok"], "target": "rknn", "precision": "int8" if not chosen else "int8+fp16",
              "kept": final["kept"], "total": final["total"], "extra": final["extra"],
              "worst_iou": final["worst_iou"], "worst_score_diff": final["worst_score_diff"],
              "map50_fp32": map_fp32, "map50_int8": map_int8, "fp16_layers": [f"layer{b:03d}" for b in chosen],
              "preprocess": {"mean_values": pre["mean_values"], "std_values": pre["std_values"],
                             "channel_order": pre["channel_order"], "letterbox": pre["letterbox"]},
              "calibration_images": [str(p) for p in calib], "eval_images": [str(p) for p in evaluate],
              "sensitivity": [{"block": b, "entire_cos_drop": c} for b, c in ranking], "order": order,
              "sequence": sequence,
              "ablation": [{k: s[k] for k in ("block", "kept", "total", "extra", "worst_iou", "worst_score_diff",
                                              "head_rel", "damage")} for s in ablation],
              "steps": steps,
              "rknn_model": str(out_dir / f"{stem}.rknn")}
    atomic_write_text(out_dir / "quantize.json", json.dumps(report, indent=1) + "\n")
    return report


def map50_pair(files: Any, outputs: dict[Path, dict[str, Any]], images: list[Path]) -> tuple[float | None,
                                                                                              float | None]:
    """mAP@0.5 of fp32 (d2c's Darknet-exact pycaffe pipeline) and of the toolchain's `outputs` on
    `images`, at Darknet's map threshold 0.005, against their Darknet label files; (None, None)
    when an image has no label file (nothing to score against)."""
    from d2c.dataset import label_path_for, parse_labels
    from d2c.detect import Engine
    from d2c.int8_rknn import detect_outputs
    from d2c.metrics import DEFAULT_THRESH, evaluate, predictions_from_detections
    classes = int(files.sidecar["heads"][-1]["classes"])
    truths = []
    for image in images:
        label = Path(label_path_for(str(image)))
        if not label.is_file():
            return None, None
        truths.append(parse_labels(label, classes)[0])
    if not any(len(t) for t in truths):
        return None, None
    engine = Engine(files, "caffe")
    fp32, int8 = [], []
    for image in images:
        dets, size = engine.detect(image, thresh=DEFAULT_THRESH)       # size: (width, height)
        fp32.append(predictions_from_detections(dets, DEFAULT_THRESH))
        int8.append(predictions_from_detections(detect_outputs(outputs[image], files.sidecar, *size,
                                                               thresh=DEFAULT_THRESH), DEFAULT_THRESH))
    return (round(evaluate(fp32, truths, classes).map50, 6), round(evaluate(int8, truths, classes).map50, 6))


def _plot(path: Path, analysis: list[dict[str, Any]]) -> None:
    from d2c.plots import plot_panels
    xs = list(range(len(analysis)))
    plot_panels(path, [("RKNN accuracy analysis: cosine against fp32 per tensor (in network order)", [
        ("entire (errors accumulated)", xs, [r["entire_cos"] for r in analysis], "tab:blue"),
        ("single (this layer alone)", xs, [r["single_cos"] for r in analysis], "tab:orange")])],
        xlabel="tensor", ylabel="cosine", log_y=False)


def run(args: argparse.Namespace) -> int:
    from d2c.calibration import calibration_images
    from d2c.detect import load_model_files
    if args.max_fp16 < 0:
        raise D2CError(f"--max-fp16 {args.max_fp16}: must be >= 0")
    if not 0 <= args.thresh <= 1:
        raise D2CError(f"--thresh {args.thresh}: must be between 0 and 1")
    load_model_files(args.model)
    calib = calibration_images(args.data, args.images)
    evaluate = _eval_images(args, calib)
    print(f"d2c quantize: {args.model} on {args.target}: {len(calib)} calibration image(s), "
          f"{len(evaluate)} evaluation image(s)")
    report = quantize(args.model, args.data, args.out, images=args.images, eval_images=evaluate,
                      max_fp16=args.max_fp16, thresh=args.thresh, order=args.order)
    print("  sensitivity (accumulated cosine each conv block loses, most sensitive first): " +
          ", ".join(f"layer{s['block']:03d} {s['entire_cos_drop']:.5f}" for s in report["sensitivity"]))
    if report["ablation"]:
        print("  ablation (damage with the block alone int8, the rest fp16; most damaging first): " +
              ", ".join(f"layer{b:03d} {next(s['damage'] for s in report['ablation'] if s['block'] == b):.2f}"
                        for b in report["sequence"]))
    print(f"  fp16 blocks: {', '.join(report['fp16_layers']) or 'none'}; "
          f"{'meets' if report['ok'] else 'misses'} the agreement target")
    print(f"  wrote {report['rknn_model']}, {Path(args.out) / 'quantize.json'}, {Path(args.out) / 'sensitivity.png'}")
    return 0 if report["ok"] else 1

