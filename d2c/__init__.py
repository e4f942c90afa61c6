"""d2c: port Darknet YOLO models to stock Caffe and prove the port is exact.

The Python API (the `d2c` command is a thin layer over the same calls)::

    import d2c

    report = d2c.convert("yolov3-tiny.cfg", "yolov3-tiny.weights", "out/tiny", fold_bn=False)
    print(report.prototxt, report.caffemodel, report.outputs)

    detector = d2c.Detector("out/tiny", engine="caffe")        # or engine="opencv"
    record = detector("dog.jpg", thresh=0.25, nms=0.45)
    for det in record["detections"]:
        print(det["name"], det["score"], det["box_px"])       # box_px: left, top, right, bottom

    result = d2c.parity("yolov3-tiny.cfg", "yolov3-tiny.weights", steps=1)   # real Darknet vs Caffe
    print(result.ok, result.to_json()["forward"])

- `d2c.convert(cfg, weights, out, **opts)` -> d2c.convert.ConvertReport. Options: flavor,
  fold_bn, continue_on_error, allow_trailing, seed (random weights when `weights` is None),
  train, bn, batch, name, names (a class names file recorded in the sidecar), target (a deploy
  toolchain from d2c.targets: the net is linted and rewritten for its importer).
- `d2c.Detector(model, engine="caffe", names=None)`: call it on an image path or a (3, h, w)
  float32 RGB array; returns the record `d2c detect --json` prints.
- `d2c.parity(cfg, weights=None, **opts)` -> d2c.parity.ParityReport (`.ok`, `.to_json()`).
  Options: images, truth_file, batch, subdivisions, steps, bn, darknet_compat, seed, size,
  net_overrides. Needs Debian's libdarknet.so and pycaffe.

`d2c.targets.verify.verify(model, images, target)` runs a converted model in a deploy toolchain
and returns the report `d2c verify --json` writes.

Every mistake in the inputs raises d2c.errors.D2CError (a one-line message, `.problems` for
the details); nothing is written unless a conversion succeeds.
"""
from __future__ import annotations

import sys
from typing import Any

__version__ = "0.1.0"
__all__ = ["Detector", "D2CError", "convert", "parity", "__version__"]

from d2c.errors import D2CError  # noqa: E402


def __getattr__(name: str) -> Any:
    """Load the API lazily: `import d2c` stays cheap for the CLI and for every submodule."""
    if name == "convert":
        import d2c.convert   # binds the package attribute to the (callable, see d2c.api) module
        return sys.modules["d2c.convert"]
    if name == "parity":
        import d2c.parity
        return sys.modules["d2c.parity"]
    if name == "Detector":
        from d2c.api import Detector
        return Detector
    raise AttributeError(f"module 'd2c' has no attribute {name!r}")
