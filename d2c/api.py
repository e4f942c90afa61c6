"""The Python API behind `import d2c`: convert, detect and parity as calls, not commands.

Why here and not in d2c/__init__.py: `import d2c.errors` (which every module does) runs the
package's __init__, so that file must stay free of heavy imports; everything below imports
its engine only when called. The CLI uses these same entry points (`d2c detect` runs a
Detector), so the API and the commands cannot drift apart.

`d2c.convert` and `d2c.parity` are also the names of submodules; `callable_module` lets the
module object itself be called, so `d2c.convert(cfg, weights, out)` works whether or not the
submodule was imported before (importing it rebinds the package attribute to the module).
"""
from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import numpy as np

from d2c.errors import D2CError

DECODED_HEADS = ("yolo", "region", "detection")


def callable_module(module_name: str, function_name: str) -> None:
    """Make module `module_name` callable: calling it calls its `function_name` (looked up at
    call time, so monkeypatching the function still works)."""
    module = sys.modules[module_name]

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(self, function_name)(*args, **kwargs)

    CallableModule.__call__.__doc__ = getattr(module, function_name).__doc__
    module.__class__ = CallableModule


class Detector:
    """A converted model loaded once, detecting on many images with Darknet-exact pre- and
    post-processing.

    >>> det = d2c.Detector("out/yolov3-tiny", engine="opencv")
    >>> record = det("dog.jpg", thresh=0.25)
    >>> [(d["name"], round(d["score"], 2)) for d in record["detections"]]

    `model` is a `d2c convert` output directory or its .prototxt, or a `d2c train` run directory
    or snapshot (converted on the fly, names from its .data); `engine` is "caffe"
    (pycaffe) or "opencv" (cv2.dnn on the same files); `names` a class names file (default:
    the names recorded at convert time, else COCO/VOC by class count, else numbers).
    """

    def __init__(self, model: str | Path, engine: str = "caffe", names: str | Path | None = None) -> None:
        from d2c.detect import Engine, class_names, load_model_files
        from d2c.model_resolve import resolve_model   # a d2c train run or snapshot: its deploy model and names
        model, run_names = resolve_model(model)
        names = names or run_names
        files = load_model_files(model)
        heads = files.sidecar["heads"]
        if not heads:
            raise D2CError(f"{files.sidecar_path}: the model has no detection head (a classifier?); "
                           "d2c detect decodes [yolo] and [region] heads only")
        kinds = {head["kind"] for head in heads}
        if not kinds <= set(DECODED_HEADS) or ("detection" in kinds and len(heads) > 1):
            raise D2CError(f"{files.sidecar_path}: heads {sorted(kinds)}: d2c detect decodes [yolo] and "
                           "[region] heads, or one YOLOv1 [detection] head")
        channels = int(files.sidecar["input"].get("channels", 3))
        if channels != 3:
            raise D2CError(f"{files.sidecar_path}: the model takes {channels} input channel(s); d2c detect feeds "
                           "3-channel RGB images, as Darknet's detector does")
        self.files = files
        self.engine_name = engine
        self.names = class_names(files.classes, names, files.sidecar.get("names"))
        self._engine = Engine(files, engine)

    @property
    def classes(self) -> int:
        return self.files.classes

    def detect_frame(self, image: np.ndarray, thresh: float = 0.25, hier: float = 0.5,
                     nms: float = 0.45) -> tuple[list[Any], dict[str, Any]]:
        """(3, h, w) float32 RGB in [0, 1] -> (Darknet detections, the JSON record body)."""
        from d2c.detect import F32, detections_to_json, pixel_box
        dets, (im_w, im_h) = self._engine.detect_image(image, thresh, hier, nms)
        rows = detections_to_json(dets, thresh)
        for row in rows:
            row["name"] = self.names[row["class"]]
            row["box_px"] = list(pixel_box(np.asarray(row["box"], dtype=F32), im_w, im_h))
        return dets, {"width": im_w, "height": im_h, "engine": self.engine_name, "detections": rows}

    def __call__(self, image: str | Path | np.ndarray, thresh: float = 0.25, hier: float = 0.5,
                 nms: float = 0.45) -> dict[str, Any]:
        """One image (a path, or a (3, h, w) float32 RGB array) -> its record, as `d2c detect --json`
        prints it: {"image", "frame", "width", "height", "engine", "detections": [...]}."""
        from d2c.image import load_image_rgb
        array = image if isinstance(image, np.ndarray) else load_image_rgb(image)
        _, body = self.detect_frame(array, thresh, hier, nms)
        name = None if isinstance(image, np.ndarray) else str(image)
        return {"image": name, "frame": None, **body}

    detect = __call__
