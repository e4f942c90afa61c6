"""The .weights reader: header versions, exact byte count, clear errors, exact round trip."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import build_graph
from d2c.darknet.weights import WeightsHeader, random_weights, read_header, read_weights, write_weights
from d2c.errors import WeightsError

ROOT = Path(__file__).resolve().parents[1]
TINY_CFG = Path("/usr/share/darknet/cfg/yolov3-tiny.cfg")
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"
SMALL = "[net]\nwidth=8\nheight=8\nchannels=3\n[convolutional]\nfilters=4\nsize=3\npad=1\nbatch_normalize=1\n" \
        "activation=leaky\n[convolutional]\nfilters=2\nsize=1\nactivation=linear\n"


@pytest.fixture()
def small_graph(tmp_path: Path):
    path = tmp_path / "small.cfg"
    path.write_text(SMALL)
    return build_graph(parse_cfg(path))


@pytest.mark.parametrize("major, minor, seen_bytes", [(0, 2, 8), (0, 1, 4), (1000, 2, 4), (0, 5, 8), (1, 0, 8)])
def test_header_versions(tmp_path: Path, major: int, minor: int, seen_bytes: int) -> None:
    seen = 12345
    raw = struct.pack("<iii", major, minor, 0) + (struct.pack("<Q", seen) if seen_bytes == 8 else struct.pack("<I", seen))
    (tmp_path / "h.weights").write_bytes(raw)
    header = read_header(tmp_path / "h.weights")
    assert header.seen == seen and header.size == 12 + seen_bytes
    assert header.pack() == raw


def test_roundtrip_is_byte_identical(tmp_path: Path, small_graph) -> None:
    arrays = random_weights(small_graph, seed=3)
    header = WeightsHeader(0, 2, 0, seen=64000)
    write_weights(tmp_path / "a.weights", header, small_graph, arrays)
    h2, back = read_weights(tmp_path / "a.weights", small_graph)
    assert h2 == header
    for index, layer in arrays.items():
        for name, arr in layer.items():
            np.testing.assert_array_equal(back[index][name], arr)
    write_weights(tmp_path / "b.weights", h2, small_graph, back)
    assert (tmp_path / "a.weights").read_bytes() == (tmp_path / "b.weights").read_bytes()
    expected = 20 + 4 * small_graph.param_count()
    assert (tmp_path / "a.weights").stat().st_size == expected


def test_short_file_names_layer_and_missing_count(tmp_path: Path, small_graph) -> None:
    write_weights(tmp_path / "a.weights", WeightsHeader(), small_graph, random_weights(small_graph))
    data = (tmp_path / "a.weights").read_bytes()
    (tmp_path / "short.weights").write_bytes(data[:-12])  # 3 floats short, inside layer 1's weights
    with pytest.raises(WeightsError) as info:
        read_weights(tmp_path / "short.weights", small_graph)
    message = str(info.value)
    assert "layer 1 [convolutional]" in message and "'weights'" in message
    assert "3 float(s) of this layer missing" in message and "12 bytes short" in message


def test_trailing_bytes_are_an_error_unless_allowed(tmp_path: Path, small_graph) -> None:
    write_weights(tmp_path / "a.weights", WeightsHeader(), small_graph, random_weights(small_graph))
    with open(tmp_path / "a.weights", "ab") as handle:
        handle.write(b"\0" * 8)
    with pytest.raises(WeightsError, match="8 trailing byte"):
        read_weights(tmp_path / "a.weights", small_graph)
    read_weights(tmp_path / "a.weights", small_graph, allow_trailing=True)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", b"\0" * 12 + b"\x05"])
def test_tiny_files(tmp_path: Path, small_graph, content: bytes) -> None:
    (tmp_path / "t.weights").write_bytes(content)
    with pytest.raises(WeightsError):
        read_weights(tmp_path / "t.weights", small_graph)


def test_real_yolov3_tiny_weights_match_the_cfg_exactly() -> None:
    graph = build_graph(parse_cfg(TINY_CFG))
    header, arrays = read_weights(TINY_WEIGHTS, graph)
    assert (header.major, header.minor) == (0, 2)
    assert TINY_WEIGHTS.stat().st_size == 20 + 4 * graph.param_count()
    first = arrays[0]
    assert first["weights"].shape == (16, 3, 3, 3)
    assert np.all(first["rolling_variance"] > 0)
