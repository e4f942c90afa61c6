"""Trace where the engines' backward deltas part, layer by layer from the heads down, before and
after each layer's own backward (activation gradient + Darknet's batch-norm backward).

Why: darknet53 nets pass forward, loss and head deltas to ~1e-5 but their learned arrays differ
by several % of the change; this separates amplification by the BN backward (the same formula on
inputs that differ slightly) from a formula difference (the layer's backward applied to the
*same* input must then differ).

    PYTHONPATH=. python tools/bn_trace.py CFG --size 416 416 --batch 2 --out trace.npz
Darknet runs in a child process of its own (its FTZ mode); Caffe runs here. Found with it (issue
16): the jumps are leaky pre-activations within float order of zero that take the other sign in
the two engines (slope 0.1 vs 1), e.g. yolov3-voc at 160 layer 102: 1.4e-5 in, 0.13 out, one
element; the BN backward itself passes differences on at ~1-1.5x. Caffe runs this trace without
parity's take_sign_near_ties, so the flips show.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import numpy as np


def darknet_side(cfg: str, weights: str, inputs: str, out: str) -> None:
    """Forward, then backward_network's loop by hand, keeping each layer's delta before its backward."""
    from d2c.darknet.runtime import DarknetNet

    data = np.load(inputs)
    dn = DarknetNet(cfg, weights, clear=True, quiet=True)
    dn.forward(data["x"], train=True, truth=data["truth"])
    lib, net = dn.lib, dn.net
    call = ctypes.CFUNCTYPE(None, lib.Layer, lib.Network)
    before = {}
    for i in range(net.n - 1, -1, -1):
        layer = net.layers[i]
        if layer.delta:
            before[i] = dn.layer_delta(i)
        copy = lib.Network.from_buffer_copy(net)
        if i > 0:
            copy.input = net.layers[i - 1].output
            copy.delta = net.layers[i - 1].delta
        copy.index = i
        call(layer.backward)(layer, copy)
    after = {i: dn.layer_delta(i) for i in before}
    x_pre = {i: dn._read(net.layers[i].x, int(np.prod(after[i].shape))).reshape(after[i].shape)
             for i in before if net.layers[i].batch_normalize and net.layers[i].x}
    extra = {}
    for i in x_pre:
        c = int(net.layers[i].out_c)
        extra[f"mean{i}"] = dn._read(net.layers[i].mean, c)
        extra[f"variance{i}"] = dn._read(net.layers[i].variance, c)
        extra[f"scales{i}"] = dn._read(net.layers[i].scales, c)
        extra[f"output{i}"] = dn.layer_output(i)
    np.savez(out, **{f"before{i}": v for i, v in before.items()}, **{f"after{i}": v for i, v in after.items()},
             **{f"x{i}": v for i, v in x_pre.items()}, **extra)


def explain(directory: Path, caffe: dict[str, np.ndarray], layer: int) -> dict[str, float | int | list[int]]:
    """Why layer `layer`'s delta parts: d2c's BN backward (bit-exact to Darknet's) applied to each
    engine's incoming delta with *Darknet's* forward state (x, batch statistics, leaky slopes).
    If it reproduces Darknet's delta (formula 0) but not Caffe's, the engines' forward states differ
    at that layer: the elements where they do are reported with Darknet's output there."""
    from d2c.loss.bn import bn_backward

    dn = np.load(directory / "dn.npz")
    tb, ta = dn[f"before{layer}"], dn[f"after{layer}"]
    cb, ca = caffe[f"before{layer}"].reshape(tb.shape), caffe[f"after{layer}"].reshape(ta.shape)
    x, mean, var, scales, out = (dn[f"{k}{layer}"] for k in ("x", "mean", "variance", "scales", "output"))
    slope = np.where(out > 0, 1, 0.1).astype(np.float32)     # leaky (the trace is for darknet53 nets)

    def backward(before: np.ndarray) -> np.ndarray:
        dy = (np.asarray(before, np.float32) * slope).astype(np.float32) * scales[None, :, None, None]
        return bn_backward(dy.astype(np.float32), x, mean, var)

    top = float(np.max(np.abs(ta)))
    err = np.abs(ta.astype(np.float64) - ca)
    jumps = np.argwhere(err > 1e-3 * top)
    channels = sorted({int(j[1]) for j in jumps})
    rest = np.delete(err, channels, axis=1)
    worst = tuple(int(v) for v in np.unravel_index(int(np.argmax(err)), err.shape))
    return {"layer": layer,
            "formula": float(np.max(np.abs(backward(tb) - ta)) / top),
            "caffe_input_darknet_state": float(np.max(np.abs(backward(cb) - ca)) / top),
            "rel_before": float(np.max(np.abs(tb.astype(np.float64) - cb)) / np.max(np.abs(tb))),
            "rel_after": float(np.max(err) / top), "max_abs_after": float(np.max(err)),
            "rel_after_other_channels": float(np.max(rest) / top) if rest.size else 0.0,
            "elements_over_1e-3": len(jumps), "worst": list(worst),
            "darknet_output_at_worst": float(out[worst]),
            "delta_in_at_worst": float(tb[worst] * scales[worst[1]] / np.sqrt(float(var[worst[1]]) + 1e-5))}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cfg")
    p.add_argument("--size", type=int, nargs=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--explain", type=int, nargs="*", default=[], help="layers to explain (JSON on stdout)")
    p.add_argument("--darknet-side", nargs=3, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.darknet_side:
        darknet_side(a.cfg, *a.darknet_side)
        return
    from d2c.caffe.emitter import TRAIN, ConvertOptions
    from d2c.caffe.runtime import load_caffe
    from d2c.convert import build_conversion
    from d2c.darknet.cfg import parse_cfg
    from d2c.darknet.graph import build_graph
    from d2c.darknet.weights import WeightsHeader, random_weights, read_weights, write_weights
    from d2c.loss.emit import truth_boxes
    from d2c.parity import (DARKNET_DATA, DEFAULT_IMAGES, PARITY_NET_DEFAULTS, emulate_darknet_defects, load_images,
                            random_truth, training_cfg)
    from d2c.solver import DarknetSGD, TrainConfig

    tmp = Path(a.out).with_suffix("")
    tmp.mkdir(exist_ok=True)
    cfg = training_cfg(a.cfg, tmp, a.batch, 1, tuple(a.size) if a.size else None, dict(PARITY_NET_DEFAULTS))
    graph = build_graph(parse_cfg(cfg))
    header, arrays = WeightsHeader(), random_weights(graph, a.seed)
    wfile = tmp / "start.weights"
    write_weights(wfile, header, graph, arrays)
    arrays = read_weights(wfile, graph)[1]
    x = load_images([DARKNET_DATA / DEFAULT_IMAGES[k] for k in range(a.batch)], graph.net.width, graph.net.height)
    train = build_conversion(graph, arrays, header, ConvertOptions(flavor=graph.flavor, mode=TRAIN, bn="exact",
                                                                   batch=a.batch, darknet_compat=True))
    truth = random_truth(a.batch, graph.heads()[0].attrs["classes"], truth_boxes(train.emitter), a.seed + 1)
    np.savez(tmp / "in.npz", x=x, truth=truth)
    subprocess.run([sys.executable, __file__, str(cfg), "--out", a.out, "--darknet-side", str(wfile),
                    str(tmp / "in.npz"), str(tmp / "dn.npz")], check=True)
    emulate_darknet_defects(graph, train)
    net = load_caffe(train.net, phase="train")
    sgd = DarknetSGD(net, train, TrainConfig.from_section(graph.net.section, batch=a.batch))
    sgd._feed(net, x, truth)
    net.forward()
    names = list(net._layer_names)
    owner = {}
    for node in graph.nodes:
        for k, name in enumerate(names):
            if name.startswith(node.prefix) and train.emitter.blob(node.index) in net.top_names[name]:
                owner.setdefault(node.index, k)   # the node's first Caffe layer writing its output
    last = {}
    for i, k in owner.items():
        last[i] = max(j for j, name in enumerate(names) if name.startswith(graph.nodes[i].prefix))
    before = {}
    order = sorted(last.items(), key=lambda t: -t[1])
    todo = dict(order)
    for k in range(len(names) - 1, -1, -1):
        for i, j in todo.items():
            if j == k and i not in before:
                before[i] = -np.array(net.blobs[train.emitter.blob(i)].diff) * a.batch
        net._backward(k, k)
    after = {i: -np.array(net.blobs[train.emitter.blob(i)].diff) * a.batch for i in before}
    dn = np.load(tmp / "dn.npz")
    rows = []
    rel = lambda t, o: float(np.max(np.abs(t - o)) / max(np.max(np.abs(t)), 1e-30))  # noqa: E731
    for node in reversed(graph.nodes):
        i = node.index
        if f"before{i}" not in dn or i not in before:
            continue
        tb, ta = dn[f"before{i}"].astype(np.float64), dn[f"after{i}"].astype(np.float64)
        cb, ca = before[i].reshape(tb.shape), after[i].reshape(ta.shape)
        rb, ra = rel(tb, cb), rel(ta, ca)
        row = {"layer": i, "kind": node.kind, "bn": int(bool(node.attrs.get("bn"))),
               "shape": tb.shape, "rel_before": rb, "rel_after": ra, "amp": ra / rb if rb else np.inf,
               "norm_before": float(np.max(np.abs(tb))), "norm_after": float(np.max(np.abs(ta)))}
        rows.append(row)
        print(f"{i:4d} {node.kind:14s} bn={row['bn']} {str(tb.shape[1:]):16s} before {rb:9.2e} after {ra:9.2e} "
              f"x{row['amp']:8.2f}  max|before| {row['norm_before']:9.3g} max|after| {row['norm_after']:9.3g}",
              flush=True)
    caffe = {**{f"before{i}": v for i, v in before.items()}, **{f"after{i}": v for i, v in after.items()}}
    for layer in a.explain:
        print(json.dumps(explain(tmp, caffe, layer)), flush=True)
    np.savez(a.out, **{f"before{i}": v for i, v in before.items()}, **{f"after{i}": v for i, v in after.items()})


if __name__ == "__main__":
    main()
