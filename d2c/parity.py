"""`d2c parity`: the real Darknet and the real Caffe side by side, on the same everything.

The protocol: the same cfg (batch and subdivisions forced small), the same weights
(given, or seeded well-conditioned random ones), the same letterboxed images and truth boxes.
Then compare (1) every layer's forward output, (2) the loss of every mini-batch, (3) the head
gradient (Darknet's l.delta against the Caffe loss layer's, and what reaches the layer below),
(4) after every SGD step every weight, bias, BN scale, momentum buffer and rolling statistic;
Caffe then takes Darknet's state, so each step is compared from the same start. Each check has
a bound derived from its inputs' measured difference (d2c.tolerances), printed beside it.
Darknet runs in a child process, so its flush-to-zero mode never touches the Caffe side. Exit
status 0 only when every check is within its bound.
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
from d2c.tolerances import (CEILINGS, EPS32, SAFETY, VISIBLE_ULPS, Check, delta_check, derived_bound, formula_check,
                            head_sensitivity, loss_bound, ulp, worst)

#: The fixed ceilings of every check (d2c.tolerances); each check's own bound is derived per run.
TOLERANCES = CEILINGS
#: [net] keys parity sets unless --set gives them: burn_in holds the rate near 0 for its first
#: batches, so a 10-step run would move no weight and its update check would compare nothing.
PARITY_NET_DEFAULTS = {"burn_in": "0"}
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
    checks: list[Check] = field(default_factory=list)
    net_defaults: dict[str, str] = field(default_factory=dict)
    #: leaky/ReLU pre-activations of the other sign within float order of zero, per layer, summed over
    #: the mini-batches: Caffe's backward took Darknet's slope there (take_sign_near_ties)
    sign_ties: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "cfg": self.cfg, "weights": self.weights, "engine": self.engine,
                "engine_reason": self.engine_reason, "batch": self.batch,
                "subdivisions": self.subdivisions, "bn": self.bn, "darknet_compat": self.darknet_compat,
                "net_defaults": self.net_defaults,
                "checks": [check.to_json() for check in self.checks],
                "forward": self.forward, "loss": self.loss, "grad": self.grad, "update": self.update,
                "emulated_defects": self.emulated_defects, "sign_ties": self.sign_ties,
                "tolerances": dict(TOLERANCES),
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
    parameters, so the momentum buffers come back under the names of the arrays they update; a blob
    no slot updates (a frozen BN beta, the statistics) reads as 0, as Darknet's accumulator of an
    array it never updates stays.
    """
    from dataclasses import replace

    from d2c.export import caffe_to_darknet

    layers = []
    for layer in conversion.net.layers:
        if layer.name in net.params:
            blobs = [np.array(blob.data if updates is None else updates.get(f"{layer.name}/{k}", 0 * blob.data),
                              np.float32) for k, blob in enumerate(net.params[layer.name])]
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
        defaults = {k: v for k, v in PARITY_NET_DEFAULTS.items() if k not in (net_overrides or {})}
        cfg = training_cfg(cfg_path, tmp, batch, subdivisions, size, {**defaults, **(net_overrides or {})})
        engine, engine_reason = choose_engine(cfg, engine)
        graph = _build_copy(cfg_path, cfg, "alexeyab" if engine == "alexeyab" else None)
        heads = graph.heads()
        if not heads or any(h.kind not in LAYER_CLASS for h in heads):
            raise D2CError(f"{cfg_path}: parity needs a cfg whose heads all have a training loss: "
                           f"{' or '.join(f'[{kind}]' for kind in LAYER_CLASS)}")
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
                              engine_reason=engine_reason, net_defaults=defaults)
        darknet_compat_asked, darknet_compat = darknet_compat, report.darknet_compat   # each engine's own
        with DarknetProcess(cfg, wfile, clear=True, engine=engine) as dn:
            # (1) forward, inference mode, first mini-batch.
            x0 = x_all[:batch]
            dn.forward(x0)
            outputs = {n.index: dn.layer_output(n.index) for n in graph.nodes}
            deploy = build_conversion(graph, arrays, header,
                                      ConvertOptions(flavor=graph.flavor, mode=DEPLOY, batch=batch))
            fwd = compare_outputs(graph, deploy, outputs, x0)
            ceiling = CEILINGS["forward_max_rel"]
            report.forward = {"max_rel": fwd.max_rel, "max_abs": fwd.max_abs, "bound": ceiling,
                              "layers": [{"index": d.index, "type": d.kind, "shape": list(d.shape),
                                          "max_abs": d.max_abs, "max_rel": d.max_rel} for d in fwd.layers]}
            report.checks.append(Check("forward", fwd.max_rel, ceiling, {"note": "identical inputs: float order only"}))
            # (2)-(4): training on both sides.
            if darknet_compat:
                report.emulated_defects = emulate_darknet_defects(graph, train)
            elif engine == "alexeyab" and darknet_compat_asked:
                from d2c.alexeyab_cpu import emulate_alexeyab_cpu
                report.emulated_defects = emulate_alexeyab_cpu(graph, train)
            net = load_caffe(train.net, phase="train")
            sgd = DarknetSGD(net, train, TrainConfig.from_section(graph.net.section, batch=batch))
            losses: list[dict[str, float]] = []
            loss_checks: list[Check] = []
            steps_done: list[dict[str, Any]] = []
            before, r_inputs = arrays, 0.0
            iterator = range(max(1, steps) * subdivisions)
            if progress:
                from tqdm import tqdm
                iterator = tqdm(iterator, desc="parity", unit="mini-batch", leave=False)
            for k in iterator:
                xs, ts = x_all[k * batch:(k + 1) * batch], truth_all[k * batch:(k + 1) * batch]
                d_err = dn.train_datum(xs, ts)
                ties: dict[str, int] = {}
                take = (lambda n: ties.update(take_sign_near_ties(dn, n, graph, train))) if engine == "debian" else None
                c_err, updated = sgd.train_minibatch(net, xs, ts, before_backward=take)
                for where, count in ties.items():
                    report.sign_ties[where] = report.sign_ties.get(where, 0) + count
                deltas = head_deltas(dn, net, train)
                rel = abs(c_err - d_err) / max(abs(d_err), 1e-30)
                bound = loss_bound(d_err, [(theirs, ours) for theirs, ours, _layer in deltas.values()])
                losses.append({"minibatch": k, "darknet": d_err, "caffe": c_err, "rel": rel, "bound": bound})
                # what this step's gradients start from: the head deltas and the forward activations
                r_inputs = max(r_inputs, fwd.max_rel + max(relative_difference(theirs, ours)
                                                           for theirs, ours, _layer in deltas.values()))
                loss_checks.append(Check(f"mini-batch {k}", rel, bound))
                if k == 0:  # (3) the head gradients of the first mini-batch
                    report.checks.extend(head_checks(dn, net, graph, train, batch, deltas, engine))
                if steps == 0:
                    break
                if updated:  # (4) every array after this step, then Caffe resynchronised to Darknet
                    step = compare_step(dn, net, graph, train, sgd, before, len(steps_done), r_inputs)
                    steps_done.append(step)
                    r_inputs = 0.0
                    before = step.pop("darknet_arrays")
                    resync(net, train, sgd, before, step.pop("darknet_updates"))
                    if engine == "alexeyab" and darknet_compat_asked:
                        from d2c.alexeyab_cpu import resync_kept_deltas
                        resync_kept_deltas(dn, net, batch)
            report.loss = {"darknet": losses[0]["darknet"], "caffe": losses[0]["caffe"],
                           "rel": max(entry["rel"] for entry in losses), "minibatches": losses}
            report.checks.insert(1, worst(loss_checks, "loss"))
            report.loss["bound"] = report.checks[1].bound
            grad = [c for c in report.checks if c.name.startswith("layer ") and "formula" not in c.name]
            report.grad = {"max_abs": max(c.detail["max_abs"] for c in grad),
                           "max_rel": max(c.detail["max_rel"] for c in grad),
                           "checks": {c.name: {**c.detail, "value": c.value, "bound": c.bound} for c in report.checks
                                      if c.name.startswith("layer ")}}
            if steps:
                report.update = summarize_update(steps_done, steps, dn.seen(), sgd.seen)
                report.checks.extend(update_checks(report.update))
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


