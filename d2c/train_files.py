"""`d2c convert --train`: the Caffe training net, its weights and a stock-Caffe solver file.

Why a solver file at all, when `d2c train` drives Darknet's exact update from Python
(d2c.solver.DarknetSGD): a user with only the `caffe` binary should still get the closest stock
mapping of [net] (Darknet's update: rate/B on the summed gradient, decay on weights only,
momentum, the learning-rate policy of batch number k = seen/B), and every place where stock
Caffe cannot follow Darknet is written into the solver file as a `#` comment, so nothing
deviates silently.

Files written (atomically):
- <stem>_train.prototxt  with `data`: the DarknetDetectionData Python layer (d2c.caffe_layers)
  reading that .data file, so `caffe train` runs as is; without: data + truth Input blobs
  (fed from pycaffe). BN as chosen (exact Python layer, stock BatchNorm, or frozen), one Python
  loss layer per head;
- <stem>_train.caffemodel  the train net's blobs (conv weights, raw Darknet rolling stats for the
  exact BN layer or the x100 sums for stock BatchNorm, Scale gamma/beta);
- <stem>_solver.prototxt  the stock SGD mapping with its deviations.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from d2c.caffe.proto import CaffeNet, solver_to_prototxt, to_prototxt, write_caffemodel
from d2c.errors import D2CError
from d2c.fsutil import atomic_write_text
from d2c.solver import LrPolicy, TrainConfig, darknet_rate

F32 = np.float32


@dataclass
class SolverMapping:
    """SolverParameter fields and the comments explaining (or flagging) each mapping."""

    fields: dict[str, Any]
    comments: list[str]
    deviations: list[str]


def map_solver(cfg: TrainConfig, *, seen: int, net_file: str, snapshot_prefix: str,
               mini_batch: int, bn_mode: str = "exact", has_region: bool = False,
               darknet_compat: bool = False, adam: bool = False) -> SolverMapping:
    """Darknet [net] training settings -> stock Caffe SGD solver fields (+ deviations).

    Caffe's iteration `iter` (0 for the first update) corresponds to Darknet's batch number
    k = k0 + iter + 1, where k0 = seen/B of the weights file (Darknet takes k after adding the
    batch to seen). The policies are re-based on that offset where Caffe's formula allows it.
    """
    big_b = mini_batch * cfg.subdivisions
    k0 = seen // big_b
    p: LrPolicy = cfg.policy
    eta = float(F32(p.learning_rate))
    notes: list[str] = [
        "Stock Caffe SGD mapping of the Darknet [net] section, written by d2c.",
        f"Darknet: mini-batch b = {mini_batch} (the net's input batch), subdivisions S = {cfg.subdivisions} "
        f"(= iter_size), B = b*S = {big_b} images per update, seen = {seen} -> first update uses k = {k0 + 1}.",
        "weight_decay = decay (Darknet's (lr/B)*(-decay*B)*W = -lr*decay*W), decay_mult 0 on biases and "
        "Scale gamma/beta; lr_mult = the layer's learning_rate.",
        "Exact Darknet training (burn-in, momentum units, seen) is `d2c train`, which drives "
        "d2c.solver.DarknetSGD over this net instead of this solver.",
    ]
    deviations: list[str] = []
    fields: dict[str, Any] = {"net": net_file, "type": "SGD", "momentum": float(cfg.momentum),
                              "weight_decay": float(cfg.decay), "iter_size": int(cfg.subdivisions),
                              "regularization_type": "L2", "display": 1, "average_loss": 1,
                              "solver_mode": "CPU", "snapshot_prefix": snapshot_prefix}
    remaining = max(0, p.max_batches - k0)
    fields["max_iter"] = remaining
    fields["snapshot"] = 100
    notes.append(f"max_iter = max_batches - k0 = {p.max_batches} - {k0} = {remaining}; Darknet snapshots "
                 f"every 100 batches (.backup) and at 100..900, 10000, 20000...; snapshot: 100 here.")
    if remaining == 0:
        deviations.append(f"max_batches = {p.max_batches} is already reached at k0 = {k0}: Darknet's "
                          f"train_detector would stop at once; max_iter is 0 (raise max_batches or use -clear).")

    # -- learning-rate policy --------------------------------------------------------------
    if p.policy == "constant":
        fields.update(base_lr=eta, lr_policy="fixed")
    elif p.policy == "steps":
        scale_vals = [float(F32(s)) for s in p.scales]
        base = eta
        steps_left: list[int] = []
        gammas: list[float] = []
        for step, scale in zip(p.steps, scale_vals):
            value = step - k0 - 1  # Darknet applies scale i once k >= steps[i]
            if value <= 0:
                base = float(F32(F32(base) * F32(scale)))  # already passed: fold into base_lr
            else:
                steps_left.append(value)
                gammas.append(scale)
        fields.update(base_lr=base, lr_policy="multistep" if steps_left else "fixed")
        if steps_left:
            fields["stepvalue"] = steps_left
            fields["gamma"] = gammas[0]
            if len(set(gammas)) > 1:
                deviations.append(f"steps policy with unequal scales {gammas}: Caffe multistep has one gamma; "
                                  f"gamma = {gammas[0]} is used for every step.")
        notes.append(f"steps {list(p.steps)} scales {list(p.scales)} -> multistep stepvalue = step - k0 - 1.")
    elif p.policy == "step":
        fields.update(base_lr=eta, lr_policy="step", gamma=float(F32(p.scale)), stepsize=int(p.step))
        if (k0 + 1) % p.step:
            deviations.append(f"step policy: Darknet uses floor(k/step) with k = iter + {k0 + 1}, Caffe "
                              f"floor(iter/stepsize); the boundaries are shifted by {(k0 + 1) % p.step} iterations.")
        else:
            fields["base_lr"] = float(darknet_rate(LrPolicy(learning_rate=p.learning_rate, policy="step",
                                                            step=p.step, scale=p.scale), k0 + 1))
    elif p.policy == "exp":
        fields.update(base_lr=float(F32(eta * float(F32(p.gamma)) ** (k0 + 1))), lr_policy="exp",
                      gamma=float(F32(p.gamma)))
        notes.append("exp: base_lr = lr*gamma^(k0+1), Caffe then multiplies by gamma^iter.")
    elif p.policy == "poly":
        left = p.max_batches - k0 - 1
        if left > 0:
            fields.update(base_lr=float(F32(eta * (left / p.max_batches) ** float(F32(p.power)))),
                          lr_policy="poly", power=float(F32(p.power)), max_iter=left)
            notes.append("poly: (1 - k/max_batches)^power = ((M-k0-1)/M)^power * (1 - iter/(M-k0-1))^power.")
        else:
            fields.update(base_lr=0.0, lr_policy="fixed")
            deviations.append("poly policy already at max_batches: rate 0.")
    elif p.policy == "sigmoid":
        fields.update(base_lr=eta, lr_policy="sigmoid", gamma=-float(F32(p.gamma)), stepsize=p.step - k0 - 1)
        deviations.append(f"sigmoid: Darknet computes k - step in size_t, so for k < step = {p.step} the rate "
                          f"is 0 (gamma > 0), not the smooth sigmoid Caffe uses.")
    else:  # random
        fields.update(base_lr=eta, lr_policy="fixed")
        deviations.append("random policy (lr * U(0,1)^power from rand()) has no Caffe equivalent; fixed lr used.")

    # -- what stock Caffe cannot do ----------------------------------------------------------
    if k0 < p.burn_in:
        deviations.append(f"burn_in = {p.burn_in}: Darknet scales the rate by (k/burn_in)^{float(F32(p.power)):g} "
                          f"for k < burn_in (first update: {float(darknet_rate(p, k0 + 1)):.9g}); stock Caffe has no "
                          f"warm-up, so the first {p.burn_in - k0 - 1} updates use the policy rate instead.")
    deviations.append("Caffe keeps momentum history after multiplying by the rate, Darknet before; whenever the "
                      "rate changes between updates (burn-in, steps) the two diverge.")
    if seen % big_b:
        deviations.append(f"seen = {seen} is not a multiple of B = {big_b}: Darknet updates when (seen/b) % S == 0, "
                          f"i.e. mid-way through an iteration; Caffe always after iter_size passes.")
    if adam:
        deviations.append("adam=1 is ignored by Darknet's CPU update (plain SGD is used, as here).")
    if mini_batch == 1 and cfg.subdivisions > 1:
        deviations.append("batch 1 with iter_size > 1: BVLC Scale assigns (does not accumulate) the gamma "
                          "gradient when N = 1 (issue #6604), so only the last pass's gamma gradient survives.")
    if bn_mode == "stock":
        deviations.append("stock BatchNorm normalises with the biased variance and sqrt(var + 1e-5) and uses "
                          "its own gradient; Darknet uses the unbiased variance and sqrt(var) + 1e-6 (use --bn exact).")
    elif bn_mode == "frozen":
        deviations.append("BN frozen (use_global_stats): Darknet normalises training batches with batch statistics "
                          "and updates the rolling statistics; here they stay fixed.")
    else:
        notes.append("BN: d2c.loss.caffe_layers.DarknetBatchNorm Python layers (exact); the caffe binary must be "
                     "built WITH_PYTHON_LAYER and d2c must be importable (the venv's `caffe` from `make setup` is both).")
    if has_region and darknet_compat:
        notes.append("region heads: darknet_compat -> zero backward, as Debian's CPU Darknet.")
    elif has_region:
        deviations.append("region heads back-propagate pjreddie's GPU gradient (sigma' on x, y, objectness); the "
                          "Debian CPU build propagates nothing (convert with darknet_compat for that).")
    if not Path(net_file).is_absolute():
        notes.append(f"Run `caffe train -solver {Path(snapshot_prefix).name}_solver.prototxt` from this directory "
                     f"(the net path is relative), with -weights {Path(snapshot_prefix).name}_train.caffemodel.")
    return SolverMapping(fields=fields, comments=notes, deviations=deviations)


def solver_text(mapping: SolverMapping) -> str:
    """The solver prototxt: explanatory comments, then 'DEVIATION:' comments, then fields."""
    comments = list(mapping.comments)
    comments += [f"DEVIATION: {d}" for d in mapping.deviations]
    return solver_to_prototxt(mapping.fields, comments)


def data_layer(conversion: Any, data: str | Path, *, seed: int, workers: int = 2) -> Any:
    """The DarknetDetectionData layer for this train net, checked against the .data file now
    (class count, train list, labels), so a bad dataset fails at convert time, not in Caffe."""
    from d2c.caffe.proto import CaffeLayer
    from d2c.caffe_layers import DATA_SCHEMA
    from d2c.dataset import DataSpec, load_split
    from d2c.errors import DatasetError
    from d2c.loss.params import check_object, dump_params

    graph = conversion.graph
    heads = conversion.emitter.heads
    last = graph.nodes[-1]
    net_sec = graph.net.section
    classes = int(heads[-1].attrs["classes"])
    spec = DataSpec.load(data)
    if spec.classes is not None and spec.classes != classes:
        raise DatasetError(f"{spec.where('classes')}: {spec.classes} classes, but the cfg's last head has "
                           f"classes={classes}")
    load_split(spec, "train", classes=classes)
    truth_width = dict(conversion.net.inputs)["truth"][1]
    record_boxes = truth_width // 5
    params = check_object({
        "name": "data", "data": str(Path(data).resolve()), "classes": classes, "batch": conversion.options.batch,
        "subdivisions": graph.net.subdivisions, "width": graph.net.width, "height": graph.net.height,
        "record_boxes": record_boxes, "loader_boxes": min(int(last.attrs.get("max_boxes") or record_boxes), record_boxes),
        "jitter": float(last.attrs.get("jitter", 0.2)), "hue": net_sec.get_float("hue", 0.0),
        "saturation": net_sec.get_float("saturation", 1.0), "exposure": net_sec.get_float("exposure", 1.0),
        "seed": int(seed), "workers": int(workers)}, DATA_SCHEMA, "DarknetDetectionData")
    return CaffeLayer("data", "Python", [], ["data", "truth"],
                      {"python_param": {"module": "d2c.caffe_layers", "layer": "DarknetDetectionData",
                                        "param_str": dump_params(params)}})


def write_train_files(conversion: Any, out_dir: str | Path, stem: str, *, data: str | Path | None = None,
                      seed: int = 0, max_iter: int | None = None, final_dir: str | Path | None = None) -> list[Path]:
    """Write the train prototxt, its caffemodel and the solver; returns the paths written.

    `data`: a Darknet .data file; the train net then reads it (DarknetDetectionData) and the
    solver names the net and snapshot prefix by absolute path (`final_dir`, where the files end
    up), so `caffe train -solver OUT/<stem>_solver.prototxt` runs from any directory.
    `max_iter` overrides the solver's iteration count.
    """
    out = Path(out_dir)
    graph = conversion.graph
    options = conversion.options
    sec = graph.net.section
    cfg = TrainConfig.from_section(sec, batch=options.batch)
    heads = conversion.emitter.heads
    seen = int(conversion.header.seen)
    restart_note = None
    big_b = options.batch * cfg.subdivisions
    if cfg.policy.max_batches - seen // big_b <= 0:
        restart_note = (f"The weights have seen {seen} images = batch {seen // big_b} >= max_batches "
                        f"{cfg.policy.max_batches}: as with Darknet's -clear, the schedule restarts at batch 0.")
        seen = 0
    if max_iter is not None and max_iter < 1:
        raise D2CError(f"--max-iter must be >= 1, got {max_iter}")
    where = Path(final_dir).resolve() if (data is not None and final_dir is not None) else None
    net_file = str(where / f"{stem}_train.prototxt") if where else f"{stem}_train.prototxt"
    prefix = str(where / stem) if where else stem
    mapping = map_solver(cfg, seen=seen, net_file=net_file, snapshot_prefix=prefix, mini_batch=options.batch,
                         bn_mode=options.bn, has_region=any(h.kind == "region" for h in heads),
                         darknet_compat=bool(options.darknet_compat), adam=bool(sec.get_int("adam", 0)))
    if restart_note:
        mapping.comments.insert(1, restart_note)
    if max_iter is not None:
        mapping.comments.append(f"max_iter = {max_iter} (--max-iter), instead of {mapping.fields['max_iter']}.")
        if mapping.fields.get("lr_policy") == "poly":
            mapping.deviations.append(f"--max-iter {max_iter} also stretches Caffe's poly curve, which is computed "
                                      f"over max_iter.")
        mapping.fields["max_iter"] = int(max_iter)
    natural = max(1, graph.net.batch // graph.net.subdivisions)
    if options.batch != natural:
        mapping.deviations.append(f"input batch {options.batch} differs from the cfg's batch/subdivisions = "
                                  f"{graph.net.batch}/{graph.net.subdivisions} = {natural}; B = {options.batch}*S.")
    paths = {"prototxt": out / f"{stem}_train.prototxt", "caffemodel": out / f"{stem}_train.caffemodel",
             "solver": out / f"{stem}_solver.prototxt"}
    head_note = ("# Loss tops: sum(delta^2)/(heads*b) each (their sum over the S = iter_size passes, averaged, is "
                 "Darknet's printed loss); backward -delta/b, Darknet's delta being the negative gradient "
                 "summed over the batch.\n")
    net = conversion.net
    if data is not None:
        layer = data_layer(conversion, data, seed=seed)
        net = CaffeNet(name=net.name, inputs=[(n, shape) for n, shape in net.inputs if n not in ("data", "truth")],
                       layers=[layer, *net.layers])
        inputs = (f"# Inputs: the DarknetDetectionData layer (d2c.caffe_layers) reads {Path(data).resolve()}: "
                  f"b*S images per iteration drawn with replacement and augmented as Darknet's "
                  f"load_data_detection (jitter, hue, saturation, exposure, flip), in worker processes, "
                  f"seed {seed}; the same batches `d2c train --seed {seed}` uses.\n")
        last = graph.nodes[-1]
        if float(last.attrs.get("random") or 0.0) != 0.0:
            mapping.deviations.append("random=1 (multi-scale): the data layer keeps the cfg's input size; the train "
                                      "net's loss layers are built for one size, so `caffe train` cannot resize "
                                      "every 10 batches as Darknet does (`d2c train` rebuilds the net and does).")
        mapping.comments.append("The train net imports d2c (data, loss and BN Python layers): run the `caffe` "
                                "that `make setup` puts on the venv's PATH (.venv/bin/caffe), e.g. "
                                f"`caffe train -solver {out_name(final_dir, stem, '_solver.prototxt')} -weights "
                                f"{out_name(final_dir, stem, '_train.caffemodel')}`. Snapshots go to "
                                f"{prefix}_iter_N.caffemodel; `d2c export` turns one into Darknet .weights.")
    else:
        inputs = (f"# Inputs: data (b, C, H, W) RGB in [0,1]; truth (b, boxes*5) Darknet records (x, y, w, h, class), "
                  f"ended by x == 0. Input blobs: feed them from pycaffe, or convert with --data DATA for a net "
                  f"that reads a Darknet dataset itself.\n")
    header = (f"# d2c training net for {Path(graph.cfg.path).name} ({graph.flavor} Darknet semantics), "
              f"BN mode: {options.bn}.\n" + inputs + head_note)
    out.mkdir(parents=True, exist_ok=True)
    write_caffemodel(conversion.net, paths["caffemodel"])
    atomic_write_text(paths["prototxt"], header + to_prototxt(net))
    atomic_write_text(paths["solver"], solver_text(mapping))
    return [paths["prototxt"], paths["caffemodel"], paths["solver"]]


def out_name(final_dir: str | Path | None, stem: str, suffix: str) -> str:
    return str(Path(final_dir) / f"{stem}{suffix}") if final_dir is not None else f"{stem}{suffix}"
