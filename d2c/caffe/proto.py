"""Caffe model files without pycaffe or protoc: the caffe.proto subset d2c uses, on the protobuf runtime.

SCHEMA (checked against pycaffe's descriptors in tests/test_caffe_proto.py) becomes a descriptor at import;
protobuf does typing, wire and text format. Only blob data bypasses it (protobuf handles packed floats one
Python float at a time). Prototxt reading is strict: a field outside SCHEMA, misspelt or not, is an error
at file:line:column; binary files skip unknown fields, as protobuf does, so real Caffe's caffemodels read.
"""
from __future__ import annotations

import math
import mmap
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from d2c.errors import CfgError, D2CError, ParamError, WeightsError
from d2c.fsutil import atomic_write

__all__ = ["CaffeLayer", "CaffeNet", "PrototxtError", "MESSAGES", "to_prototxt", "write_caffemodel",
           "read_caffemodel", "read_caffemodel_net", "parse_prototxt", "net_from_prototxt", "solver_to_prototxt"]


class PrototxtError(CfgError):
    """A prototxt that is not valid protobuf text format or does not fit caffe.proto."""


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


# Proto2 syntax with `optional` left out: only the fields d2c writes or reads, with Caffe's numbers and
# types. Declaration order is the prototxt order (Caffe's own); the binary form is in field-number order.
SCHEMA = """
message BlobShape { repeated int64 dim = 1 [packed = true]; }
message BlobProto { BlobShape shape = 7; repeated float data = 5 [packed = true]; }
message NetParameter { string name = 1; repeated LayerParameter layer = 100; }
message ParamSpec { float lr_mult = 3; float decay_mult = 4; }
message LayerParameter { string name = 1; string type = 2; repeated string bottom = 3; repeated string top = 4;
  repeated float loss_weight = 5; repeated ParamSpec param = 6; repeated BlobProto blobs = 7;
  repeated bool propagate_down = 11; BatchNormParameter batch_norm_param = 139; ConcatParameter concat_param = 104;
  ConvolutionParameter convolution_param = 106; CropParameter crop_param = 144; DropoutParameter dropout_param = 108;
  EltwiseParameter eltwise_param = 110; FlattenParameter flatten_param = 135;
  InnerProductParameter inner_product_param = 117; InputParameter input_param = 143;
  PoolingParameter pooling_param = 121; PowerParameter power_param = 122; PythonParameter python_param = 130;
  ReLUParameter relu_param = 123; ReshapeParameter reshape_param = 133; ScaleParameter scale_param = 142;
  SoftmaxParameter softmax_param = 125; SliceParameter slice_param = 126; }
message BatchNormParameter { bool use_global_stats = 1; float moving_average_fraction = 2; float eps = 3; }
message ConcatParameter { int32 axis = 2; }
message ConvolutionParameter { uint32 num_output = 1; bool bias_term = 2; repeated uint32 pad = 3;
  repeated uint32 kernel_size = 4; repeated uint32 stride = 6; uint32 group = 5; }
message CropParameter { int32 axis = 1; repeated uint32 offset = 2; }
message DropoutParameter { float dropout_ratio = 1; }
message EltwiseParameter { enum EltwiseOp { PROD = 0; SUM = 1; MAX = 2; } EltwiseOp operation = 1;
  repeated float coeff = 2; }
message FlattenParameter { int32 axis = 1; }
message InnerProductParameter { uint32 num_output = 1; bool bias_term = 2; int32 axis = 5; }
message InputParameter { repeated BlobShape shape = 1; }
message PoolingParameter { enum PoolMethod { MAX = 0; AVE = 1; STOCHASTIC = 2; } PoolMethod pool = 1; uint32 pad = 4;
  uint32 pad_h = 9; uint32 pad_w = 10; uint32 kernel_size = 2; uint32 kernel_h = 5; uint32 kernel_w = 6;
  uint32 stride = 3; uint32 stride_h = 7; uint32 stride_w = 8; bool global_pooling = 12; }
message PowerParameter { float power = 1; float scale = 2; float shift = 3; }
message PythonParameter { string module = 1; string layer = 2; string param_str = 3; }
message ReLUParameter { float negative_slope = 1; }
message ReshapeParameter { BlobShape shape = 1; }
message ScaleParameter { int32 axis = 1; bool bias_term = 4; }
message SoftmaxParameter { int32 axis = 2; }
message SliceParameter { int32 axis = 3; repeated uint32 slice_point = 2; }
message SolverParameter { string net = 24; float base_lr = 5; int32 display = 6; int32 average_loss = 33;
  int32 max_iter = 7; int32 iter_size = 36; string lr_policy = 8; float gamma = 9; float power = 10;
  float momentum = 11; float weight_decay = 12; string regularization_type = 29; int32 stepsize = 13;
  repeated int32 stepvalue = 34; int32 snapshot = 14; string snapshot_prefix = 15;
  enum SolverMode { CPU = 0; GPU = 1; } SolverMode solver_mode = 17; string type = 40; }
"""
_DECL = re.compile(r"message (\w+) \{|enum (\w+) \{([^}]*)\}|(repeated )?(\w+) (\w+) = (\d+)( \[packed = true\])?;|\}")
_PB = descriptor_pb2.FieldDescriptorProto
_SCALARS = {n: getattr(_PB, f"TYPE_{n.upper()}") for n in "float double int64 int32 bool string uint32".split()}


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    """SCHEMA as a FileDescriptorProto (package caffe, proto2)."""
    if _DECL.sub("", SCHEMA).strip():  # a typo must not drop a field silently
        raise AssertionError(f"SCHEMA has text that is not a declaration: {_DECL.sub('', SCHEMA).split()[:8]}")
    proto = descriptor_pb2.FileDescriptorProto(name="d2c_caffe.proto", package="caffe", syntax="proto2")
    message = None
    for match in _DECL.finditer(SCHEMA):
        msg_name, enum_name, values, repeated, kind, name, number, packed = match.groups()
        if enum_name:
            enum = message.enum_type.add(name=enum_name)  # enums are nested in their message
            for value, value_number in re.findall(r"(\w+) = (\d+)", values):
                enum.value.add(name=value, number=int(value_number))
        elif name:
            fld = message.field.add(name=name, number=int(number),
                                    label=_PB.LABEL_REPEATED if repeated else _PB.LABEL_OPTIONAL)
            nested = any(e.name == kind for e in message.enum_type)
            fld.type = _SCALARS.get(kind) or (_PB.TYPE_ENUM if nested else _PB.TYPE_MESSAGE)
            if kind not in _SCALARS:
                fld.type_name = f".caffe.{message.name}.{kind}" if nested else f".caffe.{kind}"
            if packed:
                fld.options.packed = True
        else:  # a message opens or closes
            message = proto.message_type.add(name=msg_name) if msg_name else None
    return proto


