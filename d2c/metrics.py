"""Detection quality: mAP@0.5 over an image list, with Darknet-exact decoding (d2c.detect).

Why our own: `d2c train` must show that a fine-tune helps, and the number must come from the
same decoding `d2c detect` (and Darknet) uses, on the Caffe net being trained or on a
converted model, not from a separate implementation with its own quirks.

Semantics (PASCAL VOC 2010+ style; Darknet's `validate_detector_map` is *not* reproduced):
- every image is letterboxed, run, decoded with `decode_heads` (threshold `thresh`, 0.005 by
  default as Darknet's map validator) and de-duplicated with Darknet's `do_nms_sort` (0.45);
- each (box, class) with probability > thresh is one detection with that score;
- per class, detections of all images are sorted by score (stable, so ties keep image order);
  a detection is a true positive when its best-overlapping ground-truth box of that class in
  the same image has IoU >= `iou_thresh` (0.5) and was not matched before, else a false
  positive (a duplicate of a matched box is a false positive, as in VOC);
- AP is the area under the precision envelope at every recall point ("all-point
  interpolation", VOC 2010+), not the 11-point average of VOC 2007;
- boxes are compared in image-relative coordinates; IoU is invariant to the per-axis scaling,
  so this equals the pixel IoU without VOC's +1 pixel convention;
- mAP is the mean over classes that have at least one ground-truth box; classes without any
  are reported with AP None and left out (VOC has no such classes).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2c.errors import D2CError
from d2c.numerics import Box, box_iou

F32 = np.float32
DEFAULT_THRESH = 0.005   # Darknet's validate_detector_map threshold
DEFAULT_NMS = 0.45
DEFAULT_IOU = 0.5

#: one prediction: (class, score, (x, y, w, h) centre/size relative to the image)
Prediction = tuple[int, float, tuple[float, float, float, float]]


@dataclass
class ClassAP:
    cls: int
    name: str
    ap: float | None         # None: no ground truth for this class
    ground_truth: int
    detections: int
    true_positives: int


@dataclass
class MapResult:
    map50: float
    per_class: list[ClassAP]
    images: int
    iou_thresh: float
    thresh: float
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"map": self.map50, "iou_thresh": self.iou_thresh, "thresh": self.thresh, "images": self.images,
                "per_class": [{"class": c.cls, "name": c.name, "ap": c.ap, "ground_truth": c.ground_truth,
                               "detections": c.detections, "true_positives": c.true_positives}
                              for c in self.per_class]}

    def summary(self) -> str:
        parts = [f"{c.name} {c.ap:.4f}" if c.ap is not None else f"{c.name} -" for c in self.per_class]
        return f"mAP@{self.iou_thresh:g} = {self.map50:.4f} over {self.images} images ({', '.join(parts)})"


# --------------------------------------------------------------------------------------------
# Pure functions
# --------------------------------------------------------------------------------------------

def iou_xywh(box: Sequence[float], others: np.ndarray) -> np.ndarray:
    """IoU of one centre/size box with each row of `others` (k, 4), in float64 (0 when empty)."""
    others = np.asarray(others, np.float64).reshape(-1, 4)
    return box_iou(Box(*np.asarray(box, np.float64)), Box(*others.T), zero_guard=True)


def average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """VOC 2010+ all-point AP: area under the monotone (right-to-left max) precision envelope."""
    rec = np.concatenate([[0.0], np.asarray(recall, np.float64), [1.0]])
    pre = np.concatenate([[0.0], np.asarray(precision, np.float64), [0.0]])
    for i in range(len(pre) - 2, -1, -1):
        pre[i] = max(pre[i], pre[i + 1])
    steps = np.nonzero(rec[1:] != rec[:-1])[0]
    return float(np.sum((rec[steps + 1] - rec[steps]) * pre[steps + 1]))


def evaluate(predictions: Sequence[Sequence[Prediction]], truths: Sequence[np.ndarray], classes: int,
             names: Sequence[str] | None = None, iou_thresh: float = DEFAULT_IOU,
             thresh: float = DEFAULT_THRESH) -> MapResult:
    """mAP from per-image predictions and per-image ground truth ((k, 5) rows class, x, y, w, h)."""
    if len(predictions) != len(truths):
        raise D2CError(f"evaluate: {len(predictions)} prediction lists for {len(truths)} images")
    names = list(names) if names is not None else [str(c) for c in range(classes)]
    per_class: list[ClassAP] = []
    for c in range(classes):
        gt = [np.asarray(t, np.float64).reshape(-1, 5) for t in truths]
        gt = [t[t[:, 0].astype(np.int64) == c, 1:5] for t in gt]
        n_gt = int(sum(len(t) for t in gt))
        dets = [(score, image, box) for image, preds in enumerate(predictions)
                for cls, score, box in preds if cls == c]
        order = sorted(range(len(dets)), key=lambda k: -dets[k][0])   # stable: ties keep image order
        matched = [np.zeros(len(t), bool) for t in gt]
        tp = np.zeros(len(dets))
        for rank, k in enumerate(order):
            _score, image, box = dets[k]
            if len(gt[image]):
                overlaps = iou_xywh(box, gt[image])
                best = int(np.argmax(overlaps))
                if overlaps[best] >= iou_thresh and not matched[image][best]:
                    matched[image][best] = True
                    tp[rank] = 1
        if n_gt == 0:
            per_class.append(ClassAP(c, names[c] if c < len(names) else str(c), None, 0, len(dets), 0))
            continue
        ctp = np.cumsum(tp)
        cfp = np.cumsum(1 - tp)
        recall = ctp / n_gt
        precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).tiny)
        ap = average_precision(recall, precision) if len(dets) else 0.0
        per_class.append(ClassAP(c, names[c] if c < len(names) else str(c), ap, n_gt, len(dets), int(tp.sum())))
    scored = [c.ap for c in per_class if c.ap is not None]
    if not scored:
        raise D2CError("evaluate: no ground-truth boxes in any image; mAP is undefined")
    return MapResult(map50=float(np.mean(scored)), per_class=per_class, images=len(truths),
                     iou_thresh=iou_thresh, thresh=thresh)


def predictions_from_detections(dets: Sequence[Any], thresh: float) -> list[Prediction]:
    """d2c.detect.Detection list (after NMS) -> one prediction per (box, class) with prob > thresh."""
    thresh32 = F32(thresh)
    out: list[Prediction] = []
    for det in dets:
        prob = np.asarray(det.prob, F32)
        box = tuple(float(v) for v in det.bbox)
        for c in np.nonzero(prob > thresh32)[0].tolist():
            out.append((int(c), float(prob[c]), box))   # type: ignore[arg-type]
    return out


# --------------------------------------------------------------------------------------------
# Detectors: a converted model on pycaffe, built from files or from Darknet arrays
# --------------------------------------------------------------------------------------------

class CaffeDetector:
    """A deploy (TEST-phase) pycaffe net plus its sidecar: image -> Darknet-ordered detections.

    Build it `from_arrays` (e.g. `d2c.parity.caffe_arrays` of a live train net: the weights and
    BN statistics being trained, run with inference BN as Darknet's detector would) or
    `from_model` (a `d2c convert` output directory or .prototxt).
    """

    def __init__(self, net: Any, sidecar: dict[str, Any]) -> None:
        self.net = net
        self.sidecar = sidecar
        self.blobs = [h["blob"] for h in sidecar["heads"]]
        self.width = int(sidecar["input"]["width"])
        self.height = int(sidecar["input"]["height"])
        self.classes = int(sidecar["heads"][-1]["classes"])

    @classmethod
    def from_arrays(cls, graph: Any, arrays: dict[int, dict[str, np.ndarray]], header: Any = None) -> CaffeDetector:
        from d2c.caffe.emitter import DEPLOY, ConvertOptions
        from d2c.caffe.runtime import load_caffe
        from d2c.convert import build_conversion
        from d2c.darknet.weights import WeightsHeader

        conv = build_conversion(graph, arrays, header or WeightsHeader(),
                                ConvertOptions(flavor=graph.flavor, mode=DEPLOY, batch=1))
        return cls(load_caffe(conv.net, phase="test"), conv.sidecar)

    @classmethod
    def from_model(cls, model: str | Path) -> CaffeDetector:
        from d2c.detect import Engine, load_model_files

        engine = Engine(load_model_files(model), "caffe")
        return cls(engine._net, engine.files.sidecar)

    def forward(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        self.net.blobs["data"].data[...] = np.asarray(tensor, F32)[None]
        self.net.forward()
        return {b: np.array(self.net.blobs[b].data, dtype=F32, copy=True) for b in self.blobs}

    def detect(self, image_path: str | Path, thresh: float = DEFAULT_THRESH, nms: float = DEFAULT_NMS) -> list[Any]:
        """Darknet's test_detector on one image: letterbox, forward, decode, do_nms_sort."""
        from d2c.detect import decode_heads, do_nms_sort
        from d2c.image import letterbox, load_image_rgb

        image = load_image_rgb(image_path)
        _, im_h, im_w = image.shape
        outputs = self.forward(letterbox(image, self.width, self.height))
        with np.errstate(over="ignore"):   # exp(-z) of a very negative logit: probability 0, as in Darknet
            dets = decode_heads(outputs, self.sidecar, im_w, im_h, thresh)
        return do_nms_sort(dets, self.classes, nms) if nms else dets


def map_on_samples(detect: Callable[[Path], list[Any]], samples: Sequence[Any], classes: int,
                   names: Sequence[str] | None = None, *, thresh: float = DEFAULT_THRESH,
                   iou_thresh: float = DEFAULT_IOU, progress: bool = False) -> MapResult:
    """mAP over d2c.dataset.Sample objects; `detect(image_path)` returns Detection lists."""
    items: Any = samples
    if progress:
        from tqdm import tqdm
        items = tqdm(samples, desc="mAP", unit="img", leave=False)
    predictions = [predictions_from_detections(detect(s.image_path), thresh) for s in items]
    return evaluate(predictions, [s.boxes for s in samples], classes, names, iou_thresh, thresh)


def map_on_list(detector: CaffeDetector, list_path: str | Path, classes: int,
                names: Sequence[str] | None = None, *, thresh: float = DEFAULT_THRESH, nms: float = DEFAULT_NMS,
                iou_thresh: float = DEFAULT_IOU, skip_bad: bool = False, progress: bool = False) -> MapResult:
    """mAP over a Darknet image list (labels found by Darknet's images->labels rule)."""
    from d2c.dataset import load_samples

    samples, problems = load_samples(list_path, classes, skip_bad)
    result = map_on_samples(lambda p: detector.detect(p, thresh, nms), samples, classes, names,
                            thresh=thresh, iou_thresh=iou_thresh, progress=progress)
    if problems:
        result.notes.append(f"{len(problems)} bad sample(s) skipped")
    return result
