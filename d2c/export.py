"""`d2c export`: a Caffe model written by d2c (deploy or train, snapshot or not) -> Darknet .weights.

Why exact: a model trained or fine-tuned in Caffe must ship to Darknet without a numeric drift,
and the round trip `export(convert(w))` must give back `w` byte for byte, so any difference a
user sees is training, never the tooling.

How the Caffe blobs map back is each converter's `export` (d2c/layers/*.py: which Caffe layers
hold which arrays, and the naming convention `layer{index:03d}_*`, are theirs); this module gives
them a ModelReader with checked access to the caffemodel's layers and the inversion of a stock
BatchNorm's statistics. Layer types without Darknet parameters export nothing (fixed helper blobs
are not exported).

BatchNorm statistics, by the form the model stores them in:
- `_dbn` (exact training layer): raw Darknet rolling mean and variance; copied.
- `_bn` with use_global_stats false (stock training BN): sums kept with a factor s (100 when
  converted); rolling = blob / s.
- `_bn` with global stats (deploy, frozen): Caffe divides by sqrt(var'/s + eps). pjreddie's
  Darknet divides by sqrt(var) + 1e-6, and convert stored var' = (sqrt(var) + 1e-6)^2 - 1e-12
  in float32. We invert in float64 and then pick the float32 var whose forward mapping (the very
  function convert uses) reproduces the stored var', searching neighbouring floats; among
  several preimages the one nearest the float64 inverse wins (0 when var' is 0: Darknet's
  untrained value). AlexeyAB's var is stored as is. A BN whose eps or factor is not d2c's is
  inverted so that Darknet's denominator equals Caffe's.
The forward map is not injective everywhere (float32 var' sometimes has a coarser grid than
var, and every var below ~1e-29 maps to 0), so a few values (~3 in 10^6 uniform variances) have
several preimages. `exact_variance_overrides` lists those; when a sidecar carries them under
"bn_exact" (and the stored var' still matches), export uses them and the round trip is exact
for every value.

BN-folded models export as conv/connected without BN, and a cfg with `batch_normalize=0` on
those sections is written next to the .weights (Darknet must be told the file has no BN arrays).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2c.caffe.proto import CaffeLayer, read_caffemodel_net
from d2c.darknet.cfg import parse_cfg, read_cfg_text
from d2c.darknet.graph import Graph, build_graph
from d2c.darknet.weights import WeightsHeader, write_weights
from d2c.errors import D2CError, WeightsError
from d2c.fsutil import atomic_write_text
from d2c.darknet.node import Node
from d2c.layers import REGISTRY
from d2c.layers.convolutional import CAFFE_TINY_EPS, caffe_bn_blobs
from d2c.numerics import ALEXEYAB_EPS_INSIDE, PJREDDIE_EPS_OUTSIDE

F32 = np.float32
F64 = np.float64

#: Arrays of one Darknet layer, keyed by ParamArray name, in Darknet shapes.
LayerArrays = dict[str, np.ndarray]



# --------------------------------------------------------------------------------------------
# Exact float32 inversion of the BN encodings
# --------------------------------------------------------------------------------------------

@dataclass
class InverseStats:
    """How many values had exactly one preimage, several, or none (nearest float then)."""

    exact: int = 0
    ambiguous: int = 0
    inexact: int = 0
    overridden: int = 0

    def add(self, other: InverseStats) -> None:
        self.exact += other.exact
        self.ambiguous += other.ambiguous
        self.inexact += other.inexact
        self.overridden += other.overridden


def _ordered(x: np.ndarray) -> np.ndarray:
    """float32 -> int64 keys whose order is the float order (-0.0 and +0.0 share key 0)."""
    bits = np.asarray(x, F32).view(np.int32).astype(np.int64)
    return np.where(bits >= 0, bits, -(bits & 0x7FFFFFFF))


def _from_ordered(keys: np.ndarray) -> np.ndarray:
    keys = np.asarray(keys, np.int64)
    bits = np.where(keys >= 0, keys, (-keys) | 0x80000000)
    return bits.astype(np.uint32).view(F32)


def _first_key(forward: Callable[[np.ndarray], np.ndarray], target: np.ndarray, lo: np.ndarray,
               hi: np.ndarray, strict: bool) -> np.ndarray:
    """Smallest key in [lo, hi] with forward >= target (> target if strict); hi + 1 if none."""
    lo, hi = lo.copy(), hi + 1
    while True:
        active = lo < hi
        if not active.any():
            return lo
        mid = (lo + hi) // 2
        value = forward(_from_ordered(mid))
        above = (value > target) if strict else (value >= target)
        hi = np.where(active & above, mid, hi)
        lo = np.where(active & ~above, mid + 1, lo)


def invert_float32_map(forward: Callable[[np.ndarray], np.ndarray], target: np.ndarray,
                       estimate: np.ndarray, *, lower: float = -np.inf,
                       prefer_zero: bool = False) -> tuple[np.ndarray, InverseStats]:
    """The float32 x nearest `estimate` with forward(x) == target, element-wise, for a
    monotone non-decreasing float32 map (both BN encodings are).

    Why a search: forward is a float64 computation rounded to float32, so its float64 inverse
    can land floats off, and near 0 far off. Bisection over the float32 order finds the whole
    range of preimages [first, last] exactly; the one nearest `estimate` is returned (0 with
    `prefer_zero` when 0 is a preimage: Darknet's untrained statistics are 0). Elements with no
    preimage (not written by this forward map) get the rounded estimate.
    """
    target = np.asarray(target, F32).ravel()
    estimate = np.asarray(estimate, F64).ravel()
    result = np.clip(estimate, lower, None).astype(F32)
    stats = InverseStats()
    if target.size == 0:
        return result, stats
    finite = np.isfinite(target)
    lo = np.full(target.size, int(_ordered(np.array([max(lower, -3.4028235e38)], F32))[0]), np.int64)
    hi = np.full(target.size, int(_ordered(np.array([3.4028235e38], F32))[0]), np.int64)
    first = _first_key(forward, target, lo, hi, strict=False)
    after = _first_key(forward, target, lo, hi, strict=True)
    last = after - 1
    found = finite & (first <= last) & (first <= hi)
    if found.any():
        pick = np.clip(_ordered(result), first, last)
        if prefer_zero:
            pick = np.where((first <= 0) & (last >= 0), 0, pick)
        result[found] = _from_ordered(pick[found])
        check = forward(result[found]) == target[found]
        if not check.all():   # the map was not monotone after all: a bug, never silent
            raise ValueError("invert_float32_map: forward map is not monotone")
    stats.ambiguous = int((found & (last > first)).sum())
    stats.exact = int(found.sum()) - stats.ambiguous
    stats.inexact = int((~found).sum())
    return result, stats


def pjreddie_variance_forward(variance: np.ndarray) -> np.ndarray:
    """The stored var' for a Darknet variance: exactly what convert writes (caffe_bn_blobs)."""
    variance = np.asarray(variance, F32)
    return caffe_bn_blobs(np.zeros_like(variance), variance, "pjreddie")[0][1]


def invert_bn_variance(stored: np.ndarray, factor: float, eps: float, flavor: str
                       ) -> tuple[np.ndarray, InverseStats]:
    """Darknet rolling variance from a global-stats Caffe BatchNorm (var' blob, factor, eps).

    Caffe divides by sqrt(stored/factor + eps); the result makes Darknet's denominator equal to
    that. With d2c's own encoding (factor 1, eps 1e-12 pjreddie / 1e-5 AlexeyAB) the returned
    float32 maps forward to `stored` bit for bit whenever such a value exists.
    """
    stored = np.asarray(stored, F32)
    caffe_var = stored.astype(F64) / F64(factor) if factor else np.zeros(stored.shape, F64)
    ours = factor == 1.0
    if flavor == "pjreddie":
        d2c_encoded = ours and F32(eps) == F32(CAFFE_TINY_EPS)
        # convert subtracted the float64 constant 1e-12; a foreign model is read as Caffe reads it
        eps64 = CAFFE_TINY_EPS if d2c_encoded else float(F32(eps))
        den = np.sqrt(np.maximum(caffe_var + eps64, 0.0))
        estimate = np.maximum(den - F64(F32(PJREDDIE_EPS_OUTSIDE)), 0.0) ** 2
        if d2c_encoded:
            return invert_float32_map(pjreddie_variance_forward, stored, estimate, lower=0.0, prefer_zero=True)
    else:
        estimate = np.maximum(caffe_var + F64(F32(eps)) - F64(F32(ALEXEYAB_EPS_INSIDE)), 0.0)
        if ours and F32(eps) == F32(ALEXEYAB_EPS_INSIDE):
            return stored.copy(), InverseStats(exact=stored.size)
    return estimate.astype(F32), InverseStats(inexact=stored.size)


def unscale(blob: np.ndarray, factor: float) -> tuple[np.ndarray, InverseStats]:
    """x with float32(x * factor) == blob (Caffe's sums), nearest blob/factor; 0 if factor is 0."""
    blob = np.asarray(blob, F32)
    if factor == 0:   # Caffe then uses 0 for the statistics
        return np.zeros_like(blob), InverseStats(exact=blob.size)
    s = F32(factor)
    return invert_float32_map(lambda x: (x * s).astype(F32), blob, blob.astype(F64) / F64(s), prefer_zero=True)


def exact_variance_overrides(graph: Graph, arrays: dict[int, LayerArrays]) -> dict[str, list[list[int]]]:
    """For a sidecar: the pjreddie BN variances the float32 var' cannot identify on its own.

    Returns {layer index: [[channel, var' bits, var bits], ...]} for every variance whose stored
    var' has another float32 preimage that the inversion would pick instead (usually empty).
    Export applies an entry only while the caffemodel still holds that exact var'.
    """
    out: dict[str, list[list[int]]] = {}
    if graph.flavor != "pjreddie":
        return out
    for node in graph.nodes:
        var = arrays.get(node.index, {}).get("rolling_variance")
        if var is None:
            continue
        var = np.asarray(var, F32).ravel()
        stored = pjreddie_variance_forward(var)
        back, _ = invert_bn_variance(stored, 1.0, CAFFE_TINY_EPS, "pjreddie")
        wrong = np.nonzero(back.view(np.uint32) != var.view(np.uint32))[0]
        if wrong.size:
            out[str(node.index)] = [[int(c), int(stored.view(np.uint32)[c]), int(var.view(np.uint32)[c])]
                                    for c in wrong]
    return out


# --------------------------------------------------------------------------------------------
# Caffe layers -> Darknet arrays
# --------------------------------------------------------------------------------------------

@dataclass
class ExportedArrays:
    """Darknet arrays recovered from a caffemodel, plus what had to be decided on the way."""

    arrays: dict[int, LayerArrays]
    folded: list[int] = field(default_factory=list)        # conv/connected exported without BN
    variance: InverseStats = field(default_factory=InverseStats)
    sums: InverseStats = field(default_factory=InverseStats)
    notes: list[str] = field(default_factory=list)


class ModelReader:
    """The caffemodel's layers by name, with checked access that names the Darknet layer, and the
    inversion of a stock BatchNorm's statistics (what converters' `export` methods are given)."""

    def __init__(self, layers: list[CaffeLayer], where: str, flavor: str, out: ExportedArrays,
                 overrides: dict[str, list[list[int]]]) -> None:
        self.where = where
        self.flavor = flavor
        self.out = out
        self.overrides = overrides
        self.layers: dict[str, CaffeLayer] = {}
        for layer in layers:
            if layer.name not in self.layers or layer.blobs:
                self.layers[layer.name] = layer

    def get(self, name: str) -> CaffeLayer | None:
        return self.layers.get(name)

    def require(self, node: Node, name: str, types: tuple[str, ...], what: str) -> CaffeLayer:
        layer = self.get(name)
        if layer is None:
            raise WeightsError(f"{self.where}: no Caffe layer '{name}' ({what}) for {node.where}; "
                               f"was this caffemodel converted from a different cfg?")
        if layer.type not in types:
            raise WeightsError(f"{self.where}: Caffe layer '{name}' is {layer.type}, expected "
                               f"{' or '.join(types)} for {node.where}")
        return layer

    def blob(self, node: Node, layer: CaffeLayer, i: int, shape: tuple[int, ...], what: str) -> np.ndarray:
        """Blob i of `layer` in `shape` (legacy 4-D shapes with leading 1s are accepted)."""
        if i >= len(layer.blobs):
            raise WeightsError(f"{self.where}: Caffe layer '{layer.name}' has {len(layer.blobs)} blob(s), "
                               f"expected {what} as blob {i} for {node.where}")
        arr = np.asarray(layer.blobs[i], F32)
        squeezed = tuple(arr.shape)
        while len(squeezed) > len(shape) and squeezed[0] == 1:
            squeezed = squeezed[1:]
        if squeezed != tuple(shape):
            raise WeightsError(f"{self.where}: Caffe layer '{layer.name}' blob {i} ({what}) has shape "
                               f"{list(arr.shape)}, {node.where} needs {list(shape)}")
        return arr.reshape(shape)

    def bn_statistics(self, node: Node, bn: CaffeLayer, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(rolling_mean, rolling_variance) from a stock Caffe BatchNorm, whichever way it stores them:
        running sums (training) unscaled, global statistics inverted to Darknet's denominator."""
        mean_blob = self.blob(node, bn, 0, (n,), "mean")
        var_blob = self.blob(node, bn, 1, (n,), "variance")
        factor = float(self.blob(node, bn, 2, (1,), "scale factor")[0])
        param = dict(bn.params.get("batch_norm_param") or {})
        global_stats = param.get("use_global_stats")
        if global_stats is None:     # Caffe's default depends on the phase; d2c always writes it
            global_stats = factor == 1.0
        mean, mean_stats = unscale(mean_blob, factor)
        self.out.sums.add(mean_stats)
        if not global_stats:
            # stock training BN: running sums of Darknet's own (unbiased) statistics
            var, var_stats = unscale(var_blob, factor)
            self.out.sums.add(var_stats)
            return mean, var
        var, stats = invert_bn_variance(var_blob, factor, float(param.get("eps", 1e-5)), self.flavor)
        for channel, stored_bits, var_bits in self.overrides.get(str(node.index), []):
            if 0 <= channel < n and int(var_blob.view(np.uint32)[channel]) == stored_bits:
                var[channel] = np.array([var_bits], np.uint32).view(F32)[0]
                stats.overridden += 1
        self.out.variance.add(stats)
        return mean, var


def caffe_to_darknet(graph: Graph, layers: list[CaffeLayer], *, where: str = "caffemodel",
                     overrides: dict[str, list[list[int]]] | None = None) -> ExportedArrays:
    """Every Darknet array of `graph` from a d2c Caffe model's layers (deploy, folded or train)."""
    out = ExportedArrays(arrays={})
    model = ModelReader(layers, where, graph.flavor, out, overrides or {})
    for node in graph.nodes:
        if not node.params:
            continue
        arrays = REGISTRY[node.kind].export(node, model)
        expected = {p.name for p in node.params} if node.index not in out.folded else {"biases", "weights"}
        if set(arrays) != expected:   # a converter changed its arrays without telling export
            raise WeightsError(f"{node.where}: export produced {sorted(arrays)}, expected {sorted(expected)}")
        out.arrays[node.index] = arrays
    _check_extra_layers(model, graph)
    return out


_PREFIX = re.compile(r"^layer(\d{3,})_")


def _check_extra_layers(model: ModelReader, graph: Graph) -> None:
    """A caffemodel with parameter layers past the cfg's last layer belongs to another cfg."""
    count = len(graph.nodes)
    extra = []
    for name, layer in model.layers.items():
        match = _PREFIX.match(name)
        if match and layer.blobs and int(match.group(1)) >= count:
            extra.append(f"{name} ({layer.type})")
    if extra:
        raise WeightsError(f"{model.where}: Caffe layer(s) {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''} "
                           f"lie beyond the cfg's {count} layers; was it converted from a different cfg?")


# --------------------------------------------------------------------------------------------
# Finding the model files
# --------------------------------------------------------------------------------------------

@dataclass
class ModelSource:
    """The caffemodel to export, its sidecar (if any) and the cfg it was converted from."""

    caffemodel: Path
    sidecar_path: Path | None
    sidecar: dict[str, Any]
    cfg: Path


def _read_sidecar(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise D2CError(f"{path}: cannot read the sidecar ({exc.strerror or exc})") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise D2CError(f"{path}: not a valid JSON sidecar ({exc})") from None
    if not isinstance(data, dict) or "d2c_sidecar" not in data:
        raise D2CError(f"{path}: not a d2c sidecar (no 'd2c_sidecar' key)")
    return data


def _is_sidecar(path: Path) -> bool:
    try:
        return "d2c_sidecar" in json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def _sidecar_for(model_file: Path) -> Path | None:
    """`<stem>.json` beside the file; for `<stem>_train.*` also `<stem>.json`; else the only one."""
    stems = [model_file.stem]
    if model_file.stem.endswith("_train"):
        stems.append(model_file.stem[: -len("_train")])
    for stem in stems:
        candidate = model_file.with_name(stem + ".json")
        if candidate.is_file() and _is_sidecar(candidate):
            return candidate
    found = [p for p in sorted(model_file.parent.glob("*.json")) if _is_sidecar(p)]
    return found[0] if len(found) == 1 else None


def _resolve_cfg(recorded: str, sidecar_path: Path) -> Path | None:
    """The sidecar's cfg as written (absolute or CWD-relative), else beside the sidecar."""
    p = Path(recorded)
    for candidate in (p, sidecar_path.parent / p, sidecar_path.parent / p.name):
        if candidate.is_file():
            return candidate
    return None


def locate_model(model: str | Path, *, cfg: str | Path | None = None,
                 sidecar: str | Path | None = None) -> ModelSource:
    """Resolve MODEL (convert output directory, .prototxt or .caffemodel) to its files."""
    path = Path(model)
    if path.is_dir():
        sidecars = [p for p in sorted(path.glob("*.json")) if _is_sidecar(p)]
        if sidecar is None and not sidecars:
            raise D2CError(f"{path}: no d2c sidecar (.json) here; is this a `d2c convert` output directory?")
        if sidecar is None and len(sidecars) > 1:
            raise D2CError(f"{path}: several converted models here ({', '.join(s.name for s in sidecars)}); "
                           f"pass the .caffemodel to export")
        sidecar_path = Path(sidecar) if sidecar else sidecars[0]
        data = _read_sidecar(sidecar_path)
        caffemodel = sidecar_path.parent / data.get("caffemodel", sidecar_path.stem + ".caffemodel")
    elif path.suffix in (".prototxt", ".caffemodel"):
        if not path.is_file():
            raise D2CError(f"{path}: no such file")
        caffemodel = path.with_suffix(".caffemodel")
        sidecar_path = Path(sidecar) if sidecar else _sidecar_for(path)
        data = _read_sidecar(sidecar_path) if sidecar_path else {}
    elif not path.exists():
        raise D2CError(f"{path}: no such model directory or file")
    else:
        raise D2CError(f"{path}: expected a `d2c convert` output directory, a .prototxt or a .caffemodel")
    if not caffemodel.is_file():
        raise D2CError(f"{caffemodel}: missing (the caffemodel to export)")
    if cfg is not None:
        cfg_path = Path(cfg)
        if not cfg_path.is_file():
            raise D2CError(f"{cfg_path}: no such cfg file")
    elif sidecar_path is None:
        raise D2CError(f"{caffemodel}: no d2c sidecar (.json) beside it; pass --cfg (and --sidecar if you have one)")
    else:
        found = _resolve_cfg(str(data.get("cfg", "")), sidecar_path) if data.get("cfg") else None
        if found is None:
            raise D2CError(f"{sidecar_path}: its cfg {data.get('cfg')!r} is not found (as given or beside the "
                           f"sidecar); pass --cfg")
        cfg_path = found
    return ModelSource(caffemodel=caffemodel, sidecar_path=sidecar_path, sidecar=data, cfg=cfg_path)


# --------------------------------------------------------------------------------------------
# Folded cfg
# --------------------------------------------------------------------------------------------

def folded_cfg_text(graph: Graph, folded: list[int], text: str) -> str:
    """The cfg text with `batch_normalize=0` on the folded sections (everything else verbatim)."""
    lines = text.split("\n")
    by_index = {n.index: n for n in graph.nodes}
    for index in folded:
        sec = by_index[index].section
        opt = sec.options.get("batch_normalize")
        if opt is None:   # cannot happen: the node had BN
            raise D2CError(f"{sec.where}: no batch_normalize line to rewrite")
        ending = "\r" if lines[opt.line - 1].endswith("\r") else ""
        lines[opt.line - 1] = "batch_normalize=0" + ending
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The whole export
# --------------------------------------------------------------------------------------------

@dataclass
class ExportReport:
    weights: Path
    cfg_written: Path | None
    cfg: Path
    caffemodel: Path
    header: WeightsHeader
    flavor: str
    layers: int
    arrays: int
    floats: int
    folded: list[int]
    variance: InverseStats
    sums: InverseStats
    notes: list[str]


def _header_from(sidecar: dict[str, Any], seen: int | None) -> WeightsHeader:
    raw = sidecar.get("weights_header") or {}
    try:
        header = WeightsHeader(int(raw.get("major", 0)), int(raw.get("minor", 2)), int(raw.get("revision", 0)),
                               int(raw.get("seen", 0)))
    except (TypeError, ValueError):
        raise D2CError(f"sidecar 'weights_header' is malformed: {raw!r}") from None
    if seen is not None:
        header.seen = int(seen)
    limit = 2 ** 64 if header.seen_is_64bit else 2 ** 32
    if not 0 <= header.seen < limit:
        raise D2CError(f"seen = {header.seen} does not fit the {header.major}.{header.minor}.{header.revision} "
                       f"header ({'64' if header.seen_is_64bit else '32'}-bit)")
    return header


def export(model: str | Path, out: str | Path, *, cfg: str | Path | None = None,
           sidecar: str | Path | None = None, seen: int | None = None,
           flavor: str | None = None) -> ExportReport:
    """Write OUT.weights (and OUT.cfg for BN-folded models) from a d2c Caffe model."""
    src = locate_model(model, cfg=cfg, sidecar=sidecar)
    out_path = Path(out)
    cfg_text = read_cfg_text(src.cfg)
    graph = build_graph(parse_cfg(src.cfg, cfg_text), flavor or src.sidecar.get("flavor"))
    header = _header_from(src.sidecar, seen)
    net = read_caffemodel_net(src.caffemodel)
    overrides = src.sidecar.get("bn_exact") or {}
    if not isinstance(overrides, dict):
        raise D2CError(f"{src.sidecar_path}: 'bn_exact' must be an object")
    exported = caffe_to_darknet(graph, net.layers, where=str(src.caffemodel), overrides=overrides)
    cfg_written = None
    write_graph = graph
    if exported.folded:
        cfg_written = out_path.with_suffix(".cfg")
        if cfg_written.resolve() == src.cfg.resolve():
            raise D2CError(f"{cfg_written}: would overwrite the source cfg with the folded one; choose another -o")
        new_text = folded_cfg_text(graph, exported.folded, cfg_text)
        write_graph = build_graph(parse_cfg(cfg_written, new_text), graph.flavor)
    if out_path.is_dir():
        raise D2CError(f"{out_path}: is a directory; -o names the .weights file to write")
    try:
        write_weights(out_path, header, write_graph, exported.arrays)
        if cfg_written is not None:
            atomic_write_text(cfg_written, new_text)
    except OSError as exc:
        raise D2CError(f"{out_path}: cannot write: {exc.strerror or exc}") from None
    n_arrays = sum(len(a) for a in exported.arrays.values())
    floats = sum(int(v.size) for a in exported.arrays.values() for v in a.values())
    return ExportReport(weights=out_path, cfg_written=cfg_written, cfg=src.cfg, caffemodel=src.caffemodel,
                        header=header, flavor=graph.flavor, layers=len(exported.arrays), arrays=n_arrays,
                        floats=floats, folded=exported.folded, variance=exported.variance, sums=exported.sums,
                        notes=exported.notes)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="`d2c convert` output directory, its .prototxt, or a .caffemodel "
                                 "(deploy, train or snapshot) with the d2c sidecar beside it")
    p.add_argument("-o", "--out", required=True, help="the .weights file to write")
    p.add_argument("--cfg", help="the Darknet cfg (default: the one the sidecar names)")
    p.add_argument("--sidecar", help="the d2c .json sidecar (default: beside the model)")
    p.add_argument("--seen", type=int, help="images seen, for the header (default: the sidecar's)")
    p.add_argument("--darknet", choices=["pjreddie", "alexeyab"],
                   help="Darknet lineage (default: the sidecar's, else inferred from the cfg)")


def run(args: argparse.Namespace) -> int:
    rep = export(args.model, args.out, cfg=args.cfg, sidecar=args.sidecar, seen=args.seen, flavor=args.darknet)
    for note in rep.notes:
        print(f"warning: {note}", file=sys.stderr)
    h = rep.header
    print(f"d2c export: {rep.caffemodel}")
    print(f"  cfg               : {rep.cfg} ({rep.flavor} Darknet)")
    print(f"  header            : {h.major}.{h.minor}.{h.revision}, seen {h.seen}")
    print(f"  layers with params: {rep.layers}   arrays: {rep.arrays}   floats: {rep.floats:,}")
    v = rep.variance
    if v.exact or v.ambiguous or v.inexact:
        print(f"  BN variances      : {v.exact} exact, {v.ambiguous} with several float32 preimages "
              f"({v.overridden} resolved by the sidecar), {v.inexact} not d2c-encoded (nearest float)")
    if rep.sums.ambiguous:
        print(f"  BN running sums   : {rep.sums.ambiguous} of {rep.sums.exact + rep.sums.ambiguous} stock-BatchNorm "
              f"values have two float32 preimages of 100*x (1 ulp apart); the nearer one is written")
    if rep.folded:
        print(f"  BN-folded layers  : {len(rep.folded)} exported without BN")
        print(f"  wrote             : {rep.cfg_written}")
    print(f"  wrote             : {rep.weights}")
    return 0
