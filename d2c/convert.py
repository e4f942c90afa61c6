"""`d2c convert`: Darknet cfg + weights -> Caffe prototxt + caffemodel + JSON sidecar.

Everything is validated (cfg, shapes, weights byte count) before the first byte is written,
and every file is written atomically, so a failure leaves no partial output behind.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from d2c.caffe.emitter import DEPLOY, TRAIN, ConvertOptions, Emitter
from d2c.caffe.proto import CaffeNet, to_prototxt, write_caffemodel
from d2c.darknet.cfg import parse_cfg
from d2c.darknet.graph import Graph, build_graph
from d2c.darknet.weights import WeightsHeader, random_weights, read_weights
from d2c.errors import CfgError, D2CError, ParamError, WeightsError
from d2c.fsutil import atomic_write_text, staged_outputs
from d2c.layers import REGISTRY
from d2c.preprocess import make_contract

SIDECAR_VERSION = 1


@dataclass
class Conversion:
    """Result of building the Caffe net in memory (nothing written yet)."""

    graph: Graph
    header: WeightsHeader
    net: CaffeNet
    emitter: Emitter
    options: ConvertOptions
    sidecar: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    @property
    def target(self) -> dict[str, Any]:
        """What --target linted and rewrote (sidecar["target"]); the plain net has none."""
        return self.sidecar.get("target") or {"name": "caffe", "rewrites": {}, "lint": []}


def load_graph(cfg_path: str | Path, flavor: str | None = None, *, continue_on_error: bool = False) -> Graph:
    """Parse and shape the cfg (all problems reported together)."""
    return build_graph(parse_cfg(cfg_path), flavor, continue_on_error=continue_on_error)


def build_conversion(graph: Graph, weights: dict[int, dict[str, np.ndarray]], header: WeightsHeader,
                     options: ConvertOptions, *, name: str | None = None,
                     progress: bool = False) -> Conversion:
    """Run every converter over the graph and collect the Caffe net and decoding metadata."""
    em = Emitter(net_name=name or Path(graph.cfg.path).stem, options=options,
                 input_shape=(graph.net.channels, graph.net.height, graph.net.width))
    nodes = graph.nodes
    if progress and len(nodes) > 40:
        from tqdm import tqdm
        nodes = tqdm(nodes, desc="convert", unit="layer", leave=False)
    warnings = list(graph.warnings)
    for node in nodes:
        warnings.extend(node.attrs.pop("warnings", []) or [])
        first = len(em.layers)
        REGISTRY[node.kind].emit(node, em, weights.get(node.index, {}))
        em.origin.update((layer.name, node.index) for layer in em.layers[first:])
    if options.mode == TRAIN:
        from d2c.loss.emit import add_truth_input
        add_truth_input(em, graph)
    target_report = None
    if options.target != "caffe":
        from d2c.targets import apply_target, get_target
        if options.mode == TRAIN:
            raise D2CError(f"--target {options.target} rewrites the deploy net; it does not apply to --train")
        target_report = apply_target(em, graph, get_target(options.target))
    sidecar = make_sidecar(graph, em, header)
    if target_report is not None:
        sidecar["target"] = target_report.to_json()
    return Conversion(graph=graph, header=header, net=em.net(), emitter=em, options=options,
                      sidecar=sidecar, warnings=warnings)


def make_sidecar(graph: Graph, em: Emitter, header: WeightsHeader) -> dict[str, Any]:
    """What decoding and export need, beside the Caffe files."""
    return {
        "d2c_sidecar": SIDECAR_VERSION,
        "cfg": str(graph.cfg.path),
        "flavor": graph.flavor,
        "input": {"name": "data", "channels": graph.net.channels, "height": graph.net.height,
                  "width": graph.net.width, "letter_box": graph.net.section.get_int("letter_box", 0)},
        "preprocess": make_contract(graph.net.width, graph.net.height, graph.net.channels, graph.flavor,
                                    graph.net.section.get_int("letter_box", 0), [h.kind for h in em.heads]),
        "bn": {"mode": "folded" if em.options.fold_bn else
               ("pjreddie sqrt(var)+1e-6" if graph.flavor == "pjreddie" else "alexeyab sqrt(var+1e-5)")},
        "fold_bn": em.options.fold_bn,
        "weights_header": {"major": header.major, "minor": header.minor, "revision": header.revision,
                           "seen": header.seen},
        "heads": [{"index": h.index, "kind": h.kind, "blob": h.blob, "shape": list(h.shape), **h.attrs}
                  for h in em.heads],
        "blobs": {str(i): b for i, b in em.blob_of.items() if i >= 0},
    }


@dataclass
class ConvertReport:
    prototxt: Path
    caffemodel: Path
    sidecar: Path
    layers: int
    caffe_layers: int
    params: int
    outputs: list[str]
    seconds: float
    warnings: list[str]
    flavor: str
    flavor_reason: str
    extra: list[Path] = field(default_factory=list)
    target: dict[str, Any] = field(default_factory=dict)


def convert(cfg_path: str | Path, weights_path: str | Path | None, out_dir: str | Path, *,
            flavor: str | None = None, fold_bn: bool = False, continue_on_error: bool = False,
            allow_trailing: bool = False, seed: int = 0, train: bool = False, bn: str = "exact",
            batch: int | None = None, progress: bool = False, name: str | None = None,
            names: str | Path | None = None, data: str | Path | None = None,
            max_iter: int | None = None, target: str = "caffe",
            split_heads: bool = False) -> ConvertReport:
    """Convert and write OUT/<stem>.prototxt, .caffemodel, .json (and the train net with `train`).

    `names`: a class names file, checked against the class count and recorded in the sidecar so
    `d2c detect` labels boxes with it. `data` (with `train`): the Darknet .data file the train
    net's data layer reads; `max_iter`: the solver's, instead of max_batches minus seen. `target`: a
    deploy toolchain (d2c.targets) whose importer the deploy net must satisfy: its lint runs first, exact
    rewrites replace what it lacks, a layer with no exact form is an error naming its cfg line.
    `split_heads`: int8-friendly [yolo] heads (d2c.int8_heads), three outputs per head.
    """
    from d2c.targets import get_target
    get_target(target)
    start = time.perf_counter()
    if (data is not None or max_iter is not None) and not train:
        raise D2CError("--data and --max-iter describe the training net: add --train")
    graph = load_graph(cfg_path, flavor, continue_on_error=continue_on_error)
    if weights_path is None:
        header, arrays = WeightsHeader(), random_weights(graph, seed)
    else:
        header, arrays = read_weights(weights_path, graph, allow_trailing=allow_trailing)
    stem = name or Path(cfg_path).stem
    if stem in ("", ".", "..") or Path(stem).name != stem:
        raise D2CError(f"output name {stem!r} must be a plain file stem (no '/')")
    out = Path(out_dir)
    options = ConvertOptions(flavor=graph.flavor, fold_bn=fold_bn, mode=DEPLOY, batch=1, target=target)
    try:
        conv = build_conversion(graph, arrays, header, options, name=stem, progress=progress)
    except WeightsError as exc:  # values the converters refuse (e.g. negative BN variance)
        raise WeightsError(f"{weights_path or 'random weights'}: {exc}", exc.problems) from None
    if split_heads:
        if train:
            raise D2CError("--split-heads rewrites the deploy net only; convert without --train")
        from d2c.int8_heads import split_heads as split
        conv.net, conv.sidecar = split(conv.net, conv.sidecar)
    class_names = None
    if names is not None:
        from d2c.detect import class_names as read_names
        heads = conv.sidecar["heads"]
        if not heads:
            raise D2CError(f"--names {names}: the network has no detection head to name classes for")
        class_names = read_names(int(heads[-1]["classes"]), names)
    files = {"prototxt": out / f"{stem}.prototxt", "caffemodel": out / f"{stem}.caffemodel",
             "sidecar": out / f"{stem}.json"}
    extra: list[Path] = []
    train_conv = None
    if train:
        train_batch = batch or max(1, graph.net.batch // graph.net.subdivisions)
        train_opts = ConvertOptions(flavor=graph.flavor, mode=TRAIN, bn=bn, batch=train_batch)
        train_conv = build_conversion(graph, arrays, header, train_opts, name=stem)
    # Everything is built and checked; only now touch the output directory. All files are staged
    # together so a failure (or a kill) leaves the previous conversion complete and untouched.
    try:
        with staged_outputs(out, stem) as stage:
            write_caffemodel(conv.net, stage / files["caffemodel"].name)
            atomic_write_text(stage / files["prototxt"].name, header_comment(conv) + to_prototxt(conv.net))
            sidecar = dict(conv.sidecar, prototxt=files["prototxt"].name, caffemodel=files["caffemodel"].name)
            # The few pjreddie variances whose float32 var' has two preimages: export stays byte-exact.
            from d2c.export import exact_variance_overrides
            sidecar["bn_exact"] = exact_variance_overrides(graph, arrays)
            if class_names is not None:
                sidecar["names"] = class_names
            atomic_write_text(stage / files["sidecar"].name, json.dumps(sidecar, indent=1) + "\n")
            if train_conv is not None:
                from d2c.train_files import write_train_files
                extra = [out / p.name for p in write_train_files(train_conv, stage, stem, data=data, seed=seed,
                                                                 max_iter=max_iter, final_dir=out)]
    except ParamError as exc:  # a value that fits Darknet's int/float but not a Caffe field's type
        raise CfgError(f"{cfg_path}: {exc}", exc.problems) from None
    except OSError as exc:
        raise D2CError(f"{out}: cannot write the converted model: "
                       f"{exc.strerror or exc}{f' ({exc.filename})' if exc.filename else ''}") from None
    from d2c.int8_heads import output_blobs
    outputs = output_blobs(conv.sidecar)
    return ConvertReport(prototxt=files["prototxt"], caffemodel=files["caffemodel"], sidecar=files["sidecar"],
                         layers=len(graph.nodes), caffe_layers=len(conv.net.layers), params=graph.param_count(),
                         outputs=outputs, seconds=time.perf_counter() - start, warnings=conv.warnings,
                         flavor=graph.flavor, flavor_reason=graph.flavor_reason, extra=extra,
                         target=conv.target)


def header_comment(conv: Conversion) -> str:
    from d2c.int8_heads import output_blobs
    g = conv.graph
    split = any(h.get("split") for h in conv.sidecar.get("heads") or [])
    lines = [f"# Converted by d2c from {Path(g.cfg.path).name} ({g.flavor} Darknet semantics: {g.flavor_reason}).",
             f"# Outputs: raw inputs of the detection heads, in cfg order: "
             f"{', '.join(output_blobs(conv.sidecar)) or '(none)'}"
             f"{' (int8-friendly split heads: x/y and objectness+classes after the logistic)' if split else ''}.",
             "# Decode with `d2c detect` using the JSON sidecar beside this file."]
    return "\n".join(lines) + "\n"


# `d2c.convert(cfg, weights, out, **opts)` calls convert() (the package API, see d2c.api).
from d2c.api import callable_module  # noqa: E402

callable_module(__name__, "convert")
