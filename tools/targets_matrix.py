#!/usr/bin/env python3
"""Measure every README model in every runnable deploy target -> docs/targets-matrix.json.

Why a file: the full matrix takes most of an hour (OpenVINO's Model Optimizer alone needs minutes
per deep net), so it is measured here, saved with the date and versions, and tools/update_readme.py
renders the README's "Deploy targets" section from it. Resumable: cases already in the file are kept
unless --force. The models are those of the README's parity tables (random weights, seed 7, 160 px;
the reorg cfg at 256) plus the real yolov3-tiny at 416 on Darknet's 7 sample images against Darknet.
Usage: .venv/bin/python tools/targets_matrix.py [--targets openvino mnn ...] [--models NAME ...] [--force]
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from shared_cfgs import shared_cfg_dir  # noqa: E402

OUT = ROOT / "docs" / "targets-matrix.json"
DEBIAN = Path("/usr/share/darknet/cfg")
DEBIAN_YOLO = ["yolov2-tiny", "yolov2-tiny-voc", "yolov2", "yolov2-voc", "yolov3-tiny", "yolov3", "yolov3-spp",
               "yolov3-voc", "yolov3-openimages"]
TARGETS = ["opencv", "mnn", "rknn", "openvino"]
REAL = "yolov3-tiny real"


def models() -> list[tuple[str, Path, int, str]]:
    """(label, cfg, size, lineage) in README order."""
    rows = [(REAL, DEBIAN / "yolov3-tiny.cfg", 416, "pjreddie")]
    rows += [(name, DEBIAN / f"{name}.cfg", 160, "pjreddie") for name in DEBIAN_YOLO]
    rows += [(f"{cfg.stem} (AlexeyAB)" if cfg.stem in DEBIAN_YOLO else cfg.stem, cfg,
              256 if "reorg" in cfg.name else 160, "alexeyab") for cfg in sorted(shared_cfg_dir().glob("*.cfg"))]
    return rows


def measure(label: str, cfg: Path, size: int, target: str) -> dict:
    from d2c.convert import convert
    from d2c.errors import D2CError
    from d2c.forward_check import with_input_size
    from d2c.targets.verify import verify

    with tempfile.TemporaryDirectory(prefix="d2c-matrix-") as tmp_s:
        tmp = Path(tmp_s)
        start = time.perf_counter()
        try:
            if label == REAL:
                weights = ROOT / "weights" / "yolov3-tiny.weights"
                convert(cfg, weights, tmp / "m", target=target)
                images = sorted(Path("/usr/share/darknet/data").glob("*.jpg"))
                report = verify(tmp / "m", images, weights=weights)
            else:
                convert(with_input_size(cfg, size, size, tmp), None, tmp / "m", target=target, seed=7)
                report = verify(tmp / "m", seed=7)
        except D2CError as exc:
            return {"converts": False, "error": str(exc).splitlines()[0][:300],
                    "seconds": round(time.perf_counter() - start, 1)}
    row = {"converts": True, "ok": report["ok"], "head_max_rel": max(r["max_rel"] for r in report["heads"]),
           "precision": report["precision"], "toolchain_version": report["toolchain_version"],
           "convert_seconds": report.get("convert_seconds"), "seconds": round(time.perf_counter() - start, 1)}
    if report["detections"]:
        d = report["detections"]
        row["detections"] = {"reference": report["reference"], "count_ref": sum(r["count_ref"] for r in d),
                             "kept": sum(r["kept"] for r in d), "extra": sum(r["extra"] for r in d),
                             "min_iou": min((r["min_iou"] for r in d if r["min_iou"] is not None), default=None),
                             "max_box_diff": max(r["max_box_diff"] for r in d),
                             "max_score_diff": max(r["max_score_diff"] for r in d)}
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--targets", nargs="+", default=TARGETS, choices=TARGETS)
    ap.add_argument("--models", nargs="+", help="labels to (re)measure (default: all)")
    ap.add_argument("--force", action="store_true", help="re-measure cases already in the file")
    args = ap.parse_args()
    from tqdm import tqdm

    from d2c.fsutil import atomic_write_text
    data = json.loads(OUT.read_text()) if OUT.exists() else {"cases": {}}
    cases = [(m, t) for t in args.targets for m in models() if not args.models or m[0] in args.models]
    for (label, cfg, size, lineage), target in tqdm(cases, desc="targets matrix", unit="case"):
        key = f"{label} | {target}"
        if key in data["cases"] and not args.force:
            continue
        row = measure(label, cfg, size, target)
        data["cases"][key] = {"model": label, "target": target, "size": size, "lineage": lineage,
                              "weights": "real COCO" if label == REAL else "random (seed 7)", **row}
        data["measured"] = (f"{datetime.date.today()} on {platform.machine()}, Python {platform.python_version()}, "
                            "CPU only")
        atomic_write_text(OUT, json.dumps(data, indent=1, sort_keys=True) + "\n")
        tqdm.write(f"{key}: {json.dumps(row)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
