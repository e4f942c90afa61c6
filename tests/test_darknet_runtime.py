"""The ctypes binding against the real Debian libdarknet.so (never skipped: a missing engine fails).

What is checked: the struct layout parsed from darknet.h (against gcc's offsetof and against
values the library writes), Darknet's own detections on dog.jpg with the real yolov3-tiny
weights (equal to what /usr/bin/darknet prints), layer buffers, parameter round trips,
save_weights, one train_network step, crash isolation and FTZ isolation of DarknetProcess.
"""
from __future__ import annotations

import ctypes
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from d2c.darknet.cfg import parse_cfg
from d2c.darknet.header import REQUIRED_STRUCTS, parse_header
from d2c.darknet.runtime import DarknetProcess, header_path, library_path, version_info
from d2c.errors import CfgError, DatasetError, EngineError, ParamError, UnsupportedLayerError, WeightsError
from header_offsets import offsets_by_gcc_and_parser

ROOT = Path(__file__).resolve().parents[1]
SYS_CFG = Path("/usr/share/darknet/cfg")
TINY_CFG = SYS_CFG / "yolov3-tiny.cfg"
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"
TRAIN_CFG = ROOT / "cfg" / "tiny_yolo_train.cfg"
DOG = Path("/usr/share/darknet/data/dog.jpg")

# `darknet detect cfg/yolov3-tiny.cfg yolov3-tiny.weights data/dog.jpg -thresh .25` (Debian binary)
# prints, in this order: dog 56%, car 52%, truck 55%, car 62%, truck 42%, bicycle 59%.
# Exact values from DarknetProcess.detect (same library, same pipeline), class ids from coco.names.
DOG_DETECTIONS = [
    (16, 0.563915491104126, [0.32445481419563293, 0.6113243103027344, 0.3128068745136261, 0.5743598937988281]),
    (2, 0.5185973644256592, [0.7517960071563721, 0.21887437999248505, 0.11485641449689865, 0.10879003256559372]),
    (7, 0.5534955263137817, [0.7517960071563721, 0.21887437999248505, 0.11485641449689865, 0.10879003256559372]),
    (2, 0.6175809502601624, [0.7449141144752502, 0.20914721488952637, 0.2790219485759735, 0.17120832204818726]),
    (7, 0.42326581478118896, [0.7449141144752502, 0.20914721488952637, 0.2790219485759735, 0.17120832204818726]),
    (1, 0.5864080786705017, [0.5091108083724976, 0.521765410900116, 0.48127487301826477, 0.5189999341964722]),
]
BINARY_PERCENTS = [("dog", 56), ("car", 52), ("truck", 55), ("car", 62), ("truck", 42), ("bicycle", 59)]
COCO = {1: "bicycle", 2: "car", 7: "truck", 16: "dog"}


