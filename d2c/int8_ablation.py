"""Per-block ablation: which conv blocks hurt int8 detections most, measured on detections.

Why: RKNN's accuracy analysis ranks blocks by tensor cosine, and on yolov3-tiny every block alone
keeps 0.9992-0.9999, so its ranking (and front-to-back order) did not find the set of fp16 blocks
that meets the agreement target. This builds the model once per conv block with that block alone in
int8 and every other block in fp16 (RKNN hybrid quantization), scores the detections with d2c's own
agreement metric against Darknet's fp32 detections on the evaluation images, and orders the blocks
by the damage each does alone: the fp16 fallback then moves the most damaging first. One build per
block; the scores are cached by content (model, calibration and evaluation images, threshold, RKNN
version) under the d2c cache, so a repeated `d2c quantize` does no ablation builds.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from d2c.calibration import cache_dir
from d2c.detect import ModelFiles
from d2c.fsutil import atomic_write_text
from d2c.int8_rknn import RKNN_VERSION, Agreement, Build, Reference, block_members, measure

IOU_TARGET = 0.95
SCORE_TARGET = 0.05


def damage(agreement: Agreement | dict[str, Any]) -> float:
    """One number per build, 0 for a perfect one: lost and extra boxes count 1 each, plus the worst
    IoU loss and worst score diff in units of the target's margins (0.05 each), whichever is larger.
    Why both margins: a block can shift boxes (IoU) or scores, and the target bounds both."""
    a = agreement.to_json() if isinstance(agreement, Agreement) else agreement
    margin = max((1.0 - a["worst_iou"]) / (1.0 - IOU_TARGET), a["worst_score_diff"] / SCORE_TARGET)
    return float((a["total"] - a["kept"]) + a["extra"] + margin)


def _digest(files: ModelFiles, calibration: list[Path], evaluate: list[Path], thresh: float) -> str:
    h = hashlib.sha256()
    for path in (files.prototxt, files.caffemodel, *calibration, None, *evaluate):
        h.update(b"|" if path is None else hashlib.sha256(Path(path).read_bytes()).digest())
    h.update(f"{thresh}|{RKNN_VERSION}|int8-alone".encode())
    return h.hexdigest()[:24]


def ablation_cache(files: ModelFiles, calibration: list[Path], evaluate: list[Path], thresh: float) -> Path:
    """Where the per-block scores of this model / image sets / threshold live."""
    return cache_dir().parent / "ablation" / f"{_digest(files, calibration, evaluate, thresh)}.json"


def ablate(files: ModelFiles, calibration: list[Path], evaluate: list[Path], refs: list[Reference], work: Path,
           thresh: float = 0.25) -> list[dict[str, Any]]:
    """Per conv block (network order): the agreement with that block alone int8, the rest fp16, and
    its damage. Resumable: blocks already in the cache are not rebuilt."""
    from tqdm import tqdm
    members = block_members(files.sidecar)
    cache = ablation_cache(files, calibration, evaluate, thresh)
    scores: dict[str, dict[str, Any]] = json.loads(cache.read_text()) if cache.is_file() else {}
    todo = [b for b in members if str(b) not in scores]
    for block in tqdm(todo, desc="ablation builds", unit="block", disable=not todo):
        rest = [b for b in members if b != block]
        agreement, _, seconds = measure(files, Build(f"block {block} int8", fp16_blocks=rest), evaluate,
                                        work / f"ablate{block}", refs=refs, thresh=thresh, calibration=calibration)
        entry = {k: v for k, v in agreement.to_json().items() if k != "per_image"}
        scores[str(block)] = {"block": block, **entry, "damage": round(damage(entry), 6), "seconds": round(seconds, 1)}
        atomic_write_text(cache, json.dumps(scores, indent=1) + "\n")
    return [scores[str(b)] for b in members]


def ablation_order(scores: list[dict[str, Any]]) -> list[int]:
    """Blocks most damaging first; ties (equal damage) by head rel, then front to back."""
    return [s["block"] for s in sorted(scores, key=lambda s: (-s["damage"], -s["head_rel"], s["block"]))]


__all__ = ["ablate", "ablation_cache", "ablation_order", "damage"]
