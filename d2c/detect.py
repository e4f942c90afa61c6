"""`d2c detect`: run a converted model with Darknet-exact pre- and post-processing.

Why exact: a port is only trustworthy if the converted model prints the very detections
Darknet prints. So the input is Darknet's letterbox (d2c.image), and decoding follows
pjreddie's src/yolo_layer.c, src/region_layer.c, src/network.c (fill_network_boxes),
src/box.c (do_nms_sort) and src/image.c (draw_detections print order), with the floating
point of the Debian build: logistic and the w/h exponentials in double, everything else in
float32 in the same operation order. AlexeyAB heads add scale_x_y and new_coords (its
src/yolo_layer.c); its logistic is float (expf). The activations, box decode and IoU are
d2c.numerics, the very functions the training loss uses, and the head parameters come from
d2c.head_params, so detect and the loss agree bit for bit.

Differences from Darknet, on purpose: unreadable images are an error (Darknet substitutes a
black 10x10 image), and hierarchical (YOLO9000) region heads are not supported.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from d2c.errors import D2CError, DatasetError, EngineError
from d2c.fsutil import input_errors
from d2c.head_params import RegionParams, YoloParams, decode_params
from d2c.image import letterbox, letterbox_size, load_image_rgb
from d2c.numerics import Box, box_iou, region_activate, yolo_activate, yolo_box

F32 = np.float32
F64 = np.float64
DARKNET_DATA = Path("/usr/share/darknet/data")
ENGINES = ("caffe", "opencv")


# --------------------------------------------------------------------------------------------
# Detections
# --------------------------------------------------------------------------------------------

@dataclass
class Detection:
    """One Darknet `detection`: box relative to the original image, objectness, class probs.

    `prob[j]` is objectness * class probability when that exceeds the threshold, else 0.
    `classes` is what Darknet stores in det.classes: the head's class count for [yolo], and
    0 for [region] (get_region_detections never sets it).
    """

    bbox: np.ndarray          # float32 (4,): x, y, w, h (centre and size), relative
    objectness: np.float32
    prob: np.ndarray          # float32 (classes,)
    classes: int
    head: int = 0             # position of the producing head in the sidecar (cfg order)

    def to_dict(self) -> dict[str, Any]:
        return {"bbox": [float(v) for v in self.bbox], "objectness": float(self.objectness),
                "prob": [float(v) for v in self.prob], "classes": self.classes, "head": self.head}


@dataclass
class _Batch:
    """Detections of one head as parallel arrays (decoding is vectorised)."""

    boxes: np.ndarray       # (n, 4) float32
    objectness: np.ndarray  # (n,) float32
    probs: np.ndarray       # (n, classes) float32
    classes: int


def _correct_boxes(boxes: np.ndarray, im_w: int, im_h: int, net_w: int, net_h: int,
                   alexeyab: bool) -> np.ndarray:
    """Undo the letterbox (correct_yolo_boxes / correct_region_boxes, relative=1).

    x, y: (x - (net - new)/2./net) / ((float)new/net), evaluated in double and rounded to
    float. Debian's -Ofast build multiplies by the double reciprocal of the float ratio, so
    we do too. w, h: multiplied by the float (float)net/new (AlexeyAB: 1/ratio). Debian's
    build computes that quotient with rcpps plus one Newton step, whose result depends on
    the CPU model, so w and h can differ from Darknet's by 1 ulp when new != net.
    """
    new_w, new_h = letterbox_size(im_w, im_h, net_w, net_h)
    out = np.empty_like(boxes)
    ratio_w = F32(new_w) / F32(net_w)
    ratio_h = F32(new_h) / F32(net_h)
    shift_x = F64(net_w - new_w) * 0.5 / F64(net_w)
    shift_y = F64(net_h - new_h) * 0.5 / F64(net_h)
    out[:, 0] = ((boxes[:, 0].astype(F64) - shift_x) * (1.0 / F64(ratio_w))).astype(F32)
    out[:, 1] = ((boxes[:, 1].astype(F64) - shift_y) * (1.0 / F64(ratio_h))).astype(F32)
    if alexeyab:
        scale_w, scale_h = F32(1) / ratio_w, F32(1) / ratio_h
    else:
        scale_w, scale_h = F32(net_w) / F32(new_w), F32(net_h) / F32(new_h)
    out[:, 2] = boxes[:, 2] * scale_w
    out[:, 3] = boxes[:, 3] * scale_h
    return out


def _head_input(outputs: dict[str, np.ndarray], head: dict[str, Any]) -> np.ndarray:
    """The raw (C, H, W) float32 input of one head, checked against the sidecar."""
    blob = head["blob"]
    if blob not in outputs:
        raise EngineError(f"the network produced no blob '{blob}' (head of layer {head.get('index')}); "
                          f"got {sorted(outputs)}")
    raw = np.asarray(outputs[blob], dtype=F32)
    if raw.ndim == 4:
        if raw.shape[0] != 1:
            raise EngineError(f"blob '{blob}': batch {raw.shape[0]}, expected 1")
        raw = raw[0]
    if list(raw.shape) != list(head["shape"]):
        raise EngineError(f"blob '{blob}' has shape {list(raw.shape)}, the sidecar says {head['shape']}")
    return raw


def _decode_yolo(raw: np.ndarray, p: YoloParams, thresh: F32, activated: bool = False) -> _Batch:
    """get_yolo_detections: cell-major (row, col, anchor) for objectness > thresh. `activated`: `raw`
    is already forward_yolo_layer's output (a split head rebuilt by d2c.int8_heads.merge_split)."""
    classes, n = p.classes, p.n
    lh, lw = raw.shape[-2:]
    grid = raw.reshape(n, 5 + classes, lh, lw)
    out = grid if activated else yolo_activate(grid.copy(), p.flavor, p.scale_x_y, p.new_coords)

    # (cell, anchor) order: transpose the anchor axis inside the cell axis.
    flat = out.reshape(n, 5 + classes, lh * lw).transpose(2, 0, 1)     # (cells, n, entries)
    objectness = flat[:, :, 4]
    cell, slot = np.nonzero(objectness > thresh)
    sel = flat[cell, slot]                                               # (k, entries)
    anchors = np.asarray(p.anchors, dtype=F32)   # (float)atof, as Darknet stores them
    anchor_idx = np.asarray(p.mask, dtype=np.int64)[slot]
    box = yolo_box(sel[:, 0], sel[:, 1], sel[:, 2], sel[:, 3], cell % lw, cell // lw, lw, lh,
                   anchors[2 * anchor_idx], anchors[2 * anchor_idx + 1], p.net_w, p.net_h, p.new_coords)
    boxes = np.stack(box, axis=1).astype(F32).reshape(len(cell), 4)
    obj = sel[:, 4].astype(F32)
    probs = obj[:, None] * sel[:, 5:]
    probs = np.where(probs > thresh, probs, F32(0)).astype(F32)
    return _Batch(boxes=boxes, objectness=obj, probs=probs, classes=classes)


