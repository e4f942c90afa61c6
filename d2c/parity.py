"""`d2c parity`: the real Darknet and the real Caffe side by side, on the same everything.

The protocol: the same cfg (batch and subdivisions forced small), the same weights
(given, or seeded well-conditioned random ones), the same letterboxed images and truth boxes.
Then compare (1) every layer's forward output, (2) the loss, (3) the head gradient (Darknet's
l.delta against minus the Caffe bottom diff times the mini-batch), (4) every weight, bias, BN
scale and rolling statistic after N SGD steps. Darknet runs in a child process, so its
flush-to-zero mode never touches the Caffe side. Exit status 0 only within the named tolerances.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2c.caffe.emitter import DEPLOY, TRAIN, ConvertOptions
from d2c.darknet.cfg import parse_cfg, read_cfg_text
from d2c.darknet.graph import Graph, build_graph
from d2c.darknet.weights import WeightsHeader, random_weights, read_weights, write_weights
from d2c.errors import D2CError, DatasetError
from d2c.fsutil import atomic_write_text

# Named tolerances, all reported. Convolutions sum in another order (BLAS, FMA) than Darknet's
# gemm, so ~1e-6 relative per layer is the floor; everything else is exact arithmetic.
TOLERANCES: dict[str, float] = {
    "forward_max_rel": 2e-5,     # per layer, |a-b| / max|darknet blob|
    "loss_rel": 1e-5,            # |loss_caffe - loss_darknet| / loss_darknet, every mini-batch
    "grad_max_abs": 1e-4,        # head delta (and what reaches the layer below), absolute
    "grad_max_rel": 1e-5,        # the same, relative to max|delta|
    "update_max_abs": 1e-5,      # every learned array (weights, biases, BN scales) after N steps
    "stats_max_rel": 1e-6,       # BN rolling mean/variance after N steps, relative to max|value|
}
STATISTICS = ("rolling_mean", "rolling_variance")
DEFAULT_IMAGES = ["dog.jpg", "horses.jpg", "person.jpg", "eagle.jpg", "giraffe.jpg", "kite.jpg", "scream.jpg"]
DARKNET_DATA = Path("/usr/share/darknet/data")


@dataclass
class ParityReport:
    cfg: str
    weights: str
    batch: int
    subdivisions: int
    steps: int
    bn: str
    darknet_compat: bool
    engine: str = "debian"
    engine_reason: str = ""
    forward: dict[str, Any] = field(default_factory=dict)
    loss: dict[str, Any] = field(default_factory=dict)
    grad: dict[str, Any] = field(default_factory=dict)
    update: dict[str, Any] = field(default_factory=dict)
    emulated_defects: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        t = TOLERANCES
        return (self.forward.get("max_rel", np.inf) <= t["forward_max_rel"]
                and self.loss.get("rel", np.inf) <= t["loss_rel"]
                and self.grad.get("max_abs", np.inf) <= t["grad_max_abs"]
                and self.grad.get("max_rel", np.inf) <= t["grad_max_rel"]
                and (self.steps == 0 or (self.update.get("max_abs", np.inf) <= t["update_max_abs"]
                                         and self.update.get("stats_max_rel", np.inf) <= t["stats_max_rel"])))

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "cfg": self.cfg, "weights": self.weights, "engine": self.engine,
                "engine_reason": self.engine_reason, "batch": self.batch,
                "subdivisions": self.subdivisions, "bn": self.bn, "darknet_compat": self.darknet_compat,
                "forward": self.forward, "loss": self.loss, "grad": self.grad, "update": self.update,
                "emulated_defects": self.emulated_defects, "tolerances": dict(TOLERANCES),
                "seconds": round(self.seconds, 2)}


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def training_cfg(cfg_path: str | Path, directory: Path, batch: int, subdivisions: int,
                 size: tuple[int, int] | None = None, overrides: dict[str, str] | None = None) -> Path:
    """A copy of the cfg whose [net] gives mini-batch `batch` and `subdivisions` (and a size, and
    other [net] keys such as learning_rate or burn_in)."""
    keys = {"batch": str(batch * subdivisions), "subdivisions": str(subdivisions), **(overrides or {})}
    if size is not None:
        keys.update(width=str(size[0]), height=str(size[1]))
    out, in_net, seen = [], False, set()
    for line in read_cfg_text(cfg_path).split("\n"):
        stripped = "".join(line.split())
        if stripped.startswith("["):
            if in_net:
                out.extend(f"{k}={v}" for k, v in keys.items() if k not in seen)
            in_net = stripped in ("[net]", "[network]")
        key = stripped.split("=", 1)[0]
        if in_net and key in keys:
            if key in seen:
                continue  # Darknet reads the first occurrence; keep exactly one
            line = f"{key}={keys[key]}"
            seen.add(key)
        out.append(line)
    path = directory / Path(cfg_path).name
    path.write_text("\n".join(out))
    return path


def _build_copy(cfg_path: str | Path, copy: Path, flavor: str | None = None) -> Graph:
    """Build the overridden copy; its errors must name the user's cfg, not a temporary file.

    A problem of the cfg itself is reported on the original (its own lines); one that only the
    overrides cause names the cfg and the overrides.
    """
    try:
        return build_graph(parse_cfg(copy), flavor)
    except D2CError as exc:
        build_graph(parse_cfg(cfg_path), flavor)      # raises with the original file's lines if it is the cfg
        first, *details = exc.render().replace(str(copy), str(cfg_path)).split("\n")
        raise type(exc)(f"with the --batch/--subdivisions/--size/--set overrides: {first}",
                        [d.strip() for d in details]) from None


def load_images(paths: list[Path], width: int, height: int) -> np.ndarray:
    """Darknet-letterboxed RGB tensors (N, 3, H, W), exactly as its detector prepares them."""
    from d2c.image import letterbox, load_image_rgb
    return np.stack([letterbox(load_image_rgb(p), width, height) for p in paths]).astype(np.float32)


def random_truth(count: int, classes: int, record_boxes: int, seed: int, max_boxes: int = 6) -> np.ndarray:
    """Seeded boxes in Darknet's truth layout: (count, record_boxes*5) of x, y, w, h, class."""
    rng = np.random.default_rng(seed)
    truth = np.zeros((count, record_boxes, 5), np.float32)
    for k in range(count):
        n = int(rng.integers(1, max_boxes + 1))
        truth[k, :n, 0:2] = rng.uniform(0.05, 0.95, (n, 2))
        truth[k, :n, 2:4] = rng.uniform(0.03, 0.6, (n, 2))
        truth[k, :n, 4] = rng.integers(0, classes, n)
    return truth.reshape(count, record_boxes * 5)