def head_deltas(dn, net, conversion) -> dict[int, tuple[np.ndarray, np.ndarray, Any]]:
    """Per head after a training mini-batch: Darknet's l.delta, the Caffe loss layer's delta, the layer."""
    from d2c.loss.emit import loss_layer_name

    names = list(net._layer_names)
    out = {}
    for head in conversion.emitter.heads:
        layer = net.layers[names.index(loss_layer_name(conversion.graph.nodes[head.index]))]
        out[head.index] = (np.asarray(dn.layer_delta(head.index), np.float32), layer._result.delta, layer)
    return out


def head_checks(dn, net, graph: Graph, conversion, batch: int,
                deltas: dict[int, tuple[np.ndarray, np.ndarray, Any]], engine: str = "debian") -> list[Check]:
    """Three checks per head after the first training mini-batch.

    delta: Darknet's l.delta against the Caffe loss layer's, bounded by the head-input difference
    through the head's Jacobian (finite differences on d2c's loss); delta formula: d2c's loss on
    Darknet's own head input against Darknet's delta (ulps); propagated: the delta Darknet leaves on
    the layer feeding the head (after its backward) against minus the Caffe bottom diff times b
    (Caffe averages over the mini-batch); the head passes its delta on, so the same bound.
    """
    from d2c.loss.emit import TRUTH_BLOB

    checks: list[Check] = []
    truth = np.asarray(net.blobs[TRUTH_BLOB].data, np.float32).reshape(batch, -1)
    for head in conversion.emitter.heads:
        node = graph.nodes[head.index]
        theirs, ours, layer = deltas[head.index]
        x_theirs = np.asarray(dn.layer_output(node.inputs[0]), np.float32)
        x_ours = np.asarray(net.blobs[head.blob].data, np.float32).reshape(x_theirs.shape)
        delta_of = lambda z: layer.compute(np.asarray(z, np.float32), truth).delta  # noqa: E731
        on_theirs = np.asarray(delta_of(x_theirs), np.float32)
        sens = head_sensitivity(delta_of, x_theirs, x_theirs.astype(np.float64) - x_ours,
                                5 + int(node.attrs["classes"]))
        direct = on_theirs.astype(np.float64) - np.asarray(ours, np.float64).reshape(on_theirs.shape)
        delta = delta_check(f"layer {head.index} delta", theirs, ours, sens, direct)
        delta.detail["input_max_abs"] = float(np.max(np.abs(x_theirs.astype(np.float64) - x_ours)))
        propagated = delta_check(f"layer {head.index} propagated", dn.layer_delta(node.inputs[0]),
                                 -np.asarray(net.blobs[head.blob].diff, np.float64) * batch, sens, direct)
        formula = formula_check(f"layer {head.index} delta formula", theirs, on_theirs)
        if engine == "alexeyab":    # its -Ofast heads' arithmetic bounds the check (d2c.alexeyab_cpu)
            from d2c.alexeyab_cpu import ofast_formula_check
            formula = ofast_formula_check(formula, node, x_theirs, theirs, on_theirs, sens.jacobian)
        checks += [delta, formula, propagated]
    return checks