def _decode_region(raw: np.ndarray, p: RegionParams, thresh: F32) -> _Batch:
    """get_region_detections: every (anchor, row, col), anchor-major; det.classes stays 0."""
    classes, coords, num = p.classes, p.coords, p.num
    _, lh, lw = raw.shape
    entries = coords + classes + 1
    out = region_activate(raw.reshape(num, entries, lh, lw).copy(), coords, classes, p.background, p.softmax)

    flat = out.reshape(num, entries, lh * lw).transpose(0, 2, 1).reshape(num * lh * lw, entries)
    cell = np.tile(np.arange(lh * lw), num)
    slot = np.repeat(np.arange(num), lh * lw)
    anchors = np.asarray(p.anchors, dtype=F32)
    # Region anchors are in grid cells: divided by the layer size, not the network size.
    box = yolo_box(flat[:, 0], flat[:, 1], flat[:, 2], flat[:, 3], cell % lw, cell // lw, lw, lh,
                   anchors[2 * slot], anchors[2 * slot + 1], lw, lh)
    boxes = np.stack(box, axis=1).astype(F32).reshape(len(cell), 4)
    scale = np.ones(len(cell), dtype=F32) if p.background else flat[:, coords].astype(F32)
    objectness = np.where(scale > thresh, scale, F32(0)).astype(F32)
    # Class j is read at entry coords+1+j even with background=1 (Darknet's own indexing).
    probs = scale[:, None] * flat[:, coords + 1:coords + 1 + classes]
    probs = np.where((probs > thresh) & (objectness[:, None] != 0), probs, F32(0)).astype(F32)
    return _Batch(boxes=boxes, objectness=objectness, probs=probs, classes=0)