def truth_from_file(path: Path, count: int, record_boxes: int, classes: int) -> np.ndarray:
    """A JSON list, one entry per image, of [x, y, w, h, class] boxes (cycled over the images)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{path}: cannot read truth JSON: {exc}") from None
    if not isinstance(data, list) or not data:
        raise DatasetError(f"{path}: expected a non-empty JSON list (one list of boxes per image)")
    truth = np.zeros((count, record_boxes, 5), np.float32)
    for k in range(count):
        boxes = data[k % len(data)]
        if not isinstance(boxes, list) or len(boxes) > record_boxes:
            raise DatasetError(f"{path}: entry {k % len(data)} must be a list of at most {record_boxes} boxes")
        for j, box in enumerate(boxes):
            if (not isinstance(box, list) or len(box) != 5
                    or not all(isinstance(v, (int, float)) for v in box)):
                raise DatasetError(f"{path}: entry {k % len(data)} box {j}: expected [x, y, w, h, class]")
            x, y, w, h, c = box
            if not (0 < x <= 1 and 0 <= y <= 1 and 0 < w <= 1 and 0 < h <= 1) or not 0 <= c < classes:
                raise DatasetError(f"{path}: entry {k % len(data)} box {j} {box} is out of range "
                                   f"(x, y, w, h in (0, 1], class < {classes})")
            truth[k, j] = box
    return truth.reshape(count, record_boxes * 5)


# ---------------------------------------------------------------------------------------------
# Darknet CPU defects (--darknet-compat)
# ---------------------------------------------------------------------------------------------

def emulate_darknet_defects(graph: Graph, conversion) -> list[str]:
    """Make the Caffe train net drop the gradients Debian's Darknet drops; return what was done.

    A node whose CPU backward *assigns* its input's delta (the converter's overwrites_input_delta:
    pjreddie's 1x1 convolution, gemm beta 0) loses whatever later layers (higher index: their
    backward ran first) had added there. Caffe sums all consumers; `propagate_down: false` on
    those later consumers' bottoms reproduces the loss exactly. What a converter's backward_note
    reports (the empty region CPU backward) is already in the train net (the loss layer's
    darknet_compat flag) and only listed.
    """
    from d2c.layers import REGISTRY

    notes: list[str] = []
    consumers: dict[int, list[int]] = {}
    for node in graph.nodes:
        for src in node.inputs:
            consumers.setdefault(src, []).append(node.index)
    for node in graph.nodes:
        converter = REGISTRY[node.kind]
        if converter.overwrites_input_delta(node, "pjreddie"):
            src = node.inputs[0]
            for j in (j for j in consumers.get(src, []) if j > node.index):
                if _block_gradient(conversion.net, graph.nodes[j].prefix, conversion.emitter.blob(src)):
                    notes.append(f"{node.kind} layer {node.index} overwrites the delta of layer {src}: "
                                 f"the gradient from layer {j} ({graph.nodes[j].kind}) is dropped")
        note = converter.backward_note(node, "pjreddie")
        if note:
            notes.append(f"{node.kind} layer {node.index}: {note}")
    return notes


def _block_gradient(net, prefix: str, source_blob: str) -> bool:
    """Set propagate_down false where the Caffe layers named `prefix*` read `source_blob`."""
    changed = False
    for layer in net.layers:
        if not layer.name.startswith(prefix):
            continue
        for k, bottom in enumerate(layer.bottom):
            if bottom == source_blob and bottom not in layer.top:
                pd = list(layer.params.get("propagate_down") or [True] * len(layer.bottom))
                pd[k] = False
                layer.params["propagate_down"] = pd
                changed = True
    return changed


# ---------------------------------------------------------------------------------------------
# Caffe side: arrays back in Darknet's names
# ---------------------------------------------------------------------------------------------

def caffe_arrays(net, conversion, updates: dict[str, np.ndarray] | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Darknet-named arrays of a live pycaffe train net, read back by each converter's export.

    With `updates` (solver slot key "layer/index" -> array), those blobs are read in place of the
    parameters, so the momentum buffers come back under the names of the arrays they update.
    """
    from dataclasses import replace

    from d2c.export import caffe_to_darknet

    layers = []
    for layer in conversion.net.layers:
        if layer.name in net.params:
            blobs = [np.array((updates or {}).get(f"{layer.name}/{k}", blob.data), np.float32)
                     for k, blob in enumerate(net.params[layer.name])]
            layer = replace(layer, blobs=blobs)
        layers.append(layer)
    return caffe_to_darknet(conversion.graph, layers, where="the parity train net").arrays


