"""int8 on RKNN's simulator, measured against Darknet's fp32 detections.

Why: NPU users ship int8, and "results differ from Darknet" has two causes outside the Caffe file:
the input scaling (d2c.preprocess) and quantization error in a few layers. This module builds a
converted model with the real RKNN-Toolkit2 (in its own venv, through d2c/rknn_worker.py), feeds
it the uint8 frames the contract describes, decodes its outputs with d2c's Darknet-exact decoder
and scores them against the fp32 detections (d2c's pycaffe pipeline, which prints Darknet's own
detections: tests/test_detect.py): kept (a reference box with a same-class int8 box at IoU > 0.5),
extra (int8 boxes matching no reference), worst IoU and worst score difference over the kept ones.

Builds: fp16 (no calibration), int8 with a calibration set (the same images, or leave-one-out:
each image scored by a model calibrated without it), RKNN's hybrid quantization with chosen conv
blocks in float16 (`fp16_blocks`: Darknet layer indices) or RKNN's own proposal.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2c.calibration import PreparedSet, leave_one_out, network_input, prepare
from d2c.detect import Detection, Engine, ModelFiles, decode_heads, do_nms_sort
from d2c.errors import D2CError, EngineError
from d2c.int8_heads import output_blobs
from d2c.preprocess import deploy_preprocess

RKNN_VERSION = "2.5.0"
PLATFORM = "rk3588"
WORKER = Path(__file__).with_name("rknn_worker.py")
MATCH_IOU = 0.5
F32 = np.float32


def rknn_python() -> Path:
    """The Python of RKNN-Toolkit2's venv in the d2c cache (created by the deploy-targets setup)."""
    root = Path(os.environ.get("D2C_CACHE") or Path.home() / ".cache" / "d2c")
    python = root / "targets" / f"rknn-{RKNN_VERSION}" / "bin" / "python"
    if not python.is_file():
        raise EngineError(f"RKNN-Toolkit2 {RKNN_VERSION} is not installed ({python} missing); "
                          "run `make targets` to create the toolchain venvs")
    return python


@dataclass
class Build:
    """One way of building the model with RKNN."""

    label: str
    quantize: bool = True
    input_kind: str = "uint8"          # uint8 frames with std 255 (the contract), or float 0..1 with std 1
    algorithm: str = "normal"          # rknn.config quantized_algorithm: normal, mmse, kl_divergence
    fp16_blocks: list[int] | None = None   # Darknet layer indices kept in float16 (hybrid quantization)
    proposal: bool = False             # RKNN's own hybrid proposal
    calibration: str = "loo"           # "loo" (leave-one-out), "same" (all images), "none" (fp16)
    std_override: float | None = None  # negative controls: the classic std-1 mistake on uint8 frames

    def config(self, sidecar: dict[str, Any]) -> dict[str, Any]:
        """rknn.config() arguments: the contract's mean/std for uint8 frames (or 0/1 for floats)."""
        if self.input_kind == "uint8":
            pre = deploy_preprocess(sidecar, "rknn")["config"]
            mean, std = pre["mean_values"], pre["std_values"]
        else:
            mean, std = [[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]]
        if self.std_override is not None:
            std = [[self.std_override] * 3]
        return {"mean_values": mean, "std_values": std, "target_platform": PLATFORM,
                "quantized_algorithm": self.algorithm}


@dataclass
class RunResult:
    outputs: list[dict[str, np.ndarray]]       # per input: {blob: array}
    fp16_tensors: list[str]
    seconds: float
    analysis: Path | None = None


