"""Fuzzed Caffe files: a garbled .caffemodel or prototxt reads or raises a D2CError naming the file.

Why: `d2c export` and `d2c detect` read Caffe files a user hands them (possibly written by real
Caffe, possibly truncated by a failed copy). The blob scanner is ours and protobuf raises its own
exceptions, so neither may escape as an IndexError, a DecodeError or a recursion error.

Seeds: a small converted YOLO net written by our writer and re-saved by real pycaffe, plus
our prototxt and BVLC Caffe's own model-zoo prototxts when the Caffe source tree is present
(those use layers outside d2c's schema, so they seed the error path).
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from byte_mutations import mutate_bytes
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from d2c.caffe.proto import net_from_prototxt, parse_prototxt, read_caffemodel, read_caffemodel_net
from d2c.convert import convert
from d2c.engines import import_caffe
from d2c.errors import D2CError

FUZZ_EXAMPLES = int(os.environ.get("D2C_FUZZ_EXAMPLES", "0"))
LONG_RUN = FUZZ_EXAMPLES > 0

SMALL_YOLO = ("[net]\nwidth=16\nheight=16\nchannels=3\n"
              "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
              "[maxpool]\nsize=2\nstride=2\n[convolutional]\nfilters=18\nsize=1\nactivation=linear\n"
              "[yolo]\nmask=0,1,2\nanchors=1,2,3,4,5,6\nclasses=1\nnum=3\n[route]\nlayers=-3\n"
              "[upsample]\nstride=2\n[route]\nlayers=-1,0\n[convolutional]\nfilters=8\nsize=1\nactivation=leaky\n"
              "[shortcut]\nfrom=-8\nactivation=linear\n[maxpool]\nsize=2\nstride=1\n")


# tmpfs when there is one: the fuzz cases write (and fsync) thousands of small files, which on a
# busy disk costs more than the conversions themselves.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def fuzz_settings(ci_examples: int) -> settings:
    return settings(max_examples=FUZZ_EXAMPLES or ci_examples, deadline=None, derandomize=not LONG_RUN,
                    database=settings.default.database if LONG_RUN else None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _make_seeds(root: Path) -> tuple[dict[str, bytes], dict[str, str]]:
    cfg = root / "small.cfg"
    cfg.write_text(SMALL_YOLO)
    report = convert(cfg, None, root / "out")
    models = {"d2c": report.caffemodel.read_bytes()}
    caffe = import_caffe()  # a missing Caffe is a failure, not a skip
    net = caffe.Net(str(report.prototxt), str(report.caffemodel), caffe.TEST)
    net.save(str(root / "pycaffe.caffemodel"))
    models["pycaffe"] = (root / "pycaffe.caffemodel").read_bytes()
    texts = {"d2c.prototxt": report.prototxt.read_text()}
    cache = Path(os.environ.get("D2C_CACHE", Path.home() / ".cache" / "d2c"))
    for path in sorted(cache.glob("src/caffe-*/models/*/*.prototxt"))[:12]:
        texts[f"{path.parent.name}/{path.name}"] = path.read_text()
    return models, texts


_ROOT = Path(tempfile.mkdtemp(prefix="d2c-fuzz-proto-", dir=SCRATCH))
atexit.register(shutil.rmtree, _ROOT, True)
MODELS, TEXTS = _make_seeds(_ROOT)


def _message_for(name: str) -> str:
    return "SolverParameter" if "solver" in name else "NetParameter"


def test_seeds_read_back() -> None:
    """Baseline: the unmutated seeds parse, and both caffemodels hold the same arrays."""
    ours = read_caffemodel(_ROOT / "out" / "small.caffemodel")
    theirs = read_caffemodel(_ROOT / "pycaffe.caffemodel")
    with_blobs = {k: v for k, v in ours.items() if v[1]}
    assert len(with_blobs) >= 4
    for name, (kind, blobs) in with_blobs.items():
        assert theirs[name][0] == kind
        for a, b in zip(blobs, theirs[name][1]):
            np.testing.assert_array_equal(a, b)
    parse_prototxt(TEXTS["d2c.prototxt"], "d2c.prototxt")
    zoo = {name: text for name, text in TEXTS.items() if name != "d2c.prototxt"}
    assert zoo, "no BVLC model-zoo prototxts in the Caffe source tree"
    for name, text in zoo.items():  # real Caffe fields outside d2c's schema: refused with file:line
        try:
            parse_prototxt(text, name, _message_for(name))
        except D2CError as exc:
            assert re.match(rf"{re.escape(name)}:\d+:\d+: ", exc.render()), exc.render()


byte_ops = st.lists(st.tuples(st.sampled_from(["truncate", "insert", "delete", "overwrite", "duplicate"]),
                              st.floats(0.0, 1.0, exclude_max=True),
                              st.one_of(st.binary(min_size=1, max_size=12),
                                        st.sampled_from([b"\xff" * 10, b"\x80" * 11, b"\x0a\xff\xff\xff\xff\x0f",
                                                         b"\x3a\x05", b"\x00", b"\x07", b"\x0f"]))),
                    min_size=1, max_size=5)


@fuzz_settings(700)
@given(seed=st.sampled_from(sorted(MODELS)), ops=byte_ops, full=st.booleans())
def test_fuzz_garbled_caffemodel_reads_or_raises_d2c_error(seed: str, ops: list, full: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="d2c-fuzz-", dir=SCRATCH) as tmp:
        path = Path(tmp) / "garbled.caffemodel"
        path.write_bytes(mutate_bytes(MODELS[seed], ops))
        try:
            if full:
                net = read_caffemodel_net(path)
                assert all(isinstance(layer.name, str) for layer in net.layers)
            else:
                layers = read_caffemodel(path)
                for kind, blobs in layers.values():
                    assert isinstance(kind, str)
                    assert all(isinstance(b, np.ndarray) and b.dtype == np.float32 for b in blobs)
            event("read")
        except D2CError as exc:
            assert str(path) in exc.render(), exc.render()
            event(f"refused: {type(exc).__name__}")


@fuzz_settings(200)
@given(data=st.binary(max_size=400), full=st.booleans())
def test_fuzz_random_bytes_as_caffemodel(data: bytes, full: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="d2c-fuzz-", dir=SCRATCH) as tmp:
        path = Path(tmp) / "random.caffemodel"
        path.write_bytes(data)
        try:
            (read_caffemodel_net if full else read_caffemodel)(path)
            event("read")
        except D2CError as exc:
            assert str(path) in exc.render(), exc.render()
            event("refused")


# Text-level edits that mirror hand-editing mistakes.
TEXT_JUNK = ["{", "}", "<", ">", ":", "\"", "'", "\\", "[", "]", ",", ";", "-", "nan", "inf", "1e999", "-1",
             "99999999999999999999", "0x1F", "true", "FALSE", "MAX", "layer {", "blobs { data: 1 }",
             "name: \"\\x4", "type: 3", "dim: -5", "\u00e9", "\t", "#", "input_dim: 1", "input: \"x\"",
             "bottom: \"nowhere\"", "convolution_param { num_output: 0 }", "phase: TRAIN", "\x00", "\x7f"]

text_ops = st.lists(st.one_of(
    st.tuples(st.just("insert"), st.floats(0.0, 1.0, exclude_max=True), st.sampled_from(TEXT_JUNK)),
    st.tuples(st.just("insert"), st.floats(0.0, 1.0, exclude_max=True), st.text(max_size=6)),
    st.tuples(st.just("delete"), st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 40)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0, exclude_max=True), st.just(0)),
    st.tuples(st.just("drop_line"), st.floats(0.0, 1.0, exclude_max=True), st.just(0)),
    st.tuples(st.just("dup_line"), st.floats(0.0, 1.0, exclude_max=True), st.just(0)),
), min_size=1, max_size=5)


def garble_text(text: str, ops: list[tuple]) -> str:
    for op, where, arg in ops:
        pos = int(where * len(text))
        if op == "insert":
            text = text[:pos] + arg + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + arg:]
        elif op == "truncate":
            text = text[:pos]
        elif op in ("drop_line", "dup_line"):
            lines = text.split("\n")
            i = int(where * len(lines))
            lines[i:i + 1] = [] if op == "drop_line" else lines[i:i + 1] * 2
            text = "\n".join(lines)
    return text


@fuzz_settings(700)
@given(seed=st.sampled_from(sorted(TEXTS)), ops=text_ops)
def test_fuzz_garbled_prototxt_parses_or_raises_d2c_error(seed: str, ops: list) -> None:
    text = garble_text(TEXTS[seed], ops)
    path = f"/some/dir/{seed.replace('/', '_')}"
    try:
        if _message_for(seed) == "NetParameter":
            net = net_from_prototxt(text, path)
            assert all(layer.name and layer.type for layer in net.layers)
        else:
            parse_prototxt(text, path, "SolverParameter")
        event("parsed")
    except D2CError as exc:
        message = exc.render()
        assert message.startswith(path), message
        event("refused")


@fuzz_settings(300)
@given(seed=st.sampled_from(sorted(TEXTS)), ops=byte_ops)
def test_fuzz_prototxt_from_garbled_bytes(seed: str, ops: list) -> None:
    """Byte garbage decoded the way a reader would (replacement characters for bad UTF-8)."""
    text = mutate_bytes(TEXTS[seed].encode(), ops).decode("utf-8", errors="replace")
    try:
        parse_prototxt(text, "x.prototxt", _message_for(seed))
        event("parsed")
    except D2CError as exc:
        assert exc.render().startswith("x.prototxt"), exc.render()
        event("refused")


def test_deeply_nested_prototxt_is_refused_not_a_recursion_error() -> None:
    """The deepest nesting the schema has parses; thousands of levels are a PrototxtError, not a
    Python RecursionError (no message of the caffe.proto subset contains itself)."""
    deep = 'layer { reshape_param { shape { dim: 1 } } }'
    assert parse_prototxt(deep, "deep.prototxt")["layer"][0]["reshape_param"]["shape"] == {"dim": [1]}
    for text in ("a {" * 5000 + "}" * 5000, "layer {" * 5000, "a <" * 100000,
                 "layer { reshape_param {" + " shape {" * 5000):
        with pytest.raises(D2CError) as info:
            parse_prototxt(text, "deep.prototxt")
        assert info.value.render().startswith("deep.prototxt")
