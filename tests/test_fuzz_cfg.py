"""Fuzzed cfgs: every mutation of a real cfg either converts or raises a D2CError naming the file.

Why: Darknet segfaults or asserts on a bad cfg. d2c must never show a user a raw traceback,
hang, or allocate gigabytes for a cfg that asks for an absurd network. The mutations are the
ones users actually produce (deleted lines, pasted sections, typos in numbers, CRLF files,
wrong indices) applied to every real cfg we have.

`D2C_FUZZ_EXAMPLES` sets the examples per fuzz test (`make fuzz` runs 20000); the default is
CI-sized and deterministic.
"""
from __future__ import annotations

import json
import os
import resource
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shared_cfgs import alexeyab_cfgs

from d2c.caffe.emitter import ConvertOptions
from d2c.convert import build_conversion, convert
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.weights import WeightsHeader
from d2c.errors import CfgError, D2CError, UnsupportedLayerError

CFG_FILES = sorted([*Path("/usr/share/darknet/cfg").glob("yolo*.cfg"), *alexeyab_cfgs()])
CFG_BYTES = {p: p.read_bytes() for p in CFG_FILES}

FUZZ_EXAMPLES = int(os.environ.get("D2C_FUZZ_EXAMPLES", "0"))
LONG_RUN = FUZZ_EXAMPLES > 0
# Networks this small (floats in the Caffe model) are converted all the way to files; bigger
# ones stop before writing (their conversion is the same code, only slower).
FULL_CONVERT_PARAMS = 300_000
SLOW_EXAMPLE_SECONDS = 20.0
# reorg3d's fixed space-to-depth kernel is 16 C^2 floats, so real cfgs already emit millions;
# the bound catches the absurd (a 20000-channel reorg asks for 24 GiB).
MAX_HELPER_FLOATS = 1 << 27
FUZZ_MEMORY_BYTES = 6 << 30

BAD_NUMBERS = ["0", "-1", "-3", "100000", "10000000", "1000000000000000000", "9" * 40, "1e400", "-1e400",
               "nan", "inf", "-inf", "3.5", "-0.5", "abc", "0x10", "1,2", "-", "1e9", "2147483648",
               "-2147483649", "1e-300", "+", ".", "1e", "0.0", "00007", "1_000", "٣", "½"]
KEYS = ["filters", "size", "stride", "pad", "padding", "layers", "from", "classes", "num", "mask", "anchors",
        "groups", "group_id", "dilation", "activation", "stride_x", "stride_y", "batch_normalize", "scale",
        "output", "coords", "side", "probability", "reverse", "scale_x_y", "new_coords", "alpha", "beta"]
NET_KEYS = ["width", "height", "channels", "batch", "subdivisions"]
SECTION_NAMES = ["convolutional", "maxpool", "route", "shortcut", "upsample", "yolo", "region", "reorg",
                 "reorg3d", "sam", "scale_channels", "avgpool", "dropout", "connected", "softmax", "net",
                 "crop", "local", "lstm", "unknown", "", "conv", "batchnorm", "detection", "activation"]


