"""d2c.caffe.proto: schema against the real caffe.proto, wire and text round trips, real engines.

The schema is ours (no pycaffe is needed to convert) but must agree with Caffe's field for
field; the raw blob path must produce exactly protobuf's bytes.

The engine tests load what we write into OpenCV's Caffe importer and into pycaffe and compare
both with a float64 numpy reference of the same net. A missing engine is a failure, never a skip.
"""
from __future__ import annotations

import math
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from d2c.caffe import proto
from d2c.caffe.proto import (
    MESSAGES, CaffeLayer, CaffeNet, PrototxtError, net_from_prototxt, parse_prototxt,
    read_caffemodel, read_caffemodel_net, solver_to_prototxt, to_prototxt, write_caffemodel,
)
from d2c.errors import D2CError, ParamError, WeightsError


# --------------------------------------------------------------------------------------------
# Engines (imported inside tests so a missing one fails those tests, not the whole module)
# --------------------------------------------------------------------------------------------

def _caffe() -> Any:
    os.environ.setdefault("GLOG_minloglevel", "2")
    try:
        import caffe  # noqa: PLC0415
    except ImportError as exc:  # a missing engine is a failure, never a skip
        pytest.fail(f"pycaffe is not importable: {exc}")
    caffe.set_mode_cpu()
    return caffe


def _caffe_pb2() -> Any:
    _caffe()
    from caffe.proto import caffe_pb2  # noqa: PLC0415
    return caffe_pb2


def _cv2() -> Any:
    try:
        import cv2  # noqa: PLC0415
    except ImportError as exc:
        pytest.fail(f"OpenCV (cv2) is not importable: {exc}")
    return cv2


def _text_format() -> Any:
    from google.protobuf import text_format  # noqa: PLC0415
    return text_format


# --------------------------------------------------------------------------------------------
# Schema: every field we know matches the descriptors generated from Caffe's caffe.proto
# --------------------------------------------------------------------------------------------

def _fields(message: str) -> list[Any]:
    return list(MESSAGES[message].DESCRIPTOR.fields)


def _packed(fld: Any) -> bool:
    """is_packed where the runtime has it (protobuf >= 4.2x), else the field option."""
    return fld.is_packed if hasattr(fld, "is_packed") else fld.GetOptions().packed


def _schema_problems(mine: Any, real: Any) -> list[str]:
    """Every way our message descriptor differs from Caffe's for the fields we declare."""
    problems = [] if list(mine.fields) else [f"{mine.name}: no fields"]
    for fld in mine.fields:
        other = real.fields_by_name.get(fld.name)
        where = f"{mine.name}.{fld.name}"
        if other is None:
            problems.append(f"{where} is not in caffe.proto")
            continue
        if (other.number, other.type, proto._repeated(other), _packed(other)) != \
                (fld.number, fld.type, proto._repeated(fld), _packed(fld)):
            problems.append(f"{where}: number, type, label or packing differs")
        if fld.message_type is not None and other.message_type.name != fld.message_type.name:
            problems.append(f"{where}: message type differs")
        if fld.enum_type is not None and {v.name: v.number for v in other.enum_type.values} != \
                {v.name: v.number for v in fld.enum_type.values}:
            problems.append(f"{where}: enum values differ")
    return problems


@pytest.mark.parametrize("message", sorted(MESSAGES))
def test_schema_matches_real_caffe_proto(message: str) -> None:
    assert _schema_problems(MESSAGES[message].DESCRIPTOR, getattr(_caffe_pb2(), message).DESCRIPTOR) == []


@pytest.mark.parametrize(("old", "new"), [
    ("negative_slope = 1;", "negative_slope = 3;"),
    ("float negative_slope", "double negative_slope"),
    ("repeated int64 dim = 1 [packed = true];", "repeated int64 dim = 1;"),
    ("repeated uint32 pad = 3;", "uint32 pad = 3;"),
    ("MAX = 0; AVE = 1;", "MAX = 1; AVE = 0;"),
    ("{ BlobShape shape = 1;", "{ InputParameter shape = 1;"),
    ("float eps = 3;", "float epsilon = 3;"),
])
def test_schema_check_sees_a_mutation(monkeypatch: pytest.MonkeyPatch, old: str, new: str) -> None:
    """The comparison above can fail: one wrong number, type, label, packing, enum value or name in SCHEMA."""
    from google.protobuf import descriptor_pool  # noqa: PLC0415
    assert proto.SCHEMA.count(old) == 1
    monkeypatch.setattr(proto, "SCHEMA", proto.SCHEMA.replace(old, new))
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(proto._file_descriptor().SerializeToString())
    caffe_pb2 = _caffe_pb2()
    problems = [p for name in MESSAGES for p in _schema_problems(pool.FindMessageTypeByName(f"caffe.{name}"),
                                                                 getattr(caffe_pb2, name).DESCRIPTOR)]
    assert len(problems) == 1, problems


