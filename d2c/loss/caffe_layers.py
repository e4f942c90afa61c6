"""Thin caffe.Layer classes over the numpy references: YoloLoss, RegionLoss, DarknetBatchNorm
(and DarknetKeptDelta, which parity's emulation of AlexeyAB's CPU training inserts).

Why thin: every number comes from d2c.loss.yolo / region / bn, which are tested against the real
Darknet; these classes only check blobs, parse the JSON param_str (d2c.loss.params schemas,
never eval) and map Darknet's conventions (train_network, backward_network) onto Caffe's:

- loss top = sum(delta^2) / (L*b) with L detection heads and b images: the loss tops of one
  pass add up to Darknet's err/b (err = mean over heads of sum(delta^2)), so Caffe's reported
  loss, averaged over iter_size = S passes, is train_network's return value (sum err)/(S*b);
- bottom diff = -delta/b * top.diff[0] (Darknet's delta is the negative gradient summed
  over the batch; Caffe subtracts the diff and Normalize averages over iter_size); no sigma'
  for [yolo]. [region] uses pjreddie's GPU backward (sigma' on x, y, objectness) by default and
  zeros with `"darknet_compat": true` (the Debian CPU backward propagates nothing);
- [region] needs Darknet's `seen` (after the mini-batch increment) for its 12800-image prior
  warm-up: set it with `set_seen(net, seen)` before each forward (DarknetSGD does), or via param
  "seen".

The last statistics of every loss layer (Darknet's printed Avg IOU, Class, Obj, No Obj, .5R,
.75R, count, plus cost and loss) are the layer's `stats` attribute; `last_stats(net, name)` reads
them. State lives on the layer objects (pycaffe's `net.layers[i]` is the Python layer itself), so
two nets in one process never share it.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from d2c.engines import import_caffe
from d2c.errors import D2CError, NumericError, ParamError
from d2c.loss.bn import (
    bn_backward,
    bn_infer_backward,
    bn_infer_forward,
    bn_train_forward,
)
from d2c.loss.params import BN_SCHEMA, LOSS_SCHEMA, load_params
from d2c.loss.region import RegionParams, region_grad, region_loss
from d2c.loss.yolo import LossResult, YoloParams, yolo_grad, yolo_loss

caffe = import_caffe()

F32 = np.float32
CAFFE_TEST_PHASE = 1

def _wrap(owner: str, exc: D2CError) -> D2CError:
    """Same error class, message prefixed with the Caffe layer (the reference names the key)."""
    return type(exc)(f"{owner}: {exc}", exc.problems)


class _DetectionLoss(caffe.Layer):
    """Shared blob checks and Caffe conventions of the two detection losses."""

    kind: ClassVar[str] = ""
    params_type: ClassVar[type] = object

    def setup(self, bottom, top) -> None:
        self.cfg = load_params(self.param_str, LOSS_SCHEMA, f"{type(self).__name__} param_str")
        self.layer_name = self.cfg["name"]
        self.owner = f"Caffe layer '{self.layer_name}' ({type(self).__name__})"
        if self.cfg["kind"] != self.kind:
            raise ParamError(f"{self.owner}: param 'kind' is {self.cfg['kind']!r}, this layer computes {self.kind!r}")
        try:
            self.p = self.params_type.from_json(self.cfg["params"])
        except D2CError as exc:
            raise _wrap(self.owner, exc) from None
        if len(bottom) != 2 or len(top) != 1:
            raise ParamError(f"{self.owner}: needs bottoms [head input, truth] and one top, "
                             f"got {len(bottom)} bottoms and {len(top)} tops")
        self._result: LossResult | None = None
        #: Darknet's printed statistics of the last training forward, plus cost and loss
        self.stats: dict[str, float] = {}

    def reshape(self, bottom, top) -> None:
        z_shape = tuple(bottom[0].data.shape)
        t_shape = tuple(bottom[1].data.shape)
        channels = self.channels()
        if len(z_shape) != 4 or z_shape[1] != channels:
            raise ParamError(f"{self.owner}: bottom 0 must be (N, {channels}, H, W), got {z_shape}")
        if len(t_shape) < 2 or t_shape[0] != z_shape[0] or int(np.prod(t_shape[1:])) % 5:
            raise ParamError(f"{self.owner}: bottom 1 (truth) must be (N={z_shape[0]}, K*5), got {t_shape}")
        top[0].reshape(1)

    def channels(self) -> int:
        raise NotImplementedError

    def compute(self, z: np.ndarray, truth: np.ndarray) -> LossResult:
        raise NotImplementedError

    def gradient(self, result: LossResult, batch: int) -> np.ndarray:
        raise NotImplementedError

    def forward(self, bottom, top) -> None:
        z = np.asarray(bottom[0].data, F32)
        truth = np.asarray(bottom[1].data, F32)
        b = z.shape[0]
        if self.cfg["check_finite"]:
            if not np.all(np.isfinite(z)):
                bad = int(np.count_nonzero(~np.isfinite(z)))
                raise NumericError(f"{self.owner}: head input has {bad} NaN/inf value(s)")
            if not np.all(np.isfinite(truth)):
                raise NumericError(f"{self.owner}: truth blob has NaN/inf values")
        try:
            result = self.compute(z, truth.reshape(b, -1))
        except D2CError as exc:
            raise _wrap(self.owner, exc) from None
        self._result = result
        loss = F32(np.float64(result.cost) / (self.cfg["heads"] * b))
        top[0].data[0] = loss
        self.stats = {**result.stats, "cost": float(result.cost), "loss": float(loss)}

    def backward(self, top, propagate_down, bottom) -> None:
        if not propagate_down[0]:
            return
        if self._result is None:
            raise ParamError(f"{self.owner}: backward called before forward")
        grad = self.gradient(self._result, bottom[0].data.shape[0])
        weight = F32(top[0].diff[0])
        bottom[0].diff[...] = grad if weight == F32(1) else (grad * weight).astype(F32)


class YoloLoss(_DetectionLoss):
    """[yolo] head: Darknet's forward_yolo_layer training branch (pjreddie or AlexeyAB)."""

    kind = "yolo"
    params_type = YoloParams

    def channels(self) -> int:
        return self.p.n * (5 + self.p.classes)

    def compute(self, z: np.ndarray, truth: np.ndarray) -> LossResult:
        return yolo_loss(z, truth, self.p)

    def gradient(self, result: LossResult, batch: int) -> np.ndarray:
        return yolo_grad(result, batch)