def _message_classes() -> dict[str, type[Message]]:
    pool = descriptor_pool.DescriptorPool()  # our own pool: no clash with pycaffe's caffe_pb2
    proto = _file_descriptor()
    pool.AddSerializedFile(proto.SerializeToString())
    make = getattr(message_factory, "GetMessageClass", None) or message_factory.MessageFactory(pool).GetPrototype
    return {m.name: make(pool.FindMessageTypeByName(f"caffe.{m.name}")) for m in proto.message_type}


MESSAGES = _message_classes()
_HAS_IS_REPEATED = hasattr(FieldDescriptor, "is_repeated")  # protobuf >= 5; older ones have `label`
_FLOAT32_MAX = float(np.finfo(np.float32).max)
_WANTED = {FieldDescriptor.CPPTYPE_BOOL: "true/false", FieldDescriptor.CPPTYPE_STRING: "a string"}


def _repeated(fld: FieldDescriptor) -> bool:
    return fld.is_repeated if _HAS_IS_REPEATED else fld.label == fld.LABEL_REPEATED


# dicts -> messages. protobuf rejects wrong types and out-of-range integers itself, but would turn
# 0 into false, True into 1.0 and 1e39 into inf (and its wording for a non-string is poor): ours.
def _scalar(fld: FieldDescriptor, value: Any, where: str) -> Any:
    """`value` checked for `fld`, as a plain Python value (enum names become numbers)."""
    if fld.enum_type is not None and isinstance(value, str):
        if value not in fld.enum_type.values_by_name:
            raise ParamError(f"{where}: '{value}' is not one of {', '.join(v.name for v in fld.enum_type.values)}")
        return fld.enum_type.values_by_name[value].number
    if isinstance(value, (bool, np.bool_)) != (fld.cpp_type == FieldDescriptor.CPPTYPE_BOOL) \
            or (fld.cpp_type == FieldDescriptor.CPPTYPE_STRING and not isinstance(value, str)):
        raise ParamError(f"{where}: expected {_WANTED.get(fld.cpp_type, 'a number')}, got {value!r}")
    if fld.cpp_type == FieldDescriptor.CPPTYPE_FLOAT and isinstance(value, (int, float, np.number)) \
            and math.isfinite(value) and abs(value) > _FLOAT32_MAX:
        raise ParamError(f"{where}: {float(value)!r} does not fit a 32-bit float")
    return value.item() if isinstance(value, np.generic) else value