def write_caffe_arrays(net, conversion, arrays: dict[int, dict[str, np.ndarray]]) -> None:
    """The inverse: Darknet arrays into the live net's blobs, through each converter's emit."""
    from d2c.convert import build_conversion

    fresh = build_conversion(conversion.graph, arrays, conversion.header, conversion.options)
    for layer in fresh.net.layers:
        if layer.name in net.params and layer.blobs:
            for blob, value in zip(net.params[layer.name], layer.blobs):
                blob.data[...] = np.asarray(value, np.float32).reshape(blob.data.shape)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def run_parity(cfg_path: str | Path, weights_path: str | Path | None = None, *, images: list[Path] | None = None,
               truth_file: Path | None = None, batch: int = 2, subdivisions: int = 1, steps: int = 1,
               bn: str = "exact", darknet_compat: bool = True, seed: int = 0,
               size: tuple[int, int] | None = None, net_overrides: dict[str, str] | None = None,
               progress: bool = False, engine: str | None = None) -> ParityReport:
    """The whole protocol; see the module docstring. `engine`: debian, alexeyab, or None to pick
    AlexeyAB's for cfgs only it can run (the reason is in the report)."""
    from d2c.caffe.runtime import caffe_forward, load_caffe
    from d2c.convert import build_conversion
    from d2c.darknet.runtime import DarknetProcess
    from d2c.forward_check import compare_outputs
    from d2c.loss.emit import LAYER_CLASS, truth_boxes
    from d2c.solver import DarknetSGD, TrainConfig

    start = time.perf_counter()
    if batch < 1 or subdivisions < 1 or steps < 0:
        raise D2CError(f"batch ({batch}) and subdivisions ({subdivisions}) must be >= 1, steps ({steps}) >= 0")
    with tempfile.TemporaryDirectory(prefix="d2c-parity-") as tmp_s:
        tmp = Path(tmp_s)
        cfg = training_cfg(cfg_path, tmp, batch, subdivisions, size, net_overrides)
        engine, engine_reason = choose_engine(cfg, engine)
        graph = _build_copy(cfg_path, cfg, "alexeyab" if engine == "alexeyab" else None)
        heads = graph.heads()
        if not heads or any(h.kind not in LAYER_CLASS for h in heads):
            raise D2CError(f"{cfg_path}: parity needs a cfg whose heads all have a training loss "
                           f"({', '.join(f'[{kind}]' for kind in LAYER_CLASS)})")
        # Weights: given, or seeded random ones written for Darknet (seen = 0 either way).
        if weights_path is None:
            header, arrays = WeightsHeader(), random_weights(graph, seed)
        else:
            header, arrays = read_weights(weights_path, graph)
            header = WeightsHeader(header.major, header.minor, header.revision, 0)
        wfile = tmp / "start.weights"
        write_weights(wfile, header, graph, arrays)
        arrays = read_weights(wfile, graph)[1]
        # Inputs: b*S images per step, cycled; truth records as long as Darknet's net->truths.
        per_step = batch * subdivisions
        needed = max(1, steps) * per_step
        chosen = images or [DARKNET_DATA / name for name in DEFAULT_IMAGES]
        x_all = load_images([chosen[k % len(chosen)] for k in range(needed)], graph.net.width, graph.net.height)
        # The train net first: its truth blob has Darknet's net->truths for this engine's flavor.
        train = build_conversion(graph, arrays, header,
                                 ConvertOptions(flavor=graph.flavor, mode=TRAIN, bn=bn, batch=batch,
                                                darknet_compat=darknet_compat and engine == "debian"))
        record_boxes = truth_boxes(train.emitter)
        classes = heads[0].attrs["classes"]
        truth_all = (truth_from_file(truth_file, needed, record_boxes, classes) if truth_file
                     else random_truth(needed, classes, record_boxes, seed + 1))

        report = ParityReport(cfg=str(cfg_path), weights=str(weights_path or f"random (seed {seed})"),
                              batch=batch, subdivisions=subdivisions, steps=steps, bn=bn,
                              darknet_compat=darknet_compat and engine == "debian", engine=engine,
                              engine_reason=engine_reason)
        darknet_compat_asked, darknet_compat = darknet_compat, report.darknet_compat   # each engine's own
        with DarknetProcess(cfg, wfile, clear=True, engine=engine) as dn:
            # (1) forward, inference mode, first mini-batch.
            x0, t0 = x_all[:batch], truth_all[:batch]
            dn.forward(x0)
            outputs = {n.index: dn.layer_output(n.index) for n in graph.nodes}
            deploy = build_conversion(graph, arrays, header,
                                      ConvertOptions(flavor=graph.flavor, mode=DEPLOY, batch=batch))
            fwd = compare_outputs(graph, deploy, outputs, x0)
            report.forward = {"max_rel": fwd.max_rel, "max_abs": fwd.max_abs,
                              "layers": [{"index": d.index, "type": d.kind, "shape": list(d.shape),
                                          "max_abs": d.max_abs, "max_rel": d.max_rel} for d in fwd.layers]}
            # (2)-(4): training on both sides.
            if darknet_compat:
                report.emulated_defects = emulate_darknet_defects(graph, train)
            elif engine == "alexeyab" and darknet_compat_asked:
                from d2c.alexeyab_cpu import emulate_alexeyab_cpu
                report.emulated_defects = emulate_alexeyab_cpu(graph, train)
            net = load_caffe(train.net, phase="train")
            sgd = DarknetSGD(net, train, TrainConfig.from_section(graph.net.section, batch=batch))
            head_blobs = {h.index: h.blob for h in train.emitter.heads}
            losses: list[dict[str, float]] = []
            grad_abs, grad_rel = 0.0, 0.0
            grad_checks: dict[str, dict[str, float]] = {}
            iterator = range(max(1, steps) * subdivisions)
            if progress:
                from tqdm import tqdm
                iterator = tqdm(iterator, desc="parity", unit="mini-batch", leave=False)
            for k in iterator:
                xs, ts = x_all[k * batch:(k + 1) * batch], truth_all[k * batch:(k + 1) * batch]
                d_err = dn.train_datum(xs, ts)
                c_err, _ = sgd.train_minibatch(net, xs, ts)
                losses.append({"minibatch": k, "darknet": d_err, "caffe": c_err,
                               "rel": abs(c_err - d_err) / max(abs(d_err), 1e-30)})
                if k == 0:  # (3) the head gradients of the first mini-batch
                    for check, value in head_gradients(dn, net, graph, train, batch).items():
                        grad_checks[check] = value
                        grad_abs, grad_rel = max(grad_abs, value["max_abs"]), max(grad_rel, value["max_rel"])
                if steps == 0:
                    break
            report.loss = {"darknet": losses[0]["darknet"], "caffe": losses[0]["caffe"],
                           "rel": max(entry["rel"] for entry in losses), "minibatches": losses}
            report.grad = {"max_abs": grad_abs, "max_rel": grad_rel, "checks": grad_checks}
            if steps:
                # (4) every array after N steps: Darknet's save_weights against the Caffe blobs.
                dn.save_weights(tmp / "darknet_after.weights")
                theirs_all = read_weights(tmp / "darknet_after.weights", graph)[1]
                ours_all = caffe_arrays(net, train)
                rows, worst, worst_stats = [], 0.0, 0.0
                for node in graph.nodes:
                    for name, theirs in theirs_all.get(node.index, {}).items():
                        ours = ours_all.get(node.index, {}).get(name)
                        if ours is None:
                            rows.append({"layer": node.index, "array": name, "max_abs": None})
                            worst = np.inf
                            continue
                        ref = np.asarray(theirs, np.float64)
                        err = float(np.max(np.abs(ref - ours.reshape(ref.shape))))
                        moved = float(np.max(np.abs(ref - arrays[node.index][name])))
                        row = {"layer": node.index, "array": name, "max_abs": err, "moved": moved}
                        if name in STATISTICS:
                            row["max_rel"] = err / (float(np.max(np.abs(ref))) or 1.0)
                            worst_stats = max(worst_stats, row["max_rel"])
                        else:
                            worst = max(worst, err)
                        rows.append(row)
                report.update = {"steps": steps, "max_abs": worst, "stats_max_rel": worst_stats, "arrays": rows,
                                 "seen_darknet": dn.seen(), "seen_caffe": sgd.seen}
    report.seconds = time.perf_counter() - start
    return report


