"""Fuzzed .weights files: truncated, extended, garbled. Each loads exactly or raises a WeightsError.

Why: Darknet reads whatever bytes are there and leaves garbage in the missing parameters. d2c
must say which layer ran out, refuse trailing bytes unless asked, and never crash on a header
or a file of random bytes. Garbled float bytes are not an error (Darknet has no checksum), so
there the property is exactness: only the floats whose bytes changed may differ.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from byte_mutations import mutate_bytes
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from d2c.convert import convert
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.weights import WeightsHeader, random_weights, read_weights, write_weights
from d2c.errors import D2CError, WeightsError

FUZZ_EXAMPLES = int(os.environ.get("D2C_FUZZ_EXAMPLES", "0"))
LONG_RUN = FUZZ_EXAMPLES > 0

NET = "[net]\nwidth={w}\nheight={w}\nchannels=3\n"
SMALL_CFGS = {
    "conv_bn": NET.format(w=8) + "[convolutional]\nfilters=4\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
               "[convolutional]\nfilters=2\nsize=1\nactivation=linear\n",
    "yolo_head": NET.format(w=16) + "[convolutional]\nfilters=8\nsize=3\npad=1\nbatch_normalize=1\nactivation=leaky\n"
                 "[maxpool]\nsize=2\nstride=2\n[convolutional]\nfilters=18\nsize=1\nactivation=linear\n"
                 "[yolo]\nmask=0,1,2\nanchors=1,2,3,4,5,6\nclasses=1\nnum=3\n[route]\nlayers=-3\n"
                 "[upsample]\nstride=2\n[route]\nlayers=-1,0\n[convolutional]\nfilters=8\nsize=1\nactivation=leaky\n"
                 "[shortcut]\nfrom=-8\nactivation=linear\n",
    "connected": NET.format(w=4) + "[convolutional]\nfilters=2\nsize=3\npad=1\nactivation=leaky\n"
                 "[connected]\noutput=5\nactivation=linear\n[connected]\noutput=3\nbatch_normalize=1\n",
}
HEADERS = [WeightsHeader(0, 2, 0, 32013312), WeightsHeader(0, 1, 0, 1234), WeightsHeader(1000, 2, 0, 7),
           WeightsHeader(0, 2, 0, 0), WeightsHeader(1, 0, 5, 2**40)]


# tmpfs when there is one: the fuzz cases write (and fsync) thousands of small files, which on a
# busy disk costs more than the conversions themselves.
SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


def fuzz_settings(ci_examples: int) -> settings:
    return settings(max_examples=FUZZ_EXAMPLES or ci_examples, deadline=None, derandomize=not LONG_RUN,
                    database=settings.default.database if LONG_RUN else None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Fixture:
    """A small cfg, its graph and a valid weights file (bytes) for each header version."""

    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.cfg = root / f"{name}.cfg"
        self.cfg.write_text(SMALL_CFGS[name])
        self.graph = build_graph(parse_cfg(self.cfg))
        self.arrays = random_weights(self.graph, seed=7)
        self.files: dict[int, bytes] = {}
        for k, header in enumerate(HEADERS):
            path = root / f"{name}-{k}.weights"
            write_weights(path, header, self.graph, self.arrays)
            self.files[k] = path.read_bytes()

    def layer_ends(self, header: WeightsHeader) -> list[tuple[int, int]]:
        """(layer index, byte offset where its arrays end), in file order."""
        offset, out = header.size, []
        for node in self.graph.nodes:
            offset += 4 * node.param_count()
            out.append((node.index, offset))
        return out


_ROOT = Path(tempfile.mkdtemp(prefix="d2c-fuzz-weights-", dir=SCRATCH))
atexit.register(shutil.rmtree, _ROOT, True)
FIXTURES = {name: Fixture(name, _ROOT) for name in SMALL_CFGS}


def test_fixtures_round_trip_exactly() -> None:
    """Baseline: every unmutated file loads with the written header and arrays."""
    for fx in FIXTURES.values():
        assert fx.graph.param_count() > 0
        for k, data in fx.files.items():
            path = _ROOT / f"{fx.name}-{k}.weights"
            header, arrays = read_weights(path, fx.graph)
            assert header == HEADERS[k]
            for index, layer in fx.arrays.items():
                for name, arr in layer.items():
                    np.testing.assert_array_equal(arrays[index][name], arr)


def _write(tmp: str, data: bytes) -> Path:
    path = Path(tmp) / "fuzzed.weights"
    path.write_bytes(data)
    return path


def _check_named(exc: D2CError, path: Path) -> str:
    text = exc.render()
    assert str(path) in text, f"error does not name the weights file: {text}"
    return text


fixture_and_header = st.tuples(st.sampled_from(sorted(FIXTURES)), st.integers(0, len(HEADERS) - 1))


@fuzz_settings(300)
@given(case=fixture_and_header, cut=st.floats(0.0, 1.0, exclude_max=True))
def test_fuzz_truncated_file_names_the_layer_that_ran_out(case: tuple[str, int], cut: float) -> None:
    fx, k = FIXTURES[case[0]], case[1]
    data = fx.files[k]
    length = int(cut * len(data))
    header = HEADERS[k]
    with tempfile.TemporaryDirectory(prefix="d2c-fuzz-", dir=SCRATCH) as tmp:
        path = _write(tmp, data[:length])
        with pytest.raises(WeightsError) as info:
            read_weights(path, fx.graph)
        text = _check_named(info.value, path)
    if length < header.size:
        assert "header" in text or "too short" in text or "empty" in text, text
        event("truncated in the header")
    else:
        layer = next(index for index, end in fx.layer_ends(header) if end > length)
        assert f"ran out in layer {layer} " in text, text
        assert f"{len(data) - length} bytes short" in text, text
        event("truncated in the arrays")


@fuzz_settings(200)
@given(case=fixture_and_header, extra=st.binary(min_size=1, max_size=64))
def test_fuzz_extended_file_is_refused_unless_trailing_allowed(case: tuple[str, int], extra: bytes) -> None:
    fx, k = FIXTURES[case[0]], case[1]
    with tempfile.TemporaryDirectory(prefix="d2c-fuzz-", dir=SCRATCH) as tmp:
        path = _write(tmp, fx.files[k] + extra)
        with pytest.raises(WeightsError) as info:
            read_weights(path, fx.graph)
        assert f"{len(extra)} trailing byte(s)" in _check_named(info.value, path)
        header, arrays = read_weights(path, fx.graph, allow_trailing=True)
        assert header == HEADERS[k]
        for index, layer in fx.arrays.items():
            for name, arr in layer.items():
                np.testing.assert_array_equal(arrays[index][name], arr)


@fuzz_settings(300)
@given(case=fixture_and_header, edits=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True),
                                                        st.integers(0, 255)), min_size=1, max_size=12))
def test_fuzz_garbled_floats_load_and_change_only_those_floats(case: tuple[str, int],
                                                                edits: list[tuple[float, int]]) -> None:
    """Any bytes are valid float32s (NaN and inf included); only the touched values may differ."""
    fx, k = FIXTURES[case[0]], case[1]
    header = HEADERS[k]
    data = bytearray(fx.files[k])
    touched: set[int] = set()
    for where, value in edits:
        pos = header.size + int(where * (len(data) - header.size))
        data[pos] = value
        touched.add((pos - header.size) // 4)
    with tempfile.TemporaryDirectory(prefix="d2c-fuzz-", dir=SCRATCH) as tmp:
        path = _write(tmp, bytes(data))
        got_header, arrays = read_weights(path, fx.graph)
        assert got_header == header
        original = np.concatenate([fx.arrays[n.index][p.name].astype("<f4").ravel()
                                   for n in fx.graph.nodes for p in n.params])
        if header.transpose:  # [connected] matrices are stored transposed: compare raw file order
            loaded = np.frombuffer(bytes(data), "<f4", offset=header.size)
            original = np.frombuffer(fx.files[k], "<f4", offset=header.size)
        else:
            loaded = np.concatenate([arrays[n.index][p.name].ravel() for n in fx.graph.nodes for p in n.params])
        changed = set(np.flatnonzero(loaded.view(np.uint32) != original.view(np.uint32)).tolist())
        assert changed <= touched
        event("non-finite value loaded" if not np.isfinite(loaded).all() else "finite values")


@fuzz_settings(400)
@given(case=fixture_and_header,
       edits=st.lists(st.tuples(st.integers(0, 19), st.integers(0, 255)), min_size=1, max_size=6),
       allow_trailing=st.booleans())
def test_fuzz_garbled_header_loads_or_raises_weights_error(case: tuple[str, int], edits: list[tuple[int, int]],
                                                            allow_trailing: bool) -> None:
    """A garbled version can change the header size (16/20 bytes) and the [connected] layout."""
    fx, k = FIXTURES[case[0]], case[1]
    data = bytearray(fx.files[k])
    for pos, value in edits:
        data[pos] = value
    with tempfile.TemporaryDirectory(prefix="d2c-fuzz-", dir=SCRATCH) as tmp:
        path = _write(tmp, bytes(data))
        try:
            header, arrays = read_weights(path, fx.graph, allow_trailing=allow_trailing)
        except WeightsError as exc:
            _check_named(exc, path)
            event("refused")
            return
        assert set(arrays) == {n.index for n in fx.graph.nodes}
        for node in fx.graph.nodes:
            for spec in node.params:
                assert arrays[node.index][spec.name].shape == spec.shape
        event("loaded")


@fuzz_settings(300)
@given(name=st.sampled_from(sorted(FIXTURES)), data=st.one_of(
    st.binary(max_size=300), st.just(b""), st.binary(min_size=16, max_size=16), st.binary(min_size=20, max_size=20)))
def test_fuzz_random_bytes_as_weights(name: str, data: bytes) -> None:
    fx = FIXTURES[name]
    with tempfile.TemporaryDirectory(prefix="d2c-fuzz-", dir=SCRATCH) as tmp:
        path = _write(tmp, data)
        try:
            read_weights(path, fx.graph)
            event("loaded (length matched by chance)")
        except WeightsError as exc:
            _check_named(exc, path)
            event("refused")


file_ops = st.lists(st.tuples(st.sampled_from(["truncate", "insert", "delete", "overwrite"]),
                              st.floats(0.0, 1.0, exclude_max=True), st.binary(min_size=1, max_size=16)),
                    min_size=1, max_size=4)


def test_fuzz_convert_with_mutated_weights_converts_or_raises_d2c_error() -> None:
    """The whole pipeline (convert into a directory) with a mutated weights file."""
    counts: Counter = Counter()

    @fuzz_settings(200)
    @given(case=fixture_and_header, ops=file_ops, allow_trailing=st.booleans())
    def check(case: tuple[str, int], ops: list[tuple], allow_trailing: bool) -> None:
        fx, k = FIXTURES[case[0]], case[1]
        with tempfile.TemporaryDirectory(prefix="d2c-fuzz-", dir=SCRATCH) as tmp:
            path = _write(tmp, mutate_bytes(fx.files[k], ops))
            out = Path(tmp) / "out"
            try:
                report = convert(fx.cfg, path, out, allow_trailing=allow_trailing)
            except D2CError as exc:
                _check_named(exc, path)
                assert not out.exists(), "a failed convert left the output directory behind"
                counts["refused"] += 1
                event("refused")
                return
            assert sorted(p.name for p in out.iterdir()) == sorted(
                p.name for p in (report.caffemodel, report.prototxt, report.sidecar))
            counts["converted"] += 1
            event("converted")

    check()
    assert counts["refused"] > 0 and counts["converted"] > 0, counts
