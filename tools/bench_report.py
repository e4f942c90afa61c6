#!/usr/bin/env python3
"""Render `d2c bench --json` output as the Markdown block the README shows.

Why a separate tool: the README table must come from a real run (machine, date, thread counts
included), never be typed in by hand. Usage: tools/bench_report.py out/bench.json > table.md
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ENGINES = [("darknet", "Darknet"), ("caffe", "pycaffe"), ("caffe_folded", "pycaffe --fold-bn"),
           ("opencv_darknet", "OpenCV (Darknet files)"), ("opencv_caffe", "OpenCV (our Caffe files)"),
           ("opencv_caffe_no_winograd", "OpenCV (our Caffe files, Winograd off)")]


def _num(value: Any, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    caffe = m.get("caffe") or {}
    build = caffe.get("build") or {}
    blas = caffe.get("blas") or {}
    threads = m["threads"]["caffe_openblas"]
    out = [f"Measured {m['date'][:10]} on {m['cpu']}, {m['cores_usable']} cores, {m['memory_gb']} GB "
           f"(load average {m['load_average_start'][0]:.1f} at start, {m['load_average_end'][0]:.1f} at end); "
           f"Caffe built `{build.get('cxxflags', '?')}` with OpenBLAS {blas.get('parallel', '?')} "
           f"(core {blas.get('core', '?')}) and {', '.join(build.get('patches') or ['no patches'])}; "
           f"OpenCV {m.get('opencv')}; {m.get('darknet')}. "
           f"Caffe and OpenCV use {threads} threads, Darknet 1 (its CPU build has no threading).", ""]
    out += ["| model | convert | numpy read+write | ratio | peak RSS | peak / weights |",
            "|---|---|---|---|---|---|"]
    for r in report["models"].values():
        c, b = r["convert"], r["baseline"]
        out.append(f"| {r['name']} ({r['weights_bytes'] / 2**20:.0f} MB) | {c['seconds']:.2f} s | {b['seconds']:.2f} s "
                   f"| {c['ratio']:.2f} | {c['peak_rss_mb']:.0f} MB | {c['peak_rss_ratio']:.2f} "
                   f"({c['peak_rss_over_start_ratio']:.2f} above the interpreter) |")
    out += ["", "Forward, batch 1, median ms (runs):", "",
            "| model | " + " | ".join(label for _, label in ENGINES) + " | pycaffe --fold-bn, 1 thread "
            "| OpenCV, 1 thread |", "|---" * (len(ENGINES) + 3) + "|"]
    for r in report["models"].values():
        cells = []
        for key in [k for k, _ in ENGINES] + ["caffe_folded_1t", "opencv_caffe_1t"]:
            v = r["forward"].get(key)
            cells.append("" if v is None else "failed" if "error" in v else f"{v['median_ms']:.1f} ({v['runs']})")
        out.append(f"| {r['name']} ({r['input_shape'][3]}x{r['input_shape'][2]}) | " + " | ".join(cells) + " |")
    trained = [r for r in report["models"].values() if (r.get("train") or {}).get("caffe_ms")]
    if trained:
        out += ["", "| training iteration | Caffe | Darknet | ratio | Python loss layer | Python BN layers |",
                "|---|---|---|---|---|---|"]
        for r in trained:
            t = r["train"]
            out.append(f"| {r['name']}, batch {t['batch']}, {t['size'][1]}x{t['size'][0]}, BN {t['bn_mode']} "
                       f"| {t['caffe_ms'] / 1e3:.2f} s | {t['darknet_ms'] / 1e3:.2f} s | {r['train_iter_ratio']:.2f} "
                       f"| {100 * r['loss_layer_share']:.1f}% | {100 * t['python_bn_share']:.1f}% |")
    p = report.get("parity") or {}
    parity = "n/a" if p.get("seconds") is None else f"{p['seconds']:.1f} s"
    out += ["", f"`d2c parity` (yolov3-tiny): {parity}" + (f" ({p['reason']})" if p.get("reason") else ""),
            "", "| target | model | value | limit | |",
            "|---|---|---|---|---|"]
    for t in report["targets"]:
        mark = "n/a" if t["ok"] is None else ("met" if t["ok"] else "**missed**")
        out.append(f"| {t['target']} | {t['model']} | {_num(t['value'], '.3f')} | {t['limit']} | {mark} |")
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: bench_report.py BENCH.json", file=sys.stderr)
        return 2
    try:
        report = json.loads(Path(argv[1]).read_text())
    except (OSError, ValueError) as exc:
        print(f"bench_report: {argv[1]}: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