def relative_difference(theirs: np.ndarray, ours: np.ndarray) -> float:
    """max|a - b| / max|a| (0 for an all-zero reference that is matched)."""
    a = np.asarray(theirs, np.float64)
    err = float(np.max(np.abs(a - np.asarray(ours, np.float64).reshape(a.shape)))) if a.size else 0.0
    mag = float(np.max(np.abs(a))) if a.size else 0.0
    return err / mag if mag else err


#: Darknet's accumulator fields and the arrays they update (layer struct naming, any section).
UPDATE_OF = {"bias_updates": "biases", "scale_updates": "scales", "weight_updates": "weights"}


def darknet_arrays(dn, graph: Graph) -> tuple[dict[int, dict[str, np.ndarray]], dict[int, dict[str, np.ndarray]]]:
    """The engine's parameters and update accumulators (renamed to the arrays they update), in the
    shapes of the graph's ParamArrays."""
    params: dict[int, dict[str, np.ndarray]] = {}
    updates: dict[int, dict[str, np.ndarray]] = {}
    for node in graph.nodes:
        if not node.params:
            continue
        shapes = {spec.name: spec.shape for spec in node.params}
        got = dn.layer_params(node.index)
        missing = sorted(set(shapes) - set(got))
        if missing:
            raise D2CError(f"{node.where}: the engine's layer has no {', '.join(missing)}")
        params[node.index] = {name: np.asarray(got[name], np.float32).reshape(shape) for name, shape in shapes.items()}
        updates[node.index] = {UPDATE_OF[name]: np.asarray(value, np.float32).reshape(shapes[UPDATE_OF[name]])
                               for name, value in dn.layer_updates(node.index).items() if UPDATE_OF.get(name) in shapes}
    return params, updates


