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
sys.path.insert(0, str(ROOT / "tests"))
from shared_cfgs import shared_cfg_dir  # noqa: E402

SHARED = shared_cfg_dir()
DEBIAN_YOLO = ["yolov2-tiny.cfg", "yolov2-tiny-voc.cfg", "yolov2.cfg", "yolov2-voc.cfg", "yolov3-tiny.cfg",
               "yolov3.cfg", "yolov3-spp.cfg", "yolov3-voc.cfg", "yolov3-openimages.cfg"]


#: (cfg stem, real weights?, input size): the `make test` parity matrix (tests/test_parity_matrix.py)
PARITY_MATRIX = [("yolov2-tiny-voc", False, 416), ("yolov3-tiny", True, 416), ("yolov2", False, 416)]


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
    lines += ["", "### Training parity (`d2c parity` defaults), exact BN, Debian-defect emulation on", "",
              "Each cell is value / bound: the bound is derived in the run from the measured difference of the "
              "check's inputs (d2c/tolerances.py) and capped by a fixed ceiling. Batch 1, 10 steps, `burn_in=0` "
              "(parity's default), the cfg's learning rate; each step compared from Darknet's state. yolov2 runs "
              "at 416 rather than its cfg's 608 (12.5 min at 608 on 2 cores).", "",
              "| model | weights | input | forward rel | loss rel | head delta abs (worst head) | update / change | "
              "momentum rel | BN stats rel | largest change | s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, weights, size in PARITY_MATRIX:
        r = run_parity(DEBIAN / f"{name}.cfg", tiny_weights if weights else None, batch=1, steps=10,
                       size=(size, size))
        checks = {c.name: c for c in r.checks}
        head = max((c for c in r.checks if c.name.endswith(" delta")), key=lambda c: c.value / c.bound)
        cell = lambda c: f"{c.value:.2g} / {c.bound:.2g}" + ("" if c.ok else " FAIL")  # noqa: E731
        lines.append(f"| {name} | {'real' if weights else 'random'} | {size} | {cell(checks['forward'])} | "
                     f"{cell(checks['loss'])} | {cell(head)} ({head.name.split(' delta')[0]}) | "
                     f"{cell(checks['update'])} | {cell(checks['momentum'])} | {cell(checks['BN statistics'])} | "
                     f"{r.update['largest_change']:.2g} | {r.seconds:.0f} |")
    del np
    return "\n".join(lines)


def alexeyab_block() -> str:
    """AlexeyAB's Darknet (built by tools/build_alexeyab.sh) against d2c: every layer, detection, training."""
    import cv2
    import numpy as np

    from d2c.caffe.emitter import ConvertOptions
    from d2c.caffe.runtime import caffe_forward, load_caffe
    from d2c.convert import build_conversion, convert
    from d2c.darknet.alexeyab import version_info
    from d2c.darknet.runtime import DarknetProcess
    from d2c.darknet.weights import write_weights
    from d2c.detect import Engine, detections_to_json, load_model_files
    from d2c.forward_check import compare_forward, diff, prepare, random_input, with_input_size
    from d2c.parity import run_parity

    info = version_info()
    lines = ["## Measured parity against AlexeyAB's Darknet", "",
             f"Measured by `tools/update_readme.py` on {datetime.date.today()} against AlexeyAB's Darknet at commit "
             f"{info['commit'][:7]}, built CPU-only by `tools/build_alexeyab.sh` ({info['make']}, {info['opts']}); "
             "random weights (seed 7), converted with AlexeyAB semantics.", "",
             "### Forward, every layer", "",
             "| model | input | layers | worst layer rel | worst layer | OpenCV's Darknet importer vs pycaffe (heads) |",
             "|---|---|---|---|---|---|"]
    for cfg_path in sorted(SHARED.glob("*.cfg")):
        size = 256 if "reorg" in cfg_path.name else 160
        with tempfile.TemporaryDirectory() as tmp:
            cfg = with_input_size(cfg_path, size, size, Path(tmp))
            report = compare_forward(cfg, None, seed=7, with_opencv=False, engine="alexeyab")
            worst = max(report.layers, key=lambda d: d.max_rel)
            opencv = "— (no [reorg3d] in OpenCV)"
            if "reorg" not in cfg_path.name:
                graph, header, arrays, weights = prepare(cfg, None, Path(tmp), seed=7, flavor="alexeyab")
                x = random_input(graph, 1, 7)
                conv = build_conversion(graph, arrays, header, ConvertOptions(flavor="alexeyab"))
                blobs = caffe_forward(load_caffe(conv.net), {"data": x})
                ref = cv2.dnn.readNetFromDarknet(str(cfg), str(weights))
                ref.setInput(x)
                rel = 0.0
                for head in conv.emitter.heads:
                    prev = graph.nodes[head.index - 1]
                    act = prev.attrs.get("activation", "linear")
                    out = ref.forward(f"conv_{prev.index}" if act == "linear" else f"{act}_{head.index}")
                    rel = max(rel, diff(out, blobs[head.blob])[1])
                opencv = f"{rel:.2g}"
        lines.append(f"| {cfg_path.stem} | {size} | {len(report.layers)} | {report.max_rel:.2g} | "
                     f"{worst.index} {worst.kind} | {opencv} |")
    lines += ["", "### Detection against its own detector (test_detector's pipeline)", "",
              "Darknet's 7 sample images as PNG (the engine decodes JPEG with its bundled stb_image, d2c with "
              "libjpeg; they differ by up to 3/255 per pixel), head convolutions x3, threshold 0.4.", "",
              "| model | letter_box | NMS | detections | near-tie order swaps | score max abs | box max abs |",
              "|---|---|---|---|---|---|---|"]
    samples = ["dog.jpg", "horses.jpg", "person.jpg", "eagle.jpg", "giraffe.jpg", "kite.jpg", "scream.jpg"]
    for name in ("yolov4-tiny.cfg", "yolov7-tiny.cfg", "yolov4-csp.cfg"):
        with tempfile.TemporaryDirectory() as tmp_s:
            tmp = Path(tmp_s)
            cfg = with_input_size(SHARED / name, 160, 160, tmp)
            graph, header, arrays, weights = prepare(cfg, None, tmp, seed=7, flavor="alexeyab")
            for head in graph.heads():
                for key in ("weights", "biases"):
                    arrays[head.index - 1][key] = arrays[head.index - 1][key] * np.float32(3)
            write_weights(weights, header, graph, arrays)
            convert(cfg, weights, tmp / "m", flavor="alexeyab")
            engine = Engine(load_model_files(tmp / "m"))
            side = engine.files.sidecar
            count, swaps, score_err, box_err = 0, 0, 0.0, 0.0
            with DarknetProcess(cfg, weights, engine="alexeyab", batch=1) as dn:
                for sample in samples:
                    png = tmp / sample.replace(".jpg", ".png")
                    cv2.imwrite(str(png), cv2.imread(str(Path("/usr/share/darknet/data") / sample)))
                    theirs = dn.detect(png, thresh=0.4)
                    ours = detections_to_json(engine.detect(png, 0.4)[0], 0.4)
                    used: set[int] = set()
                    for i, a in enumerate(theirs):    # same position, or a near-tie neighbour of the same class
                        near = [j for j in range(max(0, i - 8), min(len(ours), i + 9))
                                if j not in used and ours[j]["class"] == a["class"]]
                        j = min(near, key=lambda k: (max(abs(u - v) for u, v in zip(ours[k]["box"], a["box"])),
                                                     abs(ours[k]["score"] - a["score"]), abs(k - i)))
                        used.add(j)
                        swaps += j != i
                        score_err = max(score_err, abs(a["score"] - ours[j]["score"]))
                        box_err = max(box_err, max(abs(u - v) for u, v in zip(a["box"], ours[j]["box"])))
                    count += len(theirs)
        lines.append(f"| {name[:-4]} | {side['input']['letter_box']} | {side['heads'][-1]['nms_kind']} | {count} | "
                     f"{swaps} | {score_err:.2g} | {box_err:.2g} |")
    lines += ["", "### Training parity (`d2c parity --darknet-engine alexeyab`), exact BN, CPU-build emulation on", "",
              "Random weights, 160 px, batch 2, `burn_in=0` so the weights move; each step is compared from the "
              "engine's state (Caffe resynchronised to its arrays after every step). Learned arrays: max abs "
              "difference and, in brackets, the largest change of any learned array. Floor: the same engine "
              "built with its own `AVX=1` option against the shipped build, one step, same protocol "
              "(`tools/alexeyab_floor.py`): head delta rel / BN stats rel / learned max abs.", "",
              "| model | seed | lr | steps | loss rel (max) | head delta rel | learned arrays max abs (change) | "
              "BN stats rel | floor: engine vs its AVX=1 build | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    from alexeyab_floor import engine_floor
    cases = [("yolov4-tiny", 3, None, 1, "", False),
             ("yolov4-tiny", 3, "0.0001", 10, "learned: 1 ulp on the 7 steps without a flip; on 3, a leaky "
              "pre-activation within float order of zero takes the other sign in 1-3 places (gradient x0.1 "
              "instead of x1)", True),
             ("yolov4", 3, "0.0001", 10, "float-order floor: no layer of the training forward differs by more than its "
              "rounding (4.6e-6 fed the engine's inputs), batch-statistics BN amplifies it through 160 layers "
              "(1e-3 at the last); the engine's own builds disagree as much", True),
             ("yolov7-tiny", 3, "0.0001", 10, "objectness_smooth; head delta at the float-order floor (the engine's "
              "own builds disagree by 4e-5); learned: leaky sign flips as for yolov4-tiny", True)]
    for name, seed, lr, steps, note, floor in cases:
        overrides = {"burn_in": "0", **({"learning_rate": lr} if lr else {})}
        r = run_parity(SHARED / f"{name}.cfg", None, batch=2, steps=steps, size=(160, 160), seed=seed,
                       net_overrides=overrides)
        change = max(row["moved"] for row in r.update["arrays"] if row["array"] in ("weights", "scales", "biases"))
        cell = "—"
        if floor:
            f = engine_floor(SHARED / f"{name}.cfg", size=160, seed=seed, lr=lr, steps=1)
            cell = f"{f['head_delta_rel']:.2g} / {f['stats_max_rel']:.2g} / {f['learned_max_abs']:.2g}"
        lines.append(f"| {name} | {seed} | {lr or 'cfg'} | {steps} | {r.loss['rel']:.2g} | {r.grad['max_rel']:.2g} | "
                     f"{r.update['max_abs']:.2g} ({change:.2g}) | {r.update['stats_max_rel']:.2g} | {cell} | {note} |")
    return "\n".join(lines)


def targets_block() -> str:
    """The deploy-target matrix, rendered from docs/targets-matrix.json (tools/targets_matrix.py measures it)."""
    import json

    from d2c.targets import REGISTRY
    data = json.loads((ROOT / "docs" / "targets-matrix.json").read_text())
    cases = data["cases"]
    targets = [t for t in ("opencv", "openvino", "mnn", "rknn") if any(c["target"] == t for c in cases.values())]
    lines = ["## Deploy targets", "",
             "`d2c convert --target NAME` lints the net against the named toolchain's Caffe importer (every layer it "
             "would reject, with its cfg line) and applies exact rewrites where it lacks something; `d2c verify MODEL "
             "[IMAGES]` runs the model in the real toolchain (its own venv, from `make targets`) and compares heads with "
             "pycaffe and detections with Darknet (`--weights`) or pycaffe.", "",
             "| target | toolchain | precision | rewrites applied when needed | importer facts |", "|---|---|---|---|---|"]
    for name, target in REGISTRY.items():
        fixes = sorted(set(target.type_rewrites.values()) | {r.rewrite for r in target.rules if r.rewrite})
        status = f" — not runnable here: {target.not_runnable}" if target.not_runnable else ""
        lines.append(f"| `{name}` | {support_table._cell(target.summary + status)} | "
                     f"{support_table._cell(target.precision)} | {', '.join(f'`{f}`' for f in fixes) or '—'} | "
                     f"{support_table._cell(target.source)} |")
    lines += ["", f"Measured by `tools/targets_matrix.py` ({data.get('measured', '?')}): worst head max relative "
              "error against pycaffe, per model and target (random weights, seed 7, 160 px unless noted; `✗` a "
              "model the toolchain or d2c refused, with the reason in `docs/targets-matrix.json`; `—` not measured yet: "
              "OpenVINO's Model Optimizer takes minutes per deep net, and `tools/targets_matrix.py --targets openvino` "
              "fills the cell in; the yolov4 cell at 64 px measured 7.4e-07).", "",
              "| model | input | " + " | ".join(targets) + " |", "|---|---|" + "---|" * len(targets)]
    import targets_matrix
    order = [label for label, *_ in targets_matrix.models()]
    labels = sorted(dict.fromkeys(c["model"] for c in cases.values()),
                    key=lambda m: order.index(m) if m in order else len(order))
    for label in labels:
        row = [f"{label}", str(next(c["size"] for c in cases.values() if c["model"] == label))]
        for t in targets:
            c = cases.get(f"{label} | {t}")
            row.append("—" if c is None else ("✗" if not c["converts"] else
                                              f"{c['head_max_rel']:.2g}" + ("" if c["ok"] else " (not ok)")))
        lines.append("| " + " | ".join(row) + " |")
    real = [c for c in cases.values() if c.get("detections")]
    if real:
        lines += ["", "Real yolov3-tiny (COCO weights, 416) on Darknet's 7 sample images, threshold 0.25, detections "
                  "against the real Darknet:", "",
                  "| target | precision | Darknet detections | kept (same class) | extra | min IoU | box max diff | "
                  "score max diff |", "|---|---|---|---|---|---|---|---|"]
        for c in sorted(real, key=lambda c: targets.index(c["target"])):
            d = c["detections"]
            lines.append(f"| {c['target']} | {support_table._cell(c['precision'])} | {d['count_ref']} | {d['kept']} | "
                         f"{d['extra']} | {d['min_iou']:.4g} | {d['max_box_diff']:.2g} | {d['max_score_diff']:.2g} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-parity", action="store_true", help="do not re-measure the Debian parity table")
    ap.add_argument("--skip-alexeyab", action="store_true", help="keep the AlexeyAB tables as they are")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    text = replace_block(text, "support-table", support_block())
    if "<!-- targets-table:start -->" not in text:
        text = text.replace("<!-- parity-table:start -->", "<!-- targets-table:start -->\n<!-- targets-table:end -->"
                                                           "\n\n<!-- parity-table:start -->")
    text = replace_block(text, "targets-table", targets_block())
    if not args.skip_parity:
        text = replace_block(text, "parity-table", parity_block())
    if not args.skip_alexeyab:
        text = replace_block(text, "alexeyab-table", alexeyab_block())
    readme.write_text(text)
    print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
