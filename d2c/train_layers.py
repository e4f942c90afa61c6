"""Every layer of the *training* forward against the real Darknet, each fed the engine's own input.

Why: in training mode BN normalises with batch statistics, so a rounding difference in one layer
reaches all later layers, and after a hundred layers `d2c parity` cannot tell a float-order drift
from a semantic difference. Feeding each layer's Caffe layers the engine's outputs of the layers it
reads ("teacher forcing") isolates every layer: a semantic difference shows at the layer that has
it, float order stays at the rounding of that one layer (convolutions: another summation order;
everything else: bit for bit).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from d2c.errors import D2CError
from d2c.forward_check import LayerDiff, diff


def caffe_layer_span(names: list[str], prefix: str) -> tuple[int, int] | None:
    """First and last index of the Caffe layers a node emitted (named `prefix` or `prefix_*`)."""
    hits = [k for k, name in enumerate(names) if name == prefix or name.startswith(prefix + "_")]
    return (hits[0], hits[-1]) if hits else None


def training_layers(cfg_path: str | Path, *, size: tuple[int, int], seed: int = 3, batch: int = 2,
                    engine: str = "alexeyab", net_overrides: dict[str, str] | None = None) -> list[LayerDiff]:
    """One training-mode forward of random weights (seed) on `d2c parity`'s images and truth, in the
    engine and, layer by layer from the engine's inputs, in the Caffe train net (with the engine's
    CPU-training emulation). The heads are skipped: their loss is checked by `d2c parity`."""
    from d2c.alexeyab_cpu import emulate_alexeyab_cpu
    from d2c.caffe.emitter import TRAIN, ConvertOptions
    from d2c.caffe.runtime import load_caffe
    from d2c.convert import build_conversion
    from d2c.darknet.runtime import DarknetProcess
    from d2c.darknet.weights import WeightsHeader, random_weights, read_weights, write_weights
    from d2c.parity import DARKNET_DATA, DEFAULT_IMAGES, _build_copy, emulate_darknet_defects, load_images, \
        random_truth, training_cfg
    from d2c.solver import DarknetSGD, TrainConfig

    if engine not in ("debian", "alexeyab"):
        raise D2CError(f"engine must be debian or alexeyab, got {engine!r}")
    with tempfile.TemporaryDirectory(prefix="d2c-trainlayers-") as tmp_s:
        tmp = Path(tmp_s)
        cfg = training_cfg(cfg_path, tmp, batch, 1, size, net_overrides)
        graph = _build_copy(cfg_path, cfg, "alexeyab" if engine == "alexeyab" else None)
        heads = graph.heads()
        header, arrays = WeightsHeader(), random_weights(graph, seed)
        wfile = tmp / "start.weights"
        write_weights(wfile, header, graph, arrays)
        arrays = read_weights(wfile, graph)[1]
        x = load_images([DARKNET_DATA / DEFAULT_IMAGES[k % len(DEFAULT_IMAGES)] for k in range(batch)],
                        graph.net.width, graph.net.height)
        boxes = max(h.attrs["max_boxes"] for h in heads) if engine == "alexeyab" else 90
        truth = random_truth(batch, heads[0].attrs["classes"], boxes, seed + 1)
        conv = build_conversion(graph, arrays, header, ConvertOptions(flavor=graph.flavor, mode=TRAIN, bn="exact",
                                                                      batch=batch))
        if engine == "alexeyab":
            emulate_alexeyab_cpu(graph, conv)
        else:
            emulate_darknet_defects(graph, conv)
        with DarknetProcess(cfg, wfile, clear=True, engine=engine) as dn:
            dn.forward(x, train=True, truth=truth)
            outputs = {node.index: dn.layer_output(node.index) for node in graph.nodes}
        net = load_caffe(conv.net, phase="train")
        DarknetSGD(net, conv, TrainConfig.from_section(graph.net.section, batch=batch))._feed(net, x, truth)
        names = list(net._layer_names)
        rows: list[LayerDiff] = []
        for node in graph.nodes:
            span = caffe_layer_span(names, node.prefix)
            if node.kind in ("yolo", "region") or span is None:
                continue        # heads; and layers with nothing to run (a one-input route reuses its blob)
            for src in node.inputs:
                blob = net.blobs[conv.emitter.blob(src) if src >= 0 else "data"]
                blob.data[...] = (outputs[src] if src >= 0 else x).reshape(blob.data.shape)
            net._forward(*span)
            theirs = outputs[node.index]
            err, rel, mag = diff(theirs, np.asarray(net.blobs[conv.emitter.blob(node.index)].data))
            rows.append(LayerDiff(node.index, node.kind, tuple(theirs.shape), err, rel, mag))
        return rows
