"""Run a Caffe model in a deploy toolchain; executed by that toolchain's own venv, never imported by d2c.

Why a separate script: each toolchain pins numpy/protobuf versions that clash with d2c's venv, so d2c
starts `<venv>/bin/python runner.py REQUEST.json` and reads back arrays. It imports only the standard
library, numpy and the toolchain. REQUEST holds: target, prototxt, caffemodel, work (a scratch folder),
inputs (an .npy of (N, C, H, W) float32), outputs (blob name -> [names the toolchain may give it]) and
result (an .npz to write: one (N, ...) array per blob, plus a JSON string under "meta").
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _pick(available: dict[str, object], candidates: list[str]) -> object:
    """The toolchain's output for the first candidate name it knows."""
    for name in candidates:
        if name in available:
            return available[name]
    raise SystemExit(f"none of the output names {candidates} is among the toolchain's outputs "
                     f"{sorted(available)}")


def run_openvino(req: dict, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    import openvino as ov
    work = Path(req["work"])
    mo = Path(sys.executable).parent / "mo"
    start = time.perf_counter()
    done = subprocess.run([str(mo), "--input_model", req["caffemodel"], "--input_proto", req["prototxt"],
                           "--output_dir", str(work), "--model_name", "model", "--compress_to_fp16=False",
                           *req.get("mo_args", [])],
                          capture_output=True, text=True)
    if done.returncode != 0:
        tail = [line for line in (done.stdout + done.stderr).splitlines() if "ERROR" in line] or \
               (done.stdout + done.stderr).splitlines()[-3:]
        raise SystemExit("Model Optimizer refused the model: " + " | ".join(tail)[:2000])
    convert_s = time.perf_counter() - start
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(work / "model.xml")), "CPU",
                                  {"INFERENCE_PRECISION_HINT": "f32"})
    ports = {name: port for port in compiled.outputs for name in port.get_names()}
    request = compiled.create_infer_request()
    outs: dict[str, list[np.ndarray]] = {blob: [] for blob in req["outputs"]}
    for sample in x:
        result = request.infer({0: sample[None]})
        for blob, names in req["outputs"].items():
            outs[blob].append(np.array(result[_pick(ports, names)], dtype=np.float32))
    return ({b: np.concatenate(v) for b, v in outs.items()},
            {"toolchain_version": ov.get_version(), "convert_seconds": convert_s})


MNN_HINT_WINOGRAD_MEMORY_LEVEL = 3   # MNN::Interpreter::HintMode


def run_mnn(req: dict, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    import MNN
    work = Path(req["work"])
    model = work / "model.mnn"
    start = time.perf_counter()
    done = subprocess.run([str(Path(sys.executable).parent / "mnnconvert"), "-f", "CAFFE", "--modelFile",
                           req["caffemodel"], "--prototxt", req["prototxt"], "--MNNModel", str(model),
                           "--bizCode", "d2c"], capture_output=True, text=True)
    if done.returncode != 0 or not model.exists():
        raise SystemExit("mnnconvert refused the model: " + (done.stdout + done.stderr)[-2000:])
    convert_s = time.perf_counter() - start
    interp = MNN.Interpreter(str(model))
    # Precision high alone still takes Winograd convolutions (heads off by ~1e-4 relative on yolov3-tiny);
    # session hint 3 (WINOGRAD_MEMORY_LEVEL) at 0 turns Winograd off: 1.3e-6.
    interp.setSessionHint(MNN_HINT_WINOGRAD_MEMORY_LEVEL, 0)
    session = interp.createSession({"precision": "high", "backend": "CPU", "numThread": 2})
    tensor_in = interp.getSessionInput(session)
    outs: dict[str, list[np.ndarray]] = {blob: [] for blob in req["outputs"]}
    for sample in x:
        batch = np.ascontiguousarray(sample[None], dtype=np.float32)
        host = MNN.Tensor(batch.shape, MNN.Halide_Type_Float, batch, MNN.Tensor_DimensionType_Caffe)
        tensor_in.copyFrom(host)
        interp.runSession(session)
        available = interp.getSessionOutputAll(session)
        for blob, names in req["outputs"].items():
            out = _pick(available, names)
            shape = out.getShape()
            copy = MNN.Tensor(shape, MNN.Halide_Type_Float, np.zeros(shape, np.float32),
                              MNN.Tensor_DimensionType_Caffe)
            out.copyToHostTensor(copy)
            outs[blob].append(np.array(copy.getNumpyData(), dtype=np.float32).reshape(shape))
    return ({b: np.concatenate(v) for b, v in outs.items()},
            {"toolchain_version": getattr(MNN, "version", lambda: "?")(), "convert_seconds": convert_s})


def run_rknn(req: dict, x: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    from importlib.metadata import version

    from rknn.api import RKNN
    rknn = RKNN(verbose=False)
    start = time.perf_counter()
    channels = x.shape[1]
    rknn.config(mean_values=[[0.0] * channels], std_values=[[1.0] * channels], target_platform="rk3588")
    if rknn.load_caffe(model=req["prototxt"], blobs=req["caffemodel"]) != 0:
        raise SystemExit("RKNN-Toolkit2 refused the model (load_caffe)")
    if rknn.build(do_quantization=False) != 0:
        raise SystemExit("RKNN-Toolkit2 could not build the model")
    convert_s = time.perf_counter() - start
    if rknn.init_runtime() != 0:
        raise SystemExit("RKNN-Toolkit2's simulator did not start")
    shapes = req["shapes"]
    outs: dict[str, list[np.ndarray]] = {blob: [] for blob in req["outputs"]}
    for sample in x:
        results = rknn.inference(inputs=[np.ascontiguousarray(sample[None])], data_format=["nchw"])
        # its outputs come in the net's output order; match them to blobs by shape, then by order
        pool = [np.asarray(r, dtype=np.float32) for r in results]
        for blob in req["outputs"]:
            want = int(np.prod(shapes[blob]))
            k = next(i for i, r in enumerate(pool) if r.size == want)
            outs[blob].append(pool.pop(k).reshape(shapes[blob])[None])
    rknn.release()
    return ({b: np.concatenate(v) for b, v in outs.items()},
            {"toolchain_version": version("rknn-toolkit2"), "convert_seconds": convert_s})


RUNNERS = {"openvino": run_openvino, "mnn": run_mnn, "rknn": run_rknn}


def main() -> int:
    req = json.loads(Path(sys.argv[1]).read_text())
    x = np.load(req["inputs"])
    start = time.perf_counter()
    outs, meta = RUNNERS[req["target"]](req, x)
    meta["total_seconds"] = time.perf_counter() - start
    np.savez(req["result"], meta=np.array(json.dumps(meta)), **outs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
