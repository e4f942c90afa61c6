"""Caffe model files without pycaffe: protobuf wire codec, prototxt writer and reader.

Why hand-written: converting a model must not need a Caffe build, and the generated
caffe_pb2 module ties us to one protobuf runtime. Only the subset of caffe.proto that d2c
emits or reads is described here, with Caffe's real field numbers and types (checked against
the generated descriptors in tests/test_caffe_proto.py). Big float blobs are written straight
from numpy buffers and read with numpy.frombuffer over an mmap, never float by float.
"""
from __future__ import annotations

import contextlib
import math
import mmap
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from d2c.errors import CfgError, ParamError, WeightsError
from d2c.fsutil import atomic_write, atomic_write_text

__all__ = [
    "CaffeLayer", "CaffeNet", "PrototxtError", "PrototxtMessage",
    "to_prototxt", "write_prototxt", "write_caffemodel", "read_caffemodel", "read_caffemodel_net",
    "parse_prototxt", "net_from_prototxt", "solver_to_prototxt",
]


class PrototxtError(CfgError):
    """A prototxt that is not valid protobuf text format or does not fit caffe.proto."""


# --------------------------------------------------------------------------------------------
# Public data model
# --------------------------------------------------------------------------------------------

@dataclass
class CaffeLayer:
    """One LayerParameter. `params` holds every field except name/type/bottom/top/blobs."""

    name: str
    type: str
    bottom: list[str]
    top: list[str]
    params: dict[str, Any] = field(default_factory=dict)
    blobs: list[np.ndarray] = field(default_factory=list)


@dataclass
class CaffeNet:
    """A NetParameter; `inputs` become leading `Input` layers named after their blob."""

    name: str
    inputs: list[tuple[str, tuple[int, ...]]]
    layers: list[CaffeLayer]


# --------------------------------------------------------------------------------------------
# Schema: the caffe.proto subset (numbers and types as in BVLC Caffe 1.0 / Debian 20180821)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One message field. `ref` names the message or enum type for those kinds."""

    number: int
    kind: str  # int32 int64 uint32 bool enum float double string bytes message
    repeated: bool = False
    packed: bool = False
    ref: str | None = None


def _opt(number: int, kind: str, ref: str | None = None) -> Field:
    return Field(number, kind, False, False, ref)


def _rep(number: int, kind: str, ref: str | None = None, packed: bool = False) -> Field:
    return Field(number, kind, True, packed, ref)


ENUMS: dict[str, dict[str, int]] = {
    "Phase": {"TRAIN": 0, "TEST": 1},
    "VarianceNorm": {"FAN_IN": 0, "FAN_OUT": 1, "AVERAGE": 2},
    "DimCheckMode": {"STRICT": 0, "PERMISSIVE": 1},
    "NormalizationMode": {"FULL": 0, "VALID": 1, "BATCH_SIZE": 2, "NONE": 3},
    "Engine": {"DEFAULT": 0, "CAFFE": 1, "CUDNN": 2},
    "EltwiseOp": {"PROD": 0, "SUM": 1, "MAX": 2},
    "PoolMethod": {"MAX": 0, "AVE": 1, "STOCHASTIC": 2},
    "RoundMode": {"CEIL": 0, "FLOOR": 1},
    "SnapshotFormat": {"HDF5": 0, "BINARYPROTO": 1},
    "SolverMode": {"CPU": 0, "GPU": 1},
    "SolverType": {"SGD": 0, "NESTEROV": 1, "ADAGRAD": 2, "RMSPROP": 3, "ADADELTA": 4, "ADAM": 5},
}

_FILLER = "FillerParameter"