def compare_step(dn, net, graph: Graph, conversion, sgd, before: dict[int, dict[str, np.ndarray]],
                 index: int, r_inputs: float) -> dict[str, Any]:
    """Every array and accumulator after one SGD step, both engines having started it from `before`.

    Rows: learned arrays (weights, biases, scales: difference relative to the step's change, bound
    from their accumulators' difference, since w += lr/B * U exactly on both sides), accumulators
    (relative to their size, bound from the step's input differences `r_inputs` times 1 + the
    layers the gradient crossed; the ceiling when a max-pool argmax flipped; plus, for the arrays
    leaky/relu sign flips reach, their measured effect: d2c.activation_flips), BN statistics
    (from `r_inputs`: a step moves them by a convex combination with the batch statistics).
    """
    theirs, theirs_u = darknet_arrays(dn, graph)
    flips = routing_flips(dn, net, graph, conversion)
    from d2c.activation_flips import find_activation_flips
    signs = find_activation_flips(dn, net, graph, conversion, sgd)
    depth = backward_depth(graph)
    ours = caffe_arrays(net, conversion)
    ours_u = caffe_arrays(net, conversion, updates=sgd.U)
    momentum = float(sgd.cfg.momentum)
    rows: list[dict[str, Any]] = []
    for node in graph.nodes:
        for name, ref in theirs.get(node.index, {}).items():
            ref64 = np.asarray(ref, np.float64)
            err = float(np.max(np.abs(ref64 - ours[node.index][name].reshape(ref.shape))))
            change = float(np.max(np.abs(ref64 - before[node.index][name])))
            mag = float(np.max(np.abs(ref64)))
            row: dict[str, Any] = {"step": index, "layer": node.index, "array": name, "max_abs": err,
                                   "moved": change, "magnitude": mag}
            if name in STATISTICS:
                row["max_rel"] = err / (mag or 1.0)
                row["bound"] = derived_bound(r_inputs, 1.0, CEILINGS["stats_max_rel"], 4 * EPS32)
            elif name in theirs_u.get(node.index, {}):
                u = np.asarray(theirs_u[node.index][name], np.float64)
                u_err = float(np.max(np.abs(u - ours_u[node.index][name].reshape(u.shape))))
                u_mag = float(np.max(np.abs(u)))
                row["momentum_rel"] = u_err / u_mag if u_mag else u_err
                row["momentum_bound"] = derived_bound(r_inputs, 1 + depth[node.index], CEILINGS["momentum_rel"],
                                                      4 * EPS32)
                row["of_change"] = err / change if change else (0.0 if err == 0 else np.inf)
                derived = row["momentum_rel"] if momentum else CEILINGS["update_of_change"] / SAFETY
                floor = 4 * float(ulp(mag)) / change if change else 0.0
                row["bound"] = derived_bound(derived, 1.0, CEILINGS["update_of_change"], floor)
                if flips:   # a gradient routed elsewhere: only the ceiling can bound it
                    row["routing_flips"] = flips
                    row["momentum_bound"] = CEILINGS["momentum_rel"] + 4 * EPS32
                effect = signs.effect(node.index, name)
                if effect and momentum and u_mag:   # leaky sign flips reach it: their measured effect
                    extra = SAFETY * momentum * effect / u_mag      # on U, and on w relative to its change
                    row["momentum_bound"] += extra
                    row["bound"] += extra
                    row["activation_flips"] = signs.counts
                    row["flip_effect"] = extra / SAFETY
            rows.append(row)
    full_u = {i: {**theirs[i], **u} for i, u in theirs_u.items()}
    return {"step": index, "rows": rows, "darknet_arrays": theirs, "darknet_updates": full_u,
            "activation_flips": signs.counts}