class RegionLoss(_DetectionLoss):
    """[region] head (YOLOv2): Darknet's forward_region_layer training branch."""

    kind = "region"
    params_type = RegionParams
    #: Darknet's `*net->seen` for the next forward (set_seen); None: the param_str's "seen"
    seen: int | None = None

    def channels(self) -> int:
        return self.p.num * self.p.entries

    def compute(self, z: np.ndarray, truth: np.ndarray) -> LossResult:
        seen = self.seen if self.seen is not None else self.cfg["seen"]
        return region_loss(z, truth, self.p, seen)

    def gradient(self, result: LossResult, batch: int) -> np.ndarray:
        return region_grad(result, batch, mode="cpu" if self.cfg["darknet_compat"] else "gpu")


class DarknetBatchNorm(caffe.Layer):
    """x -> x̂ exactly as Darknet's BN (training and inference); blobs = rolling mean, variance.

    The rolling statistics are layer blobs with lr_mult 0, so no solver touches them and they
    are saved in the caffemodel. Use in place on the conv output, followed by a Scale layer.
    Every TRAIN-phase forward updates them, as every Darknet training forward does.
    """

    def setup(self, bottom, top) -> None:
        self.cfg = load_params(self.param_str, BN_SCHEMA, "DarknetBatchNorm param_str")
        self.owner = f"Caffe layer '{self.cfg['name']}' (DarknetBatchNorm)"
        if len(bottom) != 1 or len(top) != 1:
            raise ParamError(f"{self.owner}: needs exactly one bottom and one top")
        shape = tuple(bottom[0].data.shape)
        if len(shape) != 4:
            raise ParamError(f"{self.owner}: bottom must be 4-D (N, C, H, W), got shape {shape}")
        channels = shape[1]
        if len(self.blobs) == 0:
            for _ in range(2):
                self.blobs.add_blob(channels)
                self.blobs[len(self.blobs) - 1].data[...] = 0
        if len(self.blobs) != 2 or any(tuple(bl.data.shape) != (channels,) for bl in self.blobs):
            raise ParamError(f"{self.owner}: expected 2 blobs (rolling mean, rolling variance) of shape "
                             f"({channels},), got {[tuple(bl.data.shape) for bl in self.blobs]}")
        self.inference = bool(self.cfg["use_global_stats"]) or getattr(self, "phase", 0) == CAFFE_TEST_PHASE
        self._saved: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None

    def reshape(self, bottom, top) -> None:
        shape = tuple(bottom[0].data.shape)
        channels = self.blobs[0].data.shape[0]
        if len(shape) != 4 or shape[1] != channels:
            raise ParamError(f"{self.owner}: bottom shape {shape} does not have {channels} channels")
        if not self.inference and shape[0] * shape[2] * shape[3] < 2:
            raise ParamError(f"{self.owner}: training needs batch*height*width >= 2, got shape {shape}")
        top[0].reshape(*shape)

    def forward(self, bottom, top) -> None:
        x = np.array(bottom[0].data, dtype=F32, copy=True)  # in place: top is the same blob
        if self.cfg["check_finite"] and not np.all(np.isfinite(x)):
            raise NumericError(f"{self.owner}: input has {int(np.count_nonzero(~np.isfinite(x)))} NaN/inf value(s)")
        flavor = self.cfg["flavor"]
        if self.inference:
            top[0].data[...] = bn_infer_forward(x, self.blobs[0].data, self.blobs[1].data, flavor)
            self._saved = None
            return
        res = bn_train_forward(x, self.blobs[0].data, self.blobs[1].data, flavor, self.cfg["momentum"],
                               self.cfg["exact_sums"])
        self.blobs[0].data[...] = res.rolling_mean
        self.blobs[1].data[...] = res.rolling_variance
        self._saved = (x, res.mean, res.variance)
        top[0].data[...] = res.x_norm

    def backward(self, top, propagate_down, bottom) -> None:
        if not propagate_down[0]:
            return
        dy = np.array(top[0].diff, dtype=F32, copy=True)  # top and bottom share memory in place
        if self._saved is None:
            bottom[0].diff[...] = bn_infer_backward(dy, self.blobs[1].data, self.cfg["flavor"])
            return
        x, mean, variance = self._saved
        bottom[0].diff[...] = bn_backward(dy, x, mean, variance, self.cfg["flavor"])