def test_schema_text_that_is_not_a_declaration_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing ';' must not silently drop a field from the descriptor."""
    monkeypatch.setattr(proto, "SCHEMA", proto.SCHEMA.replace("float eps = 3;", "float eps = 3"))
    with pytest.raises(AssertionError, match="eps"):
        proto._file_descriptor()


# --------------------------------------------------------------------------------------------
# A net that sets every field of the schema, checked against the real protobuf runtime
# --------------------------------------------------------------------------------------------

_ODD_STRING = 'q"uote \\ back\nnew\ttab é \x01 {"json": [1, 2]}'


_KINDS = {1: "double", 2: "float", 3: "int64", 5: "int32", 8: "bool", 9: "string", 13: "uint32", 14: "enum"}


def _sample_value(fld: Any, variant: int) -> Any:
    kind = _KINDS.get(fld.type, "message")
    if kind == "int32":
        return [-7, 2**31 - 1][variant % 2]
    if kind == "int64":
        return [-(2**40), 2**62][variant % 2]
    if kind == "uint32":
        return [2**32 - 1, 0][variant % 2]
    if kind == "bool":
        return variant % 2 == 0
    if kind == "float":
        return [0.1, 1e-12, 3.0e38, -2.5][variant % 4]
    if kind == "double":
        return 0.1
    if kind == "string":
        return [_ODD_STRING, "plain"][variant % 2]
    if kind == "enum":
        names = [v.name for v in fld.enum_type.values]
        return names[(variant + 1) % len(names)]
    return _sample_message(fld.message_type.name, variant)


def _sample_message(message: str, variant: int = 0, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for index, fld in enumerate(_fields(message)):
        if fld.name in skip:
            continue
        if proto._repeated(fld):
            out[fld.name] = [_sample_value(fld, variant + index), _sample_value(fld, variant + index + 1)]
        else:
            out[fld.name] = _sample_value(fld, variant + index)
    return out


def _f32_normalised(value: Any) -> Any:
    """What a float reads back as after a float32 round trip."""
    if isinstance(value, dict):
        return {k: _f32_normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_f32_normalised(v) for v in value]
    if isinstance(value, float):
        return float(str(np.float32(value)))
    return value


def _kitchen_sink_net() -> CaffeNet:
    params = _sample_message("LayerParameter", skip=("name", "type", "bottom", "top", "blobs"))
    rng = np.random.default_rng(1)
    return CaffeNet("sink \"net\"", [], [
        CaffeLayer("every_field", "Convolution", ["a", "b"], ["c"], params,
                   [rng.standard_normal((2, 3)).astype(np.float32), np.zeros((0,), np.float32)]),
        CaffeLayer("plain", "ReLU", ["c"], ["c"], {"relu_param": {"negative_slope": 0.1}}),
    ])


def test_every_field_encodes_like_the_real_protobuf_runtime(tmp_path: Path) -> None:
    caffe_pb2, text_format = _caffe_pb2(), _text_format()
    net = _kitchen_sink_net()
    model = tmp_path / "sink.caffemodel"
    write_caffemodel(net, model)
    ours = model.read_bytes()
    parsed = caffe_pb2.NetParameter.FromString(ours)
    # Byte-identical to protobuf's own serialisation: right numbers, wire types, packing, order.
    assert parsed.SerializeToString() == ours
    layer = parsed.layer[0]
    assert list(layer.convolution_param.kernel_size) == net.layers[0].params["convolution_param"]["kernel_size"]
    assert list(layer.blobs[0].shape.dim) == [2, 3]
    assert_array_equal(np.array(layer.blobs[0].data, np.float32), net.layers[0].blobs[0].ravel())
    # The prototxt parses, in the real text parser, to the same message minus blobs.
    from_text = text_format.Parse(to_prototxt(net), caffe_pb2.NetParameter())
    for pb_layer in parsed.layer:
        del pb_layer.blobs[:]
    assert from_text == parsed
    python = from_text.layer[0].python_param
    assert _ODD_STRING in (python.module, python.layer, python.param_str)


def test_every_field_decodes_back(tmp_path: Path) -> None:
    caffe_pb2, text_format = _caffe_pb2(), _text_format()
    net = _kitchen_sink_net()
    expected = _f32_normalised(net.layers[0].params)
    model = tmp_path / "sink.caffemodel"
    write_caffemodel(net, model)
    decoded = read_caffemodel_net(model)
    assert decoded.name == net.name
    assert decoded.layers[0].params == expected
    assert [b.shape for b in decoded.layers[0].blobs] == [(2, 3), (0,)]
    from_ours = net_from_prototxt(to_prototxt(net))
    assert from_ours.layers[0].params == expected
    assert (from_ours.layers[0].bottom, from_ours.layers[0].top) == (["a", "b"], ["c"])
    # Text written by protobuf itself (its float and string formatting) reads the same.
    pb_text = text_format.MessageToString(caffe_pb2.NetParameter.FromString(model.read_bytes()))
    from_pb = net_from_prototxt(pb_text)
    assert from_pb.layers[0].params == expected
    assert_array_equal(from_pb.layers[0].blobs[0], net.layers[0].blobs[0])


def test_solver_prototxt_parses_in_real_protobuf() -> None:
    caffe_pb2, text_format = _caffe_pb2(), _text_format()
    fields = _sample_message("SolverParameter")
    text = solver_to_prototxt(fields, ["derived from yolov3-tiny.cfg", "lr = 0.001 / 64\nsecond line"])
    assert text.splitlines()[:3] == ["# derived from yolov3-tiny.cfg", "# lr = 0.001 / 64", "# second line"]
    solver = text_format.Parse(text, caffe_pb2.SolverParameter())
    assert solver.base_lr == np.float32(fields["base_lr"])
    assert list(solver.stepvalue) == fields["stepvalue"]
    assert caffe_pb2.SolverParameter.SolverMode.Name(solver.solver_mode) == fields["solver_mode"]
    assert parse_prototxt(text, message="SolverParameter") == _f32_normalised(fields)


def test_typical_solver_text() -> None:
    text = solver_to_prototxt({"net": "train.prototxt", "base_lr": 0.001, "lr_policy": "multistep",
                               "stepvalue": [400000, 450000], "gamma": 0.1, "momentum": 0.9,
                               "weight_decay": 0.0005, "max_iter": 500200, "solver_mode": "CPU",
                               "snapshot_prefix": "out/yolo"}, ["from cfg"])
    assert text == ("# from cfg\nnet: \"train.prototxt\"\nbase_lr: 0.001\nmax_iter: 500200\n"
                    "lr_policy: \"multistep\"\ngamma: 0.1\nmomentum: 0.9\nweight_decay: 0.0005\n"
                    "stepvalue: 400000\nstepvalue: 450000\nsnapshot_prefix: \"out/yolo\"\n"
                    "solver_mode: CPU\n")


# --------------------------------------------------------------------------------------------
# Blob round trips
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 0, 2), (2, 3, 4, 5), (16, 1, 2, 2),
                                   (4 * 1024 * 1024,), (1024, 3, 3, 512)])
def test_blob_round_trip(tmp_path: Path, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(len(shape) + sum(shape))
    blob = rng.standard_normal(shape).astype(np.float32)
    net = CaffeNet("n", [("data", (1, 3, 4, 4))],
                   [CaffeLayer("w", "Convolution", ["data"], ["w"], {}, [blob, blob[..., None] * 2])])
    path = tmp_path / "m.caffemodel"
    write_caffemodel(net, path)
    got = read_caffemodel(path)
    assert set(got) == {"data", "w"}
    assert got["data"] == ("Input", [])
    kind, blobs = got["w"]
    assert kind == "Convolution"
    assert [b.shape for b in blobs] == [shape, (*shape, 1)]
    assert all(b.dtype == np.float32 and b.flags.writeable for b in blobs)
    assert_array_equal(blobs[0], blob)
    assert_array_equal(blobs[1], blob[..., None] * 2)
    # The packed payload sits in the file as the raw little-endian floats.
    if blob.size:
        assert blob.astype("<f4").tobytes() in path.read_bytes()


def test_blob_dtype_conversion_and_noncontiguous_input(tmp_path: Path) -> None:
    base = np.arange(24, dtype=np.float64).reshape(4, 6)
    blobs = [base[:, ::2], base.T, np.arange(5, dtype=np.int64), np.array([True, False])]
    path = tmp_path / "m.caffemodel"
    write_caffemodel(CaffeNet("n", [], [CaffeLayer("l", "Scale", ["x"], ["y"], {}, blobs)]), path)
    got = read_caffemodel(path)["l"][1]
    for ours, theirs in zip(got, blobs):
        assert_array_equal(ours, np.asarray(theirs, dtype=np.float32))
        assert ours.shape == theirs.shape


def test_rejects_non_numeric_blob(tmp_path: Path) -> None:
    net = CaffeNet("n", [], [CaffeLayer("l", "Scale", ["x"], ["y"], {}, [np.array(["a"])])])
    with pytest.raises(ParamError, match="layer 'l'.*blob 0"):
        write_caffemodel(net, tmp_path / "m.caffemodel")


# --------------------------------------------------------------------------------------------
# Wire-level edge cases
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32 - 1, 2**63 - 1])
def test_varint_matches_protobuf(value: int) -> None:
    """Our size/length varints are protobuf's (here: one packed int64 after its key and length)."""
    encoded = MESSAGES["BlobShape"](dim=[value]).SerializeToString()[2:]
    assert proto._varint(value) == encoded
    assert proto._read_varint(memoryview(encoded), 0, len(encoded), "x") == (value, len(encoded))