def choose_engine(cfg: Path, engine: str | None) -> tuple[str, str]:
    """The engine to compare with, and why: as asked, else AlexeyAB's when the cfg needs it."""
    from d2c.darknet.graph import infer_flavor

    flavor, reason = infer_flavor(parse_cfg(cfg))
    if engine is not None:
        if engine == "debian" and flavor == "alexeyab":
            raise D2CError(f"{cfg.name}: Debian's Darknet cannot run this cfg ({reason}); "
                           "use --darknet-engine alexeyab")
        return engine, "asked for"
    if flavor == "alexeyab":
        return "alexeyab", f"picked automatically: {reason}"
    return "debian", "default"


def head_gradients(dn, net, graph: Graph, conversion, batch: int) -> dict[str, dict[str, float]]:
    """Two checks per head after one training mini-batch.

    delta: Darknet's l.delta of the head against the delta the Caffe loss layer computed;
    propagated: the delta Darknet leaves on the layer feeding the head (after its backward)
    against minus the Caffe bottom diff times b (Caffe averages over the mini-batch).
    """
    from d2c.loss.emit import loss_layer_name

    names = list(net._layer_names)
    checks: dict[str, dict[str, float]] = {}
    for head in conversion.emitter.heads:
        node = graph.nodes[head.index]
        layer = net.layers[names.index(loss_layer_name(node))]
        pairs = {"delta": (dn.layer_delta(head.index), layer._result.delta),
                 "propagated": (dn.layer_delta(head.index - 1),
                                -np.asarray(net.blobs[head.blob].diff, np.float64) * batch)}
        for check, (theirs, ours) in pairs.items():
            theirs = np.asarray(theirs, np.float64)
            err = float(np.max(np.abs(theirs - np.asarray(ours, np.float64).reshape(theirs.shape))))
            mag = float(np.max(np.abs(theirs)))
            checks[f"layer {head.index} {check}"] = {"max_abs": err, "max_rel": err / mag if mag else err,
                                                    "magnitude": mag}
    return checks


