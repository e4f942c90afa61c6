"""Darknet .weights reader and writer: header versions, 32/64-bit `seen`, strict byte count.

Why strict: Darknet silently accepts short or long files and leaves garbage in the missing
parameters. d2c says which layer ran out and how many floats were missing, and refuses
trailing bytes unless asked. Arrays are read through a memory map (no Python lists).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from d2c.darknet.graph import Graph
from d2c.errors import WeightsError
from d2c.fsutil import atomic_write, input_errors
from d2c.layers import REGISTRY


@dataclass
class WeightsHeader:
    major: int = 0
    minor: int = 2
    revision: int = 0
    seen: int = 0

    @property
    def seen_is_64bit(self) -> bool:
        """pjreddie: size_t seen iff major*10+minor >= 2 and both < 1000 (parser.c)."""
        return self.major * 10 + self.minor >= 2 and self.major < 1000 and self.minor < 1000

    @property
    def transpose(self) -> bool:
        """[connected] matrices are stored inputs x outputs when major or minor > 1000."""
        return self.major > 1000 or self.minor > 1000

    @property
    def size(self) -> int:
        return 20 if self.seen_is_64bit else 16

    def pack(self) -> bytes:
        head = struct.pack("<iii", self.major, self.minor, self.revision)
        return head + struct.pack("<Q" if self.seen_is_64bit else "<I", self.seen)


@dataclass
class LayerArrays:
    """The float arrays of one layer, keyed by ParamArray name, Darknet shapes."""

    index: int
    arrays: dict[str, np.ndarray]


def read_header(path: str | Path) -> WeightsHeader:
    """Parse the header only, with clear errors for missing or tiny files."""
    p = Path(path)
    with input_errors(p, "weights", ".weights", WeightsError), open(p, "rb") as handle:
        raw = handle.read(20)
    if len(raw) < 12:
        raise WeightsError(f"{p}: {len(raw)} bytes is too short for a Darknet header (needs 16 or 20)")
    major, minor, revision = struct.unpack("<iii", raw[:12])
    header = WeightsHeader(major, minor, revision)
    if len(raw) < header.size:
        raise WeightsError(f"{p}: header version {major}.{minor}.{revision} needs {header.size} bytes, "
                           f"file has {len(raw)}")
    header.seen = struct.unpack("<Q" if header.seen_is_64bit else "<I", raw[12:header.size])[0]
    return header


def read_weights(path: str | Path, graph: Graph, *, allow_trailing: bool = False,
                 upto: int | None = None, trailing_hint: str = "use --allow-trailing to accept"
                 ) -> tuple[WeightsHeader, dict[int, dict[str, np.ndarray]]]:
    """Map every layer's arrays (views into a read-only memory map) in cfg order.

    `upto` mirrors Darknet's load_weights_upto / partial loading: only layers < upto are read,
    and the rest of the file is not checked. `trailing_hint` is how the calling command accepts
    extra bytes. When the size does not fit and the cfg has unknown keys, those are the likelier
    cause (`filtres=16` leaves the default filter count), so the error names them first.
    """
    try:
        return _read_weights(path, graph, allow_trailing, upto, trailing_hint)
    except WeightsError as exc:
        if not graph.unknown_keys or "trailing" not in str(exc) and "ran out" not in str(exc):
            raise
        raise WeightsError(f"{graph.cfg.path}: the cfg has {len(graph.unknown_keys)} unknown key(s), and "
                           f"{Path(path).name} does not fit the network they leave: fix the cfg first "
                           f"(a misspelt key keeps its default)", [*graph.unknown_keys, str(exc)]) from None


def _read_weights(path: str | Path, graph: Graph, allow_trailing: bool, upto: int | None,
                  trailing_hint: str) -> tuple[WeightsHeader, dict[int, dict[str, np.ndarray]]]:
    p = Path(path)
    header = read_header(p)
    file_size = p.stat().st_size
    data = np.memmap(p, dtype=np.uint8, mode="r") if file_size else np.zeros(0, np.uint8)
    offset = header.size
    out: dict[int, dict[str, np.ndarray]] = {}
    for node in graph.nodes:
        if upto is not None and node.index >= upto:
            break
        arrays: dict[str, np.ndarray] = {}
        converter = REGISTRY[node.kind]
        for spec in node.params:
            nbytes = spec.count * 4
            if offset + nbytes > file_size:
                left_in_layer = sum(s.count for s in node.params) - sum(a.size for a in arrays.values())
                have = max(0, file_size - offset) // 4
                expected = header.size + 4 * sum(n.param_count() for n in graph.nodes
                                                 if upto is None or n.index < upto)
                raise WeightsError(
                    f"{p}: ran out in layer {node.index} [{node.section.raw_type}] "
                    f"({node.section.path}:{node.section.line}) while reading '{spec.name}': "
                    f"{left_in_layer - have} float(s) of this layer missing; the file is "
                    f"{expected - file_size} bytes short of the {expected} this cfg needs")
            arrays[spec.name] = converter.read_array(node, spec, data[offset:offset + nbytes].view("<f4"), header)
            offset += nbytes
        out[node.index] = arrays
    if upto is None and offset != file_size and not allow_trailing:
        raise WeightsError(f"{p}: {file_size - offset} trailing byte(s) after the last layer "
                           f"(expected {offset} bytes for this cfg, file has {file_size}); "
                           f"wrong cfg? {trailing_hint}")
    return header, out


def write_weights(path: str | Path, header: WeightsHeader, graph: Graph,
                  arrays: dict[int, dict[str, np.ndarray]]) -> None:
    """Write arrays in Darknet order, atomically; every array must be present with its shape."""
    with atomic_write(path) as handle:
        handle.write(header.pack())
        for node in graph.nodes:
            layer = arrays.get(node.index, {})
            for spec in node.params:
                if spec.name not in layer:
                    raise WeightsError(f"{path}: no '{spec.name}' for layer {node.index} [{node.kind}]")
                arr = np.asarray(layer[spec.name], dtype="<f4")
                if arr.size != spec.count:
                    raise WeightsError(f"{path}: layer {node.index} '{spec.name}' has {arr.size} floats, "
                                       f"expected {spec.count} {spec.shape}")
                arr = REGISTRY[node.kind].write_array(node, spec, arr, header)
                handle.write(np.ascontiguousarray(arr).tobytes())


def random_weights(graph: Graph, seed: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """Seeded, well-conditioned weights: He-scaled convs and BN statistics that keep activations O(1).

    Darknet's own random init leaves rolling_variance at 0 (division by 1e-6 at inference), which
    is useless for comparisons; these keep every layer's output in a sane range even for deep nets.
    """
    rng = np.random.default_rng(seed)
    out: dict[int, dict[str, np.ndarray]] = {}
    for node in graph.nodes:
        arrays: dict[str, np.ndarray] = {}
        for spec in node.params:
            n = spec.shape[0]
            if spec.name == "weights":
                fan_in = max(1, spec.count // n)
                arr = rng.standard_normal(spec.shape) * np.sqrt(1.0 / fan_in)
            elif spec.name == "biases":
                arr = rng.uniform(-0.1, 0.1, spec.shape)
            elif spec.name == "scales":
                arr = rng.uniform(0.5, 1.5, spec.shape)
            elif spec.name == "rolling_mean":
                arr = rng.uniform(-0.2, 0.2, spec.shape)
            elif spec.name == "rolling_variance":
                arr = rng.uniform(0.5, 2.0, spec.shape)
            else:
                arr = rng.standard_normal(spec.shape) * 0.1
            arrays[spec.name] = arr.astype(np.float32)
        out[node.index] = arrays
    return out