def decode_heads(outputs: dict[str, np.ndarray], sidecar: dict[str, Any], im_w: int, im_h: int,
                 thresh: float, hier: float = 0.5, letterboxed: bool = True) -> list[Detection]:
    """Darknet's get_network_boxes(relative=1) over the raw head inputs, in its order.

    `outputs` maps the sidecar's head blob names to (1, C, H, W) arrays; `im_w, im_h` is the
    original image size. `hier` only matters for hierarchical heads, which are rejected.
    `letterboxed=False` (AlexeyAB's plain resize) leaves the boxes as decoded.
    """
    heads = sidecar.get("heads") or []
    if not heads:
        raise D2CError("the model has no [yolo] or [region] head to decode")
    net_w, net_h = int(sidecar["input"]["width"]), int(sidecar["input"]["height"])
    alexeyab = sidecar.get("flavor") == "alexeyab"
    thresh32 = F32(thresh)
    # make_network_boxes sizes every prob array by the *last* layer's class count.
    alloc = int(heads[-1]["classes"])
    dets: list[Detection] = []
    for position, head in enumerate(heads):
        if head.get("split"):    # an int8-friendly split head: the parts, the logistic already applied
            from d2c.int8_heads import merge_split
            raw = merge_split(outputs, head, "alexeyab" if alexeyab else "pjreddie")
        else:
            raw = _head_input(outputs, head)
        if head["kind"] not in ("yolo", "region"):
            raise D2CError(f"cannot decode a '{head['kind']}' head")
        if head.get("tree") or head.get("map"):
            raise D2CError("hierarchical (YOLO9000) region heads are not supported by d2c detect")
        p = decode_params(head["kind"], head, net_w, net_h, "alexeyab" if alexeyab else "pjreddie")
        if head["kind"] == "yolo":
            batch = _decode_yolo(raw, p, thresh32, activated=bool(head.get("split")))
        else:
            batch = _decode_region(raw, p, thresh32)
        width = batch.probs.shape[1]
        if width > alloc:
            raise D2CError(f"head {position} has {width} classes but the last head only {alloc}; "
                           "Darknet would overflow its probability arrays")
        probs = np.zeros((batch.probs.shape[0], alloc), dtype=F32)
        probs[:, :width] = batch.probs
        boxes = (_correct_boxes(batch.boxes, im_w, im_h, net_w, net_h, alexeyab and head["kind"] == "yolo")
                 if letterboxed else batch.boxes)
        for k in range(boxes.shape[0]):
            dets.append(Detection(bbox=boxes[k], objectness=F32(batch.objectness[k]), prob=probs[k],
                                  classes=batch.classes, head=position))
    return dets


# --------------------------------------------------------------------------------------------
# NMS
# --------------------------------------------------------------------------------------------

#: An NMS overlap: one box against many (numerics.Box of float32 arrays) -> values compared with nms.
Overlap = Callable[[Box, Box], np.ndarray]