def _fill(msg: Message, values: Mapping[str, Any], where: str) -> Message:
    """Set the fields of `msg` from a dict (a repeated field takes a list or one value; None: unset)."""
    kind, fields = msg.DESCRIPTOR.name, msg.DESCRIPTOR.fields_by_name
    if not isinstance(values, Mapping):
        raise ParamError(f"{where}: expected a {kind} as a dict, got {values!r}")
    msg.SetInParent()
    for key, value in values.items():
        if key not in fields:
            raise ParamError(f"{where}: unknown {kind} field {key}")
        fld, path, repeated = fields[key], f"{where}.{key}", _repeated(fields[key])
        if not repeated and isinstance(value, (list, tuple, np.ndarray)):
            raise ParamError(f"{path}: {kind}.{key} is not repeated, got a list")
        items = ([] if value is None else value.ravel().tolist() if isinstance(value, np.ndarray)
                 else list(value) if isinstance(value, (list, tuple)) else [value])
        if fld.message_type is not None:
            for item in items:
                _fill(getattr(msg, key).add() if repeated else getattr(msg, key), item, path)
            continue
        checked = [_scalar(fld, item, path) for item in items]
        try:
            if repeated:
                getattr(msg, key).extend(checked)
            elif checked:
                setattr(msg, key, checked[0])
        except (TypeError, ValueError) as exc:
            raise ParamError(f"{path}: {exc}") from None
    return msg


def _layer_message(layer: CaffeLayer) -> Message:
    """name/type/bottom/top plus params as one LayerParameter (blobs excluded)."""
    where = f"layer '{layer.name}' ({layer.type})"
    clash = [key for key in ("name", "type", "bottom", "top", "blobs") if key in layer.params]
    if clash:
        raise ParamError(f"{where}: params must not contain {', '.join(clash)} (they are CaffeLayer attributes)")
    if not (layer.name and layer.type):
        raise ParamError(f"{where}: a layer needs a non-empty name and type")
    values = {"name": layer.name, "type": layer.type, "bottom": layer.bottom, "top": layer.top, **layer.params}
    return _fill(MESSAGES["LayerParameter"](), values, where)


def _all_layers(net: CaffeNet) -> list[CaffeLayer]:
    """`inputs` as leading Input layers (the modern form, checked by _fill like any layer)."""
    return [*(CaffeLayer(blob, "Input", [], [blob], {"input_param": {"shape": [{"dim": list(shape)}]}})
              for blob, shape in net.inputs), *net.layers]


# Text format: protobuf's, with fields in declaration order.
def to_prototxt(net: CaffeNet) -> str:
    """Deploy/train prototxt text (no blobs), fields in caffe.proto order, 2-space indent."""
    pb = _fill(MESSAGES["NetParameter"](), {"name": net.name or None}, f"net '{net.name}'")
    pb.layer.extend(_layer_message(layer) for layer in _all_layers(net))
    return text_format.MessageToString(pb, as_utf8=True, use_index_order=True)


def solver_to_prototxt(fields: Mapping[str, Any], comments: list[str] | tuple[str, ...] = ()) -> str:
    """SolverParameter text preceded by '# ' comment lines (e.g. how each value was derived)."""
    lines = [f"# {line}".rstrip() + "\n" for comment in comments for line in str(comment).splitlines() or [""]]
    solver = _fill(MESSAGES["SolverParameter"](), fields, "solver")
    return "".join(lines) + text_format.MessageToString(solver, as_utf8=True, use_index_order=True)


