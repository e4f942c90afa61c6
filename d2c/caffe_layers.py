"""DarknetDetectionData: a Caffe Python data layer that feeds `caffe train` d2c train's batches.

Why: a train net whose `data` and `truth` are Input blobs trains on zeros under the `caffe`
binary. This layer reads a Darknet .data file (its train list, label files and class count)
and produces, for the same seed, exactly the mini-batches `d2c train` feeds (Darknet's
load_data_detection augmentation, b*S picks per iteration drawn together). Thin by design: the
draws and the pixel work are d2c.augment's, the worker processes and the bounded queue are
d2c.loader's.

param_str: a JSON object (parsed with json, never evaluated) with the keys of DATA_SCHEMA:
  data (.data path), classes, batch (b), subdivisions (S, the solver's iter_size), width,
  height, record_boxes (truth row width / 5), loader_boxes (the last head's max), jitter, hue,
  saturation, exposure, no_augment, seed, workers, slots (mini-batches in flight), skip_bad.
Tops: data (b, 3, height, width) RGB in [0, 1]; truth (b, record_boxes*5) Darknet truth
records (x, y, w, h, class), zero-padded.

Darknet's multi-scale training (random=1) changes the input size every 10 batches. The stock
train net cannot follow that by reshaping alone (the loss layers are built for one input size
and some emitted crops depend on map sizes), so this layer keeps the cfg's size; `d2c train`
rebuilds the net and is the path that reproduces random=1.

Shutdown: pycaffe's Python layers are never freed (the C++ layer holds a strong reference to
its Python object, and the Python object owns the C++ layer), so a plain __del__ would never
run when the net is deleted. setup() drops that one reference, so deleting the net (or the
`caffe` process ending its solver) frees the layer and __del__ stops the workers; at
interpreter exit the loader's finalizer does it, and the workers die with their parent anyway.
"""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from d2c.engines import import_caffe
from d2c.errors import D2CError, DatasetError, ParamError
from d2c.loss.params import Key, load_params

caffe = import_caffe()

DATA_SCHEMA: dict[str, Key] = {
    "name": Key("str", default="data"),
    "data": Key("str", required=True),
    "classes": Key("int", required=True, minimum=1),
    "batch": Key("int", required=True, minimum=1),
    "subdivisions": Key("int", default=1, minimum=1),
    "width": Key("int", required=True, minimum=1),
    "height": Key("int", required=True, minimum=1),
    "record_boxes": Key("int", required=True, minimum=1),
    "loader_boxes": Key("int", default=0, minimum=0),       # 0: record_boxes
    "jitter": Key("float", default=0.2, minimum=0.0),
    "hue": Key("float", default=0.0, minimum=0.0),
    "saturation": Key("float", default=1.0, minimum=0.0),
    "exposure": Key("float", default=1.0, minimum=0.0),
    "no_augment": Key("bool", default=False),
    "seed": Key("int", default=0, minimum=0),
    "workers": Key("int", default=2, minimum=1),
    "slots": Key("int", default=0, minimum=0),              # 0: subdivisions + 1
    "skip_bad": Key("bool", default=False),
}


def open_loader(cfg: dict[str, Any]) -> Any:
    """The PrefetchLoader the parameters describe (the .data file is read and checked here)."""
    from d2c.dataset import DataSpec, load_split
    from d2c.loader import LoaderSettings, PrefetchLoader

    spec = DataSpec.load(cfg["data"])
    if spec.classes is not None and spec.classes != cfg["classes"]:
        raise DatasetError(f"{spec.where('classes')}: {spec.classes} classes, but the net was converted for "
                           f"classes={cfg['classes']}")
    samples, _problems = load_split(spec, "train", classes=cfg["classes"], skip_bad=cfg["skip_bad"])
    record = cfg["record_boxes"]
    settings = LoaderSettings(batch=cfg["batch"], subdivisions=cfg["subdivisions"], width=cfg["width"],
                              height=cfg["height"], record_boxes=record,
                              loader_boxes=min(cfg["loader_boxes"] or record, record), jitter=cfg["jitter"],
                              hue=cfg["hue"], saturation=cfg["saturation"], exposure=cfg["exposure"],
                              no_augment=cfg["no_augment"])
    return PrefetchLoader(samples, settings, np.random.default_rng(cfg["seed"]), workers=cfg["workers"],
                          slots=cfg["slots"] or None)


class DarknetDetectionData(caffe.Layer):
    """Tops data and truth from a Darknet .data file, rendered ahead by worker processes."""

    loader: Any = None

    def setup(self, bottom, top) -> None:
        self.cfg = load_params(self.param_str, DATA_SCHEMA, "DarknetDetectionData param_str")
        owner = f"Caffe layer '{self.cfg['name']}' (DarknetDetectionData)"
        if len(bottom) != 0 or len(top) != 2:
            raise ParamError(f"{owner}: takes no bottoms and has two tops (data, truth); got {len(bottom)} "
                             f"bottoms and {len(top)} tops")
        try:
            self.loader = open_loader(self.cfg)
        except D2CError as exc:
            raise type(exc)(f"{owner}: {exc}", exc.problems) from None
        # Drop the reference the C++ layer holds on this object (see the module docstring), so
        # that freeing the net frees this layer and __del__ stops the workers.
        ctypes.pythonapi.Py_DecRef(ctypes.py_object(self))

    def reshape(self, bottom, top) -> None:
        c = self.cfg
        top[0].reshape(c["batch"], 3, c["height"], c["width"])
        top[1].reshape(c["batch"], c["record_boxes"] * 5)

    def forward(self, bottom, top) -> None:
        self.loader.copy_next_into(top[0].data, top[1].data)

    def backward(self, top, propagate_down, bottom) -> None:
        pass

    @property
    def worker_pids(self) -> list[int]:
        return [] if self.loader is None else self.loader.worker_pids

    def close(self) -> None:
        if self.loader is not None:
            self.loader.close()

    def __del__(self) -> None:
        self.close()