def format_report(report: ParityReport) -> str:
    t = TOLERANCES
    mark = lambda ok: "ok" if ok else "FAIL"  # noqa: E731
    lines = [f"d2c parity: {report.cfg}  weights: {report.weights}",
             f"  engine: {'AlexeyAB Darknet' if report.engine == 'alexeyab' else 'Debian Darknet'} "
             f"({report.engine_reason})",
             f"  mini-batch b={report.batch}, subdivisions S={report.subdivisions}, steps={report.steps}, "
             f"BN={report.bn}, darknet-compat={'on' if report.darknet_compat else 'off'}",
             "", f"{'layer':>5}  {'type':14s} {'shape':22s} {'max abs':>10s} {'max rel':>10s}"]
    for d in report.forward.get("layers", []):
        lines.append(f"{d['index']:5d}  {d['type']:14s} {str(tuple(d['shape'])):22s} "
                     f"{d['max_abs']:10.3g} {d['max_rel']:10.3g}")
    f, lo, g, u = report.forward, report.loss, report.grad, report.update
    lines += ["",
              f"  forward  max rel {f['max_rel']:.3g} (tol {t['forward_max_rel']:g})  "
              f"{mark(f['max_rel'] <= t['forward_max_rel'])}",
              f"  loss     darknet {lo['darknet']:.7g} caffe {lo['caffe']:.7g}  max rel over "
              f"{len(lo['minibatches'])} mini-batches {lo['rel']:.3g} (tol {t['loss_rel']:g})  "
              f"{mark(lo['rel'] <= t['loss_rel'])}",
              f"  grad     max abs {g['max_abs']:.3g} (tol {t['grad_max_abs']:g}), max rel {g['max_rel']:.3g} "
              f"(tol {t['grad_max_rel']:g})  {mark(g['max_abs'] <= t['grad_max_abs'] and g['max_rel'] <= t['grad_max_rel'])}"]
    if report.steps:
        moved = max((r.get("moved") or 0.0) for r in u["arrays"])
        lines.append(f"  update   {u['steps']} step(s), {len(u['arrays'])} arrays (largest change {moved:.3g}): "
                     f"learned max abs {u['max_abs']:.3g} (tol {t['update_max_abs']:g}), BN statistics max rel "
                     f"{u['stats_max_rel']:.3g} (tol {t['stats_max_rel']:g})  "
                     f"{mark(u['max_abs'] <= t['update_max_abs'] and u['stats_max_rel'] <= t['stats_max_rel'])}")
    for note in report.emulated_defects:
        lines.append(f"  emulated Darknet defect: {note}")
    lines.append(f"  {'OK' if report.ok else 'FAILED'} in {report.seconds:.1f} s")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cfg", help="Darknet .cfg with [yolo] or [region] heads")
    p.add_argument("weights", nargs="?", help=".weights (default: seeded well-conditioned random weights)")
    p.add_argument("--images", nargs="+", type=Path, help="images (default: Darknet's sample images)")
    p.add_argument("--truth", type=Path, help="JSON list per image of [x, y, w, h, class] boxes")
    p.add_argument("--batch", type=int, default=2, help="mini-batch b (default 2)")
    p.add_argument("--subdivisions", type=int, default=1, help="mini-batches per SGD step (default 1)")
    p.add_argument("--steps", type=int, default=1, help="SGD steps to compare (0: forward, loss, gradient only)")
    p.add_argument("--bn", choices=["exact", "stock", "frozen"], default="exact",
                   help="Caffe-side BatchNorm: exact Darknet (Python layer), stock Caffe, or frozen statistics")
    p.add_argument("--no-darknet-compat", dest="darknet_compat", action="store_false",
                   help="do not emulate Debian Darknet's CPU gradient defects on the Caffe side")
    p.add_argument("--size", type=int, nargs=2, metavar=("W", "H"), help="override the [net] input size")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and truth boxes (default 0)")
    p.add_argument("--set", dest="net_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a [net] key in both engines, e.g. --set burn_in=0 --set learning_rate=0.01")
    p.add_argument("--darknet-engine", choices=["debian", "alexeyab"], default=None,
                   help="the real Darknet to compare with (default: Debian's, AlexeyAB's for cfgs that need it)")
    p.add_argument("--json", type=Path, help="write the full report as JSON")


