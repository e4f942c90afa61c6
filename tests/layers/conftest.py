"""Shared machinery of the per-layer tier: one tiny cfg, converted and run in every engine.

Each test writes a small cfg, converts it with d2c (random but well-conditioned weights, also
written as a .weights file), and runs the same input through
  * pycaffe (the emitted prototxt + caffemodel, as written to disk),
  * OpenCV's Caffe importer (cv2.dnn.readNetFromCaffe on the same two files),
  * the real Darknet (Debian's pjreddie libdarknet.so, in its own process, which keeps its
    FTZ/DAZ floating-point mode out of this one) for sections pjreddie has, and
  * OpenCV's Darknet importer (cv2.dnn.readNetFromDarknet on the same cfg + .weights) for
    AlexeyAB-only constructs it supports.
A missing engine fails the test; nothing here skips.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

os.environ.setdefault("GLOG_minloglevel", "2")

from d2c.caffe.emitter import ConvertOptions  # noqa: E402
from d2c.caffe.proto import CaffeNet, to_prototxt, write_caffemodel  # noqa: E402
from d2c.convert import Conversion, build_conversion  # noqa: E402
from d2c.darknet.cfg import parse_cfg  # noqa: E402
from d2c.darknet.graph import Graph, build_graph  # noqa: E402
from d2c.darknet.weights import WeightsHeader, random_weights, write_weights  # noqa: E402

# Tolerances (explicit, one place). Relative to each blob's magnitude: |a - e| <= RTOL*|e| + ATOL*max|e|.
RTOL = 1e-5            # float32 GEMM order / FMA / exp differences are ~1e-7..1e-6 relative
ATOL_SCALE = 1e-5      # absolute slack, as a fraction of the largest magnitude in the blob
EXACT = 0.0            # data movement only (reorg, route, upsample, dropout): must be bit-identical


def net_header(channels: int, height: int, width: int, batch: int = 2) -> str:
    """A [net] section with the given input and batch (subdivisions 1)."""
    return (f"[net]\nbatch={batch}\nsubdivisions=1\nwidth={width}\nheight={height}\n"
            f"channels={channels}\n\n")


def section(kind: str, **keys: Any) -> str:
    """One cfg section from keyword arguments (values written as Darknet expects them)."""
    lines = [f"[{kind}]"]
    for key, value in keys.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n\n"


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str, *, rtol: float = RTOL,
                 atol_scale: float = ATOL_SCALE) -> None:
    """Shape-checked comparison with a tolerance scaled to the expected blob's magnitude."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != expected {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    atol = atol_scale * scale
    err = np.abs(actual - expected)
    bound = atol + rtol * np.abs(expected)
    worst = int(np.argmax(err - bound)) if err.size else 0
    assert np.all(err <= bound), (
        f"{what}: max abs err {err.max():.3g} (bound {bound.flat[worst]:.3g} at flat index {worst}, "
        f"actual {actual.flat[worst]:.8g}, expected {expected.flat[worst]:.8g}, blob max {scale:.3g})")


def max_rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |a - e| / max |e|: the number negative checks compare against a threshold."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return float("inf")
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


# --------------------------------------------------------------------------------------------
# Engines
# --------------------------------------------------------------------------------------------

def _caffe() -> Any:
    try:
        from d2c.engines import import_caffe
        return import_caffe()
    except Exception as exc:  # a missing engine is a failure, never a skip
        pytest.fail(f"pycaffe is not usable: {exc}")


def _cv2() -> Any:
    try:
        from d2c.engines import import_cv2
        return import_cv2()
    except Exception as exc:
        pytest.fail(f"OpenCV is not usable: {exc}")


def _darknet_process() -> Any:
    try:
        from d2c.darknet.runtime import DarknetProcess
    except ImportError as exc:
        pytest.fail(f"d2c.darknet.runtime.DarknetProcess is not importable: {exc}")
    return DarknetProcess