def run_rknn(files: ModelFiles, build: Build, dataset: PreparedSet | None, inputs: list[Path], workdir: Path,
             analysis_input: Path | None = None, timeout: float = 1800, export: Path | None = None) -> RunResult:
    """Build with RKNN-Toolkit2 in its venv and run the simulator on `inputs` (.npy NCHW tensors)."""
    workdir = Path(workdir).resolve()     # the worker runs with cwd=workdir: relative paths would break
    workdir.mkdir(parents=True, exist_ok=True)
    job = {"prototxt": str(files.prototxt.resolve()), "caffemodel": str(files.caffemodel.resolve()),
           "config": build.config(files.sidecar), "quantize": build.quantize,
           "dataset": str(dataset.list_file) if dataset else None,
           "fp16": ([f"layer{i:03d}_" for b in build.fp16_blocks for i in block_members(files.sidecar).get(b, [b])]
                    if build.fp16_blocks is not None else None),
           "proposal": build.proposal, "inputs": [str(p) for p in inputs],
           "outputs": str(workdir / "outputs.npz"), "analysis": str(analysis_input) if analysis_input else None,
           "workdir": str(workdir), "export": str(Path(export).resolve()) if export else None}
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job))
    start = time.perf_counter()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    try:
        proc = subprocess.run([str(rknn_python()), str(WORKER), str(job_path)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=workdir)
    except subprocess.TimeoutExpired:
        raise EngineError(f"RKNN build '{build.label}' did not finish in {timeout:.0f} s") from None
    (workdir / "rknn.log").write_text(proc.stdout + proc.stderr)
    marker = [line for line in proc.stdout.splitlines() if line.startswith("D2C-RESULT ")]
    if proc.returncode != 0 or not marker:
        tail = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()][-1:] or ["no output"]
        raise EngineError(f"RKNN build '{build.label}' failed (exit {proc.returncode}): {tail[0][:300]} "
                          f"(log: {workdir / 'rknn.log'})")
    result = json.loads(marker[-1][len("D2C-RESULT "):])
    blobs = output_blobs(files.sidecar)
    outputs = []
    with np.load(workdir / "outputs.npz") as arrays:
        for i in range(len(inputs)):
            got = [arrays[f"i{i}_o{k}"] for k in range(len(blobs)) if f"i{i}_o{k}" in arrays]
            if len(got) != len(blobs) or f"i{i}_o{len(blobs)}" in arrays:
                raise EngineError(f"RKNN returned {len([k for k in arrays if k.startswith(f'i{i}_')])} outputs, "
                                  f"the model has {len(blobs)} ({', '.join(blobs)})")
            outputs.append(dict(zip(blobs, got, strict=True)))
    analysis = Path(result["analysis"]) if result.get("analysis") else None
    return RunResult(outputs=outputs, fp16_tensors=result.get("fp16", []), seconds=time.perf_counter() - start,
                     analysis=analysis)


# --------------------------------------------------------------------------------------------
# Detections and their comparison
# --------------------------------------------------------------------------------------------

def detect_outputs(outputs: dict[str, np.ndarray], sidecar: dict[str, Any], im_w: int, im_h: int,
                   thresh: float = 0.25, nms: float = 0.45) -> list[Detection]:
    """Darknet's decode and NMS (per lineage) over one image's head outputs."""
    classes = int(sidecar["heads"][-1]["classes"])
    if sidecar.get("flavor") == "alexeyab":
        from d2c.detect_alexeyab import decode_heads as ab_decode
        from d2c.detect_alexeyab import nms_sort
        return nms_sort(ab_decode(outputs, sidecar, im_w, im_h, thresh), sidecar, classes, nms)
    return do_nms_sort(decode_heads(outputs, sidecar, im_w, im_h, thresh), classes, nms)


def rows(dets: list[Detection], thresh: float = 0.25) -> list[tuple[int, float, np.ndarray]]:
    """(class, score, box) for every class above thresh, as Darknet prints them."""
    t = F32(thresh)
    return [(int(j), float(d.prob[j]), np.asarray(d.bbox, dtype=np.float64))
            for d in dets for j in np.nonzero(np.asarray(d.prob) > t)[0]]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax1, bx1) - max(ax0, bx0)) * max(0.0, min(ay1, by1) - max(ay0, by0))
    union = a[2] * a[3] + b[2] * b[3] - inter
    return float(inter / union) if union > 0 else 0.0