class DarknetKeptDelta(caffe.Layer):
    """Identity forward; backward passes on the running sum of every gradient it has received.

    Why: AlexeyAB's CPU build never clears the delta of a route or upsample layer between training
    passes, so what it hands its inputs is the sum over the whole run (d2c.alexeyab_cpu). Placed
    between such a layer's output and its readers, out of place, this reproduces it in a train net.
    """

    def setup(self, bottom, top) -> None:
        if len(bottom) != 1 or len(top) != 1:
            raise ParamError(f"DarknetKeptDelta of layer {self.param_str}: needs one bottom and one top")
        self.kept: np.ndarray | None = None

    def reshape(self, bottom, top) -> None:
        top[0].reshape(*bottom[0].data.shape)
        self.kept_shape = tuple(bottom[0].data.shape)

    def forward(self, bottom, top) -> None:
        top[0].data[...] = bottom[0].data

    def backward(self, top, propagate_down, bottom) -> None:
        if self.kept is None or self.kept.shape != tuple(top[0].diff.shape):
            self.kept = np.zeros(top[0].diff.shape, F32)
        self.kept += top[0].diff
        if propagate_down[0]:
            bottom[0].diff[...] = self.kept


def loss_layers(net) -> dict[str, _DetectionLoss]:
    """The detection loss layers of a pycaffe net, by Caffe layer name (the layer objects)."""
    return {name: layer for name, layer in zip(net._layer_names, net.layers) if isinstance(layer, _DetectionLoss)}


def set_seen(net, seen: int | None) -> None:
    """Darknet's `*net->seen` after this mini-batch's increment, for every [region] loss of `net`
    (None: each layer's param "seen")."""
    if seen is not None and (isinstance(seen, bool) or not isinstance(seen, (int, np.integer)) or seen < 0):
        raise ParamError(f"set_seen: seen must be a non-negative integer, got {seen!r}")
    for layer in loss_layers(net).values():
        if isinstance(layer, RegionLoss):
            layer.seen = None if seen is None else int(seen)


def last_stats(net, name: str) -> dict[str, float]:
    """Statistics of a loss layer's last forward (KeyError-free: ParamError naming the layers)."""
    layers = loss_layers(net)
    if name not in layers or not layers[name].stats:
        raise ParamError(f"no statistics for loss layer {name!r}; known: "
                         f"{sorted(n for n, layer in layers.items() if layer.stats)}")
    return layers[name].stats


def stats_line(net, name: str, index: int | None = None) -> str:
    """Darknet's printed line for a loss layer's last forward (for logs)."""
    s = last_stats(net, name)
    label = f"Region {index}" if index is not None else f"Region {name}"
    keys = [("Avg IOU", "avg_iou"), ("Class", "class"), ("Obj", "obj"), ("No Obj", "no_obj"),
            (".5R", "recall50"), (".75R", "recall75")]
    parts = [f"{text}: {s[key]:f}" for text, key in keys if key in s]
    return f"{label} " + ", ".join(parts) + f",  count: {int(s.get('count', 0))}"


__all__ = ["YoloLoss", "RegionLoss", "DarknetBatchNorm", "loss_layers", "set_seen", "last_stats", "stats_line"]