# Declaration order is the prototxt writing order (Caffe's own order); binary uses number order.
MESSAGES: dict[str, dict[str, Field]] = {
    "BlobShape": {"dim": _rep(1, "int64", packed=True)},
    "BlobProto": {
        "shape": _opt(7, "message", "BlobShape"),
        "data": _rep(5, "float", packed=True),
        "diff": _rep(6, "float", packed=True),
        "double_data": _rep(8, "double", packed=True),
        "double_diff": _rep(9, "double", packed=True),
        "num": _opt(1, "int32"), "channels": _opt(2, "int32"),
        "height": _opt(3, "int32"), "width": _opt(4, "int32"),
    },
    "FillerParameter": {
        "type": _opt(1, "string"), "value": _opt(2, "float"), "min": _opt(3, "float"),
        "max": _opt(4, "float"), "mean": _opt(5, "float"), "std": _opt(6, "float"),
        "sparse": _opt(7, "int32"), "variance_norm": _opt(8, "enum", "VarianceNorm"),
    },
    "NetParameter": {
        "name": _opt(1, "string"),
        "input": _rep(3, "string"),
        "input_shape": _rep(8, "message", "BlobShape"),
        "input_dim": _rep(4, "int32"),
        "force_backward": _opt(5, "bool"),
        "state": _opt(6, "message", "NetState"),
        "debug_info": _opt(7, "bool"),
        "layer": _rep(100, "message", "LayerParameter"),
    },
    "NetState": {"phase": _opt(1, "enum", "Phase"), "level": _opt(2, "int32"),
                 "stage": _rep(3, "string")},
    "NetStateRule": {
        "phase": _opt(1, "enum", "Phase"), "min_level": _opt(2, "int32"),
        "max_level": _opt(3, "int32"), "stage": _rep(4, "string"), "not_stage": _rep(5, "string"),
    },
    "ParamSpec": {
        "name": _opt(1, "string"), "share_mode": _opt(2, "enum", "DimCheckMode"),
        "lr_mult": _opt(3, "float"), "decay_mult": _opt(4, "float"),
    },
    "LayerParameter": {
        "name": _opt(1, "string"), "type": _opt(2, "string"),
        "bottom": _rep(3, "string"), "top": _rep(4, "string"),
        "phase": _opt(10, "enum", "Phase"),
        "loss_weight": _rep(5, "float"),
        "param": _rep(6, "message", "ParamSpec"),
        "blobs": _rep(7, "message", "BlobProto"),
        "propagate_down": _rep(11, "bool"),
        "include": _rep(8, "message", "NetStateRule"),
        "exclude": _rep(9, "message", "NetStateRule"),
        "loss_param": _opt(101, "message", "LossParameter"),
        "batch_norm_param": _opt(139, "message", "BatchNormParameter"),
        "bias_param": _opt(141, "message", "BiasParameter"),
        "concat_param": _opt(104, "message", "ConcatParameter"),
        "convolution_param": _opt(106, "message", "ConvolutionParameter"),
        "crop_param": _opt(144, "message", "CropParameter"),
        "dropout_param": _opt(108, "message", "DropoutParameter"),
        "eltwise_param": _opt(110, "message", "EltwiseParameter"),
        "flatten_param": _opt(135, "message", "FlattenParameter"),
        "inner_product_param": _opt(117, "message", "InnerProductParameter"),
        "input_param": _opt(143, "message", "InputParameter"),
        "pooling_param": _opt(121, "message", "PoolingParameter"),
        "power_param": _opt(122, "message", "PowerParameter"),
        "python_param": _opt(130, "message", "PythonParameter"),
        "relu_param": _opt(123, "message", "ReLUParameter"),
        "reshape_param": _opt(133, "message", "ReshapeParameter"),
        "scale_param": _opt(142, "message", "ScaleParameter"),
        "sigmoid_param": _opt(124, "message", "SigmoidParameter"),
        "softmax_param": _opt(125, "message", "SoftmaxParameter"),
        "slice_param": _opt(126, "message", "SliceParameter"),
        "swish_param": _opt(147, "message", "SwishParameter"),
        "tanh_param": _opt(127, "message", "TanHParameter"),
    },
    "LossParameter": {
        "ignore_label": _opt(1, "int32"),
        "normalization": _opt(3, "enum", "NormalizationMode"),
        "normalize": _opt(2, "bool"),
    },
    "BatchNormParameter": {
        "use_global_stats": _opt(1, "bool"), "moving_average_fraction": _opt(2, "float"),
        "eps": _opt(3, "float"),
    },
    "BiasParameter": {"axis": _opt(1, "int32"), "num_axes": _opt(2, "int32"),
                      "filler": _opt(3, "message", _FILLER)},
    "ConcatParameter": {"axis": _opt(2, "int32"), "concat_dim": _opt(1, "uint32")},
    "ConvolutionParameter": {
        "num_output": _opt(1, "uint32"), "bias_term": _opt(2, "bool"),
        "pad": _rep(3, "uint32"), "kernel_size": _rep(4, "uint32"), "stride": _rep(6, "uint32"),
        "dilation": _rep(18, "uint32"),
        "pad_h": _opt(9, "uint32"), "pad_w": _opt(10, "uint32"),
        "kernel_h": _opt(11, "uint32"), "kernel_w": _opt(12, "uint32"),
        "stride_h": _opt(13, "uint32"), "stride_w": _opt(14, "uint32"),
        "group": _opt(5, "uint32"),
        "weight_filler": _opt(7, "message", _FILLER), "bias_filler": _opt(8, "message", _FILLER),
        "engine": _opt(15, "enum", "Engine"), "axis": _opt(16, "int32"),
        "force_nd_im2col": _opt(17, "bool"),
    },
    "CropParameter": {"axis": _opt(1, "int32"), "offset": _rep(2, "uint32")},
    "DropoutParameter": {"dropout_ratio": _opt(1, "float")},
    "EltwiseParameter": {
        "operation": _opt(1, "enum", "EltwiseOp"), "coeff": _rep(2, "float"),
        "stable_prod_grad": _opt(3, "bool"),
    },
    "FlattenParameter": {"axis": _opt(1, "int32"), "end_axis": _opt(2, "int32")},
    "InnerProductParameter": {
        "num_output": _opt(1, "uint32"), "bias_term": _opt(2, "bool"),
        "weight_filler": _opt(3, "message", _FILLER), "bias_filler": _opt(4, "message", _FILLER),
        "axis": _opt(5, "int32"), "transpose": _opt(6, "bool"),
    },
    "InputParameter": {"shape": _rep(1, "message", "BlobShape")},
    "PoolingParameter": {
        "pool": _opt(1, "enum", "PoolMethod"),
        "pad": _opt(4, "uint32"), "pad_h": _opt(9, "uint32"), "pad_w": _opt(10, "uint32"),
        "kernel_size": _opt(2, "uint32"), "kernel_h": _opt(5, "uint32"),
        "kernel_w": _opt(6, "uint32"),
        "stride": _opt(3, "uint32"), "stride_h": _opt(7, "uint32"), "stride_w": _opt(8, "uint32"),
        "engine": _opt(11, "enum", "Engine"), "global_pooling": _opt(12, "bool"),
        "round_mode": _opt(13, "enum", "RoundMode"),
    },
    "PowerParameter": {"power": _opt(1, "float"), "scale": _opt(2, "float"),
                       "shift": _opt(3, "float")},
    "PythonParameter": {
        "module": _opt(1, "string"), "layer": _opt(2, "string"), "param_str": _opt(3, "string"),
        "share_in_parallel": _opt(4, "bool"),
    },
    "ReLUParameter": {"negative_slope": _opt(1, "float"), "engine": _opt(2, "enum", "Engine")},
    "ReshapeParameter": {"shape": _opt(1, "message", "BlobShape"), "axis": _opt(2, "int32"),
                         "num_axes": _opt(3, "int32")},
    "ScaleParameter": {
        "axis": _opt(1, "int32"), "num_axes": _opt(2, "int32"),
        "filler": _opt(3, "message", _FILLER), "bias_term": _opt(4, "bool"),
        "bias_filler": _opt(5, "message", _FILLER),
    },
    "SigmoidParameter": {"engine": _opt(1, "enum", "Engine")},
    "SoftmaxParameter": {"engine": _opt(1, "enum", "Engine"), "axis": _opt(2, "int32")},
    "SliceParameter": {"axis": _opt(3, "int32"), "slice_point": _rep(2, "uint32"),
                       "slice_dim": _opt(1, "uint32")},
    "SwishParameter": {"beta": _opt(1, "float")},
    "TanHParameter": {"engine": _opt(1, "enum", "Engine")},
    "SolverParameter": {
        "net": _opt(24, "string"), "train_net": _opt(1, "string"), "test_net": _rep(2, "string"),
        "test_iter": _rep(3, "int32"), "test_interval": _opt(4, "int32"),
        "test_initialization": _opt(32, "bool"),
        "base_lr": _opt(5, "float"), "display": _opt(6, "int32"), "average_loss": _opt(33, "int32"),
        "max_iter": _opt(7, "int32"), "iter_size": _opt(36, "int32"),
        "lr_policy": _opt(8, "string"), "gamma": _opt(9, "float"), "power": _opt(10, "float"),
        "momentum": _opt(11, "float"), "weight_decay": _opt(12, "float"),
        "regularization_type": _opt(29, "string"),
        "stepsize": _opt(13, "int32"), "stepvalue": _rep(34, "int32"),
        "clip_gradients": _opt(35, "float"),
        "snapshot": _opt(14, "int32"), "snapshot_prefix": _opt(15, "string"),
        "snapshot_diff": _opt(16, "bool"), "snapshot_format": _opt(37, "enum", "SnapshotFormat"),
        "solver_mode": _opt(17, "enum", "SolverMode"), "device_id": _opt(18, "int32"),
        "random_seed": _opt(20, "int64"), "type": _opt(40, "string"),
        "delta": _opt(31, "float"), "momentum2": _opt(39, "float"), "rms_decay": _opt(38, "float"),
        "debug_info": _opt(23, "bool"), "snapshot_after_train": _opt(28, "bool"),
        "solver_type": _opt(30, "enum", "SolverType"), "layer_wise_reduce": _opt(41, "bool"),
        "weights": _rep(42, "string"),
    },
}

