"""Measure the int8 table of the README: RKNN simulator builds of real yolov3-tiny against Darknet.

Usage: .venv/bin/python tools/int8_table.py [--out out/int8] [--images DIR] [--max-fp16 6]
       .venv/bin/python tools/int8_table.py --ablation-loo 5 6     (only the ablation-order rows)

Rows (each image scored against Darknet's fp32 detections at thresh 0.25 after Darknet's NMS):
fp16; int8 calibrated on the same images with float 0..1 input / uint8 input with the contract's
std 255 / mmse; the classic mistake (uint8 frames, std 1); leave-one-out int8; RKNN's hybrid
int8-friendly split heads; then the automatic fallback on the split model: conv blocks (each with
its maxpool/route/upsample) moved to fp16 one at a time in the order RKNN's accuracy analysis ranks
them (calibrated on the 7), until the agreement target holds or --max-fp16 blocks are spent, and
that choice confirmed leave-one-out. `--ablation-loo K...`: the per-block ablation of `d2c quantize
--order ablation` (calibrated and scored on the 7; cached, so after a `d2c quantize` on the same 7 it
costs no build) and the first K blocks of its order in fp16, leave-one-out. Resumable: rows already in
OUT/table.json are kept. Writes OUT/table.json and OUT/table.md.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2c.convert import convert  # noqa: E402
from d2c.detect import load_model_files  # noqa: E402
from d2c.fsutil import atomic_write_text  # noqa: E402
from d2c.int8_ablation import ablate, ablation_order  # noqa: E402
from d2c.int8_rknn import Build, measure, references, sensitivity  # noqa: E402

CFG = Path("/usr/share/darknet/cfg/yolov3-tiny.cfg")
WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/int8")
    parser.add_argument("--images", default="/usr/share/darknet/data")
    parser.add_argument("--max-fp16", type=int, default=6)
    parser.add_argument("--ablation-loo", type=int, nargs="+", metavar="K",
                        help="only: the first K blocks of the ablation order in fp16, leave-one-out")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = sorted(Path(args.images).glob("*.jpg"))
    convert(CFG, WEIGHTS, out / "plain")
    convert(CFG, WEIGHTS, out / "split", split_heads=True)
    models = {"plain": load_model_files(out / "plain"), "split": load_model_files(out / "split")}
    table_path = out / "table.json"
    table = json.loads(table_path.read_text()) if table_path.is_file() else {"rows": [], "ranking": None}
    done = {row["label"] for row in table["rows"]}

    def row(model: str, build: Build, note: str = "") -> dict:
        if build.label in done:
            return next(r for r in table["rows"] if r["label"] == build.label)
        agreement, fp16, seconds = measure(models[model], build, images, out / "work" / build.label.replace(" ", "_"))
        entry = {"label": build.label, "model": model, "calibration": build.calibration,
                 "fp16_blocks": build.fp16_blocks, "fp16_tensors": len(fp16), "note": note,
                 "seconds": round(seconds, 1), **{k: v for k, v in agreement.to_json().items() if k != "per_image"},
                 "ok_target": agreement.ok_target, "per_image": agreement.per_image}
        table["rows"].append(entry)
        done.add(build.label)
        atomic_write_text(table_path, json.dumps(table, indent=1) + "\n")
        print(f"{build.label:55s} kept {entry['kept']}/{entry['total']} extra {entry['extra']} "
              f"iou {entry['worst_iou']:.3f} score {entry['worst_score_diff']:.3f} head {entry['head_rel']:.3g} "
              f"({seconds:.0f} s)", flush=True)
        return entry

    if args.ablation_loo:
        scores = ablate(models["split"], images, images, references(models["split"], images, "uint8"),
                        out / "work" / "ablation")
        table["ablation"] = scores
        order = ablation_order(scores)
        print("ablation order (block, damage alone int8):",
              [(b, next(s["damage"] for s in scores if s["block"] == b)) for b in order], flush=True)
        for k in args.ablation_loo:
            row("split", Build(f"split heads + first {k} blocks of the ablation order fp16, leave-one-out",
                               fp16_blocks=order[:k]))
        atomic_write_text(table_path, json.dumps(table, indent=1) + "\n")
        return 0
    row("split", Build("split heads, int8, uint8 std 255, leave-one-out"))
    if table["ranking"] is None:
        analysis, ranking = sensitivity(models["split"], images, out / "work" / "analysis")
        table["ranking"] = [[block, drop] for block, drop in ranking]
        table["analysis"] = analysis
        atomic_write_text(table_path, json.dumps(table, indent=1) + "\n")
    ranking = [int(block) for block, _ in table["ranking"]]
    print("sensitivity order (block, entire-cosine drop):", table["ranking"], flush=True)
    def curve(sequence: list[int], step: str, confirm: str) -> None:
        """Blocks to fp16 one at a time, calibrated on the 7 (one build per step, as `d2c quantize`
        does); the first step that meets the target is then confirmed leave-one-out."""
        for k in range(1, args.max_fp16 + 1):
            if row("split", Build(step.format(k=k), fp16_blocks=sequence[:k], calibration="same"))["ok_target"]:
                row("split", Build(confirm.format(k=k), fp16_blocks=sequence[:k]))
                return

    curve(ranking, "split heads + {k} fp16 blocks (sensitivity order)", "split heads + {k} fp16 blocks, leave-one-out")
    row("split", Build("split heads + conv 0-8 with their maxpools fp16, leave-one-out", fp16_blocks=[0, 2, 4, 6, 8]))
    row("split", Build("split heads + every layer fp16 (hybrid control)", fp16_blocks=list(range(24)),
                       calibration="same"))
    # The same curve with blocks taken front to back (errors made early are carried through the net).
    curve(sorted(ranking), "split heads + first {k} conv blocks fp16 (depth order)",
          "split heads + first {k} conv blocks fp16, leave-one-out")
    row("split", Build("split heads + first 6 conv blocks fp16, leave-one-out", fp16_blocks=sorted(ranking)[:6]))
    row("split", Build("split heads + conv 0-8 and head block 22 fp16, leave-one-out", fp16_blocks=[0, 2, 4, 6, 8, 22]))
    row("plain", Build("fp16", quantize=False, calibration="none"))
    row("plain", Build("int8, float input 0..1, std 1, same 7", input_kind="float", calibration="same"))
    row("plain", Build("int8, uint8 input, std 255, same 7", calibration="same"))
    row("plain", Build("NEGATIVE: int8, uint8 input, std 1, same 7", calibration="same", std_override=1.0))
    row("plain", Build("int8, uint8 std 255, mmse, same 7", algorithm="mmse", calibration="same"))
    row("plain", Build("int8, uint8 std 255, leave-one-out"))
    lines = ["| build | calibration | kept | extra | worst IoU | worst score diff | head rel | fp16 blocks |",
             "|---|---|---|---|---|---|---|---|"]
    for r in table["rows"]:
        lines.append(f"| {r['label']} | {r['calibration']} | {r['kept']}/{r['total']} | {r['extra']} | "
                     f"{r['worst_iou']:.3f} | {r['worst_score_diff']:.3f} | {r['head_rel']:.3g} | "
                     f"{' '.join(map(str, r['fp16_blocks'] or [])) or '-'} |")
    atomic_write_text(out / "table.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
