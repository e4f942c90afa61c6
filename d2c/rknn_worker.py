"""Runs inside RKNN-Toolkit2's own venv: build a converted Caffe model, run its x86 simulator.

Why a separate script: RKNN-Toolkit2 pins numpy and protobuf versions that clash with d2c's venv,
so d2c (d2c.int8_rknn) writes a JSON job, runs this file with the toolchain's Python, and reads
the results back from .npz files. It imports only the standard library, numpy and rknn.

Job keys: prototxt, caffemodel, config (rknn.config keyword arguments), quantize (bool), dataset
(calibration list, with quantize), fp16 (tensor name prefixes to keep in float16 through RKNN's
hybrid quantization, or null), proposal (RKNN's own hybrid proposal), inputs (.npy NCHW tensors),
outputs (.npz to write: one array per input and output, keys "i<input>_o<output>"), analysis
(an .npy input for accuracy_analysis, or null), export (a .rknn file to write, or null), workdir. Prints one JSON line on success.
"""
from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any


def _check(code: Any, what: str) -> None:
    if code != 0:
        raise RuntimeError(f"RKNN {what} failed (returned {code})")


def _set_fp16(cfg_path: Path, prefixes: list[str]) -> list[str]:
    """Write `custom_quantize_layers` into step 1's quantization cfg (YAML, edited as text: the
    toolchain's venv has no YAML writer we rely on): every tensor RKNN knows whose name starts with
    one of `prefixes` (d2c names a Darknet layer's blobs layerNNN_*) goes float16. Returns them."""
    text = cfg_path.read_text()
    known = re.findall(r"(?m)^    ([A-Za-z0-9_.:/-]+):$", text)
    chosen = [t for t in known if any(t.startswith(p) for p in prefixes) and not t.endswith("_int8")]
    body = "".join(f"    {t}: float16\n" for t in chosen)
    text = re.sub(r"(?m)^custom_quantize_layers:.*$", "custom_quantize_layers:\n" + body.rstrip("\n")
                  if chosen else "custom_quantize_layers: {}", text, count=1)
    cfg_path.write_text(text)
    return chosen


def run(job: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    from rknn.api import RKNN
    workdir = Path(job["workdir"])
    workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(workdir)                     # hybrid step 1 writes its files into the working directory
    rknn = RKNN(verbose=False)
    _check(rknn.config(**job["config"]), "config")
    _check(rknn.load_caffe(model=job["prototxt"], blobs=job["caffemodel"]), "load_caffe")
    result: dict[str, Any] = {"fp16": []}
    if job.get("fp16") is not None or job.get("proposal"):
        _check(rknn.hybrid_quantization_step1(dataset=job["dataset"], proposal=bool(job.get("proposal"))),
               "hybrid_quantization_step1")
        stem = Path(job["prototxt"]).stem
        cfg = workdir / f"{stem}.quantization.cfg"
        if job.get("fp16") is not None:
            result["fp16"] = _set_fp16(cfg, list(job["fp16"]))
        else:   # the proposal's own choice, as written by step 1
            result["fp16"] = re.findall(r"(?m)^    ([A-Za-z0-9_.:/-]+): float16$", cfg.read_text())
        rknn.release()
        rknn = RKNN(verbose=False)
        _check(rknn.hybrid_quantization_step2(model_input=str(workdir / f"{stem}.model"),
                                              data_input=str(workdir / f"{stem}.data"),
                                              model_quantization_cfg=str(cfg)), "hybrid_quantization_step2")
    else:
        _check(rknn.build(do_quantization=bool(job["quantize"]), dataset=job.get("dataset")), "build")
    if job.get("export"):
        _check(rknn.export_rknn(job["export"]), "export_rknn")
    _check(rknn.init_runtime(), "init_runtime (simulator)")
    arrays = {}
    for i, path in enumerate(job["inputs"]):
        outs = rknn.inference(inputs=[np.load(path)], data_format="nchw")
        if outs is None:
            raise RuntimeError(f"RKNN inference failed on {path}")
        for k, out in enumerate(outs):
            arrays[f"i{i}_o{k}"] = np.asarray(out, dtype=np.float32)
    np.savez(job["outputs"], **arrays)
    if job.get("analysis"):
        _check(rknn.accuracy_analysis(inputs=[job["analysis"]], output_dir=str(workdir / "analysis")),
               "accuracy_analysis")
        result["analysis"] = str(workdir / "analysis" / "error_analysis.txt")
    rknn.release()
    return result


def main() -> int:
    job = json.loads(Path(sys.argv[1]).read_text())
    result = run(job)
    print("D2C-RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