# ------------------------------------------------------------------------------------------
# Shapes and values derived from the cfg alone (pjreddie's parse_* rules), to compare with
# what Darknet computed and wrote into its structs.
# ------------------------------------------------------------------------------------------
def expected_network(cfg_path: Path, batch: int | None = None) -> tuple[dict, list[dict]]:
    cfg = parse_cfg(cfg_path)
    net = cfg.net
    subdivisions = net.get_int("subdivisions", 1)
    h, w, c = net.get_int("height", 0), net.get_int("width", 0), net.get_int("channels", 0)
    net_info = {
        "n": len(cfg.layers), "batch": batch or net.get_int("batch", 1) // subdivisions,
        "subdivisions": subdivisions, "h": h, "w": w, "c": c, "inputs": h * w * c,
        "learning_rate": net.get_float("learning_rate", 0.001), "momentum": net.get_float("momentum", 0.9),
        "decay": net.get_float("decay", 0.0001), "burn_in": net.get_int("burn_in", 0),
        "max_batches": net.get_int("max_batches", 0), "policy": net.get_str("policy", "constant").upper(),
    }
    if net_info["policy"] == "STEPS":
        net_info["steps"] = net.get_int_list("steps", [])
        net_info["scales"] = net.get_float_list("scales", [])
    layers: list[dict] = []
    for idx, sec in enumerate(cfg.layers):
        prev = layers[-1]["out_shape"] if layers else (c, h, w)
        pc, ph, pw = prev
        info: dict = {"batch": net_info["batch"]}
        if sec.type == "convolutional":
            n, k, s = sec.get_int("filters", 1), sec.get_int("size", 1), sec.get_int("stride", 1)
            pad = k // 2 if sec.get_int("pad", 0) else sec.get_int("padding", 0)
            groups = sec.get_int("groups", 1)
            oh, ow = (ph + 2 * pad - k) // s + 1, (pw + 2 * pad - k) // s + 1
            info.update(type="CONVOLUTIONAL", in_shape=prev, out_shape=(n, oh, ow), n=n, size=k, stride=s,
                        pad=pad, groups=groups, batch_normalize=sec.get_int("batch_normalize", 0),
                        nweights=n * (pc // groups) * k * k, nbiases=n,
                        workspace_size=oh * ow * k * k * pc // groups * 4,
                        activation=sec.get_str("activation", "logistic").upper())
            bn = 3 * n if info["batch_normalize"] else 0
            info["params"] = n + bn + n * (pc // groups) * k * k
        elif sec.type == "maxpool":
            s = sec.get_int("stride", 1)
            k = sec.get_int("size", s)
            padding = sec.get_int("padding", k - 1)
            info.update(type="MAXPOOL", in_shape=prev, size=k, stride=s, pad=padding,
                        out_shape=(pc, (ph + padding - k) // s + 1, (pw + padding - k) // s + 1))
        elif sec.type == "upsample":
            s = sec.get_int("stride", 2)
            info.update(type="UPSAMPLE", in_shape=prev, stride=s, out_shape=(pc, ph * s, pw * s))
        elif sec.type == "reorg":
            s = sec.get_int("stride", 1)
            info.update(type="REORG", in_shape=prev, stride=s, out_shape=(pc * s * s, ph // s, pw // s))
        elif sec.type == "route":
            refs = [r if r >= 0 else idx + r for r in sec.get_int_list("layers", [])]
            shapes = [layers[r]["out_shape"] for r in refs]
            info.update(type="ROUTE", input_layers=refs, n=len(refs),
                        out_shape=(sum(s[0] for s in shapes), shapes[0][1], shapes[0][2]))
        elif sec.type == "shortcut":
            ref = sec.get_int("from", 0)
            info.update(type="SHORTCUT", out_shape=prev, **{"from": ref if ref >= 0 else idx + ref})
        elif sec.type == "yolo":
            num = sec.get_int("num", 1)
            mask = sec.get_int_list("mask", list(range(num)))
            info.update(type="YOLO", in_shape=prev, out_shape=prev, n=len(mask), mask=mask, total=num,
                        classes=sec.get_int("classes", 20), truths=90 * 5, max_boxes=90,
                        anchors=sec.get_float_list("anchors", [0.5] * 2 * num),
                        ignore_thresh=sec.get_float("ignore_thresh", 0.5),
                        truth_thresh=sec.get_float("truth_thresh", 1.0))
        elif sec.type == "region":
            num, coords = sec.get_int("num", 1), sec.get_int("coords", 4)
            info.update(type="REGION", in_shape=prev, out_shape=prev, n=num, coords=coords,
                        classes=sec.get_int("classes", 20), truths=30 * (coords + 1),
                        softmax=sec.get_int("softmax", 0), thresh=sec.get_float("thresh", 0.5),
                        anchors=sec.get_float_list("anchors", [0.5] * 2 * num))
        else:
            raise AssertionError(f"test helper does not know [{sec.type}]")
        info["outputs"] = int(np.prod(info["out_shape"]))
        layers.append(info)
    net_info["outputs"] = layers[-1]["outputs"]
    net_info["truths"] = layers[-1].get("truths", 0)
    return net_info, layers


def assert_same(actual: dict, expected: dict, where: str) -> None:
    for key, want in expected.items():
        if key == "params":
            continue
        got = actual[key]
        if isinstance(want, float) or (isinstance(want, list) and want and isinstance(want[0], float)):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=f"{where} {key}")
        else:
            want = tuple(want) if isinstance(want, tuple) else want
            assert got == want, f"{where} {key}: Darknet has {got!r}, cfg says {want!r}"


@pytest.fixture(scope="module")
def tiny() -> DarknetProcess:
    """yolov3-tiny with the real COCO weights, batch 1, in a child process."""
    assert TINY_WEIGHTS.is_file(), f"{TINY_WEIGHTS} missing: run tools/fetch_weights.py"
    proc = DarknetProcess(TINY_CFG, TINY_WEIGHTS, batch=1)
    yield proc
    proc.close()


@pytest.fixture()
def train_net() -> DarknetProcess:
    proc = DarknetProcess(TRAIN_CFG, clear=True)
    yield proc
    proc.close()


# ------------------------------------------------------------------------------------------
# 1. Header layout
# ------------------------------------------------------------------------------------------
def test_library_and_header_present() -> None:
    assert library_path().is_file()
    assert header_path().is_file()
    info = version_info()
    assert info["available"] and info["library"] == str(library_path())
    assert info["version"].startswith("0.0.0+git20180914.61c9d02e"), info


def test_parsed_offsets_equal_gcc_offsetof(tmp_path: Path) -> None:
    """Every member offset and struct size agrees with gcc compiling the same header."""
    header = parse_header(header_path())
    names, expected, got = offsets_by_gcc_and_parser(header, REQUIRED_STRUCTS, header_path().parent, tmp_path)
    assert len(names) > 280   # layer alone has ~250 members
    mismatches = [(n, e, g) for n, e, g in zip(names, expected, got) if e != g]
    assert not mismatches and len(got) == len(expected), mismatches[:10]
    assert header.enum("LAYER_TYPE")["YOLO"] == 23 and header.enum("LAYER_TYPE")["REGION"] == 22


def test_header_gpu_blocks_are_skipped() -> None:
    cpu = parse_header(header_path())
    gpu = parse_header(header_path(), defines={"GPU"})
    assert "output_gpu" not in dict(cpu.struct("layer")._fields_)
    assert "output_gpu" in dict(gpu.struct("layer")._fields_)
    assert "input_gpu" in dict(gpu.struct("network")._fields_)
    assert ctypes.sizeof(gpu.struct("layer")) > ctypes.sizeof(cpu.struct("layer"))
    # The CPU layout ends with workspace_size, the last member outside #ifdef GPU.
    assert cpu.struct("layer")._fields_[-1][0] == "workspace_size"


def test_header_parser_constructs(tmp_path: Path) -> None:
    path = tmp_path / "mini.h"
    path.write_text(textwrap.dedent("""\
        #ifndef MINI_H
        #define MINI_H
        #define NBUF 3
        /* a block comment with struct junk { int x; } */
        typedef enum { A, B = 5, C } KIND;   // C == 6
        typedef struct { float x, y, w, h; } box;
        struct node;
        typedef struct node node;
        struct node {
            KIND kind;
            int h,w,c;
            char tag;
            double d;
            void (*fn)(struct node, int);
            box b;
            size_t *seen;
            float **rows;
            struct node *next;
            int buf[NBUF];
        #ifdef GPU
            float *gpu_only;
        #else
            int cpu_only;
        #endif
        #if 0
            int never;
        #endif
        };
        node *make_node(int n);
        #endif
        """))
    h = parse_header(path)
    node = h.struct("node")
    fields = dict(node._fields_)
    assert list(fields)[:4] == ["kind", "h", "w", "c"]
    assert "cpu_only" in fields and "gpu_only" not in fields and "never" not in fields
    assert h.enum("KIND") == {"A": 0, "B": 5, "C": 6}
    assert fields["kind"] is ctypes.c_int and fields["fn"] is ctypes.c_void_p
    assert fields["b"] is h.struct("box") and ctypes.sizeof(h.struct("box")) == 16
    assert fields["seen"] is ctypes.POINTER(ctypes.c_size_t)
    assert fields["rows"] is ctypes.POINTER(ctypes.POINTER(ctypes.c_float))
    assert fields["next"] is ctypes.c_void_p          # self-reference while incomplete
    assert fields["buf"]._length_ == 3
    # x86-64 ABI: 4 ints, char at 16, double aligned to 24, fn 32, box 40, seen 56 ...
    assert [node.tag.offset, node.d.offset, node.fn.offset, node.b.offset, node.seen.offset] == [16, 24, 32, 40, 56]


# ------------------------------------------------------------------------------------------
# 1b. Parsed offsets agree with what the library writes
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cfg_path, batch", [
    (TINY_CFG, None), (SYS_CFG / "yolov2-tiny.cfg", None), (SYS_CFG / "yolov2.cfg", None),
    (SYS_CFG / "yolov3-spp.cfg", None), (TRAIN_CFG, None), (TRAIN_CFG, 1), (TRAIN_CFG, 3),
], ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_library_written_fields_match_cfg(cfg_path: Path, batch: int | None) -> None:
    want_net, want_layers = expected_network(cfg_path, batch)
    with DarknetProcess(cfg_path, batch=batch) as proc:
        assert proc.n_layers == len(want_layers)
        net = proc.net_info()
        assert_same(net, want_net, f"{cfg_path.name} [net]")
        for i, want in enumerate(want_layers):
            assert_same(proc.layer_info(i), want, f"{cfg_path.name} layer {i}")
        assert proc.seen() == 0


# ------------------------------------------------------------------------------------------
# 2. Darknet's own detections
# ------------------------------------------------------------------------------------------
def test_detect_dog_matches_darknet(tiny: DarknetProcess) -> None:
    dets = tiny.detect(DOG, thresh=0.25, hier=0.5, nms=0.45)
    assert [d["class"] for d in dets] == [c for c, _, _ in DOG_DETECTIONS]
    assert {COCO[d["class"]] for d in dets} == {"dog", "bicycle", "car", "truck"}
    # What /usr/bin/darknet prints ("%.0f%%" of prob*100, same order).
    assert [(COCO[d["class"]], round(d["score"] * 100)) for d in dets] == BINARY_PERCENTS
    for det, (_, score, box) in zip(dets, DOG_DETECTIONS):
        np.testing.assert_allclose(det["score"], score, rtol=1e-6, atol=0)
        np.testing.assert_allclose(det["box"], box, rtol=1e-6, atol=1e-7)
    # Higher threshold keeps a subset (Darknet's default -thresh .5 drops the 42% truck).
    assert len(tiny.detect(DOG, thresh=0.5)) == 5


def test_letterbox_dog(tiny: DarknetProcess) -> None:
    """768x576 -> 416x312 centred in a 416x416 canvas of 0.5 (52 rows above and below)."""
    img = tiny.letterbox(DOG)
    assert img.shape == (3, 416, 416) and img.dtype == np.float32
    assert np.all(img[:, :52, :] == 0.5) and np.all(img[:, 364:, :] == 0.5)
    assert not np.all(img[:, 52, :] == 0.5) and not np.all(img[:, 363, :] == 0.5)
    assert img.min() >= 0.0 and img.max() <= 1.0


# ------------------------------------------------------------------------------------------
# 3. forward, buffers, parameters, save_weights
# ------------------------------------------------------------------------------------------
def test_forward_layer_outputs(tiny: DarknetProcess) -> None:
    _, want = expected_network(TINY_CFG, 1)
    x = np.random.default_rng(0).random((1, 3, 416, 416), dtype=np.float32)
    tiny.forward(x)
    outs = [tiny.layer_output(i) for i in range(tiny.n_layers)]
    for i, (out, info) in enumerate(zip(outs, want)):
        assert out.shape == (1, *info["out_shape"]), f"layer {i}"
        assert np.all(np.isfinite(out)), f"layer {i}"
    # maxpool 2/2 (layer 1) is the 2x2 block max of layer 0.
    a = outs[0][0]
    np.testing.assert_array_equal(outs[1][0], a.reshape(16, 208, 2, 208, 2).max(axis=(2, 4)))
    # maxpool 2/1 (layer 11) keeps 13x13: windows [i, i+1] clipped at the edge.
    p = np.pad(outs[10][0], ((0, 0), (0, 1), (0, 1)), constant_values=-np.inf)
    ref = np.maximum.reduce([p[:, :13, :13], p[:, 1:, :13], p[:, :13, 1:], p[:, 1:, 1:]])
    np.testing.assert_array_equal(outs[11][0], ref)
    # [yolo] (layer 16): logistic (double) on x, y, objectness, classes; w, h raw.
    z = outs[15][0].reshape(3, 85, 13, 13).astype(np.float64)
    y = outs[16][0].reshape(3, 85, 13, 13)
    logistic = (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    np.testing.assert_array_equal(y[:, 2:4], z[:, 2:4].astype(np.float32))
    np.testing.assert_allclose(y[:, [0, 1] + list(range(4, 85))], logistic[:, [0, 1] + list(range(4, 85))],
                               rtol=0, atol=1e-7)
    # upsample (19) is nearest neighbour of 18; route 20 concatenates 19 and 8.
    np.testing.assert_array_equal(outs[19][0], outs[18][0].repeat(2, axis=1).repeat(2, axis=2))
    np.testing.assert_array_equal(outs[20][0], np.concatenate([outs[19][0], outs[8][0]]))
    assert tiny.layer_cost(16) >= 0.0 and tiny.layer_info(16)["has_cost"]
    with pytest.raises(ParamError):
        tiny.layer_cost(0)
    with pytest.raises(ParamError):
        tiny.forward(np.zeros((1, 3, 32, 32), np.float32))
    with pytest.raises(ParamError):
        tiny.layer_output(tiny.n_layers)


def test_layer_params_shapes(tiny: DarknetProcess) -> None:
    _, want = expected_network(TINY_CFG, 1)
    total = 0
    for i, info in enumerate(want):
        params = tiny.layer_params(i)
        if info["type"] == "CONVOLUTIONAL":
            n, c, k = info["n"], info["in_shape"][0], info["size"]
            expected = ["biases", "scales", "rolling_mean", "rolling_variance", "weights"] \
                if info["batch_normalize"] else ["biases", "weights"]
            assert list(params) == expected
            assert params["weights"].shape == (n, c, k, k)
            total += sum(a.size for a in params.values())
        elif info["type"] == "YOLO":
            np.testing.assert_array_equal(params["anchors"], np.float32(info["anchors"]))
        else:
            assert params == {}
    assert total == sum(info.get("params", 0) for info in want) == tiny.param_count()
    # The file on disk is exactly header + those floats.
    assert TINY_WEIGHTS.stat().st_size == 20 + 4 * total


def test_set_layer_params_round_trip(train_net: DarknetProcess) -> None:
    rng = np.random.default_rng(5)
    x = rng.random((2, 3, 32, 32), dtype=np.float32)
    train_net.forward(x)
    before = train_net.layer_output(2)
    old = train_net.layer_params(2)
    new = {"biases": rng.normal(size=old["biases"].shape).astype(np.float32),
           "weights": rng.normal(size=old["weights"].shape).astype(np.float32)}
    train_net.set_layer_params(2, **new)
    got = train_net.layer_params(2)
    for name, arr in new.items():
        np.testing.assert_array_equal(got[name], arr)
    train_net.forward(x)
    after = train_net.layer_output(2)
    assert np.abs(after - before).max() > 1e-3
    # Linear 1x1 conv: output = W @ input + b, computed here from the layer-1 output.
    inp = train_net.layer_output(1)
    ref = np.einsum("oc,bchw->bohw", new["weights"][:, :, 0, 0], inp) + new["biases"][None, :, None, None]
    np.testing.assert_allclose(after, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ParamError, match="shape"):
        train_net.set_layer_params(2, weights=np.zeros((3, 3), np.float32))
    with pytest.raises(ParamError, match="no parameter"):
        train_net.set_layer_params(2, scales=np.zeros(21, np.float32))
    np.testing.assert_array_equal(train_net.layer_params(2)["weights"], new["weights"])  # nothing written


def test_save_weights_size_and_reload(tiny: DarknetProcess, tmp_path: Path) -> None:
    out = tmp_path / "saved.weights"
    tiny.save_weights(out)
    _, want = expected_network(TINY_CFG, 1)
    n_params = sum(info.get("params", 0) for info in want)
    assert out.stat().st_size == 20 + 4 * n_params
    major, minor, revision, seen = struct.unpack("<iiiQ", out.read_bytes()[:20])
    assert (major, minor, revision) == (0, 2, 0) and seen == tiny.seen()
    # Darknet writes the same bytes it read (body identical to the original file).
    assert out.read_bytes()[20:] == TINY_WEIGHTS.read_bytes()[20:]


# ------------------------------------------------------------------------------------------
# 4. One training step
# ------------------------------------------------------------------------------------------
def _truth(rows: int) -> np.ndarray:
    truth = np.zeros((rows, 450), np.float32)
    truth[0, :5] = [0.5, 0.5, 0.3, 0.4, 1]
    if rows > 1:
        truth[1, :10] = [0.25, 0.3, 0.2, 0.2, 0, 0.7, 0.6, 0.4, 0.5, 1]
    return truth


def test_train_step(train_net: DarknetProcess) -> None:
    x = np.random.default_rng(2).random((2, 3, 32, 32), dtype=np.float32)
    before = [train_net.layer_params(i) for i in (0, 2)]
    assert train_net.seen() == 0
    np.testing.assert_allclose(train_net.current_rate(), 0.01, rtol=1e-6)
    loss = train_net.train_step(x, _truth(2))
    assert math.isfinite(loss) and loss > 0
    # One mini-batch of 2: train_network returns *net->cost / 2, and cost is the yolo Σδ².
    np.testing.assert_allclose(loss, train_net.cost() / 2, rtol=1e-6)
    np.testing.assert_allclose(train_net.cost(), train_net.layer_cost(3), rtol=1e-6)
    assert train_net.seen() == 2 and train_net.current_batch() == 1
    after = [train_net.layer_params(i) for i in (0, 2)]
    for old, new in zip(before, after):
        for name in ("biases", "weights"):
            assert np.abs(new[name] - old[name]).max() > 1e-6, name
    assert np.abs(after[0]["rolling_mean"] - before[0]["rolling_mean"]).max() > 0
    # The truth reached Darknet: a step with no boxes gives a different loss.
    with DarknetProcess(TRAIN_CFG, clear=True) as fresh:
        fresh.set_layer_params(0, **before[0])
        fresh.set_layer_params(2, **before[1])
        empty = fresh.train_step(x, np.zeros((2, 450), np.float32))
    assert math.isfinite(empty) and abs(empty - loss) > 1e-3
    with pytest.raises(ParamError, match="multiple"):
        train_net.train_step(x[:1], _truth(1))
    with pytest.raises(ParamError, match="truth"):
        train_net.train_step(x, np.zeros((2, 5), np.float32))


def test_train_datum_and_backward(train_net: DarknetProcess) -> None:
    x = np.random.default_rng(3).random((2, 3, 32, 32), dtype=np.float32)
    train_net.forward(x, train=True, truth=_truth(2))
    head_delta = train_net.layer_delta(3)
    assert np.abs(head_delta).sum() > 0
    np.testing.assert_allclose(train_net.layer_cost(3), float((head_delta.astype(np.float64) ** 2).sum()),
                               rtol=1e-5)
    train_net.backward()
    # [yolo] backward adds its δ to the (zeroed) δ of the conv below it.
    np.testing.assert_array_equal(train_net.layer_delta(2), head_delta)
    err = train_net.train_datum(x, _truth(2))
    assert math.isfinite(err) and train_net.seen() == 2


# ------------------------------------------------------------------------------------------
# 5. Isolation: FTZ stays in the child, crashes stay in the child
# ------------------------------------------------------------------------------------------
def test_ftz_isolation() -> None:
    """A fresh interpreter: DarknetProcess leaves IEEE denormals alone; DarknetNet does not."""
    script = textwrap.dedent(f"""
        import json, numpy as np
        from d2c.darknet.runtime import DarknetNet, DarknetProcess
        def parent_ok():
            return bool(np.float32(1e-40) * np.float32(1) != 0)
        out = {{"before": parent_ok()}}
        with DarknetProcess({str(TRAIN_CFG)!r}) as p:
            out["child_flushes"] = p.denormals_flushed()
            out["during"] = parent_ok()
        out["after"] = parent_ok()
        net = DarknetNet({str(TRAIN_CFG)!r}, quiet=True)
        out["in_process"] = parent_ok()
        print(json.dumps(out))
    """)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {"before": True, "child_flushes": True, "during": True, "after": True, "in_process": False}


def test_crash_becomes_engine_error(tmp_path: Path) -> None:
    """[route] without layers= makes pjreddie call strlen(NULL); the caller survives."""
    cfg = tmp_path / "rt_crash.cfg"
    cfg.write_text("[net]\nbatch=1\nwidth=8\nheight=8\nchannels=3\n[route]\nfoo=1\n")
    with pytest.raises(EngineError, match="SIGSEGV"):
        DarknetProcess(cfg)


def test_bad_paths_are_refused_before_darknet(tmp_path: Path) -> None:
    with pytest.raises(CfgError, match="nope.cfg"):
        DarknetProcess(tmp_path / "nope.cfg")
    with pytest.raises(WeightsError, match="nope.weights"):
        DarknetProcess(TRAIN_CFG, tmp_path / "nope.weights")
    short = tmp_path / "short.weights"
    short.write_bytes(struct.pack("<iiiQ", 0, 2, 0, 0) + np.zeros(100, np.float32).tobytes())
    with pytest.raises(WeightsError, match="needs 437"):
        DarknetProcess(TRAIN_CFG, short)
    with DarknetProcess(TRAIN_CFG, short, strict_weights=False) as proc:   # Darknet's own behaviour
        assert proc.layer_params(0)["biases"].shape == (8,)
    alexey = tmp_path / "alexey.cfg"
    alexey.write_text("[net]\nwidth=8\nheight=8\nchannels=3\n[sam]\nfrom=-1\n")
    with pytest.raises(UnsupportedLayerError, match="sam"):
        DarknetProcess(alexey)
    with pytest.raises(DatasetError, match="missing.jpg"):
        with DarknetProcess(TRAIN_CFG) as proc:
            proc.detect(tmp_path / "missing.jpg")


def test_missing_library_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("D2C_DARKNET_LIB", str(tmp_path / "libdarknet.so"))
    with pytest.raises(EngineError, match="apt-get install darknet"):
        library_path()
    with pytest.raises(EngineError, match="apt-get install darknet"):
        DarknetProcess(TRAIN_CFG)
    assert version_info()["available"] is False