def backward_depth(graph: Graph) -> dict[int, int]:
    """Per node, the most layers with parameters its gradient crosses on the way from a head: each
    adds a float-order difference of the size of its inputs' (the sensitivity of an accumulator)."""
    consumers: dict[int, list[int]] = {}
    for node in graph.nodes:
        for src in node.inputs:
            consumers.setdefault(src, []).append(node.index)
    depth: dict[int, int] = {}
    for node in reversed(graph.nodes):
        depth[node.index] = max((depth[c] + bool(graph.nodes[c].params) for c in consumers.get(node.index, [])),
                                default=0)
    return depth


#: Activations whose backward slope is chosen by the sign of the pre-activation (Darknet's
#: gradient_array: > 0), with the slope below zero.
SIGN_SLOPES = {"leaky": 0.1, "relu": 0.0}


def take_sign_near_ties(dn, net, graph: Graph, conversion) -> dict[str, int]:
    """Caffe takes Darknet's slope where a leaky/ReLU pre-activation has the other sign within float
    order of zero; returns the count per layer (only layers with such ties).

    Why: a pre-activation of -1e-6 in one engine and +1e-6 in the other gets slope 0.1 in one
    backward and 1 in the other, a 0.9 x delta jump at that element (yolov3-voc at 160, layer 102:
    one such element turns a 1.4e-5 input difference into 0.13 of the layer's delta, then 5-10% of
    deep darknet53 weight updates; tests/test_bn_trace.py). Like resynchronising the weights, this
    makes the compared step start from the same decisions. Float order means both values within
    the forward ceiling (relative to the layer's largest output) of zero: a real mistake flips signs
    far from zero, which stay and fail. Caffe's in-place ReLU backward reads the sign from the output
    blob, so Darknet's output value is written there (it differs from Caffe's by float order).
    """
    out: dict[str, int] = {}
    tie = CEILINGS["forward_max_rel"]
    for node in graph.nodes:
        slope = SIGN_SLOPES.get(node.attrs.get("activation", ""))
        if slope is None or not node.params:
            continue
        theirs = np.asarray(dn.layer_output(node.index), np.float32)
        blob = net.blobs[conversion.emitter.blob(node.index)].data
        ours = blob.reshape(theirs.shape)
        near = tie * float(np.max(np.abs(theirs)))
        pre = lambda y: np.where(y > 0, y, y / slope if slope else y)  # noqa: E731
        flip = ((theirs > 0) != (ours > 0)) & (np.abs(pre(theirs)) <= near) & (np.abs(pre(ours)) <= near)
        count = int(np.count_nonzero(flip))
        if count:
            ours[flip] = theirs[flip]
            out[f"layer {node.index} ({node.kind})"] = count
    return out


def routing_flips(dn, net, graph: Graph, conversion) -> dict[str, int]:
    """Per node with a discrete gradient route (max pooling), the choices that differ between
    Darknet's and Caffe's inputs of the last training forward; only nodes with flips."""
    from d2c.layers import REGISTRY
    from d2c.layers.base import LayerConverter

    out: dict[str, int] = {}
    for node in graph.nodes:
        converter = REGISTRY[node.kind]
        if type(converter).routing_flips is LayerConverter.routing_flips:
            continue
        theirs = np.asarray(dn.layer_output(node.inputs[0]), np.float32)
        ours = np.asarray(net.blobs[conversion.emitter.blob(node.inputs[0])].data, np.float32).reshape(theirs.shape)
        count = converter.routing_flips(node, theirs, ours)
        if count:
            out[f"layer {node.index} ({node.kind})"] = count
    return out


def caffe_blobs(conversion, arrays: dict[int, dict[str, np.ndarray]]) -> dict[str, list[np.ndarray]]:
    """The Caffe blobs each converter's emit makes of Darknet arrays, by Caffe layer name."""
    from d2c.convert import build_conversion

    fresh = build_conversion(conversion.graph, arrays, conversion.header, conversion.options)
    return {layer.name: layer.blobs for layer in fresh.net.layers if layer.blobs}