# V1LayerParameter (the legacy `layers` field 2 of NetParameter): only what reading weights needs.
_V1_NAME, _V1_TYPE, _V1_BLOBS = 4, 5, 6
_V1_TYPES: dict[int, str] = {
    35: "AbsVal", 1: "Accuracy", 30: "ArgMax", 2: "BNLL", 3: "Concat", 37: "ContrastiveLoss",
    4: "Convolution", 5: "Data", 39: "Deconvolution", 6: "Dropout", 32: "DummyData",
    7: "EuclideanLoss", 25: "Eltwise", 38: "Exp", 8: "Flatten", 9: "HDF5Data", 10: "HDF5Output",
    28: "HingeLoss", 11: "Im2col", 12: "ImageData", 13: "InfogainLoss", 14: "InnerProduct",
    15: "LRN", 29: "MemoryData", 16: "MultinomialLogisticLoss", 34: "MVN", 17: "Pooling",
    26: "Power", 18: "ReLU", 19: "Sigmoid", 27: "SigmoidCrossEntropyLoss", 36: "Silence",
    20: "Softmax", 21: "SoftmaxWithLoss", 22: "Split", 33: "Slice", 23: "TanH",
    24: "WindowData", 31: "Threshold",
}
_NET_LAYER, _NET_V1_LAYERS = 100, 2

_INT_RANGES: dict[str, tuple[int, int]] = {
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint32": (0, (1 << 32) - 1),
}
_VARINT_KINDS = frozenset({"int32", "int64", "uint32", "bool", "enum"})
_FLOAT32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------------------------
# Value checks shared by both writers
# --------------------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    """int or float (numpy ones too) but not bool, which Python counts as an int."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _check_float32(value: Any, where: str) -> float:
    """A Python float that fits float32 (Caffe stores these as float)."""
    if not _is_number(value):
        raise ParamError(f"{where}: expected a number, got {value!r}")
    number = float(value)
    if math.isfinite(number) and abs(number) > _FLOAT32_MAX:
        raise ParamError(f"{where}: {number!r} does not fit a 32-bit float")
    return number


def _check_scalar(fld: Field, value: Any, where: str) -> Any:
    """Validate and normalise one scalar for `fld`; enums become (name, number)."""
    kind = fld.kind
    if kind in _INT_RANGES:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise ParamError(f"{where}: expected an integer, got {value!r}")
        low, high = _INT_RANGES[kind]
        if not low <= int(value) <= high:
            raise ParamError(f"{where}: {int(value)} is out of range for {kind}")
        return int(value)
    if kind == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise ParamError(f"{where}: expected true/false, got {value!r}")
        return bool(value)
    if kind == "float":
        return _check_float32(value, where)
    if kind == "double":
        if not _is_number(value):
            raise ParamError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind == "string":
        if not isinstance(value, str):
            raise ParamError(f"{where}: expected a string, got {value!r}")
        return value
    if kind == "bytes":
        if not isinstance(value, (bytes, bytearray)):
            raise ParamError(f"{where}: expected bytes, got {value!r}")
        return bytes(value)
    if kind == "enum":
        names = ENUMS[fld.ref or ""]
        if isinstance(value, str):
            if value not in names:
                raise ParamError(f"{where}: '{value}' is not one of {', '.join(names)}")
            return value, names[value]
        if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
            for name, number in names.items():
                if number == int(value):
                    return name, number
        raise ParamError(f"{where}: '{value}' is not one of {', '.join(names)}")
    raise AssertionError(f"unknown field kind {kind}")


def _field_items(values: Mapping[str, Any], msg: str, where: str) -> dict[str, tuple[Field, list]]:
    """Check keys against the schema; each present field -> (Field, list of its values)."""
    if not isinstance(values, Mapping):
        raise ParamError(f"{where}: expected a {msg} as a dict, got {values!r}")
    schema = MESSAGES[msg]
    unknown = [key for key in values if key not in schema]
    if unknown:
        raise ParamError(f"{where}: unknown {msg} field(s) {', '.join(map(str, unknown))}")
    out: dict[str, tuple[Field, list]] = {}
    for name, fld in schema.items():
        value = values.get(name)
        if value is None:
            continue
        if fld.repeated:
            if isinstance(value, (list, tuple)):
                items = list(value)
            elif isinstance(value, np.ndarray) and fld.kind != "message":
                items = value.ravel().tolist()
            else:
                items = [value]  # a lone scalar for a repeated field (kernel_size: 3) is fine
        else:
            if isinstance(value, (list, tuple, np.ndarray)):
                raise ParamError(f"{where}.{name}: {msg}.{name} is not repeated, got a list")
            items = [value]
        out[name] = (fld, items)
    return out


# --------------------------------------------------------------------------------------------
# Binary encoding
# --------------------------------------------------------------------------------------------

def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negatives as 64-bit two's complement (10 bytes)."""
    if value < 0:
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint((number << 3) | wire)


class _Pieces:
    """Encoded bytes kept as a list of buffers so big blobs are never copied into one string."""

    def __init__(self) -> None:
        self.parts: list[bytes | memoryview] = []
        self.size = 0

    def add(self, data: bytes | memoryview) -> None:
        self.parts.append(data)
        self.size += len(data)

    def add_pieces(self, other: _Pieces) -> None:
        self.parts.extend(other.parts)
        self.size += other.size

    def add_delimited(self, number: int, body: _Pieces) -> None:
        self.add(_key(number, 2) + _varint(body.size))
        self.add_pieces(body)


def _scalar_bytes(fld: Field, value: Any) -> bytes:
    """Payload of one already-checked scalar (no key)."""
    kind = fld.kind
    if kind == "enum":
        return _varint(value[1])
    if kind in _VARINT_KINDS:
        return _varint(int(value))
    if kind == "float":
        return struct.pack("<f", value)
    if kind == "double":
        return struct.pack("<d", value)
    data = value.encode("utf-8") if kind == "string" else value
    return _varint(len(data)) + data


_WIRE = {"float": 5, "double": 1, "string": 2, "bytes": 2, "message": 2}


def _encode_message(values: Mapping[str, Any], msg: str, where: str,
                    extra: tuple[int, _Pieces] | None = None) -> _Pieces:
    """Encode a dict as message `msg` in field-number order, as protobuf does.

    `extra` is one already-encoded field (its number, its bytes) slotted into that order.
    """
    out = _Pieces()
    items = _field_items(values, msg, where)
    for name, (fld, raw_items) in sorted(items.items(), key=lambda kv: kv[1][0].number):
        if extra is not None and extra[0] < fld.number:
            out.add_pieces(extra[1])
            extra = None
        path = f"{where}.{name}"
        if fld.kind == "message":
            for item in raw_items:
                out.add_delimited(fld.number, _encode_message(item, fld.ref or "", path))
            continue
        checked = [_check_scalar(fld, item, path) for item in raw_items]
        if fld.packed:
            if checked:
                out.add_delimited(fld.number, _bytes_piece(b"".join(_scalar_bytes(fld, v) for v in checked)))
            continue
        key = _key(fld.number, _WIRE.get(fld.kind, 0))
        for item in checked:
            out.add(key + _scalar_bytes(fld, item))
    if extra is not None:
        out.add_pieces(extra[1])
    return out