def do_nms_sort(dets: list[Detection], classes: int, nms: float, overlap: Overlap = box_iou) -> list[Detection]:
    """box.c do_nms_sort, returning the detections in Darknet's final order.

    Darknet first moves zero-objectness detections to the end by swapping (which permutes
    the rest), then for each class stable-sorts the others by that class's probability
    (glibc's qsort is a merge sort) and zeroes the probability of every later box that
    overlaps a kept one by `overlap` > nms: pjreddie's IoU by default; AlexeyAB's diounms_sort
    is the same loop with its DIoU (d2c.detect_alexeyab). The input list is not modified.
    """
    count = len(dets)
    if count == 0:
        return []
    nms32 = F32(nms)
    boxes = np.stack([d.bbox for d in dets]).astype(F32)
    objectness = np.array([d.objectness for d in dets], dtype=F32)
    probs = np.stack([np.asarray(d.prob, dtype=F32) for d in dets]).copy()
    order = list(range(count))
    last = count - 1
    i = 0
    while i <= last:
        if objectness[order[i]] == 0:
            order[i], order[last] = order[last], order[i]
            last -= 1
        else:
            i += 1
    total = last + 1
    perm = np.asarray(order, dtype=np.int64)
    for k in range(min(classes, probs.shape[1])):
        head = perm[:total]
        key = probs[head, k]
        perm[:total] = head[np.argsort(-key, kind="stable")]
        kept = int(np.count_nonzero(probs[perm[:total], k]))   # non-zero ones sort first
        for pos in range(kept):
            current = perm[pos]
            if probs[current, k] == 0:
                continue
            later = perm[pos + 1:kept]
            if later.size == 0:
                break
            overlapping = overlap(Box(*boxes[current]), Box(*boxes[later].T)) > nms32
            probs[later[overlapping], k] = 0
    return [Detection(bbox=dets[j].bbox.copy(), objectness=dets[j].objectness, prob=probs[j],
                      classes=dets[j].classes, head=dets[j].head) for j in perm.tolist()]


def detections_to_json(dets: list[Detection], thresh: float) -> list[dict[str, Any]]:
    """One entry per (box, class) with prob > thresh, in draw_detections' print order."""
    thresh32 = F32(thresh)
    rows: list[dict[str, Any]] = []
    for det in dets:
        for j in np.nonzero(np.asarray(det.prob, dtype=F32) > thresh32)[0].tolist():
            rows.append({"class": int(j), "score": float(det.prob[j]),
                         "box": [float(v) for v in det.bbox]})
    return rows


# --------------------------------------------------------------------------------------------
# Models and engines
# --------------------------------------------------------------------------------------------