def parse_prototxt(text: str, path: str = "<prototxt>", message: str = "NetParameter") -> dict:
    """Protobuf text format -> nested dicts (repeated fields -> lists, enums as names, floats as
    the shortest decimal of their float32). Errors name `path:line:column`."""
    msg = MESSAGES[message]()
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as exc:
        line, lines = exc.GetLine() or 1, text.splitlines()
        quoted = f"'{lines[line - 1]}': " if line <= len(lines) else ""  # protobuf repeats the whole line
        reason = re.sub(r"^\d+:\d+ : ", "", str(exc)).removeprefix(quoted)
        if 'named "layers"' in reason:
            reason += " (a V1 net: upgrade it with Caffe's upgrade_net_proto_text tool first)"
        raise PrototxtError(f"{path}:{line}:{exc.GetColumn() or 1}: {reason}") from None
    return _to_dict(msg, path, PrototxtError)


def net_from_prototxt(text: str, path: str = "<prototxt>") -> CaffeNet:
    """A prototxt as a CaffeNet: plain Input layers become `inputs`."""
    net = parse_prototxt(text, path)
    return _to_net(net, [(layer, layer.pop("blobs", [])) for layer in net.pop("layer", [])], path, PrototxtError)


# messages -> dicts -> CaffeNets
def _value(fld: FieldDescriptor, value: Any, where: str, error: type[D2CError]) -> Any:
    if fld.message_type is not None:  # a blob in a prototxt: protobuf's floats are few there
        return (_blob(value, np.asarray(value.data, np.float32), where, error)
                if fld.message_type.name == "BlobProto" else _to_dict(value, where, error))
    if fld.enum_type is not None:
        return fld.enum_type.values_by_number[value].name
    if fld.cpp_type == FieldDescriptor.CPPTYPE_FLOAT:
        return float(str(np.float32(value)))  # 0.1 reads back as 0.1, not 0.10000000149011612
    if isinstance(value, bytes):  # upb hands out a proto2 string that is not UTF-8 as bytes
        raise error(f"{where}.{fld.name}: text is not UTF-8")
    return value


def _to_dict(msg: Message, where: str, error: type[D2CError]) -> dict[str, Any]:
    return {fld.name: [_value(fld, v, where, error) for v in value] if _repeated(fld)
            else _value(fld, value, where, error) for fld, value in msg.ListFields()}


def _blob(pb: Message, data: np.ndarray, where: str, error: type[D2CError]) -> np.ndarray:
    """A BlobProto's float32 `data` shaped by its BlobShape (flat without one)."""
    if not pb.HasField("shape"):
        return data
    shape = tuple(pb.shape.dim)
    if any(d < 0 for d in shape) or data.size != math.prod(shape):
        raise error(f"{where}: blob shape {shape} does not fit the {data.size} values in the file")
    return data.reshape(shape)


def _to_net(net: dict[str, Any], layers: list[tuple[dict[str, Any], list[np.ndarray]]], where: str,
            error: type[D2CError]) -> CaffeNet:
    """NetParameter dicts -> CaffeNet; plain Input layers (one top, one shape, nothing else) become `inputs`."""
    inputs, out = [], []
    for index, (params, blobs) in enumerate(layers):
        for key in ("name", "type"):
            if not params.get(key):
                raise error(f"{where}: layer {index} ('{params.get('name', '')}') has no '{key}'")
        name, kind, bottom, top = (params.pop(k, []) for k in ("name", "type", "bottom", "top"))
        shapes = params.get("input_param", {}).get("shape", [])
        if kind == "Input" and params == {"input_param": {"shape": shapes}} and not bottom \
                and len(top) == len(shapes) == 1:
            inputs.append((top[0], tuple(shapes[0].get("dim", []))))
        else:
            out.append(CaffeLayer(name, kind, bottom, top, params, blobs))
    return CaffeNet(net.get("name", ""), inputs, out)


# Binary: protobuf for every message; blob data straight between numpy buffers and the file.
def _varint(value: int) -> bytes:
    """protobuf's own varint encoding: the payload of a one-value packed int64 field."""
    return MESSAGES["BlobShape"](dim=[value]).SerializeToString()[2:]