def _bytes_piece(data: bytes) -> _Pieces:
    piece = _Pieces()
    piece.add(data)
    return piece


def _blob_array(blob: Any, where: str) -> np.ndarray:
    """A C-contiguous little-endian float32 array (copied only when it must be)."""
    arr = np.asarray(blob)
    if arr.dtype.kind not in "fiub":
        raise ParamError(f"{where}: blob dtype {arr.dtype} is not numeric")
    return np.asarray(arr, dtype="<f4", order="C")  # ascontiguousarray would make 0-d arrays 1-d


def _encode_blob(blob: Any, where: str) -> _Pieces:
    """BlobProto {data: packed floats, shape {dim...}} with the data as a zero-copy memoryview."""
    arr = _blob_array(blob, where)
    shape = _Pieces()
    if arr.shape:
        shape.add_delimited(1, _bytes_piece(b"".join(_varint(d) for d in arr.shape)))
    out = _Pieces()
    if arr.size:
        data = _Pieces()
        data.add(memoryview(arr.reshape(-1)).cast("B"))
        out.add_delimited(5, data)
    out.add_delimited(7, shape)  # after data: protobuf's field-number order
    return out


def _layer_where(layer: CaffeLayer) -> str:
    return f"layer '{layer.name}' ({layer.type})"


def _layer_dict(layer: CaffeLayer) -> dict[str, Any]:
    """name/type/bottom/top plus params as one LayerParameter dict (blobs excluded)."""
    where = _layer_where(layer)
    if not isinstance(layer.name, str) or not layer.name:
        raise ParamError(f"{where}: a layer needs a non-empty name")
    if not isinstance(layer.type, str) or not layer.type:
        raise ParamError(f"{where}: a layer needs a non-empty type")
    clash = [key for key in ("name", "type", "bottom", "top", "blobs") if key in layer.params]
    if clash:
        raise ParamError(f"{where}: params must not contain {', '.join(clash)} "
                         "(they are CaffeLayer attributes)")
    for attr in ("bottom", "top"):
        names = getattr(layer, attr)
        if isinstance(names, str) or not all(isinstance(n, str) for n in names):
            raise ParamError(f"{where}: {attr} must be a list of blob names, got {names!r}")
    return {"name": layer.name, "type": layer.type, "bottom": list(layer.bottom),
            "top": list(layer.top), **layer.params}


def _input_layers(net: CaffeNet) -> list[CaffeLayer]:
    """`inputs` as Input layers (the modern form; legacy input/input_dim is never written)."""
    layers = []
    for entry in net.inputs:
        try:
            blob, shape = entry
            dims = [int(d) for d in shape]
        except (TypeError, ValueError) as exc:
            raise ParamError(f"net '{net.name}': input {entry!r} is not (name, shape)") from exc
        if not isinstance(blob, str) or not blob or any(d < 0 for d in dims):
            raise ParamError(f"net '{net.name}': input {entry!r} needs a name and a non-negative shape")
        layers.append(CaffeLayer(blob, "Input", [], [blob], {"input_param": {"shape": [{"dim": dims}]}}))
    return layers


def _encode_layer(layer: CaffeLayer) -> _Pieces:
    where = _layer_where(layer)
    blobs_number = MESSAGES["LayerParameter"]["blobs"].number
    blobs = _Pieces()
    for index, blob in enumerate(layer.blobs):
        blobs.add_delimited(blobs_number, _encode_blob(blob, f"{where} blob {index}"))
    return _encode_message(_layer_dict(layer), "LayerParameter", where, (blobs_number, blobs))


def write_caffemodel(net: CaffeNet, path: str | Path) -> None:
    """Write the binary NetParameter (name, layers with params and blobs) atomically.

    Layers are encoded one at a time and blob data goes from the numpy buffer to the file,
    so peak memory stays near the size of the arrays themselves.
    """
    header = _Pieces()
    if net.name:
        header.add(_key(1, 2) + _scalar_bytes(MESSAGES["NetParameter"]["name"], net.name))
    # Validate everything before touching the file system so a bad layer leaves no temp file.
    encoded = [_encode_layer(layer) for layer in [*_input_layers(net), *net.layers]]
    with atomic_write(path, "wb") as handle:
        _write_parts(handle, header.parts)
        for body in encoded:
            handle.write(_key(_NET_LAYER, 2) + _varint(body.size))
            _write_parts(handle, body.parts)


def _write_parts(handle: IO[bytes], parts: list[bytes | memoryview]) -> None:
    """Write small pieces in batches and big buffers directly."""
    pending: list[bytes | memoryview] = []
    pending_size = 0
    for part in parts:
        if len(part) >= 1 << 16:
            if pending:
                handle.write(b"".join(pending))
                pending, pending_size = [], 0
            handle.write(part)
        else:
            pending.append(part)
            pending_size += len(part)
            if pending_size >= 1 << 16:
                handle.write(b"".join(pending))
                pending, pending_size = [], 0
    if pending:
        handle.write(b"".join(pending))


# --------------------------------------------------------------------------------------------
# Binary decoding
# --------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _read_varint(buf: memoryview, pos: int, end: int, where: str) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WeightsError(f"{where}: truncated varint at byte {pos}")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result & _MASK64, pos
        shift += 7
        if shift >= 70:
            raise WeightsError(f"{where}: varint longer than 10 bytes at byte {pos}")


def _read_field(buf: memoryview, pos: int, end: int, where: str) -> tuple[int, int, int, int, int]:
    """One field at `pos`: (number, wire type, a, b, next pos); a is the value for varints,
    else (a, b) is the payload's byte span."""
    start = pos
    key, pos = _read_varint(buf, pos, end, where)
    number, wire = key >> 3, key & 7
    if number == 0:
        raise WeightsError(f"{where}: invalid field number 0 at byte {start}")
    if wire == 0:
        value, pos = _read_varint(buf, pos, end, where)
        return number, wire, value, pos, pos
    if wire == 2:
        size, pos = _read_varint(buf, pos, end, where)
    elif wire == 1:
        size = 8
    elif wire == 5:
        size = 4
    else:
        raise WeightsError(f"{where}: unsupported wire type {wire} for field {number} at byte {start}")
    if pos + size > end:
        raise WeightsError(f"{where}: field {number} at byte {start} runs past the end "
                           f"({size} bytes needed, {end - pos} left); the file is truncated")
    return number, wire, pos, pos + size, pos + size