@dataclass
class ModelFiles:
    """A converted model: the Caffe files plus the decoding sidecar."""

    prototxt: Path
    caffemodel: Path
    sidecar_path: Path
    sidecar: dict[str, Any]

    @property
    def input_size(self) -> tuple[int, int]:
        return int(self.sidecar["input"]["width"]), int(self.sidecar["input"]["height"])

    @property
    def classes(self) -> int:
        return int(self.sidecar["heads"][-1]["classes"])


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise D2CError(f"{path}: cannot read the sidecar ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise D2CError(f"{path}: not a valid JSON sidecar ({exc})") from None
    if not isinstance(data, dict) or "d2c_sidecar" not in data:
        raise D2CError(f"{path}: not a d2c sidecar (no 'd2c_sidecar' key)")
    problems = [f"missing key '{k}'" for k in ("input", "heads") if k not in data]
    if not problems:
        if not all(k in data["input"] for k in ("width", "height")):
            problems.append("'input' needs width and height")
        for i, head in enumerate(data["heads"]):
            needed = ("kind", "blob", "shape", "classes") + (("anchors",) if head.get("kind") != "detection" else ())
            missing = [k for k in needed if k not in head]
            if missing:
                problems.append(f"heads[{i}] lacks {', '.join(missing)}")
    if problems:
        raise D2CError(f"{path}: malformed d2c sidecar", problems)
    return data


def load_model_files(model: str | Path) -> ModelFiles:
    """Resolve MODEL (a `d2c convert` output directory or its .prototxt) to its three files."""
    path = Path(model)
    if path.is_dir():
        sidecars = []
        for candidate in sorted(path.glob("*.json")):
            try:
                if "d2c_sidecar" in json.loads(candidate.read_text(encoding="utf-8")):
                    sidecars.append(candidate)
            except (OSError, ValueError, TypeError):
                continue
        if not sidecars:
            raise D2CError(f"{path}: no d2c sidecar (.json) here; is this a `d2c convert` output directory?")
        if len(sidecars) > 1:
            raise D2CError(f"{path}: several converted models here ({', '.join(s.name for s in sidecars)}); "
                           "pass the .prototxt of the one to use")
        sidecar_path = sidecars[0]
    elif path.suffix == ".prototxt":
        if not path.is_file():
            raise D2CError(f"{path}: no such prototxt")
        sidecar_path = path.with_suffix(".json")
        if not sidecar_path.is_file():
            raise D2CError(f"{path}: its sidecar {sidecar_path.name} is missing beside it")
    elif not path.exists():
        raise D2CError(f"{path}: no such model directory or .prototxt")
    else:
        raise D2CError(f"{path}: expected a `d2c convert` output directory or a .prototxt")
    sidecar = _read_sidecar(sidecar_path)
    base = sidecar_path.parent
    prototxt = path if path.suffix == ".prototxt" else base / sidecar.get("prototxt", sidecar_path.stem + ".prototxt")
    caffemodel = base / sidecar.get("caffemodel", sidecar_path.stem + ".caffemodel")
    for needed in (prototxt, caffemodel):
        if not needed.is_file():
            raise D2CError(f"{needed}: missing (named by the sidecar {sidecar_path})")
    return ModelFiles(prototxt=prototxt, caffemodel=caffemodel, sidecar_path=sidecar_path, sidecar=sidecar)


def _output_layers(prototxt: Path, blobs: list[str]) -> list[tuple[str, int]]:
    """OpenCV addresses outputs by layer: (the last layer writing each head blob, its top index),
    since a Slice writes several outputs and `forward(name)` gives only the first."""
    from d2c.caffe.proto import parse_prototxt
    net = parse_prototxt(prototxt.read_text(encoding="utf-8"), str(prototxt))
    writer: dict[str, tuple[str, int]] = {}
    for layer in net.get("layer", []):
        for position, top in enumerate(layer.get("top", [])):
            writer[top] = (layer.get("name", top), position)
    return [writer.get(b, (b, 0)) for b in blobs]


def check_model_files(prototxt: Path, caffemodel: Path) -> None:
    """Parse both files ourselves first: a Caffe CHECK failure on a bad file would abort the process."""
    from d2c.caffe.proto import net_from_prototxt, read_caffemodel
    try:
        text = Path(prototxt).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise D2CError(f"{prototxt}: not UTF-8 text (byte offset {exc.start})") from None
    except OSError as exc:
        raise D2CError(f"{prototxt}: cannot read: {exc.strerror}") from None
    net_from_prototxt(text, str(prototxt))
    read_caffemodel(caffemodel)


class Engine:
    """A loaded converted network on pycaffe or OpenCV; forward() returns the head inputs."""

    def __init__(self, files: ModelFiles, engine: str = "caffe") -> None:
        if engine not in ENGINES:
            raise D2CError(f"unknown engine '{engine}'; choose from {', '.join(ENGINES)}")
        self.files = files
        self.engine = engine
        from d2c.int8_heads import output_blobs
        self.blobs = output_blobs(files.sidecar)
        self.input_name = files.sidecar["input"].get("name", "data")
        check_model_files(files.prototxt, files.caffemodel)
        try:
            if engine == "caffe":
                from d2c.engines import import_caffe
                caffe = import_caffe()
                self._net = caffe.Net(str(files.prototxt), str(files.caffemodel), caffe.TEST)
            else:
                from d2c.engines import import_cv2
                cv2 = import_cv2()
                self._net = cv2.dnn.readNetFromCaffe(str(files.prototxt), str(files.caffemodel))
                self._net.setPreferableBackend(cv2.dnn.DNN_BACKEND_OPENCV)
                self._net.setPreferableTarget(cv2.dnn.DNN_TARGET_CPU)
                self._layers = _output_layers(files.prototxt, self.blobs)
        except D2CError:
            raise
        except Exception as exc:  # engines raise their own types (RuntimeError, cv2.error)
            raise EngineError(f"{engine} could not load {files.prototxt} + {files.caffemodel}: "
                              f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}") from None

    def forward(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        """(3, H, W) letterboxed input -> {head blob: (1, C, H, W) float32}."""
        batch = np.ascontiguousarray(tensor[None], dtype=F32)
        try:
            if self.engine == "caffe":
                self._net.blobs[self.input_name].data[...] = batch
                self._net.forward()
                return {b: np.array(self._net.blobs[b].data, dtype=F32, copy=True) for b in self.blobs}
            self._net.setInput(batch, self.input_name)
            names = list(dict.fromkeys(name for name, _ in self._layers))
            per_layer = dict(zip(names, self._net.forwardAndRetrieve(names), strict=True))
            return {b: np.array(per_layer[name][position], dtype=F32, copy=True)
                    for b, (name, position) in zip(self.blobs, self._layers, strict=True)}
        except Exception as exc:
            raise EngineError(f"{self.engine} forward failed on {self.files.prototxt}: {exc}") from None

    def detect(self, image_path: str | Path, thresh: float = 0.25, hier: float = 0.5,
               nms: float = 0.45) -> tuple[list[Detection], tuple[int, int]]:
        """Darknet's test_detector for one image: letterbox, forward, boxes, do_nms_sort."""
        return self.detect_image(load_image_rgb(image_path), thresh, hier, nms)

    def detect_image(self, image: np.ndarray, thresh: float = 0.25, hier: float = 0.5,
                     nms: float = 0.45) -> tuple[list[Detection], tuple[int, int]]:
        """The same on an image already loaded as (3, h, w) float32 RGB (a video frame, say)."""
        if self.files.sidecar.get("flavor") == "alexeyab":   # its resize/letterbox rule and NMS kinds
            from d2c.detect_alexeyab import detect_image
            return detect_image(self, image, thresh, nms)
        _, im_h, im_w = image.shape
        net_w, net_h = self.files.input_size
        if any(h["kind"] == "detection" for h in self.files.sidecar["heads"]):
            dets = self._detect_yolov1(image, thresh)
        else:
            outputs = self.forward(letterbox(image, net_w, net_h))
            dets = decode_heads(outputs, self.files.sidecar, im_w, im_h, thresh, hier)
        if nms:
            dets = do_nms_sort(dets, self.files.classes, nms)
        return dets, (im_w, im_h)

    def _detect_yolov1(self, image: np.ndarray, thresh: float) -> list[Detection]:
        """YOLOv1 (`darknet yolo test`): stretch to the net size, boxes relative to the image."""
        from d2c.decode_v1 import decode_detection
        from d2c.image import resize_image
        (head,) = self.files.sidecar["heads"]
        outputs = self.forward(resize_image(image, *self.files.input_size))
        boxes, objectness, probs = decode_detection(_head_input(outputs, head), head, thresh)
        return [Detection(bbox=boxes[k], objectness=objectness[k], prob=probs[k], classes=0)
                for k in range(boxes.shape[0])]


def run_model(model_dir: str | Path, image_path: str | Path, engine: str = "caffe") -> dict[str, np.ndarray]:
    """Letterbox one image and return the raw head inputs {blob: (1, C, H, W)}."""
    net = Engine(load_model_files(model_dir), engine)
    image = load_image_rgb(image_path)
    return net.forward(letterbox(image, *net.files.input_size))


# --------------------------------------------------------------------------------------------
# Names, drawing, CLI
# --------------------------------------------------------------------------------------------

def class_names(classes: int, names_file: str | Path | None = None,
                known: list[str] | None = None) -> list[str]:
    """--names, else the names recorded at convert time (`known`), else Darknet's COCO (80) or
    VOC (20) list, else the class numbers. A names file whose count differs from the model's
    class count is an error: Darknet would silently label with the wrong names (or crash)."""
    path: Path | None = Path(names_file) if names_file else None
    if path is None:
        if known:
            return list(known)
        path = {80: DARKNET_DATA / "coco.names", 20: DARKNET_DATA / "voc.names"}.get(classes)
        if path is None or not path.is_file():
            return [str(i) for i in range(classes)]
    with input_errors(path, "class names", "class names (one name per line)", DatasetError):
        lines = path.read_text(encoding="utf-8").splitlines()
    names = [line.strip() for line in lines if line.strip()]
    if len(names) != classes:
        raise DatasetError(f"{path}: {len(names)} class name(s) but the model has {classes} classes; "
                           "pass the names file the model was trained with")
    return names


def pixel_box(bbox: np.ndarray, im_w: int, im_h: int) -> tuple[int, int, int, int]:
    """draw_detections' integer box: (int)((x -+ w/2.)*W) in double, clamped to the image."""
    x, y, w, h = (float(v) for v in bbox)
    left = max(int((x - w / 2.0) * im_w), 0)
    right = min(int((x + w / 2.0) * im_w), im_w - 1)
    top = max(int((y - h / 2.0) * im_h), 0)
    bot = min(int((y + h / 2.0) * im_h), im_h - 1)
    return left, top, right, bot


# Darknet's colour table (src/image.c `colors`), indexed [stop][channel]; draw_detections reads
# channel 2 as red, 1 as green and 0 as blue.
DARKNET_COLORS = ((1, 0, 1), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 1, 0), (1, 0, 0))


def darknet_get_color(channel: int, x: int, top: int) -> F32:
    """Darknet's get_color: linear interpolation along the colour table, in float."""
    ratio = (F32(x) / F32(top)) * F32(5)
    lo, hi = math.floor(ratio), math.ceil(ratio)
    ratio = ratio - F32(lo)
    return F32((F32(1) - ratio) * F32(DARKNET_COLORS[lo][channel]) + ratio * F32(DARKNET_COLORS[hi][channel]))


def class_color(cls: int, classes: int) -> tuple[int, int, int]:
    """The box colour Darknet's draw_detections gives class `cls`, as OpenCV BGR bytes.

    offset = cls*123457 % classes (C int arithmetic); red = get_color(2, ...), green =
    get_color(1, ...), blue = get_color(0, ...); Darknet's save_image stores (unsigned char)(255*v).
    """
    classes = max(classes, 1)
    offset = cls * 123457 % classes
    red, green, blue = (darknet_get_color(c, offset, classes) for c in (2, 1, 0))
    return int(F32(255) * blue), int(F32(255) * green), int(F32(255) * red)


def _canvas(image: str | Path | np.ndarray) -> np.ndarray:
    """BGR bytes to draw on: the file's own pixels, or an RGB float image turned back into bytes."""
    from d2c.engines import import_cv2
    cv2 = import_cv2()
    if isinstance(image, np.ndarray):
        planar = np.rint(np.clip(np.asarray(image, dtype=F64), 0, 1) * 255.0).astype(np.uint8)
        return np.ascontiguousarray(planar.transpose(1, 2, 0)[:, :, ::-1])
    raw = np.fromfile(Path(image), dtype=np.uint8)
    canvas = cv2.imdecode(raw, cv2.IMREAD_COLOR) if raw.size else None
    if canvas is None:
        raise DatasetError(f"{image}: not an image OpenCV can decode")
    return canvas


def draw(image: str | Path | np.ndarray, dets: list[Detection], names: list[str], out_path: str | Path,
         thresh: float = 0.25) -> Path:
    """Write the image with a labelled box per detection above thresh, in Darknet's colours, in
    the format `out_path`'s extension names (atomically)."""
    from d2c.engines import import_cv2
    from d2c.fsutil import atomic_write_bytes
    cv2 = import_cv2()
    canvas = _canvas(image)
    im_h, im_w = canvas.shape[:2]
    thresh32 = F32(thresh)
    width = max(int(im_h * 0.006), 1)
    for det in dets:
        hits = np.nonzero(np.asarray(det.prob, dtype=F32) > thresh32)[0].tolist()
        if not hits:
            continue
        label = ", ".join(names[j] if j < len(names) else str(j) for j in hits)
        color = class_color(hits[0], len(names))
        left, top, right, bot = pixel_box(det.bbox, im_w, im_h)
        cv2.rectangle(canvas, (left, top), (right, bot), color, width)
        scale = max(im_h * 0.03 / 22.0, 0.4)
        (tw, th), base = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        y0 = max(top - th - base, 0)
        cv2.rectangle(canvas, (left, y0), (left + tw + 2, y0 + th + base), color, -1)
        cv2.putText(canvas, label, (left + 1, y0 + th), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1,
                    cv2.LINE_AA)
    out = Path(out_path)
    extension = out.suffix.lower() or ".png"
    try:
        ok, encoded = cv2.imencode(extension, canvas)
    except cv2.error:
        ok = False
    if not ok:
        raise EngineError(f"OpenCV could not encode {out} as '{extension}'")
    atomic_write_bytes(out, encoded.tobytes())
    return out


def run_detect_cli(args: argparse.Namespace) -> int:
    """`d2c detect`: a table per image or frame, or JSON records (one document, or JSON Lines)."""
    from d2c.api import Detector
    from d2c.detect_inputs import OutputNamer, expand_inputs, first_problem, iter_frames
    for value, name in ((args.thresh, "--thresh"), (args.hier, "--hier"), (args.nms, "--nms")):
        if not (math.isfinite(value) and 0 <= value <= 1):
            raise D2CError(f"{name} {value}: must be between 0 and 1")
    sources = expand_inputs(args.images)          # fail fast, before loading a model
    problem = first_problem(sources)
    if problem and not args.skip_bad:
        raise DatasetError(f"{problem} (--skip-bad reports it and goes on)")
    namer = OutputNamer(args.out, sources)
    frames = iter_frames(sources, frame_stride=args.frame_stride, max_frames=args.max_frames)
    detector = Detector(args.model, engine=args.engine, names=args.names)
    json_mode = args.json or args.jsonl
    records: list[dict[str, Any]] = []
    failed: list[str] = []
    total = None if any(s.kind == "video" for s in sources) else len(sources)
    from tqdm import tqdm
    bar = tqdm(frames, total=total, desc="detect", unit="image", leave=False,
               disable=not (sys.stderr.isatty() and (total is None or total > 3)))
    for frame in bar:
        record: dict[str, Any] = {"image": str(frame.source), "frame": frame.frame}
        if frame.error:
            failed.append(frame.error)
            if not json_mode and not args.skip_bad:
                raise DatasetError(f"{frame.error} (--skip-bad reports it and goes on)")
            record["error"] = frame.error
            if not json_mode:
                print(f"d2c detect: skipped: {frame.error}", file=sys.stderr)
        else:
            start = time.perf_counter()
            dets, record_body = detector.detect_frame(frame.image, args.thresh, args.hier, args.nms)
            seconds = time.perf_counter() - start
            record.update(record_body)
            out_path = namer.path_for(frame)
            if out_path is not None:
                draw(frame.image, dets, detector.names, out_path, args.thresh)
            if not json_mode:
                bar.write(_table(frame.label, record["detections"], seconds, args.engine, out_path))
        if args.jsonl:
            sys.stdout.write(json.dumps(record) + "\n")
            sys.stdout.flush()
        elif args.json:
            records.append(record)
    bar.close()
    if args.json:
        json.dump(records, sys.stdout, indent=1)
        sys.stdout.write("\n")
    if failed:
        if not args.skip_bad:
            raise DatasetError(f"{len(failed)} input(s) could not be read, first: {failed[0]} "
                               "(--skip-bad accepts that)")
        print(f"d2c detect: warning: skipped {len(failed)} unreadable input(s)", file=sys.stderr)
    return 0


def _table(label: str, rows: list[dict[str, Any]], seconds: float, engine: str, out_path: Path | None) -> str:
    lines = [f"{label}: {len(rows)} detection{'s' if len(rows) != 1 else ''} ({engine}, {seconds:.3f} s)"]
    if rows:
        width = max(12, *(len(r["name"]) for r in rows))
        lines.append(f"  {'class':<{width}} {'score':>6}  {'left':>5} {'top':>5} {'right':>5} {'bottom':>6}")
        for r in rows:
            left, top, right, bot = r["box_px"]
            percent = float(F32(r["score"]) * F32(100))     # Darknet: prob*100 in float, then %.0f
            lines.append(f"  {r['name']:<{width}} {percent:5.0f}%  {left:5d} {top:5d} {right:5d} {bot:6d}")
    if out_path is not None:
        lines.append(f"  wrote {out_path}")
    return "\n".join(lines)
