"""`d2c verify MODEL IMAGES --target T --uint8 | --int8`: uint8 camera frames through the toolchain's
own scaling (the preprocessing contract), and int8 builds, against Darknet's fp32 detections.

Why: `d2c verify` proves the Caffe file inside a toolchain on Darknet's float input; a deployment
feeds uint8 frames and lets the toolchain scale them (mean/std in its config), and an NPU runs int8.
`--uint8` gives the toolchain uint8 frames (the letterboxed image rounded to bytes) with the config
the contract writes (d2c.preprocess) and compares its heads with pycaffe on the same bytes / 255 and
its detections with Darknet's; `--int8` (RKNN) builds int8 calibrated on `--data` (or leave-one-out
over the images) and reports kept / extra / worst IoU / worst score diff against Darknet's fp32
detections, with the contract as written into the toolchain's config.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from d2c.errors import D2CError

#: uint8 heads against pycaffe on the same bytes: f32 toolchains compute the same function (the
#: scaling folded into their graph), RKNN's simulator computes in fp16.
UINT8_HEAD_REL = {"caffe": 1e-5, "opencv": 1e-4, "openvino": 1e-4, "rknn": 2e-2}


def verify_uint8(model: str | Path, images: list[Path], target: str, thresh: float = 0.25,
                 frame_order: str = "RGB") -> dict[str, Any]:
    """Feed uint8 frames through `target`'s own scaling and compare with pycaffe and Darknet."""
    from d2c.calibration import toolchain_tensor
    from d2c.detect import Engine, load_model_files
    from d2c.int8_rknn import Agreement, Build, detect_outputs, head_rel, measure, references, rows
    from d2c.preprocess import deploy_preprocess, from_uint8_frame
    if target not in UINT8_HEAD_REL:
        raise D2CError(f"--uint8: target {target} is not wired yet; choose from {', '.join(UINT8_HEAD_REL)}")
    if not images:
        raise D2CError("--uint8 compares detections: name at least one image")
    files = load_model_files(model)
    pre = deploy_preprocess(files.sidecar, target, frame_order)
    refs = references(files, images, "uint8", thresh)
    if target == "rknn":
        with tempfile.TemporaryDirectory(prefix="d2c-rknn-") as tmp:
            agreement, _, _ = measure(files, Build("fp16", quantize=False, calibration="none"), images, Path(tmp),
                                      refs=refs, thresh=thresh)
    else:
        agreement = Agreement()
        if target == "openvino":
            from d2c.int8_heads import output_blobs
            from d2c.targets import get_target
            from d2c.targets.verify import run_toolchain
            frames = np.stack([toolchain_tensor(r.image, files.sidecar, "uint8")[0] for r in refs]).astype(np.float32)
            blobs = output_blobs(files.sidecar)
            got, _ = run_toolchain(get_target("openvino"), files.prototxt, files.caffemodel, frames,
                                   {b: [b] for b in blobs}, {b: list(refs[0].heads[b].shape[1:]) for b in blobs},
                                   extra={"mo_args": pre["config"]["mo_args"]})
            outputs = [{b: got[b][k:k + 1] for b in blobs} for k in range(len(refs))]
        else:
            engine = Engine(files, target)
            outputs = []
            for ref in refs:
                frame = toolchain_tensor(ref.image, files.sidecar, "uint8")[0].transpose(1, 2, 0)
                if frame_order == "BGR":
                    frame = frame[:, :, ::-1]
                outputs.append(engine.forward(from_uint8_frame(np.ascontiguousarray(frame), pre)[0]))
        for ref, out in zip(refs, outputs, strict=True):
            got_rows = rows(detect_outputs(out, files.sidecar, *ref.size, thresh=thresh), thresh)
            agreement.add(ref.image.name, ref.rows, got_rows, head_rel(out, ref.heads))
    ok = agreement.kept == agreement.total and agreement.extra == 0 and agreement.head_rel <= UINT8_HEAD_REL[target]
    return {"ok": ok, "target": target, "precision": "fp16 (simulator)" if target == "rknn" else "f32",
            "input": "uint8", **_summary(agreement), "preprocess": _written(pre)}


def verify_int8(model: str | Path, images: list[Path], target: str = "rknn", data: str | Path | None = None,
                fp16_blocks: list[int] | None = None, thresh: float = 0.25) -> dict[str, Any]:
    """int8 on RKNN's simulator against Darknet's fp32 detections (issue keys, see module doc)."""
    from d2c.calibration import calibration_images
    from d2c.detect import load_model_files
    from d2c.int8_rknn import Build, measure
    from d2c.preprocess import deploy_preprocess
    if target != "rknn":
        raise D2CError(f"--int8: only --target rknn quantizes here (got {target})")
    if not images:
        raise D2CError("--int8 compares detections: name at least one image")
    files = load_model_files(model)
    calib = calibration_images(data) if data is not None else None
    if calib is None and len(images) < 2:
        raise D2CError("--int8 without --data calibrates leave-one-out over the images: name at least two")
    build = Build("int8", fp16_blocks=fp16_blocks or None, calibration="loo")
    from d2c.quantize import map50_pair
    outputs: dict[Path, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="d2c-rknn-") as tmp:
        agreement, fp16, _ = measure(files, build, images, Path(tmp), thresh=thresh, calibration=calib,
                                     outputs_into=outputs)
    map_fp32, map_int8 = map50_pair(files, outputs, list(images))   # None without label files
    return {"ok": agreement.ok_target, "target": target, "precision": "int8+fp16" if fp16_blocks else "int8",
            "calibration": "leave-one-out over the images" if calib is None else f"{len(calib)} image(s) from {data}",
            **_summary(agreement), "map50_fp32": map_fp32, "map50_int8": map_int8,
            "fp16_layers": [f"layer{b:03d}" for b in fp16_blocks or []], "fp16_tensors": fp16,
            "preprocess": _written(deploy_preprocess(files.sidecar, "rknn"))}


def _summary(agreement: Any) -> dict[str, Any]:
    return {"kept": agreement.kept, "total": agreement.total, "extra": agreement.extra,
            "worst_iou": agreement.worst_iou, "worst_score_diff": agreement.worst_score_diff,
            "head_rel": agreement.head_rel, "per_image": agreement.per_image}


def _written(pre: dict[str, Any]) -> dict[str, Any]:
    return {"mean_values": pre["mean_values"], "std_values": pre["std_values"], "channel_order": pre["channel_order"],
            "letterbox": pre["letterbox"], "config": pre["config"]}


def table(report: dict[str, Any]) -> str:
    what = "int8" if report.get("precision", "").startswith("int8") else "uint8 frames"
    lines = [f"d2c verify ({what}) in {report['target']}, {report['precision']}: kept {report['kept']}/{report['total']} "
             f"Darknet detections, {report['extra']} extra, worst IoU {report['worst_iou']:.3f}, "
             f"worst score diff {report['worst_score_diff']:.3f}, heads max rel {report['head_rel']:.3g}",
             f"  preprocess: mean {report['preprocess']['mean_values']} std {report['preprocess']['std_values']} "
             f"{report['preprocess']['channel_order']} letterbox={report['preprocess']['letterbox']}"]
    if report.get("fp16_layers"):
        lines.append(f"  fp16 layers: {', '.join(report['fp16_layers'])}")
    lines.append(f"  {'OK' if report['ok'] else 'FAILED'}")
    return "\n".join(lines)