@dataclass
class Agreement:
    """int8 (or fp16) detections against the fp32 reference, summed over images."""

    kept: int = 0
    total: int = 0
    extra: int = 0
    worst_iou: float = 1.0
    worst_score_diff: float = 0.0
    head_rel: float = 0.0
    per_image: list[dict[str, Any]] = field(default_factory=list)

    def add(self, name: str, ref: list[tuple[int, float, np.ndarray]], got: list[tuple[int, float, np.ndarray]],
            head_rel: float) -> None:
        """Greedy same-class matching, best IoU first: each int8 box matches at most one reference."""
        pairs = sorted(((_iou(r[2], g[2]), i, k) for i, r in enumerate(ref) for k, g in enumerate(got)
                        if r[0] == g[0]), reverse=True)
        used_ref: set[int] = set()
        used_got: set[int] = set()
        kept = 0
        for iou, i, k in pairs:
            if iou <= MATCH_IOU or i in used_ref or k in used_got:
                continue
            used_ref.add(i)
            used_got.add(k)
            kept += 1
            self.worst_iou = min(self.worst_iou, iou)
            self.worst_score_diff = max(self.worst_score_diff, abs(ref[i][1] - got[k][1]))
        self.kept += kept
        self.total += len(ref)
        self.extra += len(got) - len(used_got)
        self.head_rel = max(self.head_rel, head_rel)
        self.per_image.append({"image": name, "kept": kept, "total": len(ref), "extra": len(got) - len(used_got),
                               "head_rel": head_rel})

    @property
    def ok_target(self) -> bool:
        """The issue's bar: every box kept, none extra, worst IoU >= 0.95, score diff <= 0.05."""
        return self.kept == self.total and self.extra == 0 and self.worst_iou >= 0.95 and self.worst_score_diff <= 0.05

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def head_rel(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
    """max |got - ref| / max |ref| over the heads (the outputs as the toolchain returns them)."""
    worst = 0.0
    for blob, value in ref.items():
        r = np.asarray(value, dtype=np.float64).ravel()
        g = np.asarray(got[blob], dtype=np.float64).ravel()
        worst = max(worst, float(np.abs(g - r).max() / max(np.abs(r).max(), 1e-30)))
    return worst


@dataclass
class Reference:
    """fp32 detections (Darknet's, via d2c's pycaffe pipeline) and pycaffe's heads on the toolchain's input."""

    image: Path
    size: tuple[int, int]
    rows: list[tuple[int, float, np.ndarray]]
    heads: dict[str, np.ndarray]


def references(files: ModelFiles, images: list[Path], input_kind: str, thresh: float = 0.25) -> list[Reference]:
    """Per image: Darknet's fp32 detections (float input), and pycaffe's heads on the very tensor the
    toolchain is fed (uint8 / 255 for uint8 frames), for the head rel column."""
    from d2c.calibration import toolchain_tensor
    engine = Engine(files, "caffe")
    out = []
    for image in images:
        dets, size = engine.detect(image, thresh=thresh)
        tensor = toolchain_tensor(image, files.sidecar, input_kind)[0].astype(np.float32)
        heads = engine.forward(tensor / F32(255) if input_kind == "uint8" else tensor)
        out.append(Reference(image=image, size=size, rows=rows(dets, thresh), heads=heads))
    return out


def measure(files: ModelFiles, build: Build, images: list[Path], workdir: Path,
            refs: list[Reference] | None = None, thresh: float = 0.25, calibration: list[Path] | None = None,
            export: Path | None = None, outputs_into: dict[Path, dict[str, np.ndarray]] | None = None,
            ) -> tuple[Agreement, list[str], float]:
    """Score `build` on `images`: calibrated on `calibration` when given (one build, `export`ed to
    a .rknn file if asked), else as build.calibration says (the same images, leave-one-out, none).
    Returns the agreement, the float16 tensors RKNN used, and the seconds spent in RKNN;
    `outputs_into` receives each image's raw outputs (for mAP at a lower threshold)."""
    refs = refs or references(files, images, build.input_kind, thresh)
    inputs = prepare(images, files.sidecar, build.input_kind, "inputs").tensors
    agreement = Agreement()
    fp16: list[str] = []
    seconds = 0.0
    if calibration is not None:
        groups = [(images, prepare(calibration, files.sidecar, build.input_kind, "calibration"))]
    elif build.calibration == "loo":
        groups = [([image], prepare(leave_one_out(images, image), files.sidecar, build.input_kind, "loo"))
                  for image in images]
    else:
        dataset = prepare(images, files.sidecar, build.input_kind, "same") if build.quantize else None
        groups = [(images, dataset)]
    results: dict[Path, dict[str, np.ndarray]] = {}
    for k, (scored, dataset) in enumerate(groups):
        if build.quantize and dataset is None:
            raise D2CError(f"build '{build.label}': int8 needs calibration images")
        run = run_rknn(files, build, dataset, [inputs[p] for p in scored], workdir / f"build{k}",
                       export=export if len(groups) == 1 else None)
        seconds += run.seconds
        fp16 = run.fp16_tensors
        results.update(zip(scored, run.outputs, strict=True))
    if outputs_into is not None:
        outputs_into.update(results)
    for ref in refs:
        outputs = results[ref.image]
        got = rows(detect_outputs(outputs, files.sidecar, *ref.size, thresh=thresh), thresh)
        agreement.add(ref.image.name, ref.rows, got, head_rel(outputs, ref.heads))
    return agreement, fp16, seconds


def temp_workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="d2c-rknn-"))