def run(args: argparse.Namespace) -> int:
    if args.json:
        from d2c.fsutil import check_output_file
        check_output_file(args.json, "--json")
    from d2c.darknet.runtime import library_path
    from d2c.engines import import_caffe
    library_path()      # both engines present (exit 3 otherwise) before any work starts
    import_caffe()
    overrides = {}
    for item in args.net_overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or not value or any(c.isspace() for c in item):
            raise D2CError(f"--set {item!r}: expected KEY=VALUE for a [net] key")
        overrides[key] = value
    report = run_parity(args.cfg, args.weights, net_overrides=overrides, images=args.images, truth_file=args.truth, batch=args.batch,
                        subdivisions=args.subdivisions, steps=args.steps, bn=args.bn,
                        darknet_compat=args.darknet_compat, seed=args.seed,
                        size=tuple(args.size) if args.size else None, progress=sys.stderr.isatty(),
                        engine=args.darknet_engine)
    print(format_report(report))
    if args.json:
        atomic_write_text(args.json, json.dumps(report.to_json(), indent=1, default=float) + "\n")
        print(f"  wrote {args.json}")
    return 0 if report.ok else 1


# `d2c.parity(cfg, weights, **opts)` calls run_parity() (the package API, see d2c.api).
from d2c.api import callable_module  # noqa: E402

callable_module(__name__, "run_parity")