def _read_varint(buf: memoryview, pos: int, end: int, where: str) -> tuple[int, int]:
    result = shift = 0
    while pos < end and shift < 70:
        result, pos, shift = result | (buf[pos] & 0x7F) << shift, pos + 1, shift + 7
        if not buf[pos - 1] & 0x80:
            return result, pos
    raise WeightsError(f"{where}: varint truncated or longer than 10 bytes at byte {pos}")


def _fields(buf: memoryview, pos: int, end: int, where: str) -> Iterator[tuple[int, int, int, int, int]]:
    """(number, wire type, field start, payload start, payload end) of each field in buf[pos:end]."""
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, end, where)
        number, wire = key >> 3, key & 7
        if number == 0 or wire not in (0, 1, 2, 5):
            raise WeightsError(f"{where}: invalid field number {number} or wire type {wire} at byte {start}")
        if wire == 2:
            size, pos = _read_varint(buf, pos, end, where)
        else:
            size = _read_varint(buf, pos, end, where)[1] - pos if wire == 0 else 8 if wire == 1 else 4
        if pos + size > end:
            raise WeightsError(f"{where}: field {number} at byte {start} runs past the end ({size} bytes "
                               f"needed, {end - pos} left); the file is truncated")
        yield number, wire, start, pos, pos + size
        pos += size


def _parse(message: str, data: bytes | bytearray | memoryview, where: str) -> Message:
    msg = MESSAGES[message]()
    try:
        msg.ParseFromString(bytes(data))
    except (DecodeError, UnicodeDecodeError) as exc:  # older runtimes check UTF-8 while parsing
        raise WeightsError(f"{where}: not a valid {message}: {exc}") from None
    return msg


def _layer_parts(layer: CaffeLayer) -> list[bytes | memoryview]:
    """One NetParameter.layer entry: protobuf's bytes, with each blob (field 7) slotted into
    field-number order as BlobProto {data (5): packed floats from the array's own buffer, shape (7)}."""
    body = _layer_message(layer).SerializeToString()
    cut = next((start for number, _, start, _, _ in _fields(memoryview(body), 0, len(body), "") if number > 7),
               len(body))
    parts: list[bytes | memoryview] = [body[:cut]]
    for index, blob in enumerate(layer.blobs):
        arr = np.asarray(blob)
        if arr.dtype.kind not in "fiub":
            raise ParamError(f"layer '{layer.name}' ({layer.type}) blob {index}: blob dtype {arr.dtype} is not numeric")
        arr = np.asarray(arr, dtype="<f4", order="C")  # ascontiguousarray would make 0-d arrays 1-d
        shape = MESSAGES["BlobShape"](dim=arr.shape).SerializeToString()
        data = memoryview(arr.reshape(-1)).cast("B")
        head = b"\x2a" + _varint(len(data)) if arr.size else b""
        tail = b"\x3a" + _varint(len(shape)) + shape
        parts += [b"\x3a" + _varint(len(head) + len(data) + len(tail)) + head, data, tail]
    parts.append(body[cut:])
    return [b"\xa2\x06" + _varint(sum(len(p) for p in parts)), *parts]


def _write_parts(handle: IO[bytes], parts: list[bytes | memoryview]) -> None:
    """One layer's pieces (a function of its own so tests can fail or kill a write half-way)."""
    for part in parts:
        handle.write(part)


def write_caffemodel(net: CaffeNet, path: str | Path) -> None:
    """Write the binary NetParameter atomically. Every layer is encoded (and so checked) before the file
    is opened; blob data goes from the numpy buffers to the file, so memory stays near the arrays' size."""
    header = _fill(MESSAGES["NetParameter"](), {"name": net.name or None}, f"net '{net.name}'")
    encoded = [_layer_parts(layer) for layer in _all_layers(net)]
    with atomic_write(path, "wb") as handle:
        handle.write(header.SerializeToString())
        for parts in encoded:
            _write_parts(handle, parts)


def _split(buf: memoryview, a: int, b: int, where: str, raw: tuple[int, ...]) -> tuple[bytearray, list[tuple]]:
    """buf[a:b] as (its other fields as bytes for protobuf, (number, wire, start, end) of the fields `raw`)."""
    rest, spans = bytearray(), []
    for number, wire, start, fa, fb in _fields(buf, a, b, where):
        if number in raw:
            spans.append((number, wire, fa, fb))
        else:
            rest += buf[start:fb]
    return rest, spans


