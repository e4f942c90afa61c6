"""pycaffe and OpenCV wrappers: load a converted net (in memory or from files) and run it.

Why a wrapper: tests, parity and bench all need "this CaffeNet, these inputs, every blob", and
pycaffe only loads from files; this writes a temporary prototxt/caffemodel pair and cleans up.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from d2c.caffe.proto import CaffeNet, to_prototxt, write_caffemodel
from d2c.engines import import_caffe, import_cv2
from d2c.errors import EngineError


def write_pair(net: CaffeNet, directory: str | Path, stem: str = "net") -> tuple[Path, Path]:
    """Write prototxt + caffemodel for `net` into `directory`."""
    directory = Path(directory)
    proto, model = directory / f"{stem}.prototxt", directory / f"{stem}.caffemodel"
    proto.write_text(to_prototxt(net))
    write_caffemodel(net, model)
    return proto, model


def load_caffe(net: CaffeNet, phase: str = "test"):
    """A pycaffe Net built from an in-memory CaffeNet (weights included)."""
    caffe = import_caffe()
    with tempfile.TemporaryDirectory(prefix="d2c-net-") as tmp:
        proto, model = write_pair(net, tmp)
        mode = caffe.TEST if phase == "test" else caffe.TRAIN
        try:
            return caffe.Net(str(proto), str(model), mode)
        except Exception as exc:  # pycaffe raises bare RuntimeError/ValueError
            raise EngineError(f"pycaffe could not load the converted net: {exc}") from exc


def caffe_forward(net, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run a pycaffe Net on `inputs` and return a copy of every blob."""
    for name, value in inputs.items():
        blob = net.blobs[name]
        if blob.data.shape != value.shape:
            blob.reshape(*value.shape)
    if any(net.blobs[n].data.shape != v.shape for n, v in inputs.items()):
        net.reshape()
    for name, value in inputs.items():
        net.blobs[name].data[...] = value
    net.forward()
    return {name: blob.data.copy() for name, blob in net.blobs.items()}


def opencv_forward(net: CaffeNet, x: np.ndarray, blobs: list[str]) -> dict[str, np.ndarray]:
    """Run the converted net in OpenCV's Caffe importer and return the named blobs."""
    cv2 = import_cv2()
    with tempfile.TemporaryDirectory(prefix="d2c-cv-") as tmp:
        proto, model = write_pair(net, tmp)
        cvnet = cv2.dnn.readNetFromCaffe(str(proto), str(model))
    # OpenCV addresses outputs by layer name: the last layer that wrote each blob (in-place chains).
    writer = {top: layer.name for layer in net.layers for top in layer.top}
    cvnet.setInput(x, "data")
    outs = cvnet.forward([writer[b] for b in blobs])
    return {name: np.asarray(out) for name, out in zip(blobs, outs)}