def _iter_fields(buf: memoryview, pos: int, end: int, where: str) -> Iterator[tuple[int, int, int, int]]:
    """Yield (number, wire type, a, b) for each field in buf[pos:end]."""
    while pos < end:
        number, wire, a, b, pos = _read_field(buf, pos, end, where)
        yield number, wire, a, b


def _signed(value: int, kind: str) -> int:
    if kind in ("int32", "int64") and value >= 1 << 63:
        value -= 1 << 64
    if kind == "int32":
        value = ((value + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)
    elif kind == "uint32":
        value &= 0xFFFFFFFF
    return value


def _f32(value: float) -> float:
    """The float32 value as its shortest decimal, so 0.1 reads back as 0.1."""
    return float(str(np.float32(value)))


def _decode_varint_scalar(fld: Field, value: int) -> Any:
    if fld.kind == "bool":
        return value != 0
    if fld.kind == "enum":
        for name, number in ENUMS[fld.ref or ""].items():
            if number == value:
                return name
        return _signed(value, "int32")
    return _signed(value, fld.kind)


def _decode_scalars(buf: memoryview, fld: Field, wire: int, a: int, b: int, where: str) -> list[Any]:
    """Values of one scalar field occurrence, packed or not."""
    kind = fld.kind
    if kind in _VARINT_KINDS:
        if wire == 0:
            return [_decode_varint_scalar(fld, a)]
        if wire == 2 and fld.repeated:
            values, pos = [], a
            while pos < b:
                raw, pos = _read_varint(buf, pos, b, where)
                values.append(_decode_varint_scalar(fld, raw))
            return values
    elif kind in ("float", "double"):
        fmt, size, want = ("<f4", 4, 5) if kind == "float" else ("<f8", 8, 1)
        if wire == want or (wire == 2 and fld.repeated):
            if (b - a) % size:
                raise WeightsError(f"{where}: packed {kind} field of {b - a} bytes")
            arr = np.frombuffer(buf, dtype=fmt, count=(b - a) // size, offset=a)
            return [_f32(v) for v in arr] if kind == "float" else arr.astype(float).tolist()
    elif kind in ("string", "bytes") and wire == 2:
        data = bytes(buf[a:b])
        if kind == "bytes":
            return [data]
        try:
            return [data.decode("utf-8")]
        except UnicodeDecodeError as exc:
            raise WeightsError(f"{where}: string is not UTF-8") from exc
    raise WeightsError(f"{where}: wire type {wire} does not fit a {kind} field")


def _decode_message(buf: memoryview, a: int, b: int, msg: str, where: str) -> dict[str, Any]:
    """Decode known fields of `msg` into a dict (repeated -> list); unknown fields are skipped."""
    schema = MESSAGES[msg]
    by_number = {fld.number: (name, fld) for name, fld in schema.items()}
    out: dict[str, Any] = {}
    for number, wire, start, stop in _iter_fields(buf, a, b, where):
        known = by_number.get(number)
        if known is None:
            continue
        name, fld = known
        path = f"{where}.{name}"
        if fld.kind == "message":
            if wire != 2:
                raise WeightsError(f"{path}: wire type {wire} does not fit a message field")
            if fld.ref == "BlobProto":
                values: list[Any] = [_decode_blob(buf, start, stop, path)]
            else:
                values = [_decode_message(buf, start, stop, fld.ref or "", path)]
        else:
            values = _decode_scalars(buf, fld, wire, start, stop, path)
        if fld.repeated:
            out.setdefault(name, []).extend(values)
        elif fld.kind == "message" and isinstance(out.get(name), dict):
            out[name].update(values[-1])  # protobuf merges repeated singular messages
        elif values:
            out[name] = values[-1]
    return out


# BlobProto float fields: number -> (numpy dtype, element size, key byte of the unpacked form).
_BLOB_FLOATS = {5: ("<f4", 4, 0x2D), 6: ("<f4", 4, 0x35), 8: ("<f8", 8, 0x41), 9: ("<f8", 8, 0x49)}


def _decode_blob(buf: memoryview, a: int, b: int, where: str) -> np.ndarray:
    """BlobProto -> float32 array shaped by BlobShape, or legacy num/channels/height/width."""
    chunks: dict[int, list[np.ndarray]] = {5: [], 6: [], 8: [], 9: []}
    shape: list[int] | None = None
    legacy: dict[int, int] = {}
    pos = a
    while pos < b:
        start = pos
        number, wire, fa, fb, pos = _read_field(buf, pos, b, where)
        if number in _BLOB_FLOATS:
            dtype, size, unpacked_key = _BLOB_FLOATS[number]
            if wire == 2:
                if (fb - fa) % size:
                    raise WeightsError(f"{where}: packed data at byte {start} is not a whole "
                                       "number of values")
                chunks[number].append(np.frombuffer(buf, dtype=dtype, count=(fb - fa) // size, offset=fa))
            elif buf[start] == unpacked_key:
                # Unpacked values: a run of (key byte, value) records, sliced out in one go.
                record = 1 + size
                max_rows = (b - start) // record
                rows = np.frombuffer(buf, dtype=np.uint8, count=max_rows * record, offset=start)
                rows = rows.reshape(max_rows, record)
                stops = np.flatnonzero(rows[:, 0] != unpacked_key)
                count = int(stops[0]) if stops.size else max_rows
                chunks[number].append(rows[:count, 1:].copy().view(dtype).reshape(-1))
                pos = start + count * record
            else:
                raise WeightsError(f"{where}: wire type {wire} does not fit blob field {number}")
        elif number == 7 and wire == 2:
            shape = _decode_message(buf, fa, fb, "BlobShape", f"{where}.shape").get("dim", [])
        elif number in (1, 2, 3, 4) and wire == 0:
            legacy[number] = _signed(fa, "int32")
    if shape is None and legacy:
        shape = [legacy.get(i, 0) for i in (1, 2, 3, 4)]
    source = chunks[5] or chunks[8]
    if not source:
        data = np.zeros(0, dtype=np.float32)
    elif len(source) == 1:
        data = source[0].astype(np.float32)
    else:
        data = np.concatenate([c.astype(np.float32) for c in source])
    if shape is None:
        return data  # no shape at all: keep the values flat
    if any(d < 0 for d in shape):
        raise WeightsError(f"{where}: negative blob dimension in shape {tuple(shape)}")
    count = math.prod(shape)
    if data.size != count:
        raise WeightsError(f"{where}: blob shape {tuple(shape)} needs {count} values, "
                           f"the file has {data.size}")
    return data.reshape(shape)


@contextlib.contextmanager
def _mapped(path: str | Path) -> Iterator[memoryview]:
    """The whole file as a read-only memoryview over an mmap (no copy into memory)."""
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise WeightsError(f"{path}: cannot open caffemodel: {exc.strerror or exc}") from exc
    with handle:
        size = Path(path).stat().st_size
        if size == 0:
            raise WeightsError(f"{path}: caffemodel is empty")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mapped)
        try:
            yield view
        finally:
            view.release()
            with contextlib.suppress(BufferError):  # a live traceback may still hold a slice
                mapped.close()


def _decode_net(buf: memoryview, where: str, full: bool) -> tuple[str, list[dict[str, Any]]]:
    """(net name, layer dicts). `full` decodes every known field, else only name/type/blobs."""
    name = ""
    layers: list[dict[str, Any]] = []
    saw_v1 = saw_v2 = False
    for number, wire, a, b in _iter_fields(buf, 0, len(buf), where):
        if number == 1 and wire == 2:
            name = _text_at(buf, a, b)
        elif number == _NET_LAYER and wire == 2:
            saw_v2 = True
            index = len(layers)
            lwhere = f"{where}: layer {index}"
            if full:
                layers.append(_decode_message(buf, a, b, "LayerParameter", lwhere))
            else:
                layers.append(_decode_layer_light(buf, a, b, lwhere))
        elif number == _NET_V1_LAYERS and wire == 2:
            saw_v1 = True
            layers.append(_decode_v1_layer(buf, a, b, f"{where}: V1 layer {len(layers)}"))
    if saw_v1 and saw_v2:
        raise WeightsError(f"{where}: mixes V1 'layers' and current 'layer' fields (Caffe rejects this)")
    return name, layers


def _text_at(buf: memoryview, a: int, b: int) -> str:
    return bytes(buf[a:b]).decode("utf-8", errors="replace")


def _decode_layer_light(buf: memoryview, a: int, b: int, where: str) -> dict[str, Any]:
    """Only name, type and blobs of a LayerParameter: robust to params we do not model."""
    out: dict[str, Any] = {"name": "", "type": "", "blobs": []}
    for number, wire, fa, fb in _iter_fields(buf, a, b, where):
        if number in (1, 2) and wire == 2:
            out["name" if number == 1 else "type"] = _text_at(buf, fa, fb)
        elif number == 7 and wire == 2:
            blob_where = f"{where} ('{out['name']}') blob {len(out['blobs'])}"
            out["blobs"].append(_decode_blob(buf, fa, fb, blob_where))
    return out


def _decode_v1_layer(buf: memoryview, a: int, b: int, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {"name": "", "type": "", "bottom": [], "top": [], "blobs": []}
    for number, wire, fa, fb in _iter_fields(buf, a, b, where):
        if number == _V1_NAME and wire == 2:
            out["name"] = _text_at(buf, fa, fb)
        elif number == _V1_TYPE and wire == 0:
            out["type"] = _V1_TYPES.get(fa, f"V1_TYPE_{fa}")
        elif number in (2, 3) and wire == 2:
            out["bottom" if number == 2 else "top"].append(_text_at(buf, fa, fb))
        elif number == _V1_BLOBS and wire == 2:
            blob_where = f"{where} ('{out['name']}') blob {len(out['blobs'])}"
            out["blobs"].append(_decode_blob(buf, fa, fb, blob_where))
    return out


def read_caffemodel(path: str | Path) -> dict[str, tuple[str, list[np.ndarray]]]:
    """Layer name -> (type, float32 blobs) from a .caffemodel, ours or real Caffe's.

    Accepts packed or unpacked data, BlobShape or legacy 4-D dims, and V1 `layers` files.
    Layers sharing a name (TRAIN/TEST data layers) are fine unless two of them carry blobs.
    """
    where = str(path)
    with _mapped(path) as buf:
        _, layers = _decode_net(buf, where, full=False)
    out: dict[str, tuple[str, list[np.ndarray]]] = {}
    for layer in layers:
        name = layer["name"]
        if name in out:
            if out[name][1] and layer["blobs"]:
                raise WeightsError(f"{where}: two layers named '{name}' both carry blobs")
            if not layer["blobs"]:
                continue
        out[name] = (layer["type"], layer["blobs"])
    return out


def read_caffemodel_net(path: str | Path) -> CaffeNet:
    """Every known field of a .caffemodel as a CaffeNet (params decoded through the schema)."""
    where = str(path)
    with _mapped(path) as buf:
        name, layers = _decode_net(buf, where, full=True)
    return _net_from_dict({"name": name, "layer": layers}, where)


# --------------------------------------------------------------------------------------------
# Text format writing
# --------------------------------------------------------------------------------------------

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", '"': '\\"', "'": "\\'", "\\": "\\\\"}


def _quote(text: str) -> str:
    """A double-quoted text-format string; control characters as octal escapes."""
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\{ord(char):03o}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _format_float32(value: float) -> str:
    """Shortest text that reads back as the same float32 (what Caffe will store)."""
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(np.float32(value))


def _text_scalar(fld: Field, value: Any) -> str:
    kind = fld.kind
    if kind == "enum":
        return value[0]
    if kind == "bool":
        return "true" if value else "false"
    if kind == "float":
        return _format_float32(value)
    if kind == "double":
        return repr(value) if math.isfinite(value) else _format_float32(value)
    if kind == "string":
        return _quote(value)
    if kind == "bytes":
        return _quote(value.decode("latin-1"))
    return str(value)


def _text_message(values: Mapping[str, Any], msg: str, indent: int, where: str, lines: list[str]) -> None:
    pad = "  " * indent
    for name, (fld, items) in _field_items(values, msg, where).items():
        path = f"{where}.{name}"
        for item in items:
            if fld.kind == "message":
                lines.append(f"{pad}{name} {{")
                _text_message(item, fld.ref or "", indent + 1, path, lines)
                lines.append(f"{pad}}}")
            else:
                lines.append(f"{pad}{name}: {_text_scalar(fld, _check_scalar(fld, item, path))}")


def to_prototxt(net: CaffeNet) -> str:
    """Deploy/train prototxt text (no blobs), fields in caffe.proto order, 2-space indent."""
    lines: list[str] = []
    if net.name:
        lines.append(f"name: {_quote(net.name)}")
    for layer in [*_input_layers(net), *net.layers]:
        lines.append("layer {")
        _text_message(_layer_dict(layer), "LayerParameter", 1, _layer_where(layer), lines)
        lines.append("}")
    return "\n".join(lines) + "\n"


def write_prototxt(net: CaffeNet, path: str | Path) -> None:
    """to_prototxt, written atomically."""
    atomic_write_text(path, to_prototxt(net))


def solver_to_prototxt(fields: Mapping[str, Any], comments: list[str] | tuple[str, ...] = ()) -> str:
    """SolverParameter text preceded by '# ' comment lines (e.g. how each value was derived)."""
    lines = []
    for comment in comments:
        lines.extend(f"# {line}".rstrip() for line in str(comment).splitlines() or [""])
    _text_message(fields, "SolverParameter", 0, "solver", lines)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Text format parsing
# --------------------------------------------------------------------------------------------

class PrototxtMessage(dict):
    """A parsed message: a plain dict that also remembers the line where it starts."""

    line: int = 0


_TOKEN_RE = re.compile(r"""
    (?P<nl>\n)
  | (?P<ws>[ \t\r\f\v]+)
  | (?P<comment>\#[^\n]*)
  | (?P<string>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<number>(?:0[xX][0-9a-fA-F]+|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?[fF]?)(?![A-Za-z0-9_]))
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<sym>[{}<>:\[\],;\-])
""", re.VERBOSE)

_SIMPLE_ESCAPES = {"n": b"\n", "t": b"\t", "r": b"\r", "a": b"\a", "b": b"\b", "f": b"\f",
                   "v": b"\v", "\\": b"\\", "'": b"'", '"': b'"', "?": b"?"}
_ESCAPE_RE = re.compile(
    r"\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))", re.S)


@dataclass
class _Token:
    kind: str
    text: str
    line: int


def _tokenize(text: str, path: str) -> list[_Token]:
    tokens: list[_Token] = []
    line = 1
    pos = 0
    while pos < len(text):
        match = _TOKEN_RE.match(text, pos)
        if match is None:
            raise PrototxtError(f"{path}:{line}: unexpected character {text[pos]!r}")
        kind = match.lastgroup or ""
        if kind == "nl":
            line += 1
        elif kind not in ("ws", "comment"):
            tokens.append(_Token(kind, match.group(), line))
        pos = match.end()
    return tokens


def _unescape(token: _Token, path: str) -> bytes:
    body = token.text[1:-1]
    out = bytearray()
    pos = 0
    for match in _ESCAPE_RE.finditer(body):
        out += body[pos:match.start()].encode("utf-8")
        octal, hexa, uni4, uni8, simple = match.groups()
        if octal:
            out.append(int(octal, 8) & 0xFF)
        elif hexa:
            out.append(int(hexa, 16))
        elif uni4 or uni8:
            out += chr(int(uni4 or uni8, 16)).encode("utf-8")
        elif simple in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[simple]
        else:
            raise PrototxtError(f"{path}:{token.line}: invalid escape '\\{simple}' in string")
        pos = match.end()
    out += body[pos:].encode("utf-8")
    return bytes(out)


_OCTAL_RE = re.compile(r"0[0-7]+")
_BOOL_WORDS = {"true": True, "True": True, "t": True, "false": False, "False": False, "f": False}
_FLOAT_WORDS = {"inf": math.inf, "infinity": math.inf, "nan": math.nan}


class _Parser:
    """Recursive-descent protobuf text format parser, typed by the schema where it knows the field."""

    def __init__(self, text: str, path: str) -> None:
        self.path = path
        self.tokens = _tokenize(text, path)
        self.pos = 0
        self.depth = 0

    # -- token helpers
    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            last = self.tokens[-1].line if self.tokens else 1
            raise PrototxtError(f"{self.path}:{last}: unexpected end of file")
        self.pos += 1
        return token

    def at(self, *symbols: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "sym" and token.text in symbols

    def error(self, token: _Token | None, message: str) -> PrototxtError:
        line = token.line if token else (self.tokens[-1].line if self.tokens else 1)
        return PrototxtError(f"{self.path}:{line}: {message}")

    # -- grammar
    def message(self, msg: str | None, close: str | None, line: int) -> PrototxtMessage:
        out = PrototxtMessage()
        out.line = line
        listed: set[str] = set()
        schema = MESSAGES.get(msg or "", {})
        while True:
            token = self.peek()
            if token is None:
                if close:
                    raise PrototxtError(f"{self.path}:{line}: missing '{close}' for the message "
                                        "opened on this line (the file ends first)")
                return out
            if token.kind == "sym" and token.text == close:
                self.pos += 1
                return out
            if token.kind != "ident":
                raise self.error(token, f"expected a field name, found {token.text!r}")
            self.pos += 1
            fld = schema.get(token.text)
            values, is_list = self.field_value(token, fld, msg)
            self.store(out, token, fld, values, is_list, listed)
            if self.at(",", ";"):
                self.pos += 1

    def field_value(self, name: _Token, fld: Field | None, msg: str | None) -> tuple[list[Any], bool]:
        colon = self.at(":")
        if colon:
            self.pos += 1
        if self.at("{", "<"):
            return [self.submessage(name, fld)], False
        if not colon:
            raise self.error(self.peek() or name, f"expected ':' or '{{' after '{name.text}'")
        if self.at("["):
            opener = self.take()
            items: list[Any] = []
            if fld is not None and not fld.repeated:
                raise self.error(opener, f"'{name.text}' is not a repeated field of {msg}")
            while not self.at("]"):
                if self.at("{", "<"):
                    items.append(self.submessage(name, fld))
                else:
                    items.append(self.scalar(name, fld))
                if self.at(","):
                    self.pos += 1
                elif not self.at("]"):
                    raise self.error(self.peek(), f"expected ',' or ']' in the list for '{name.text}'")
            self.pos += 1
            return items, True
        return [self.scalar(name, fld)], False

    def submessage(self, name: _Token, fld: Field | None) -> PrototxtMessage:
        opener = self.take()
        if fld is not None and fld.kind != "message":
            raise self.error(opener, f"'{name.text}' is a {fld.kind} field, not a message")
        close = "}" if opener.text == "{" else ">"
        if self.depth >= MAX_PROTOTXT_DEPTH:  # protobuf's own text parser stops at 100 too
            raise self.error(opener, f"messages nested deeper than {MAX_PROTOTXT_DEPTH} levels")
        self.depth += 1
        try:
            return self.message(fld.ref if fld else None, close, opener.line)
        finally:
            self.depth -= 1

    def scalar(self, name: _Token, fld: Field | None) -> Any:
        token = self.take()
        negative = False
        if token.kind == "sym" and token.text == "-":
            negative = True
            token = self.take()
        if token.kind == "string" and not negative:
            data = _unescape(token, self.path)
            while self.peek() is not None and self.peek().kind == "string":  # "a" "b" concatenates
                data += _unescape(self.take(), self.path)
            return self.typed_string(token, name, fld, data)
        if token.kind == "number":
            return self.typed_number(token, name, fld, negative)
        if token.kind == "ident":
            return self.typed_ident(token, name, fld, negative)
        raise self.error(token, f"expected a value for '{name.text}', found {token.text!r}")

    def typed_string(self, token: _Token, name: _Token, fld: Field | None, data: bytes) -> Any:
        if fld is not None and fld.kind == "bytes":
            return data
        if fld is not None and fld.kind != "string":
            raise self.error(token, f"'{name.text}' is a {fld.kind} field, got a string")
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.error(token, f"string for '{name.text}' is not valid UTF-8") from exc

    def typed_number(self, token: _Token, name: _Token, fld: Field | None, negative: bool) -> Any:
        text = token.text
        is_int = not re.search(r"[.eEfF]", text) or text[:2].lower() == "0x"
        if is_int:
            if text[:2].lower() == "0x":
                value = int(text, 16)
            elif _OCTAL_RE.fullmatch(text):
                value = int(text, 8)
            else:
                value = int(text)
            value = -value if negative else value
        else:
            number = float(text.rstrip("fF"))
            value = -number if negative else number
        if fld is None:
            return value
        kind = fld.kind
        if kind in _INT_RANGES:
            if not is_int:
                raise self.error(token, f"'{name.text}' needs an integer, got {text}")
            low, high = _INT_RANGES[kind]
            if not low <= value <= high:
                raise self.error(token, f"'{name.text}': {value} is out of range for {kind}")
            return value
        if kind in ("float", "double"):
            return float(value)
        if kind == "bool" and is_int and value in (0, 1):
            return bool(value)
        if kind == "enum" and is_int:
            for enum_name, number in ENUMS[fld.ref or ""].items():
                if number == value:
                    return enum_name
            raise self.error(token, f"'{name.text}': {value} is not a value of {fld.ref}")
        raise self.error(token, f"'{name.text}' is a {kind} field, got {text}")

    def typed_ident(self, token: _Token, name: _Token, fld: Field | None, negative: bool) -> Any:
        word = token.text
        lower = word.lower()
        kind = fld.kind if fld else None
        if kind in ("float", "double") or (kind is None and lower in _FLOAT_WORDS):
            if lower not in _FLOAT_WORDS:
                raise self.error(token, f"'{name.text}' needs a number, got {word}")
            value = _FLOAT_WORDS[lower]
            return -value if negative else value
        if negative:
            raise self.error(token, f"'-' before {word!r} for '{name.text}'")
        if kind == "bool" or (kind is None and word in ("true", "false")):
            if word not in _BOOL_WORDS:
                raise self.error(token, f"'{name.text}' needs true or false, got {word}")
            return _BOOL_WORDS[word]
        if kind == "enum":
            names = ENUMS[fld.ref or ""]  # type: ignore[union-attr]
            if word not in names:
                raise self.error(token, f"'{name.text}': {word} is not one of {', '.join(names)}")
            return word
        if kind is not None:
            raise self.error(token, f"'{name.text}' is a {kind} field, got {word}")
        return word

    def store(self, out: PrototxtMessage, name: _Token, fld: Field | None, values: list[Any],
              is_list: bool, listed: set[str]) -> None:
        key = name.text
        if fld is not None:
            if fld.repeated:
                out.setdefault(key, []).extend(values)
            elif key in out:
                raise self.error(name, f"'{key}' is not a repeated field but is given more than once")
            else:
                out[key] = values[0]
            return
        # A field outside our schema subset: a list once it repeats or uses [..] syntax.
        if key not in out:
            out[key] = list(values) if is_list else values[0]
            if is_list:
                listed.add(key)
        elif key in listed:
            out[key].extend(values)
        else:
            out[key] = [out[key], *values]
            listed.add(key)


MAX_PROTOTXT_DEPTH = 100


def parse_prototxt(text: str, path: str = "<prototxt>", message: str | None = "NetParameter") -> dict:
    """Protobuf text format -> nested dicts (repeated fields -> lists; enums as names).

    Fields known to the schema of `message` are typed and checked (a float field given `1`
    reads as 1.0, repeated fields are always lists); other fields are kept as parsed.
    `message=None` parses with no schema at all. Errors name `path:line`.
    """
    if message is not None and message not in MESSAGES:
        raise ValueError(f"unknown message type {message}")
    parser = _Parser(text, path)
    return parser.message(message, None, 1)


def _line_of(value: Any, default: str) -> str:
    line = getattr(value, "line", 0)
    return f"{default}:{line}" if line else default


def _net_from_dict(data: Mapping[str, Any], path: str) -> CaffeNet:
    """NetParameter dict (text or binary) -> CaffeNet, Input layers folded into `inputs`."""
    if "layers" in data:
        raise PrototxtError(f"{_line_of(data, path)}: V1 'layers' nets are not supported; "
                            "upgrade them with Caffe's upgrade_net_proto_text tool first")
    name = data.get("name", "")
    inputs: list[tuple[str, tuple[int, ...]]] = []
    legacy_names = list(data.get("input", []))
    if legacy_names:
        shapes = [tuple(s.get("dim", [])) for s in data.get("input_shape", [])]
        dims = list(data.get("input_dim", []))
        if not shapes and dims:
            if len(dims) != 4 * len(legacy_names):
                raise PrototxtError(f"{_line_of(data, path)}: {len(dims)} input_dim values for "
                                    f"{len(legacy_names)} inputs (4 each are needed)")
            shapes = [tuple(dims[4 * i:4 * i + 4]) for i in range(len(legacy_names))]
        if len(shapes) != len(legacy_names):
            raise PrototxtError(f"{_line_of(data, path)}: {len(legacy_names)} inputs but "
                                f"{len(shapes)} input shapes")
        inputs.extend(zip(legacy_names, shapes))
    layers: list[CaffeLayer] = []
    for raw in data.get("layer", []):
        where = _line_of(raw, path)
        for key in ("name", "type"):
            if not isinstance(raw.get(key), str) or not raw.get(key):
                raise PrototxtError(f"{where}: layer without a '{key}'")
        bottom, top = list(raw.get("bottom", [])), list(raw.get("top", []))
        params = {k: v for k, v in raw.items() if k not in ("name", "type", "bottom", "top", "blobs")}
        blobs = [b if isinstance(b, np.ndarray) else _blob_from_text(b, where) for b in raw.get("blobs", [])]
        shapes_ = params.get("input_param", {}).get("shape", []) if raw["type"] == "Input" else []
        if raw["type"] == "Input" and set(params) == {"input_param"} and not bottom and top \
                and len(shapes_) in (1, len(top)) and set(params["input_param"]) == {"shape"}:
            for index, blob in enumerate(top):
                shape = shapes_[index if len(shapes_) > 1 else 0]
                inputs.append((blob, tuple(int(d) for d in shape.get("dim", []))))
            continue
        layers.append(CaffeLayer(raw["name"], raw["type"], bottom, top, params, blobs))
    return CaffeNet(name, inputs, layers)


def _blob_from_text(blob: Mapping[str, Any], where: str) -> np.ndarray:
    data = np.asarray(blob.get("data", []), dtype=np.float32)
    if "shape" in blob:
        shape = tuple(blob["shape"].get("dim", []))
    elif any(k in blob for k in ("num", "channels", "height", "width")):
        shape = tuple(blob.get(k, 0) for k in ("num", "channels", "height", "width"))
    else:
        return data
    if data.size != math.prod(shape):
        raise PrototxtError(f"{where}: blob shape {shape} needs {math.prod(shape)} values, got {data.size}")
    return data.reshape(shape)


def net_from_prototxt(text: str, path: str = "<prototxt>") -> CaffeNet:
    """A prototxt as a CaffeNet (no blobs): plain Input layers and legacy inputs become `inputs`."""
    return _net_from_dict(parse_prototxt(text, path, "NetParameter"), path)