def _old_format(spans: list[tuple], numbers: tuple[int, ...], what: str, where: str) -> None:
    """Pre-2015 Caffe encodings (V1 layers, 4-D blob dims, double blobs) are refused, not guessed at."""
    if any(number in numbers for number, *_ in spans):
        raise WeightsError(f"{where}: {what} (an old Caffe format); upgrade it with Caffe's "
                           f"upgrade_net_proto_binary tool first")


def _read_blob(buf: memoryview, a: int, b: int, where: str) -> np.ndarray:
    """A BlobProto: its packed data (5) read straight into numpy, the shape by protobuf."""
    rest, spans = _split(buf, a, b, where, (1, 2, 3, 4, 5, 8))
    _old_format(spans, (1, 2, 3, 4, 8), "blob with 4-D num/channels/height/width dims or double_data", where)
    if any(wire != 2 for _, wire, _, _ in spans) or any((fb - fa) % 4 for _, _, fa, fb in spans):
        raise WeightsError(f"{where}: blob data that is not packed float32 (wire type or length)")
    chunks = [np.frombuffer(buf, "<f4", (fb - fa) // 4, fa) for _, _, fa, fb in spans]
    data = chunks[0].astype(np.float32) if len(chunks) == 1 else np.concatenate(chunks or [[]], dtype=np.float32)
    return _blob(_parse("BlobProto", rest, where), data, where, WeightsError)


def _read(path: str | Path, full: bool) -> tuple[dict[str, Any], list[tuple[dict[str, Any], list[np.ndarray]]]]:
    """(NetParameter without layers, [(LayerParameter without blobs, blobs)]) as dicts; only each
    layer's name and type unless `full`."""
    try:
        with open(path, "rb") as handle:  # an mmap: blob data is copied once, page cache -> arrays
            size = os.fstat(handle.fileno()).st_size
            buf = memoryview(mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b"")
    except OSError as exc:
        raise WeightsError(f"{path}: cannot open caffemodel: {exc.strerror or exc}") from None
    if not size:
        raise WeightsError(f"{path}: caffemodel is empty")
    rest, spans = _split(buf, 0, len(buf), str(path), (2, 100))
    _old_format(spans, (2,), "V1 'layers'", str(path))
    layers = []
    for index, (_, wire, a, b) in enumerate(spans):
        where = f"{path}: layer {index}"
        layer_rest, blob_spans = _split(buf, a, b, where, (7,)) if wire == 2 else (b"", [])
        if wire != 2 or any(blob_wire != 2 for _, blob_wire, _, _ in blob_spans):
            raise WeightsError(f"{where}: a layer or blob that is not a message (wire type {wire})")
        blobs = [_read_blob(buf, fa, fb, f"{where} blob {i}") for i, (_, _, fa, fb) in enumerate(blob_spans)]
        msg = _parse("LayerParameter", layer_rest, where)
        fields = msg.DESCRIPTOR.fields_by_name
        layers.append((_to_dict(msg, where, WeightsError) if full else
                       {key: _value(fields[key], getattr(msg, key), where, WeightsError) for key in ("name", "type")},
                       blobs))
    return _to_dict(_parse("NetParameter", rest, str(path)), str(path), WeightsError), layers


def read_caffemodel(path: str | Path) -> dict[str, tuple[str, list[np.ndarray]]]:
    """Layer name -> (type, float32 blobs) from a .caffemodel, ours or real Caffe's. Same-named
    layers are fine unless two carry blobs."""
    out: dict[str, tuple[str, list[np.ndarray]]] = {}
    for layer, blobs in _read(path, full=False)[1]:
        name = layer.get("name", "")
        if name in out and out[name][1] and blobs:
            raise WeightsError(f"{path}: two layers named '{name}' both carry blobs")
        if name not in out or blobs:
            out[name] = (layer.get("type", ""), blobs)
    return out


def read_caffemodel_net(path: str | Path) -> CaffeNet:
    """Every known field of a .caffemodel as a CaffeNet (params decoded through the schema)."""
    net, layers = _read(path, full=True)
    return _to_net(net, layers, str(path), WeightsError)