# The Debian (pjreddie) make_batchnorm_layer never allocates l.x / l.x_norm on the CPU, yet
# forward_batchnorm_layer copies its input into l.x on every call: a stand-alone [batchnorm]
# segfaults the real Darknet even at inference. Inference never *reads* those buffers, so the
# child below gives them scratch memory before forward; everything Darknet computes is unchanged.
_BN_SCRATCH_CHILD = r"""
import ctypes, sys
import numpy as np
from d2c.darknet.runtime import DarknetNet
cfg, weights, x_path, out_path = sys.argv[1:5]
x = np.load(x_path)
with DarknetNet(cfg, weights, batch=x.shape[0], quiet=True) as net:
    libc = ctypes.CDLL(None)
    libc.calloc.restype = ctypes.c_void_p
    for i in range(net.n_layers):
        layer = net.net.layers[i]
        if net.lib.layer_type(layer.type) == "BATCHNORM" and not layer.x:
            count = layer.outputs * layer.batch
            for name in ("x", "x_norm"):   # calloc'd: free_network frees them like its own
                setattr(layer, name, ctypes.cast(libc.calloc(count, 4), type(layer.x)))
    net.forward(x)
    np.savez(out_path, *[net.layer_output(i) for i in range(net.n_layers)])
"""


def run_darknet_with_bn_scratch(cfg: Path, weights: Path, x: np.ndarray, directory: Path) -> list[np.ndarray]:
    """Every layer's output from the real Darknet in a child process, with [batchnorm] scratch buffers."""
    import subprocess
    import sys
    x_path, out_path = directory / "darknet_input.npy", directory / "darknet_outputs.npz"
    np.save(x_path, x)
    done = subprocess.run([sys.executable, "-c", _BN_SCRATCH_CHILD, str(cfg), str(weights), str(x_path),
                           str(out_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"Darknet child failed ({done.returncode}): {done.stderr[-2000:]}"
    with np.load(out_path) as saved:
        return [saved[f"arr_{k}"] for k in range(len(saved.files))]


def write_net(net: CaffeNet, directory: Path, stem: str) -> tuple[Path, Path]:
    """prototxt + caffemodel on disk, exactly as `d2c convert` writes them."""
    directory.mkdir(parents=True, exist_ok=True)
    prototxt, caffemodel = directory / f"{stem}.prototxt", directory / f"{stem}.caffemodel"
    prototxt.write_text(to_prototxt(net))
    write_caffemodel(net, caffemodel)
    return prototxt, caffemodel


def run_pycaffe(prototxt: Path, caffemodel: Path, x: np.ndarray, blobs: list[str]) -> dict[str, np.ndarray]:
    """Forward `x` in pycaffe (TEST phase) and copy out the named blobs."""
    caffe = _caffe()
    net = caffe.Net(str(prototxt), str(caffemodel), caffe.TEST)
    assert net.blobs["data"].data.shape == x.shape, (net.blobs["data"].data.shape, x.shape)
    net.blobs["data"].data[...] = x
    net.forward()
    return {b: net.blobs[b].data.copy() for b in blobs}


def last_writer(net: CaffeNet, blob: str) -> str:
    """OpenCV names outputs by layer, not blob: the last layer that writes `blob` holds its final value."""
    writers = [layer.name for layer in net.layers if blob in layer.top]
    assert writers, f"no layer writes blob {blob}"
    return writers[-1]


# OpenCV's Darknet importer names an activation after the *next* Darknet index (conv_2 is followed
# by mish_3), every other layer after its own index (conv_2, bn_2, shortcut_9, slice_5...).
OPENCV_ACTIVATION_NAMES = frozenset({"leaky", "relu", "mish", "swish", "logistic", "tanh", "elu", "selu",
                                     "gelu", "relu6", "hswish", "hard_mish", "hardtanh", "linear"})


def opencv_darknet_layers(names: list[str]) -> dict[int, str]:
    """Darknet index -> the last OpenCV layer that computes its output (from getLayerNames order)."""
    owners: dict[int, str] = {}
    current = -1
    for name in names:
        prefix, _, suffix = name.rpartition("_")
        if prefix in OPENCV_ACTIVATION_NAMES or not suffix.isdigit():
            owners[current] = name
            continue
        current = int(suffix)
        owners[current] = name
    return owners


def run_opencv_caffe(net: CaffeNet, prototxt: Path, caffemodel: Path, x: np.ndarray,
                     blobs: list[str], *, fusion: bool = True) -> dict[str, np.ndarray]:
    """Forward `x` with cv2.dnn.readNetFromCaffe on the written files; outputs per blob name.

    OpenCV 4.x returns wrong values when asked for an *intermediate* output that its layer
    fusion swallowed (e.g. a Scale fused into a BatchNorm that feeds another BatchNorm), so
    per-layer comparisons run with fusion off and the net's real outputs with fusion on."""
    cv2 = _cv2()
    model = cv2.dnn.readNetFromCaffe(str(prototxt), str(caffemodel))
    model.enableFusion(fusion)
    model.setInput(x)
    names = [last_writer(net, b) for b in blobs]
    outs = model.forward(names)
    return {b: np.asarray(o).copy() for b, o in zip(blobs, outs)}


# --------------------------------------------------------------------------------------------
# One converted test network
# --------------------------------------------------------------------------------------------

@dataclass
class Case:
    """A tiny cfg converted by d2c, with everything needed to run it in each engine."""

    directory: Path
    cfg_path: Path
    weights_path: Path
    graph: Graph
    arrays: dict[int, dict[str, np.ndarray]]
    conversion: Conversion
    prototxt: Path
    caffemodel: Path
    x: np.ndarray
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def net(self) -> CaffeNet:
        return self.conversion.net

    @property
    def flavor(self) -> str:
        return self.graph.flavor

    def blob(self, index: int) -> str:
        return self.conversion.emitter.blob(index)

    def shape(self, index: int) -> tuple[int, int, int, int]:
        return (self.x.shape[0], *self.graph.nodes[index].out_shape)

    @property
    def indices(self) -> list[int]:
        return [n.index for n in self.graph.nodes]

    def caffe(self) -> dict[int, np.ndarray]:
        """pycaffe output of every Darknet layer, by Darknet index, in Darknet's (N, C, H, W) shape."""
        if "caffe" not in self._cache:
            names = sorted({self.blob(i) for i in self.indices})
            got = run_pycaffe(self.prototxt, self.caffemodel, self.x, names)
            self._cache["caffe"] = {i: self._as_darknet(i, got[self.blob(i)]) for i in self.indices}
        return self._cache["caffe"]

    def opencv(self) -> dict[int, np.ndarray]:
        """OpenCV (Caffe importer, fusion off) output of every Darknet layer whose blob is not the input."""
        if "opencv" not in self._cache:
            indices = [i for i in self.indices if self.blob(i) != "data"]
            names = sorted({self.blob(i) for i in indices})
            got = run_opencv_caffe(self.net, self.prototxt, self.caffemodel, self.x, names, fusion=False)
            self._cache["opencv"] = {i: self._as_darknet(i, got[self.blob(i)]) for i in indices}
        return self._cache["opencv"]

    def net_outputs(self) -> list[str]:
        """Blobs no Caffe layer reads: what a user of the converted model gets."""
        read = {b for layer in self.net.layers for b in layer.bottom}
        tops = [t for layer in self.net.layers for t in layer.top]
        return sorted({t for t in tops if t not in read})

    def opencv_fused(self) -> dict[int, np.ndarray]:
        """OpenCV with its default layer fusion, for the layers whose blob is a net output."""
        if "opencv_fused" not in self._cache:
            outputs = set(self.net_outputs())
            indices = [i for i in self.indices if self.blob(i) in outputs]
            got = run_opencv_caffe(self.net, self.prototxt, self.caffemodel, self.x,
                                   sorted({self.blob(i) for i in indices}), fusion=True)
            self._cache["opencv_fused"] = {i: self._as_darknet(i, got[self.blob(i)]) for i in indices}
        return self._cache["opencv_fused"]

    def darknet(self, *, any_flavor: bool = False) -> dict[int, np.ndarray]:
        """The real (pjreddie) Darknet's output of every layer, same cfg, .weights and input."""
        if "darknet" not in self._cache:
            assert any_flavor or self.flavor == "pjreddie", \
                "the Debian Darknet is pjreddie's; use opencv_darknet() for AlexeyAB cfgs"
            if any(node.kind == "batchnorm" for node in self.graph.nodes):
                raw = run_darknet_with_bn_scratch(self.cfg_path, self.weights_path, self.x, self.directory)
            else:
                process_cls = _darknet_process()
                with process_cls(str(self.cfg_path), str(self.weights_path), batch=self.x.shape[0]) as dn:
                    dn.forward(self.x)
                    raw = [np.asarray(dn.layer_output(i)) for i in self.indices]
            self._cache["darknet"] = {i: self._as_darknet(i, raw[i]) for i in self.indices}
        return self._cache["darknet"]

    def opencv_darknet(self, index: int) -> np.ndarray:
        """Layer `index`'s output from cv2.dnn.readNetFromDarknet on the same cfg + .weights.

        All layers are run once and cached; the shape check happens per requested layer, since
        OpenCV's importer gets some layers' shapes wrong (e.g. route groups over several inputs).
        One image at a time: OpenCV 4.x's Darknet importer mis-shapes scale_channels for batches > 1."""
        if "opencv_darknet" not in self._cache:
            cv2 = _cv2()
            model = cv2.dnn.readNetFromDarknet(str(self.cfg_path), str(self.weights_path))
            owners = opencv_darknet_layers(list(model.getLayerNames()))
            wanted = [i for i in self.indices if i in owners]
            per_image: list[list[np.ndarray]] = []
            for image in self.x:
                model.setInput(image[None])
                per_image.append([np.asarray(o).copy() for o in model.forward([owners[i] for i in wanted])])
            self._cache["opencv_darknet"] = {
                i: np.concatenate([outs[k] for outs in per_image], axis=0) for k, i in enumerate(wanted)}
        raw = self._cache["opencv_darknet"]
        assert index in raw, f"OpenCV's Darknet importer has no output for layer {index}"
        return self._as_darknet(index, raw[index])

    def _as_darknet(self, index: int, data: np.ndarray) -> np.ndarray:
        """Darknet's flat per-image buffer (or a Caffe blob) as (N, C, H, W) float32."""
        shape = self.shape(index)
        assert data.size == int(np.prod(shape)), f"layer {index}: {data.shape} has {data.size} values, " \
                                                 f"Darknet's shape is {shape}"
        return np.asarray(data, np.float32).reshape(shape)

    def with_net(self, net: CaffeNet, stem: str) -> Callable[[list[int]], dict[int, np.ndarray]]:
        """Write a modified Caffe net beside this case and return a pycaffe runner for it (negative checks)."""
        prototxt, caffemodel = write_net(net, self.directory, stem)

        def run(indices: list[int]) -> dict[int, np.ndarray]:
            names = {self.blob(i) for i in indices}
            got = run_pycaffe(prototxt, caffemodel, self.x, sorted(names))
            return {i: got[self.blob(i)] for i in indices}
        return run


def make_input(shape: tuple[int, ...], seed: int = 1, kind: str = "normal") -> np.ndarray:
    """Test input: normal(0, 1) (signs matter for activations) or uniform [0, 1) like an image."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return rng.random(shape, dtype=np.float32)
    return rng.standard_normal(shape).astype(np.float32)


def build_case(directory: Path, cfg_text: str, *, flavor: str | None = None, seed: int = 0,
               batch: int = 2, fold_bn: bool = False, input_kind: str = "normal",
               arrays: dict[int, dict[str, np.ndarray]] | None = None,
               header: WeightsHeader | None = None) -> Case:
    """Write the cfg, convert it, write .weights and the Caffe files; nothing is run yet."""
    directory.mkdir(parents=True, exist_ok=True)
    cfg_path = directory / "net.cfg"
    cfg_path.write_text(cfg_text)
    graph = build_graph(parse_cfg(cfg_path), flavor)
    arrays = arrays if arrays is not None else random_weights(graph, seed)
    header = header or WeightsHeader()
    weights_path = directory / "net.weights"
    write_weights(weights_path, header, graph, arrays)
    options = ConvertOptions(flavor=graph.flavor, fold_bn=fold_bn, batch=batch)
    conversion = build_conversion(graph, arrays, header, options, name="net")
    prototxt, caffemodel = write_net(conversion.net, directory, "net")
    x = make_input((batch, graph.net.channels, graph.net.height, graph.net.width), seed + 1, input_kind)
    return Case(directory=directory, cfg_path=cfg_path, weights_path=weights_path, graph=graph,
                arrays=arrays, conversion=conversion, prototxt=prototxt, caffemodel=caffemodel, x=x)


@pytest.fixture
def make_case(tmp_path: Path) -> Callable[..., Case]:
    """Factory fixture: make_case(cfg_text, flavor=None, seed=0, batch=2, fold_bn=False, ...)."""
    counter = iter(range(1000))

    def factory(cfg_text: str, **kwargs: Any) -> Case:
        return build_case(tmp_path / f"case{next(counter)}", cfg_text, **kwargs)
    return factory


def check_all_engines(case: Case, *, darknet: bool = True, layers: list[int] | None = None,
                      rtol: float = RTOL, atol_scale: float = ATOL_SCALE) -> dict[int, np.ndarray]:
    """pycaffe vs OpenCV-Caffe for every layer, and pycaffe vs the real Darknet (pjreddie cfgs)."""
    layers = case.indices if layers is None else layers
    caffe_out = case.caffe()
    cv_out, cv_fused = case.opencv(), case.opencv_fused()
    for i in layers:
        if i in cv_out:
            assert_close(cv_out[i], caffe_out[i], f"layer {i} [{case.graph.nodes[i].kind}] OpenCV-Caffe vs pycaffe",
                         rtol=rtol, atol_scale=atol_scale)
        if i in cv_fused:
            assert_close(cv_fused[i], caffe_out[i], f"layer {i} [{case.graph.nodes[i].kind}] OpenCV-Caffe "
                                                    f"(fused net output) vs pycaffe", rtol=rtol, atol_scale=atol_scale)
    if darknet:
        dn = case.darknet()
        for i in layers:
            assert_close(caffe_out[i], dn[i], f"layer {i} [{case.graph.nodes[i].kind}] pycaffe vs Darknet",
                         rtol=rtol, atol_scale=atol_scale)
    return caffe_out


# --------------------------------------------------------------------------------------------
# Bundles: many variants in one network (one Darknet process for a whole parametrized sweep)
# --------------------------------------------------------------------------------------------

IDENTITY_LAYER = section("maxpool", size=1, stride=1)   # layer 0: an exact copy of the input, routable


@dataclass
class Bundle:
    """One network holding independent variants, each `[route] layers=0` + the variant's sections.

    Starting the real Darknet costs ~0.6 s per network, so a parametrized sweep converts and runs
    one bundle per module and each parametrized test checks its own variant's layers."""

    case: Case
    spans: dict[str, list[int]]

    def layers(self, name: str) -> list[int]:
        return self.spans[name]

    def last(self, name: str) -> int:
        return self.spans[name][-1]

    def check(self, name: str, *, darknet: bool | None = None, opencv_darknet: bool = False,
              rtol: float = RTOL, atol_scale: float = ATOL_SCALE) -> dict[int, np.ndarray]:
        """Every layer of variant `name`: pycaffe vs OpenCV-Caffe, vs Darknet (pjreddie), vs OpenCV-Darknet."""
        darknet = self.case.flavor == "pjreddie" if darknet is None else darknet
        out = check_all_engines(self.case, darknet=darknet, layers=self.spans[name], rtol=rtol,
                                atol_scale=atol_scale)
        if opencv_darknet:
            for i in self.spans[name]:
                assert_close(out[i], self.case.opencv_darknet(i), f"{name}: layer {i} [{self.case.graph.nodes[i].kind}] "
                                               f"pycaffe vs OpenCV Darknet importer", rtol=rtol,
                             atol_scale=atol_scale)
        return {i: out[i] for i in self.spans[name]}

    def input_of(self, name: str) -> np.ndarray:
        """The variant's input (the network input, via layer 0 and its route)."""
        return self.case.x


def build_bundle(directory: Path, input_shape: tuple[int, int, int], variants: dict[str, str], *,
                 flavor: str | None = None, seed: int = 0, batch: int = 2, fold_bn: bool = False,
                 input_kind: str = "normal") -> Bundle:
    """Concatenate the variants behind an identity layer 0 and convert them as one network."""
    c, h, w = input_shape
    text = net_header(c, h, w, batch) + IDENTITY_LAYER
    spans: dict[str, list[int]] = {}
    index = 1
    for name, body in variants.items():
        count = sum(1 for line in body.splitlines() if line.strip().startswith("["))
        text += f"# variant {name}\n" + section("route", layers=0) + body
        spans[name] = list(range(index + 1, index + 1 + count))
        index += 1 + count
    case = build_case(directory, text, flavor=flavor, seed=seed, batch=batch, fold_bn=fold_bn,
                      input_kind=input_kind)
    return Bundle(case=case, spans=spans)