def block_members(sidecar: dict[str, Any]) -> dict[int, list[int]]:
    """Conv block -> the Darknet layers it covers: the conv and every non-conv layer after it up to
    the next conv (maxpool, upsample, route, shortcut, yolo). Why: a maxpool or route left in int8
    between two fp16 convs requantizes the tensor at every block boundary, so moving convs alone to
    fp16 removes little error (measured on yolov3-tiny: all 13 conv blocks alone in fp16 kept the
    heads 30% off; with their pools and routes 2%)."""
    blobs = {int(i): str(b) for i, b in (sidecar.get("blobs") or {}).items()}
    members: dict[int, list[int]] = {}
    current: int | None = None
    for index in sorted(blobs):
        if blobs[index] == f"layer{index:03d}_conv":
            current = index
            members[current] = [index]
        elif current is not None:
            members[current].append(index)
    return members


_ANALYSIS_ROW = re.compile(r"^\[(\w+)\]\s+(\S+)\s+([-\d.]+)\s*\|\s*([-\d.e+]+)\s+([-\d.]+)\s*\|\s*([-\d.e+]+)")


def parse_analysis(path: Path) -> list[dict[str, Any]]:
    """RKNN accuracy_analysis's error_analysis.txt: per tensor, its op type and the cosine against
    fp32 with errors accumulated through the network ("entire") and of that layer alone ("single")."""
    out = []
    for line in Path(path).read_text().splitlines():
        match = _ANALYSIS_ROW.match(line.strip())
        if match:
            kind, name, entire, _, single, _ = match.groups()
            out.append({"op": kind, "tensor": name, "entire_cos": float(entire), "single_cos": float(single)})
    if not out:
        raise EngineError(f"{path}: no per-layer rows in RKNN's accuracy analysis")
    return out


def rank_blocks(analysis: list[dict[str, Any]], members: dict[int, list[int]]) -> list[tuple[int, float]]:
    """Conv blocks, most sensitive first, by the accumulated ("entire") cosine the block loses: the
    entire cosine of the tensor just before the block's first tensor minus the lowest entire cosine
    among its tensors (layerNNN_* of its layers). Why not RKNN's single-layer cosine: every block
    scores 0.9992-0.9999 alone, and the ranking it gives moved the wrong blocks first on yolov3-tiny."""
    ranked = []
    for block, layers in members.items():
        prefixes = tuple(f"layer{i:03d}_" for i in layers)
        positions = [k for k, row in enumerate(analysis) if row["tensor"].startswith(prefixes)]
        if positions:
            before = analysis[positions[0] - 1]["entire_cos"] if positions[0] > 0 else 1.0
            lowest = min(analysis[k]["entire_cos"] for k in positions)
            ranked.append((block, round(before - lowest, 6)))
    return sorted(ranked, key=lambda item: -item[1])


def sensitivity(files: ModelFiles, images: list[Path], workdir: Path, probe: Path | None = None,
                input_kind: str = "uint8") -> tuple[list[dict[str, Any]], list[tuple[int, float]]]:
    """RKNN's own per-layer analysis of the int8 build calibrated on `images`, run on `probe` (the
    first image by default); returns its rows and the conv blocks ranked by sensitivity."""
    dataset = prepare(images, files.sidecar, input_kind, "same")
    probe_tensor = prepare([probe or images[0]], files.sidecar, input_kind, "inputs").tensors[probe or images[0]]
    run = run_rknn(files, Build("analysis", input_kind=input_kind, calibration="same"), dataset, [probe_tensor],
                   workdir, analysis_input=probe_tensor)
    assert run.analysis is not None
    rows_ = parse_analysis(run.analysis)
    return rows_, rank_blocks(rows_, block_members(files.sidecar))


__all__ = ["Agreement", "Build", "Reference", "block_members", "detect_outputs", "measure", "network_input",
           "parse_analysis", "rank_blocks", "references", "rknn_python", "run_rknn", "rows", "sensitivity"]