@pytest.mark.parametrize("data", [b"\x80", b"\xff\xff", b"\xff" * 11, b""])
def test_bad_varint_raises(data: bytes) -> None:
    with pytest.raises(WeightsError):
        proto._read_varint(memoryview(data), 0, len(data), "x")


def _key(number: int, wire: int) -> bytes:
    return proto._varint(number << 3 | wire)


def _delimited(number: int, body: bytes) -> bytes:
    return _key(number, 2) + proto._varint(len(body)) + body


def _string(number: int, text: str) -> bytes:
    return _delimited(number, text.encode())


def _write_raw(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "raw.caffemodel"
    path.write_bytes(data)
    return path


def test_unknown_fields_are_skipped_and_data_may_come_in_chunks(tmp_path: Path) -> None:
    values = np.arange(1, 13, dtype=np.float32) / 8
    # Packed data in two chunks (protobuf concatenates them), plus fields d2c does not know.
    blob = (_delimited(7, _delimited(1, b"\x03\x04")) + _delimited(5, values[:5].tobytes())
            + _key(99, 0) + proto._varint(12345) + _delimited(5, values[5:].tobytes())
            + _key(98, 5) + b"abcd" + _key(97, 1) + b"abcdefgh" + _delimited(96, b"zz")
            + _delimited(6, np.ones(3, "<f4").tobytes()))   # diff: skipped, whatever its size
    layer = (_string(1, "conv") + _string(2, "Convolution") + _delimited(7, blob)
             + _key(1000, 0) + b"\x05" + _delimited(7, _delimited(7, b"") + _delimited(5, b"\x00\x00\x80\x3f")))
    got = read_caffemodel(_write_raw(tmp_path, _string(1, "net") + _key(10, 0) + b"\x01" + _delimited(100, layer)))
    kind, blobs = got["conv"]
    assert kind == "Convolution"
    assert blobs[0].shape == (3, 4)
    assert_array_equal(blobs[0].ravel(), values)
    assert blobs[1].shape == () and float(blobs[1]) == 1.0


@pytest.mark.parametrize(("data", "match"), [
    # Pre-2015 Caffe: 4-D num/channels/height/width dims, double_data, unpacked floats, V1 `layers`.
    (_delimited(100, _string(1, "l") + _delimited(7, _key(1, 0) + b"\x01" + _delimited(5, b"\x00" * 4))),
     "layer 0 blob 0: blob with 4-D num/channels/height/width dims or double_data .*upgrade_net_proto_binary"),
    (_delimited(100, _string(1, "l") + _delimited(7, _delimited(8, b"\x00" * 8))), "double_data"),
    (_delimited(100, _string(1, "l") + _delimited(7, b"\x2d" + struct.pack("<f", 1.0))), "not packed float32"),
    (_delimited(2, _string(4, "conv1")), "raw.caffemodel: V1 'layers' .*upgrade_net_proto_binary"),
])
def test_old_caffe_encodings_are_refused_with_the_file(tmp_path: Path, data: bytes, match: str) -> None:
    with pytest.raises(WeightsError, match=match) as info:
        read_caffemodel(_write_raw(tmp_path, data))
    assert str(info.value).startswith(str(tmp_path / "raw.caffemodel"))


def test_real_protobuf_v1_layers_and_double_blobs_are_refused(tmp_path: Path) -> None:
    caffe_pb2 = _caffe_pb2()
    old = caffe_pb2.NetParameter(name="old")
    old.layers.add(name="conv1", type=caffe_pb2.V1LayerParameter.CONVOLUTION).blobs.add(num=1).data.extend([1.0])
    with pytest.raises(WeightsError, match="V1 'layers'"):
        read_caffemodel(_write_raw(tmp_path, old.SerializeToString()))
    double = caffe_pb2.NetParameter(name="d")
    blob = double.layer.add(name="l", type="Scale").blobs.add()
    blob.shape.dim.extend([2])
    blob.double_data.extend([1.0, 2.0])
    with pytest.raises(WeightsError, match="double_data"):
        read_caffemodel_net(_write_raw(tmp_path, double.SerializeToString()))


def test_diff_from_real_protobuf_is_skipped(tmp_path: Path) -> None:
    caffe_pb2 = _caffe_pb2()
    net = caffe_pb2.NetParameter(name="d")
    values = np.linspace(-3, 3, 12).astype(np.float32)
    blob = net.layer.add(name="l", type="Scale").blobs.add()
    blob.shape.dim.extend([3, 4])
    blob.data.extend(values.tolist())
    blob.diff.extend([1.0] * 5)
    got = read_caffemodel(_write_raw(tmp_path, net.SerializeToString()))
    assert_array_equal(got["l"][1][0], values.reshape(3, 4))


def test_duplicate_layer_names(tmp_path: Path) -> None:
    data_layers = _delimited(100, _string(1, "data") + _string(2, "Data")) * 2
    conv = _delimited(100, _string(1, "c") + _delimited(7, _delimited(5, b"\x00" * 4)))
    got = read_caffemodel(_write_raw(tmp_path, data_layers + conv))
    assert got["data"] == ("Data", [])
    with pytest.raises(WeightsError, match="two layers named 'c'"):
        read_caffemodel(_write_raw(tmp_path, conv + conv))


@pytest.mark.parametrize("data", [
    b"\x00\x01",                                   # field number 0
    _key(100, 3),                                  # group wire type
    _delimited(100, b"")[:-1] + b"\x05",           # length past the end
    _delimited(100, _delimited(7, _delimited(5, b"\x00" * 5))),           # 5 bytes of floats
    _delimited(100, _delimited(7, _delimited(7, b"\x0a\x01\x03") + _delimited(5, b"\x00" * 8))),  # 3 != 2
    _delimited(100, _delimited(7, _key(5, 0) + b"\x01")),                 # data as a varint
    _delimited(100, _delimited(7, _delimited(7, b"\x0a\x01\x7f"))),       # count 127, no data
])
def test_malformed_caffemodel_raises_weights_error(tmp_path: Path, data: bytes) -> None:
    with pytest.raises(WeightsError, match="raw.caffemodel"):
        read_caffemodel(_write_raw(tmp_path, data))


def test_every_truncation_is_a_weights_error(tmp_path: Path) -> None:
    net = _small_net(1e-5)
    path = tmp_path / "full.caffemodel"
    write_caffemodel(net, path)
    data = path.read_bytes()
    cut_points = sorted(set(range(1, len(data), max(1, len(data) // 300))) | set(range(1, 64)))
    failures = 0
    for cut in cut_points:
        try:
            read_caffemodel(_write_raw(tmp_path, data[:cut]))
        except WeightsError:
            failures += 1
    # Cutting exactly between two top-level layers yields a valid, shorter file; anything else fails.
    assert failures == len(cut_points) - sum(1 for c in cut_points if c in _layer_boundaries(data))


def _layer_boundaries(data: bytes) -> set[int]:
    out, pos = set(), 0
    view = memoryview(data)
    for *_, end in proto._fields(view, 0, len(data), "x"):
        out.add(end)
    return out


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="cannot open"):
        read_caffemodel(tmp_path / "nope.caffemodel")
    with pytest.raises(WeightsError, match="empty"):
        read_caffemodel(_write_raw(tmp_path, b""))


# --------------------------------------------------------------------------------------------
# Writers: validation and atomicity
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("params", "match"), [
    ({"convolution_params": {}}, "unknown LayerParameter field"),
    ({"convolution_param": {"num_ouput": 3}}, r"convolution_param: unknown ConvolutionParameter field num_ouput"),
    ({"convolution_param": {"num_output": -1}}, "num_output: .*out of range"),
    ({"convolution_param": {"num_output": 2**32}}, "num_output: .*out of range"),
    ({"python_param": {"module": "\ud800"}}, "module: .*(surrogates|UTF-8)"),
    ({"convolution_param": {"num_output": 2.0}}, "num_output: .*float"),
    ({"convolution_param": {"num_output": True}}, "num_output: expected a number, got True"),
    ({"relu_param": {"negative_slope": True}}, "negative_slope: expected a number, got True"),
    ({"convolution_param": {"bias_term": 0}}, "bias_term: expected true/false"),
    ({"pooling_param": {"pool": "MAXX"}}, "pool: 'MAXX' is not one of MAX, AVE, STOCHASTIC"),
    ({"pooling_param": {"kernel_size": [2, 2]}}, "kernel_size is not repeated"),
    ({"relu_param": {"negative_slope": "0.1"}}, "negative_slope: .*str"),
    ({"power_param": {"scale": 1e39}}, "does not fit a 32-bit float"),
    ({"python_param": {"module": 3}}, "module: expected a string, got 3"),
    ({"python_param": {"module": True}}, "module: expected a string, got True"),
    ({"eltwise_param": {"operation": 7}}, "operation: .*7"),
    ({"relu_param": 0.1}, "expected a ReLUParameter as a dict"),
    ({"top": ["x"]}, "params must not contain top"),
])
def test_writers_reject_bad_params(tmp_path: Path, params: dict, match: str) -> None:
    net = CaffeNet("n", [], [CaffeLayer("bad", "Convolution", ["x"], ["y"], params)])
    with pytest.raises(ParamError, match=match):
        to_prototxt(net)
    target = tmp_path / "m.caffemodel"
    target.write_bytes(b"previous")
    with pytest.raises(ParamError, match="layer 'bad' \\(Convolution\\)"):
        write_caffemodel(net, target)
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.caffemodel"]


def test_enum_given_as_number_and_scalar_for_repeated() -> None:
    net = CaffeNet("n", [], [CaffeLayer("p", "Pooling", ["x"], ["y"], {"pooling_param": {"pool": 1}}),
                             CaffeLayer("c", "Convolution", ["y"], ["z"],
                                        {"convolution_param": {"kernel_size": 3, "pad": np.array([1])}})])
    text = to_prototxt(net)
    assert "pool: AVE" in text
    parsed = net_from_prototxt(text)
    assert parsed.layers[1].params == {"convolution_param": {"pad": [1], "kernel_size": [3]}}


def test_prototxt_formatting_is_deterministic(tmp_path: Path) -> None:
    net = _small_net(1e-12)
    text = to_prototxt(net)
    path = tmp_path / "deploy.prototxt"
    path.write_text(to_prototxt(net))
    assert path.read_text() == text == to_prototxt(net_from_prototxt(text))
    assert "eps: 1e-12" in text and "negative_slope: 0.1" in text
    assert text.startswith('name: "d2c_test"\nlayer {\n  name: "data"\n  type: "Input"\n  top: "data"\n')


# --------------------------------------------------------------------------------------------
# Prototxt parsing
# --------------------------------------------------------------------------------------------

_HAND_WRITTEN = r"""
# A deploy file the way people write them.
name: 'hand' # trailing comment
layer { name: "data" type: "Input" top: "data" input_param { shape: { dim: [1, 3] dim: 4 dim: 4 } } }
layer {
  name: "conv"; type: "Convolution"
  bottom: 'data' top: "conv"
  param { lr_mult: 1 decay_mult: 0 }
  param < lr_mult: 2, decay_mult: 0 >
  convolution_param: {
    num_output: 0x10
    kernel_size: [3, 3]
    pad: 1
    bias_term: False
    stride: [1]
  }
  loss_weight: -inf
  propagate_down: [true, f]
}
layer {
  name: "py" type: "Python" bottom: "conv" top: "out"
  python_param { module: "d2c.loss" layer: "Yolo"
                 param_str: "{\"classes\": 80," ' "tab": "\t\101\x42"}' }
  eltwise_param { operation: 1 coeff: 1 coeff: -2.5e-1 }
}
"""


def test_parse_hand_written_prototxt() -> None:
    data = parse_prototxt(_HAND_WRITTEN, "hand.prototxt")
    assert data["name"] == "hand"
    assert data["layer"][0]["input_param"] == {"shape": [{"dim": [1, 3, 4, 4]}]}
    conv, py = data["layer"][1:]
    assert conv["param"] == [{"lr_mult": 1.0, "decay_mult": 0.0}, {"lr_mult": 2.0, "decay_mult": 0.0}]
    assert isinstance(conv["param"][0]["lr_mult"], float)
    assert conv["convolution_param"] == {"num_output": 16, "kernel_size": [3, 3], "pad": [1],
                                         "bias_term": False, "stride": [1]}
    assert conv["loss_weight"] == [-math.inf]
    assert conv["propagate_down"] == [True, False]
    assert py["python_param"]["param_str"] == '{"classes": 80, "tab": "\tAB"}'
    assert py["eltwise_param"] == {"operation": "SUM", "coeff": [1.0, -0.25]}


def test_parse_matches_real_protobuf_text_parser() -> None:
    caffe_pb2, text_format = _caffe_pb2(), _text_format()
    text = _HAND_WRITTEN
    real = text_format.Parse(text, caffe_pb2.NetParameter())
    ours = parse_prototxt(text)
    assert real.layer[2].python_param.param_str == ours["layer"][2]["python_param"]["param_str"]
    assert real.layer[1].convolution_param.num_output == ours["layer"][1]["convolution_param"]["num_output"]
    assert list(real.layer[1].propagate_down) == ours["layer"][1]["propagate_down"]
    assert real.layer[1].loss_weight[0] == ours["layer"][1]["loss_weight"][0]
    assert list(real.layer[0].input_param.shape[0].dim) == [1, 3, 4, 4]


def test_net_from_input_layer() -> None:
    net = net_from_prototxt(_HAND_WRITTEN, "hand.prototxt")
    assert net.name == "hand"
    assert net.inputs == [("data", (1, 3, 4, 4))]
    assert [layer.name for layer in net.layers] == ["conv", "py"]
    assert net.layers[0].bottom == ["data"] and net.layers[0].blobs == []


def test_input_layers_become_inputs_only_when_plain() -> None:
    text = """
layer { name: "in" type: "Input" top: "a" input_param { shape { dim: 1 dim: 2 } } }
layer { name: "two" type: "Input" top: "b" top: "c" input_param { shape { dim: 1 } } }
layer { name: "train_in" type: "Input" top: "t" loss_weight: 1 input_param { shape { dim: 5 } } }
"""
    net = net_from_prototxt(text)
    assert net.inputs == [("a", (1, 2))]
    assert [layer.name for layer in net.layers] == ["two", "train_in"]


@pytest.mark.parametrize(("text", "line", "match"), [
    ("layer {\n  name: \"a\"\n", 2, 'Expected "}"'),
    ("layer {\n name: \"a\" }\n}", 3, "Expected identifier"),
    ("layer {\n  pooling_param { pool: MAXX }\n}", 2, "PoolMethod.* has no value named MAXX"),
    ("layer { pooling_param {\n pool: 7 } }", 2, "has no value with number 7"),
    ("layer {\n\n convolution_param { num_output: 1.5 } }", 3, "Couldn't parse integer: 1.5"),
    ("layer { convolution_param {\n num_output: -3 } }", 2, "out of range"),
    ("layer { name: \"a\"\n name: \"b\" }", 2, 'multiple "name" fields'),
    ("name: \"unterminated\n", 1, "missing ending quote"),
    ("layer { name: 3 }", 1, "Expected string"),
    ("layer {\n name { x: 1 } }", 2, 'Expected ":"'),
    ("layer { relu_param { negative_slope: true } }", 1, "Couldn't parse float"),
    ("layer { convolution_param { bias_term: yes } }", 1, 'Expected "true" or "false"'),
    ("layer { name: [\"a\"] }", 1, "Expected string"),
    ("layer { bottom: [\"a\" \"b\"", 1, 'Expected ","'),
    ("name: @", 1, "Expected string"),
    ("name:", 1, "Expected string"),
    # A misspelt field, or a real Caffe field d2c never reads or writes, is an error, not ignored.
    ("layer {\n  type: \"ReLU\"\n  relu_param { negative_slop: 0.1 }\n}", 3,
     'ReLUParameter" has no field named "negative_slop"'),
    ("layer {\n  name: \"a\"\n  lrn_param { local_size: 5 }\n}", 3, 'has no field named "lrn_param"'),
    ('layers { name: "a" type: CONVOLUTION }', 1, "V1 net: upgrade it with Caffe's upgrade_net_proto_text"),
    ('input: "data"\ninput_dim: 1', 1, 'has no field named "input"'),
    ("layer { convolution_param { weight_filler { type: 'x' } } }", 1, 'has no field named "weight_filler"'),
])
def test_prototxt_errors_name_path_and_line(text: str, line: int, match: str) -> None:
    with pytest.raises(PrototxtError, match=match) as info:
        parse_prototxt(text, "models/x.prototxt")
    assert str(info.value).startswith(f"models/x.prototxt:{line}:")
    assert isinstance(info.value, D2CError)


def test_net_from_prototxt_errors() -> None:
    with pytest.raises(PrototxtError, match=r"^n.prototxt: layer 1 \('a'\) has no 'type'"):
        net_from_prototxt('name: "x"\nlayer { name: "in" type: "Input" }\nlayer { name: "a" }', "n.prototxt")


# --------------------------------------------------------------------------------------------
# Real engines: a small net through OpenCV and pycaffe against a numpy reference
# --------------------------------------------------------------------------------------------

_IN_SHAPE = (1, 3, 8, 8)


def _small_net(eps: float) -> CaffeNet:
    """Input -> Conv(no bias) -> BN -> Scale(bias) -> ReLU(0.1) -> pool/crop/eltwise/concat -> deconv -> sigmoid."""
    rng = np.random.default_rng(7)
    conv_w = (rng.standard_normal((4, 3, 3, 3)) * 0.4).astype(np.float32)
    mean = rng.standard_normal(4).astype(np.float32) * 0.3
    var = rng.uniform(0.5, 2.0, 4).astype(np.float32)
    gamma = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    beta = rng.standard_normal(4).astype(np.float32) * 0.2
    deconv_w = rng.standard_normal((8, 1, 2, 2)).astype(np.float32)
    return CaffeNet("d2c_test", [("data", _IN_SHAPE)], [
        CaffeLayer("conv1", "Convolution", ["data"], ["conv1"],
                   {"convolution_param": {"num_output": 4, "kernel_size": [3], "stride": [1],
                                          "pad": [1], "bias_term": False, "group": 1}},
                   [conv_w]),
        CaffeLayer("bn1", "BatchNorm", ["conv1"], ["bn1"],
                   {"batch_norm_param": {"use_global_stats": True, "eps": eps}},
                   [mean, var, np.ones(1, np.float32)]),
        CaffeLayer("scale1", "Scale", ["bn1"], ["scale1"], {"scale_param": {"bias_term": True}},
                   [gamma, beta]),
        CaffeLayer("relu1", "ReLU", ["scale1"], ["scale1"], {"relu_param": {"negative_slope": 0.1}}),
        CaffeLayer("pool1", "Pooling", ["scale1"], ["pool1"],
                   {"pooling_param": {"pool": "MAX", "kernel_size": 2, "stride": 1, "pad": 1}}),
        CaffeLayer("crop1", "Crop", ["pool1", "scale1"], ["crop1"],
                   {"crop_param": {"axis": 2, "offset": [1]}}),
        CaffeLayer("prod1", "Eltwise", ["crop1", "scale1"], ["prod1"],
                   {"eltwise_param": {"operation": "PROD"}}),
        CaffeLayer("sum1", "Eltwise", ["prod1", "crop1"], ["sum1"],
                   {"eltwise_param": {"operation": "SUM", "coeff": [1.0, -0.5]}}),
        CaffeLayer("max1", "Eltwise", ["sum1", "scale1"], ["max1"],
                   {"eltwise_param": {"operation": "MAX"}}),
        CaffeLayer("concat1", "Concat", ["max1", "crop1"], ["concat1"], {"concat_param": {"axis": 1}}),
        CaffeLayer("up1", "Deconvolution", ["concat1"], ["up1"],
                   {"convolution_param": {"num_output": 8, "kernel_size": [2], "stride": [2],
                                          "group": 8, "bias_term": False},
                    "param": [{"lr_mult": 0, "decay_mult": 0}]},
                   [deconv_w]),
        CaffeLayer("out", "Sigmoid", ["up1"], ["out"]),
    ])


def _conv_ref(x: np.ndarray, w: np.ndarray, stride: int, pad: int) -> np.ndarray:
    """Cross-correlation of one (C, H, W) image with (O, C, k, k) weights, zero padding."""
    k = w.shape[-1]
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    windows = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("chwij,ocij->ohw", windows, w)


def _maxpool_ref(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    """Caffe's max pooling: ceil output size, windows clipped to the image (pads never win)."""
    _, h, w = x.shape
    out_h = math.ceil((h + 2 * pad - k) / stride) + 1
    out_w = math.ceil((w + 2 * pad - k) / stride) + 1
    if pad and (out_h - 1) * stride >= h + pad:
        out_h -= 1
    if pad and (out_w - 1) * stride >= w + pad:
        out_w -= 1
    out = np.empty((x.shape[0], out_h, out_w))
    for i in range(out_h):
        for j in range(out_w):
            h0, w0 = i * stride - pad, j * stride - pad
            window = x[:, max(h0, 0):min(h0 + k, h), max(w0, 0):min(w0 + k, w)]
            out[:, i, j] = window.max(axis=(1, 2))
    return out


def _deconv_ref(x: np.ndarray, w: np.ndarray, stride: int, group: int) -> np.ndarray:
    """Transposed convolution, no padding: weights (C_in, C_out/group, k, k)."""
    c_in, h, wd = x.shape
    k, per_out, per_in = w.shape[-1], w.shape[1], c_in // group
    out = np.zeros((per_out * group, (h - 1) * stride + k, (wd - 1) * stride + k))
    for g in range(group):
        xs = x[g * per_in:(g + 1) * per_in]
        ws = w[g * per_in:(g + 1) * per_in]
        for ki in range(k):
            for kj in range(k):
                contrib = np.einsum("chw,co->ohw", xs, ws[:, :, ki, kj])
                out[g * per_out:(g + 1) * per_out, ki:ki + stride * h:stride, kj:kj + stride * wd:stride] += contrib
    return out


def _reference(net: CaffeNet, x: np.ndarray) -> dict[str, np.ndarray]:
    """float64 forward pass of _small_net, blob name -> (1, C, H, W) array."""
    layers = {layer.name: layer for layer in net.layers}
    blobs = [b.astype(np.float64) for b in layers["bn1"].blobs]
    eps = layers["bn1"].params["batch_norm_param"]["eps"]
    factor = 1.0 / blobs[2][0]
    gamma, beta = (b.astype(np.float64) for b in layers["scale1"].blobs)
    out: dict[str, np.ndarray] = {}
    conv1 = _conv_ref(x[0].astype(np.float64), layers["conv1"].blobs[0].astype(np.float64), 1, 1)
    bn1 = (conv1 - (blobs[0] * factor)[:, None, None]) / np.sqrt(blobs[1] * factor + eps)[:, None, None]
    scale1 = bn1 * gamma[:, None, None] + beta[:, None, None]
    relu1 = np.where(scale1 > 0, scale1, 0.1 * scale1)
    pool1 = _maxpool_ref(relu1, 2, 1, 1)
    crop1 = pool1[:, 1:1 + relu1.shape[1], 1:1 + relu1.shape[2]]
    prod1 = crop1 * relu1
    sum1 = prod1 - 0.5 * crop1
    max1 = np.maximum(sum1, relu1)
    concat1 = np.concatenate([max1, crop1])
    up1 = _deconv_ref(concat1, layers["up1"].blobs[0].astype(np.float64), 2, 8)
    sig = 1.0 / (1.0 + np.exp(-up1))
    for name, value in [("conv1", conv1), ("bn1", bn1), ("scale1", relu1), ("pool1", pool1),
                        ("crop1", crop1), ("prod1", prod1), ("sum1", sum1), ("max1", max1),
                        ("concat1", concat1), ("up1", up1), ("out", sig)]:
        out[name] = value[None]
    return out


def _write_small_net(tmp_path: Path, eps: float) -> tuple[CaffeNet, Path, Path]:
    net = _small_net(eps)
    prototxt, model = tmp_path / "deploy.prototxt", tmp_path / "weights.caffemodel"
    prototxt.write_text(to_prototxt(net))
    write_caffemodel(net, model)
    return net, prototxt, model


def _input() -> np.ndarray:
    return np.random.default_rng(3).standard_normal(_IN_SHAPE).astype(np.float32)


def test_reference_shapes_are_what_caffe_produces() -> None:
    ref = _reference(_small_net(1e-5), _input())
    assert ref["pool1"].shape == (1, 4, 9, 9)
    assert ref["crop1"].shape == (1, 4, 8, 8)
    assert ref["up1"].shape == (1, 8, 16, 16)
    assert ref["out"].min() > 0 and ref["out"].max() < 1
    assert np.any(ref["scale1"] < 0)  # the leaky slope is exercised


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_opencv_loads_and_matches_reference(tmp_path: Path, eps: float) -> None:
    cv2 = _cv2()
    net, prototxt, model = _write_small_net(tmp_path, eps)
    dnn = cv2.dnn.readNetFromCaffe(str(prototxt), str(model))
    x = _input()
    dnn.setInput(x)
    got = dnn.forward("out")
    ref = _reference(net, x)
    assert got.shape == ref["out"].shape
    assert_allclose(got, ref["out"], rtol=1e-5, atol=1e-6)


# pycaffe runs in a child process: a Caffe CHECK failure aborts its process, and that must be
# one failed test with Caffe's message, not a dead test session.
_PYCAFFE_SCRIPT = """
import os, sys
os.environ.setdefault("GLOG_minloglevel", "2")
import numpy as np
import caffe
caffe.set_mode_cpu()
prototxt, model, inputs, results, saved = sys.argv[1:6]
net = caffe.Net(prototxt, model, caffe.TEST)
net.blobs["data"].data[...] = np.load(inputs)
outputs = net.forward()
arrays = {"blob/" + name: blob.data.copy() for name, blob in net.blobs.items()}
for name, params in net.params.items():
    for index, param in enumerate(params):
        arrays[f"param/{name}/{index}"] = param.data.copy()
np.savez(results, outputs=np.array(list(outputs)), layer_names=np.array(list(net._layer_names)),
         layer_types=np.array([layer.type for layer in net.layers]), **arrays)
net.save(saved)
"""


def _run_pycaffe(tmp_path: Path, prototxt: Path, model: Path, x: np.ndarray) -> tuple[dict[str, np.ndarray], Path]:
    """Load + forward + save in real pycaffe; (arrays it reported, path of its saved caffemodel)."""
    _caffe()  # fail early and clearly when pycaffe is not importable
    inputs, results, saved = tmp_path / "x.npy", tmp_path / "caffe_out.npz", tmp_path / "saved.caffemodel"
    np.save(inputs, x)
    proc = subprocess.run([sys.executable, "-c", _PYCAFFE_SCRIPT, str(prototxt), str(model), str(inputs),
                           str(results), str(saved)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"pycaffe failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    with np.load(results) as data:
        return {key: data[key] for key in data.files}, saved


@pytest.mark.parametrize("eps", [1e-5, 1e-12])
def test_pycaffe_loads_and_matches_reference(tmp_path: Path, eps: float) -> None:
    net, prototxt, model = _write_small_net(tmp_path, eps)
    x = _input()
    got, _ = _run_pycaffe(tmp_path, prototxt, model, x)
    ref = _reference(net, x)
    assert got["outputs"].tolist() == ["out"]
    assert_allclose(got["blob/out"], ref["out"], rtol=1e-5, atol=1e-6)
    for name, value in ref.items():
        scale = float(np.abs(value).max())
        assert_allclose(got[f"blob/{name}"], value, rtol=1e-5, atol=1e-6 * max(1.0, scale), err_msg=name)
    for layer in net.layers:
        for index, blob in enumerate(layer.blobs):
            assert_array_equal(got[f"param/{layer.name}/{index}"], blob)


def test_pycaffe_saved_model_reads_back(tmp_path: Path) -> None:
    net, prototxt, model = _write_small_net(tmp_path, 1e-12)
    theirs, saved = _run_pycaffe(tmp_path, prototxt, model, _input())
    got = read_caffemodel(saved)
    names = theirs["layer_names"].tolist()
    assert list(got) == names
    for name, kind in zip(names, theirs["layer_types"].tolist()):
        assert got[name][0] == kind
        params = [theirs[key] for key in sorted(k for k in theirs if k.startswith(f"param/{name}/"))]
        assert len(got[name][1]) == len(params)
        for ours, param in zip(got[name][1], params):
            assert ours.shape == param.shape
            assert_array_equal(ours, param)
    assert sum(len(blobs) for _, blobs in got.values()) == 7  # conv 1, bn 3, scale 2, deconv 1
    # The full decode sees Caffe's copy of our params, plus what Caffe adds itself: Split layers
    # (which rename bottoms) and frozen ParamSpecs for BatchNorm's statistics; `phase` is not d2c's, skipped.
    full = read_caffemodel_net(saved)
    assert full.name == "d2c_test" and full.inputs == [("data", _IN_SHAPE)]
    decoded = {layer.name: layer for layer in full.layers}
    assert sorted(decoded) == sorted(["scale1_relu1_0_split", "crop1_crop1_0_split",
                                      *(layer.name for layer in net.layers)])
    for layer in net.layers:
        expected = _f32_normalised(layer.params)
        if layer.type == "BatchNorm":
            expected["param"] = [{"lr_mult": 0.0}] * 3
        assert decoded[layer.name].params == expected, layer.name
        assert (decoded[layer.name].type, decoded[layer.name].top) == (layer.type, layer.top)


# --------------------------------------------------------------------------------------------
# Property checks: strings and floats survive our text writer, our parser and protobuf's parser
# --------------------------------------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
_FLOAT32 = st.floats(width=32, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(param_str=_TEXT, layer_name=_TEXT.filter(bool), slope=_FLOAT32, coeffs=st.lists(_FLOAT32, min_size=1, max_size=4))
def test_text_round_trip_property(param_str: str, layer_name: str, slope: float, coeffs: list[float]) -> None:
    caffe_pb2, text_format = _caffe_pb2(), _text_format()
    params = {"python_param": {"param_str": param_str}, "relu_param": {"negative_slope": slope},
              "eltwise_param": {"coeff": coeffs}}
    net = CaffeNet("p", [], [CaffeLayer(layer_name, "Python", [], [], params)])
    text = to_prototxt(net)
    ours = net_from_prototxt(text).layers[0]
    assert ours.name == layer_name
    # Floats read back as the shortest decimal of the same float32 (75701248.0 -> 75701250.0).
    assert ours.params["python_param"] == params["python_param"]
    assert np.float32(ours.params["relu_param"]["negative_slope"]) == np.float32(slope)
    assert_array_equal(np.float32(ours.params["eltwise_param"]["coeff"]), np.float32(coeffs))
    real = text_format.Parse(text, caffe_pb2.NetParameter()).layer[0]
    assert real.name == layer_name and real.python_param.param_str == param_str
    assert real.relu_param.negative_slope == slope
    assert list(real.eltwise_param.coeff) == coeffs
