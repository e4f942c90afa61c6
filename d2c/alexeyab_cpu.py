"""What AlexeyAB's CPU build computes in training where it differs from its GPU build (and from
d2c's default Caffe train net), so `d2c parity --darknet-engine alexeyab` compares like with like.

Found by running the engine (commit 59596d7, CPU) against d2c's train net, then reading why:
- BN rolling statistics use a 0.9/0.1 factor on the CPU (forward_batchnorm_layer); the GPU
  build uses 0.99/0.01, which stays d2c's default for models meant for GPU-trained Darknet.
- the CPU BN backward never accumulates the beta (bias) gradient: backward_convolutional_layer
  calls backward_batchnorm_layer instead of backward_bias, and that one only does the scales;
  so on the CPU build BN betas never move. The Caffe side freezes them (Scale bias lr_mult 0).
- a convolution's CPU backward writes its input's delta through col2im_cpu_ext, which first sets
  the whole destination to zero (any kernel size, unlike Debian's, where only 1x1 assigns): what
  later layers (higher index, their backward ran first) had added to that delta is lost. Found on
  yolov4-tiny, where the gradient from the second head through `[route] layers=-4` never reaches
  layer 27. The Caffe side drops the same gradients (propagate_down false on those consumers).
"""
from __future__ import annotations

import json
from typing import Any

from d2c.layers import REGISTRY
from d2c.loss.params import dump_params

CPU_BN_MOMENTUM = 0.9


def emulate_alexeyab_cpu(graph: Any, conversion: Any) -> list[str]:
    """Make a `--bn exact` train conversion follow AlexeyAB's CPU training; return what was changed."""
    from d2c.parity import _block_gradient

    notes: list[str] = []
    consumers: dict[int, list[int]] = {}
    for node in graph.nodes:
        for src in node.inputs:
            consumers.setdefault(src, []).append(node.index)
    def block(reader: int, blob: str) -> bool:
        """Stop the gradient of `blob` from layer `reader`; a reader that reuses the blob (a one-input
        route has no Caffe layer) passes the job to its own readers."""
        if _block_gradient(conversion.net, graph.nodes[reader].prefix, blob):
            return True
        if conversion.emitter.blob(reader) == blob:
            return any([block(k, blob) for k in consumers.get(reader, [])])
        return False

    for node in graph.nodes:
        if REGISTRY[node.kind].overwrites_input_delta(node, "alexeyab"):
            src = node.inputs[0]
            for j in (j for j in consumers.get(src, []) if j > node.index):
                if block(j, conversion.emitter.blob(src)):
                    notes.append(f"conv layer {node.index} zeroes the delta of layer {src} (col2im_cpu_ext): "
                                 f"the gradient from layer {j} ({graph.nodes[j].kind}) is dropped")
    bn_prefixes: list[str] = []
    for layer in conversion.net.layers:
        python = layer.params.get("python_param") or {}
        if layer.type == "Python" and python.get("layer") == "DarknetBatchNorm":
            settings = json.loads(python.get("param_str") or "{}")
            settings["momentum"] = CPU_BN_MOMENTUM
            python["param_str"] = dump_params(settings)
            bn_prefixes.append(layer.name[:-len("_dbn")])
    frozen = 0
    for layer in conversion.net.layers:
        if layer.type == "Scale" and layer.name.endswith("_scale") and layer.name[:-len("_scale")] in bn_prefixes:
            specs = layer.params.get("param")
            if specs and len(specs) == 2:
                specs[1] = {**specs[1], "lr_mult": 0.0}
                frozen += 1
    if bn_prefixes:
        notes.append(f"{len(bn_prefixes)} BN layers: rolling statistics with AlexeyAB's CPU factor 0.9/0.1")
    if frozen:
        notes.append(f"{frozen} BN betas frozen: AlexeyAB's CPU backward never accumulates their gradient")
    return notes