# tmpfs when there is one: the fuzz cases write (and fsync) thousands of small files, which on a
# busy disk costs more than the conversions themselves.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def fuzz_settings(ci_examples: int) -> settings:
    """CI: deterministic and small. `make fuzz`: random and long, failures saved for replay."""
    return settings(max_examples=FUZZ_EXAMPLES or ci_examples, deadline=None, derandomize=not LONG_RUN,
                    database=settings.default.database if LONG_RUN else None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ---------------------------------------------------------------------------------------------
# Mutations: each is a tuple (name, *parameters) so hypothesis shrinks to a readable case.
# ---------------------------------------------------------------------------------------------

value_text = st.one_of(st.sampled_from(BAD_NUMBERS), st.integers(-10**6, 10**12).map(str),
                       st.floats(allow_nan=True, allow_infinity=True).map(repr),
                       st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n\r"), max_size=8))
index_list = st.lists(st.integers(-400, 400), min_size=1, max_size=4).map(lambda v: ",".join(map(str, v)))
fraction = st.floats(0.0, 1.0, exclude_max=True)

mutation = st.one_of(
    st.tuples(st.just("delete_lines"), fraction, st.integers(1, 8)),
    st.tuples(st.just("delete_section"), fraction),
    st.tuples(st.just("swap_sections"), fraction, fraction),
    st.tuples(st.just("duplicate_section"), fraction, fraction),
    st.tuples(st.just("set_value"), fraction, value_text),
    st.tuples(st.just("set_key"), fraction, st.sampled_from(KEYS), value_text),
    st.tuples(st.just("set_key"), fraction, st.sampled_from(["filters", "size", "stride", "output", "groups"]),
              st.sampled_from(["0", "-1", "-64", "10000000", "1000000000000000000000"])),
    st.tuples(st.just("set_key"), fraction, st.sampled_from(["layers", "from"]), index_list),
    st.tuples(st.just("set_net"), st.sampled_from(NET_KEYS),
              st.sampled_from(["0", "-416", "1", "7", "100000", "65536", "10000000", "abc", "416.5"])),
    st.tuples(st.just("rename_section"), fraction, st.sampled_from(SECTION_NAMES)),
    st.tuples(st.just("junk"), fraction, st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("non_utf8"), fraction, st.sampled_from([b"\xff", b"\xc3\x28", b"\xe2\x82", b"\x80abc"])),
    st.tuples(st.just("crlf")),
    st.tuples(st.just("truncate"), fraction),
    st.tuples(st.just("prefix"), st.integers(1, 12)),
    st.tuples(st.just("empty"), st.sampled_from([b"", b"\n\n", b"# only a comment\n", b"[net]\n",
                                                  b"[net]\nwidth=416\n", b"\xef\xbb\xbf[net]\n"])),
)


def _sections(lines: list[bytes]) -> list[tuple[int, int]]:
    """(start, end) line ranges of every [section]."""
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(b"[")]
    return list(zip(starts, [*starts[1:], len(lines)]))


def _pick(items: list, frac: float):
    return items[min(int(frac * len(items)), len(items) - 1)]


def apply_mutation(data: bytes, op: tuple) -> bytes:
    """Apply one mutation to cfg bytes; mutations that do not apply leave the bytes alone."""
    name, *args = op
    lines = data.split(b"\n")
    sections = _sections(lines)
    layer_sections = sections[1:]
    kv_lines = [i for i, line in enumerate(lines) if b"=" in line and not line.lstrip().startswith((b"#", b";"))]
    if name == "delete_lines" and lines:
        start = _pick(list(range(len(lines))), args[0])
        del lines[start:start + args[1]]
    elif name == "delete_section" and layer_sections:
        a, b = _pick(layer_sections, args[0])
        del lines[a:b]
    elif name in ("swap_sections", "duplicate_section") and layer_sections:
        (a1, b1), (a2, b2) = _pick(layer_sections, args[0]), _pick(layer_sections, args[1])
        first, second = lines[a1:b1], lines[a2:b2]
        if name == "duplicate_section":
            lines[a2:a2] = first
        elif a1 < a2:
            lines = lines[:a1] + second + lines[b1:a2] + first + lines[b2:]
    elif name == "set_value" and kv_lines:
        i = _pick(kv_lines, args[0])
        lines[i] = lines[i].split(b"=", 1)[0] + b"=" + args[1].encode()
    elif name == "set_key" and layer_sections:
        a, _ = _pick(layer_sections, args[0])
        lines.insert(a + 1, f"{args[1]}={args[2]}".encode())  # right after the header: Darknet's first key wins
    elif name == "set_net" and sections:
        lines.insert(sections[0][0] + 1, f"{args[0]}={args[1]}".encode())
    elif name == "rename_section" and layer_sections:
        a, _ = _pick(layer_sections, args[0])
        lines[a] = f"[{args[1]}]".encode()
    elif name in ("junk", "non_utf8"):
        lines.insert(_pick(list(range(len(lines) + 1)), args[0]), args[1])
    elif name == "prefix" and len(sections) > 1:
        lines = lines[:sections[min(args[0], len(sections) - 1)][1]]
    data = b"\n".join(lines)
    if name == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif name == "truncate":
        data = data[:int(args[0] * len(data))]
    elif name == "empty":
        data = args[0]
    return data


cfg_case = st.tuples(st.sampled_from(CFG_FILES), st.lists(mutation, min_size=1, max_size=4))


# ---------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------

def zero_weights(graph) -> dict[int, dict[str, np.ndarray]]:
    """Lazily zeroed arrays (calloc): conversion of a big net costs no weight generation."""
    return {n.index: {p.name: np.zeros(p.shape, np.float32) for p in n.params} for n in graph.nodes}


def convert_or_refuse(cfg_path: Path, out: Path) -> str:
    """Convert the cfg (to files when small); return the outcome or raise if the property fails."""
    try:
        graph = build_graph(parse_cfg(cfg_path))
        conv = build_conversion(graph, zero_weights(graph), WeightsHeader(), ConvertOptions(flavor=graph.flavor))
        # Every Darknet layer has a Caffe blob (identity layers such as reorg3d stride=1 emit none).
        assert {n.index for n in graph.nodes} <= set(conv.emitter.blob_of), "a layer without a Caffe blob"
        # Fixed helper weights (upsample, reorg kernels) come on top of the cfg's parameters; they
        # must stay small, or a tiny cfg could write gigabytes (checked before anything is written).
        emitted = sum(blob.size for layer in conv.net.layers for blob in layer.blobs)
        assert emitted <= graph.param_count() + MAX_HELPER_FLOATS, \
            f"{emitted:,} floats emitted for {graph.param_count():,} parameters"
        if emitted > FULL_CONVERT_PARAMS:
            return "converted (in memory)"
        report = convert(cfg_path, None, out)
    except D2CError as exc:
        text = exc.render()
        assert str(cfg_path) in text, f"error does not name the cfg: {text}"
        assert not out.exists() or not any(out.iterdir()), "a failed convert left files behind"
        return f"refused: {type(exc).__name__}"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([report.caffemodel.name, report.prototxt.name, report.sidecar.name]), names
    assert json.loads(report.sidecar.read_text())["d2c_sidecar"] >= 1
    return "converted (files)"


def run_case(source: Path, ops: list[tuple], counts: Counter) -> None:
    data = CFG_BYTES[source]
    for op in ops:
        data = apply_mutation(data, op)
    with tempfile.TemporaryDirectory(prefix="d2c-fuzz-", dir=SCRATCH) as tmp:
        cfg_path = Path(tmp) / source.name
        cfg_path.write_bytes(data)
        start = time.perf_counter()
        outcome = convert_or_refuse(cfg_path, Path(tmp) / "out")
        elapsed = time.perf_counter() - start
    assert elapsed < SLOW_EXAMPLE_SECONDS, f"{elapsed:.1f} s for one cfg: unbounded work?"
    event(outcome)
    counts[outcome.split(":")[0]] += 1


@pytest.fixture()
def memory_cap():
    """Cap this process's address space while fuzzing: a cfg that makes d2c allocate gigabytes
    must fail the test with a MemoryError, not get the whole machine OOM-killed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as status:
        in_use = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    cap = in_use + FUZZ_MEMORY_BYTES
    resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def test_every_real_cfg_converts_unmutated(tmp_path: Path) -> None:
    """The baseline the mutations start from: each real cfg either builds or is refused clearly."""
    outcomes = {p.name: convert_or_refuse(p, tmp_path / p.stem) for p in CFG_FILES}
    assert sum(o.startswith("converted") for o in outcomes.values()) >= len(CFG_FILES) - 4, outcomes


def test_fuzz_mutated_real_cfgs_convert_or_raise_d2c_error(memory_cap) -> None:
    counts: Counter = Counter()

    @fuzz_settings(1000)
    @given(case=cfg_case)
    def check(case: tuple[Path, list[tuple]]) -> None:
        run_case(case[0], case[1], counts)

    check()
    print(f"mutated real cfgs: {dict(counts)}")  # shown with -s; `make fuzz` reports these counts
    total = sum(counts.values())
    # A campaign where nothing converts (or nothing fails) tests nothing: the mutations must bite
    # and must also leave many cfgs valid.
    assert counts["converted (files)"] + counts["converted (in memory)"] > total * 0.05, counts
    assert counts["refused"] > total * 0.3, counts
    assert counts["converted (files)"] > 0, counts


def test_fuzz_small_prefixes_write_real_files(memory_cap) -> None:
    """Short prefixes of real cfgs are small enough to write to disk every time."""
    counts: Counter = Counter()

    @fuzz_settings(400)
    @given(source=st.sampled_from(CFG_FILES), keep=st.integers(1, 6), ops=st.lists(mutation, max_size=2))
    def check(source: Path, keep: int, ops: list[tuple]) -> None:
        run_case(source, [("prefix", keep), *ops], counts)

    check()
    print(f"small prefixes: {dict(counts)}")
    assert counts["converted (files)"] > sum(counts.values()) * 0.2, counts


# ---------------------------------------------------------------------------------------------
# Named cases from the issue, each with the message it must give
# ---------------------------------------------------------------------------------------------

NET = "[net]\nwidth=32\nheight=32\nchannels=3\n"
CONV = "[convolutional]\nfilters=8\nsize=3\npad=1\nactivation=leaky\n"


@pytest.mark.parametrize("data, error, fragments", [
    (b"", CfgError, ["no sections"]),
    (b"\x00\x01\x02binary", CfgError, ["binary file"]),
    (b"[net]\nwidth=32\n# caf\xe9\n", CfgError, [":3:", "not UTF-8"]),
    ((NET + "[convolutional]\nfilters=-4\nsize=3\n").encode(), CfgError, [":6 [convolutional] 'filters'", "> 0"]),
    ((NET + "[convolutional]\nfilters=0\nsize=3\n").encode(), CfgError, ["'filters'", "> 0"]),
    ((NET + "[convolutional]\nfilters=4\nsize=0\n").encode(), CfgError, ["'size'", "> 0"]),
    ((NET + "[convolutional]\nfilters=4\nstride=-2\n").encode(), CfgError, ["'stride'", "> 0"]),
    ((NET + "[convolutional]\nfilters=4x\n").encode(), CfgError, ["'filters'", "integer", "'4x'"]),
    ((NET + CONV + "[route]\nlayers=-5\n").encode(), CfgError, ["'layers'", "outside 0..0"]),
    ((NET + CONV + "[route]\nlayers=7\n").encode(), CfgError, ["'layers'", "resolves to 7"]),
    ((NET + CONV + "[shortcut]\nfrom=-3\n").encode(), CfgError, ["'from'", "outside"]),
    ((NET + CONV + "[lstm]\noutput=4\n").encode(), UnsupportedLayerError, ["[lstm] (layer 1)"]),
    ((NET + CONV + "[nonsense]\n").encode(), UnsupportedLayerError, ["[nonsense]"]),
    (b"[net]\nwidth=100000\nheight=100000\nchannels=3\n" + CONV.encode(), CfgError, ["GiB per image", "refusing"]),
    ((NET + "[convolutional]\nfilters=10000000\nsize=3\n").encode(), CfgError, ["GiB", "refusing"]),
    ((NET + "[convolutional]\nfilters=1000000000000000000\nsize=3\npad=1\n").encode(), CfgError,
     ["'filters'", "does not fit the 32-bit int"]),
    ((NET + "[convolutional]\nfilters=3\nstride=1e21\n").encode(), CfgError, ["'stride'", "32-bit int"]),
    ((NET + CONV + "[shortcut]\nfrom=-1\nalpha=1e39\n").encode(), CfgError, ["'alpha'", "32-bit float"]),
    ((NET + "[convolutional]\nfilters=1_000\n").encode(), CfgError, ["'filters'", "expects an integer"]),
    ((NET + "[convolutional]\nfilters=\u0663\n").encode(), CfgError, ["'filters'", "expects an integer"]),
    ((NET + "[convolutional]\nfilters=" + "7" * 5000 + "\n").encode(), CfgError, ["(5000 characters)"]),
    # 400M BN-conv parameters: conversion would need ~12 GiB; refused before allocating.
    (b"[net]\nwidth=1\nheight=1\nchannels=1\n[convolutional]\nfilters=80000000\nsize=1\nbatch_normalize=1\n",
     CfgError, ["1.5 GiB of parameters", "400,000,000 floats", "limit 1 GiB"]),
    # Each number fits an int, but weights = filters x 3 x 46341^2 overflows a 64-bit product.
    (b"[net]\nwidth=1\nheight=1\nchannels=3\n[convolutional]\nfilters=2147483647\nsize=46341\npad=1\n",
     CfgError, ["GiB of parameters", "refusing"]),
    ((NET + CONV + "[upsample]\nstride=100000\n").encode(), CfgError, ["GiB", "refusing"]),
])
def test_named_bad_cfgs_give_clear_errors(tmp_path: Path, data: bytes, error: type, fragments: list[str]) -> None:
    path = tmp_path / "bad.cfg"
    path.write_bytes(data)
    with pytest.raises(error) as info:
        convert(path, None, tmp_path / "out")
    text = info.value.render()
    assert str(path) in text
    for fragment in fragments:
        assert fragment in text
    assert not (tmp_path / "out").exists()


def test_crlf_cfg_converts_with_a_warning(tmp_path: Path) -> None:
    path = tmp_path / "crlf.cfg"
    path.write_bytes((NET + CONV).replace("\n", "\r\n").encode())
    report = convert(path, None, tmp_path / "out")
    assert any("CRLF" in w for w in report.warnings)
    assert report.caffemodel.exists()


def test_whole_net_activation_estimate_is_refused_before_allocating(tmp_path: Path) -> None:
    """Each blob is under the per-blob limit, but together they need over 16 GiB per image."""
    path = tmp_path / "wide.cfg"
    conv = "[convolutional]\nfilters=24\nsize=3\npad=1\nactivation=leaky\n"
    path.write_text("[net]\nwidth=8192\nheight=8192\nchannels=3\n" + conv * 4)
    tracemalloc.start()
    try:
        with pytest.raises(CfgError) as info:
            build_graph(parse_cfg(path))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    text = info.value.render()
    assert "layers 0..2" in text and "18.0 GiB per image" in text and "limit 16 GiB" in text, text
    assert peak < 5 * 2**20, f"{peak} bytes allocated while refusing"


@pytest.mark.parametrize("source", CFG_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_single_line_deletion_of_a_tiny_cfg_prefix(source: Path) -> None:
    """Exhaustive, not random: drop each line of the first sections in turn."""
    lines = CFG_BYTES[source].split(b"\n")
    cut = _sections(lines)[min(3, len(_sections(lines)) - 1)][1]
    head = lines[:cut]
    outcomes = Counter()
    with tempfile.TemporaryDirectory(prefix="d2c-fuzz-", dir=SCRATCH) as tmp:
        for i in range(len(head)):
            cfg_path = Path(tmp) / f"del{i}.cfg"
            cfg_path.write_bytes(b"\n".join(head[:i] + head[i + 1:]))
            outcomes[convert_or_refuse(cfg_path, Path(tmp) / f"out{i}").split(":")[0]] += 1
    assert outcomes["converted (files)"] > 0, outcomes  # deleting a comment or a default changes nothing