def resync(net, conversion, sgd, arrays: dict[int, dict[str, np.ndarray]],
           updates: dict[int, dict[str, np.ndarray]]) -> None:
    """Caffe's parameters and momentum buffers := Darknet's, so the float-order differences of one
    step do not compound into the next (each step is compared from the same state)."""
    for name, blobs in caffe_blobs(conversion, arrays).items():
        for blob, value in zip(net.params[name] if name in net.params else [], blobs):
            blob.data[...] = np.asarray(value, np.float32).reshape(blob.data.shape)
    fresh_u = caffe_blobs(conversion, updates)
    for slot in sgd.slots:
        sgd.U[slot.key] = np.asarray(fresh_u[slot.layer][slot.index], np.float32).reshape(sgd.U[slot.key].shape).copy()


def summarize_update(steps_done: list[dict[str, Any]], steps: int, seen_darknet: int,
                     seen_caffe: int) -> dict[str, Any]:
    """The update section of the report: every row of every step, the worst of each kind, and the
    largest learned change (a check that moved nothing compared nothing)."""
    rows = [row for step in steps_done for row in step["rows"]]
    learned = [row for row in rows if "of_change" in row]
    stats = [row for row in rows if row["array"] in STATISTICS]
    largest = max((row["moved"] for row in learned), default=0.0)
    visible = max((row["moved"] / float(ulp(row["magnitude"])) for row in learned if row["magnitude"]), default=0.0)
    return {"steps": steps, "max_abs": max((row["max_abs"] for row in learned), default=0.0),
            "stats_max_rel": max((row["max_rel"] for row in stats), default=0.0),
            "largest_change": largest, "largest_change_ulps": visible, "arrays": rows,
            "activation_flips": {step["step"]: step["activation_flips"] for step in steps_done
                                 if step.get("activation_flips")},
            "seen_darknet": seen_darknet, "seen_caffe": seen_caffe}


def flipped(row: dict[str, Any]) -> dict[str, Any]:
    """A row's routing flips, for the check's detail."""
    return {key: row[key] for key in ("routing_flips", "activation_flips", "flip_effect") if row.get(key)}


def update_checks(update: dict[str, Any]) -> list[Check]:
    """update (learned arrays), momentum (accumulators), BN statistics, and the vacuous-update check."""
    rows = update["arrays"]
    where = lambda r: f"step {r['step']} layer {r['layer']} {r['array']}"  # noqa: E731
    groups = {
        "update": [Check(where(r), r["of_change"], r["bound"], flipped(r)) for r in rows if "of_change" in r],
        "momentum": [Check(where(r), r["momentum_rel"], r["momentum_bound"], flipped(r))
                     for r in rows if "momentum_rel" in r],
        "BN statistics": [Check(where(r), r["max_rel"], r["bound"]) for r in rows if r["array"] in STATISTICS],
    }
    checks = [worst(group, name) for name, group in groups.items() if group]
    # Below 4 ulps of the arrays' own size a step's change is rounding: nothing would be compared.
    checks.append(Check("learned change (ulps)", update["largest_change_ulps"], VISIBLE_ULPS,
                        {"largest_change": update["largest_change"]}, at_least=True))
    return checks


