"""Per-layer forward comparison: real Darknet (child process) against the converted Caffe net.

Why here and not in a test: `d2c parity` step 1, the whole-model tests and the README's parity
table all need the same thing: the same cfg, weights and input in both engines, and every
Darknet layer's output set against the Caffe blob that carries it.
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2c.caffe.emitter import DEPLOY, ConvertOptions
from d2c.caffe.runtime import caffe_forward, load_caffe, opencv_forward
from d2c.convert import Conversion, build_conversion
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import Graph, build_graph
from d2c.darknet.weights import WeightsHeader, random_weights, read_weights, write_weights
from d2c.darknet.node import Node


@dataclass
class LayerDiff:
    index: int
    kind: str
    shape: tuple[int, ...]
    max_abs: float
    max_rel: float          # max |a-b| / max |darknet| over the blob
    magnitude: float


@dataclass
class ForwardReport:
    cfg: str
    flavor: str
    layers: list[LayerDiff] = field(default_factory=list)
    opencv: dict[str, float] = field(default_factory=dict)   # head blob -> max rel vs pycaffe

    @property
    def max_rel(self) -> float:
        return max((d.max_rel for d in self.layers), default=0.0)

    @property
    def max_abs(self) -> float:
        return max((d.max_abs for d in self.layers), default=0.0)

    def to_json(self) -> dict[str, Any]:
        return {"cfg": self.cfg, "flavor": self.flavor, "max_rel": self.max_rel, "max_abs": self.max_abs,
                "layers": [asdict(d) for d in self.layers], "opencv": self.opencv}


def diff(reference: np.ndarray, other: np.ndarray) -> tuple[float, float, float]:
    """(max abs, max abs relative to the reference's magnitude, magnitude)."""
    ref = reference.astype(np.float64)
    err = float(np.max(np.abs(ref - other.reshape(ref.shape).astype(np.float64)))) if ref.size else 0.0
    mag = float(np.max(np.abs(ref))) if ref.size else 0.0
    return err, err / mag if mag > 0 else err, mag


def head_forward(node: Node, z: np.ndarray, graph: Graph) -> np.ndarray:
    """Darknet's in-layer activation of a [yolo]/[region] head, applied to the raw Caffe blob."""
    from d2c.head_params import head_params
    from d2c.loss.region import region_forward
    from d2c.loss.yolo import yolo_forward

    params = head_params(node.kind, node.attrs, graph.net.width, graph.net.height, graph.flavor)
    if node.kind == "yolo":
        return yolo_forward(z, params)
    return region_forward(z, params)


def random_input(graph: Graph, batch: int, seed: int) -> np.ndarray:
    """A seeded input in Darknet's range: RGB planes in [0, 1]."""
    rng = np.random.default_rng(seed)
    shape = (batch, graph.net.channels, graph.net.height, graph.net.width)
    return rng.uniform(0.0, 1.0, shape).astype(np.float32)


def with_input_size(cfg_path: str | Path, width: int, height: int, directory: Path) -> Path:
    """A copy of the cfg with another [net] width/height (same layers), for fast checks of deep nets."""
    lines = Path(cfg_path).read_text().split("\n")
    out, in_net = [], False
    for line in lines:
        stripped = "".join(line.split())
        if stripped.startswith("["):
            in_net = stripped in ("[net]", "[network]")
        key = stripped.split("=", 1)[0]
        if in_net and key == "width":
            line = f"width={width}"
        elif in_net and key == "height":
            line = f"height={height}"
        out.append(line)
    path = directory / Path(cfg_path).name
    path.write_text("\n".join(out))
    return path


def prepare(cfg_path: str | Path, weights_path: str | Path | None, directory: Path, *, seed: int = 0,
            flavor: str | None = None) -> tuple[Graph, WeightsHeader, dict, Path]:
    """Graph, header, arrays and a weights file Darknet can load (random weights written out)."""
    graph = build_graph(parse_cfg(cfg_path), flavor)
    if weights_path is None:
        header, arrays = WeightsHeader(), random_weights(graph, seed)
        weights_path = directory / "random.weights"
        write_weights(weights_path, header, graph, arrays)
    else:
        header, arrays = read_weights(weights_path, graph)
    return graph, header, arrays, Path(weights_path)


def compare_forward(cfg_path: str | Path, weights_path: str | Path | None = None, *, batch: int = 1,
                    seed: int = 0, x: np.ndarray | None = None, fold_bn: bool = False,
                    with_opencv: bool = True, engine: str = "debian") -> ForwardReport:
    """Run Darknet (`engine`: debian or alexeyab) and Caffe on the same input and compare every layer."""
    from d2c.darknet.runtime import DarknetProcess

    with tempfile.TemporaryDirectory(prefix="d2c-fwd-") as tmp:
        # The engine decides the semantics (BN epsilon, ...): AlexeyAB's engine runs every cfg its way.
        flavor = "alexeyab" if engine == "alexeyab" else None
        graph, header, arrays, wpath = prepare(cfg_path, weights_path, Path(tmp), seed=seed, flavor=flavor)
        x = random_input(graph, batch, seed) if x is None else x.astype(np.float32)
        batch = x.shape[0]
        conv = build_conversion(graph, arrays, header, ConvertOptions(flavor=graph.flavor, fold_bn=fold_bn,
                                                                      mode=DEPLOY, batch=batch))
        with DarknetProcess(cfg_path, wpath, batch=batch, engine=engine) as dn:
            dn.forward(x)
            outputs = {node.index: dn.layer_output(node.index) for node in graph.nodes}
        report = compare_outputs(graph, conv, outputs, x)
        if with_opencv and batch == 1:
            caffe_blobs = caffe_forward(load_caffe(conv.net), {"data": x})
            heads = [h.blob for h in conv.emitter.heads]
            cv = opencv_forward(conv.net, x, heads)
            report.opencv = {b: diff(caffe_blobs[b], cv[b])[1] for b in heads}
        return report


def compare_outputs(graph: Graph, conv: Conversion, darknet_outputs: dict[int, np.ndarray],
                    x: np.ndarray) -> ForwardReport:
    """Compare Darknet's per-layer outputs with the Caffe blobs of `conv` on input `x`."""
    net = load_caffe(conv.net)
    blobs = caffe_forward(net, {"data": x})
    report = ForwardReport(cfg=str(graph.cfg.path), flavor=graph.flavor)
    for node in graph.nodes:
        ours = blobs[conv.emitter.blob(node.index)]
        if node.kind in ("yolo", "region"):
            ours = head_forward(node, ours, graph)
        theirs = darknet_outputs[node.index]
        err, rel, mag = diff(theirs, ours)
        report.layers.append(LayerDiff(node.index, node.kind, tuple(theirs.shape), err, rel, mag))
    return report


def format_table(report: ForwardReport) -> str:
    """Layer, shape, max abs, max rel: one line each."""
    lines = [f"{'layer':>5}  {'type':14s} {'shape':22s} {'max abs':>10s} {'max rel':>10s}"]
    for d in report.layers:
        lines.append(f"{d.index:5d}  {d.kind:14s} {str(d.shape):22s} {d.max_abs:10.3g} {d.max_rel:10.3g}")
    return "\n".join(lines)
