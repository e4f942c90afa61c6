#!/usr/bin/env python3
"""Regenerate the README's support table (from the registry) and parity table (measured).

Why generated: both tables must say what the code does and what was measured on this machine,
never what someone remembered. Usage: .venv/bin/python tools/update_readme.py [--skip-parity]
"""
from __future__ import annotations

import argparse
import datetime
import platform
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

import support_table  # noqa: E402

DEBIAN = Path("/usr/share/darknet/cfg")
SHARED = ROOT.parent / "shared" / "darknet-cfg"
DEBIAN_YOLO = ["yolov2-tiny.cfg", "yolov2-tiny-voc.cfg", "yolov2.cfg", "yolov2-voc.cfg", "yolov3-tiny.cfg",
               "yolov3.cfg", "yolov3-spp.cfg", "yolov3-voc.cfg", "yolov3-openimages.cfg"]
ALEXEYAB = ["yolov4.cfg", "yolov4-tiny.cfg", "yolov4-csp.cfg", "yolov4-csp-swish.cfg", "yolov7.cfg",
            "yolov7-tiny.cfg", "yolov3-tiny-prn.cfg", "yolov3_5l.cfg"]


def replace_block(text: str, name: str, body: str) -> str:
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    return pattern.sub(lambda _: f"{start}\n{body.rstrip()}\n{end}", text)


def support_block() -> str:
    rows = support_table.layer_rows()
    acts = support_table.activation_rows()
    lines = ["## Supported Darknet layers", "",
             "Generated from the converter registry by `tools/update_readme.py`; one module per section "
             "in `d2c/layers/`, one test file per section in `tests/layers/`.", "",
             "| Section | What is converted | Stock Caffe layers | Darknet | Tests |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(support_table._cell(c) if i in (1, 2) else c for i, c in enumerate(r)) + " |"
              for r in rows]
    lines += ["", "| Activation | Stock Caffe form | Darknet |", "|---|---|---|"]
    lines += [f"| {a} | {support_table._cell(b)} | {c} |" for a, b, c in acts]
    return "\n".join(lines)


def parity_block() -> str:
    import cv2
    import numpy as np

    from d2c.caffe.emitter import ConvertOptions
    from d2c.caffe.runtime import caffe_forward, load_caffe
    from d2c.convert import build_conversion
    from d2c.forward_check import compare_forward, diff, prepare, random_input, with_input_size
    from d2c.parity import run_parity

    tiny_weights = ROOT / "weights" / "yolov3-tiny.weights"
    lines = ["## Measured parity", "",
             f"Measured by `tools/update_readme.py` on {datetime.date.today()} ({platform.processor() or platform.machine()}, "
             f"{platform.python_version()}, OpenCV {cv2.__version__}). Relative errors are max |a-b| over the blob "
             "divided by max |reference| over the blob, worst layer of the model.", "",
             "### Forward, every layer against the real Darknet (Debian libdarknet.so)", "",
             "| model | weights | input | layers | worst layer rel | OpenCV (our Caffe files) vs pycaffe |",
             "|---|---|---|---|---|---|"]
    report = compare_forward(DEBIAN / "yolov3-tiny.cfg", tiny_weights)
    lines.append(f"| yolov3-tiny | real COCO | 416 | {len(report.layers)} | {report.max_rel:.2g} | "
                 f"{max(report.opencv.values()):.2g} |")
    report = compare_forward(DEBIAN / "yolov3-tiny.cfg", tiny_weights, fold_bn=True, with_opencv=False)
    lines.append(f"| yolov3-tiny `--fold-bn` | real COCO | 416 | {len(report.layers)} | {report.max_rel:.2g} | — |")
    for name in DEBIAN_YOLO:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = with_input_size(DEBIAN / name, 160, 160, Path(tmp))
            report = compare_forward(cfg, None, seed=7)
        lines.append(f"| {name[:-4]} | random (seed 7) | 160 | {len(report.layers)} | {report.max_rel:.2g} | "
                     f"{max(report.opencv.values()):.2g} |")
    lines += ["", "### Forward, AlexeyAB cfgs against OpenCV's Darknet importer (no runnable AlexeyAB Darknet here)",
              "", "| model | input | worst head rel |", "|---|---|---|"]
    for name in ALEXEYAB:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = with_input_size(SHARED / name, 160, 160, Path(tmp))
            graph, header, arrays, weights = prepare(cfg, None, Path(tmp), seed=5)
            x = random_input(graph, 1, 5)
            conv = build_conversion(graph, arrays, header, ConvertOptions(flavor=graph.flavor))
            blobs = caffe_forward(load_caffe(conv.net), {"data": x})
            ref = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
            ref.setInput(x)
            worst = 0.0
            for head in conv.emitter.heads:
                prev = graph.nodes[head.index - 1]
                act = prev.attrs.get("activation", "linear")
                out = ref.forward(f"conv_{prev.index}" if act == "linear" else f"{act}_{head.index}")
                worst = max(worst, diff(out, blobs[head.blob])[1])
        lines.append(f"| {name[:-4]} | 160 | {worst:.2g} |")
    lines += ["", "### Training parity (`d2c parity`), exact BN, Debian-defect emulation on", "",
              "| model | weights | input | b x S | steps | loss rel (max) | head grad rel | learned arrays max abs | "
              "BN stats rel |", "|---|---|---|---|---|---|---|---|---|"]
    cases = [("yolov3-tiny", tiny_weights, 416, 2, 1, 10, {}),
             ("yolov3-tiny", tiny_weights, 160, 2, 2, 3, {"burn_in": "0", "learning_rate": "0.001"}),
             ("yolov2-tiny-voc", None, 160, 2, 1, 10, {}),
             ("yolov2-tiny-voc", None, 160, 4, 1, 3, {"burn_in": "0", "learning_rate": "0.001"})]
    for name, weights, size, b, s, steps, overrides in cases:
        r = run_parity(DEBIAN / f"{name}.cfg", weights, batch=b, subdivisions=s, steps=steps, size=(size, size),
                       net_overrides=overrides)
        note = " (burn-in)" if not overrides else " (lr 0.001, no burn-in)"
        lines.append(f"| {name}{note} | {'real' if weights else 'random'} | {size} | {b} x {s} | {steps} | "
                     f"{r.loss['rel']:.2g} | {r.grad['max_rel']:.2g} | {r.update['max_abs']:.2g} | "
                     f"{r.update['stats_max_rel']:.2g} |")
    del np
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-parity", action="store_true", help="only regenerate the support table")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = replace_block(text, "support-table", support_block())
    if not args.skip_parity:
        text = replace_block(text, "parity-table", parity_block())
    readme.write_text(text)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