def format_report(report: ParityReport) -> str:
    """The per-layer forward table, then one row per check: value, bound, verdict."""
    defaults = ", ".join(f"{k}={v}" for k, v in report.net_defaults.items())
    lines = [f"d2c parity: {report.cfg}  weights: {report.weights}",
             f"  engine: {'AlexeyAB Darknet' if report.engine == 'alexeyab' else 'Debian Darknet'} "
             f"({report.engine_reason})",
             f"  mini-batch b={report.batch}, subdivisions S={report.subdivisions}, steps={report.steps}, "
             f"BN={report.bn}, darknet-compat={'on' if report.darknet_compat else 'off'}"
             + (f", {defaults} (parity's default; --set to change)" if defaults else ""),
             "", f"{'layer':>5}  {'type':14s} {'shape':22s} {'max abs':>10s} {'max rel':>10s}"]
    for d in report.forward.get("layers", []):
        lines.append(f"{d['index']:5d}  {d['type']:14s} {str(tuple(d['shape'])):22s} "
                     f"{d['max_abs']:10.3g} {d['max_rel']:10.3g}")
    lines += ["", f"  {'check':28s} {'value':>10s} {'bound':>10s}"]
    for check in report.checks:
        relation = ">=" if check.at_least else "<="
        where = f"  ({check.detail['where']})" if "where" in check.detail else ""
        if check.detail.get("routing_flips"):
            where += ", argmax near-tie flips between the engines: " + ", ".join(
                f"{n} in {k}" for k, n in check.detail["routing_flips"].items())
        if check.detail.get("activation_flips"):
            signs = ", ".join(f"{n} in {k}" for k, n in check.detail["activation_flips"].items())
            where += (f", leaky/relu sign flips between the engines ({signs}), "
                      f"bound includes their effect {check.detail['flip_effect']:.3g}")
        lines.append(f"  {check.name:28s} {check.value:10.3g} {relation}{check.bound:8.3g}  "
                     f"{'ok' if check.ok else 'FAIL'}{where}")
    if report.update:
        u = report.update
        lines.append(f"  update: {u['steps']} step(s) compared one by one (Caffe resynchronised to Darknet "
                     f"after each), "
                     f"largest learned change {u['largest_change']:.3g}")
        if not next(c for c in report.checks if c.at_least).ok:
            lines.append(f"  FAILED: vacuous update: the learned arrays moved by at most "
                         f"{u['largest_change_ulps']:.2g} float32 ulps of their size; nothing was compared "
                         f"(learning_rate too small? burn_in?)")
    for note in report.emulated_defects:
        lines.append(f"  emulated Darknet defect: {note}")
    if report.sign_ties:
        lines.append("  activation sign near-ties (pre-activation within float order of 0, Caffe took Darknet's "
                     "slope): " + ", ".join(f"{n} in {k}" for k, n in report.sign_ties.items()))
    lines.append(f"  {'OK' if report.ok else 'FAILED'} in {report.seconds:.1f} s")
    return "\n".join(lines)


def plot_report(report: ParityReport, path: Path) -> None:
    """Per-layer forward error, per-mini-batch loss error and per-step update error, each beside its
    bound (log scale): where in the net and when the engines part."""
    from d2c.plots import plot_panels

    layers = report.forward.get("layers", [])
    panels = [("forward: max rel per layer (x: layer index)",
               [("max rel", [d["index"] for d in layers], [d["max_rel"] for d in layers], "tab:blue"),
                ("bound", [d["index"] for d in layers], [report.forward["bound"]] * len(layers), "tab:red")])]
    batches = report.loss.get("minibatches", [])
    panels.append(("loss: rel per mini-batch (x: mini-batch)",
                   [("rel", [m["minibatch"] for m in batches], [m["rel"] for m in batches], "tab:blue"),
                    ("bound", [m["minibatch"] for m in batches], [m["bound"] for m in batches], "tab:red")]))
    rows = [r for r in report.update.get("arrays", []) if "of_change" in r]
    if rows:
        steps = sorted({r["step"] for r in rows})
        pick = [max((r for r in rows if r["step"] == k), key=lambda r: r["of_change"] / r["bound"]) for k in steps]
        panels.append(("update: worst learned array of each step, difference / change (x: step)",
                       [("value", steps, [r["of_change"] for r in pick], "tab:blue"),
                        ("bound", steps, [r["bound"] for r in pick], "tab:red")]))
    plot_panels(path, panels, xlabel="", ylabel="relative difference", log_y=True, size=(8.0, 3.2))


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
    p.add_argument("--plot", type=Path, metavar="PNG", help="plot each layer's, mini-batch's and step's error "
                   "beside its bound")


def run(args: argparse.Namespace) -> int:
    from d2c.fsutil import check_output_file
    for option, path in (("--json", args.json), ("--plot", args.plot)):
        if path:
            check_output_file(path, option)
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
    if args.plot:
        plot_report(report, args.plot)
        print(f"  wrote {args.plot}")
    return 0 if report.ok else 1


# `d2c.parity(cfg, weights, **opts)` calls run_parity() (the package API, see d2c.api).
from d2c.api import callable_module  # noqa: E402

callable_module(__name__, "run_parity")
