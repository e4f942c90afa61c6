#!/usr/bin/env python3
"""The proof of issue 5 for `d2c train`: fine-tune the real yolov3-tiny in Caffe, then check it.

Why a script and not a test: it trains for ~15 minutes on a 2-core machine. Run it once:
    .venv/bin/python tools/train_demo.py            (writes out/train_demo/ and out/train_compare.png)
Steps:
1. generate the seeded shapes dataset (d2c.shapes: 300 images at 256x256, 240 train, 60 held out);
2. fine-tune yolov3-tiny from the real COCO weights: cfg/yolov3-tiny-shapes.cfg (3 classes,
   24-filter heads, 256x256), `--load-upto 15` (Darknet's yolov3-tiny.conv.15 backbone; the four
   later parameter layers start from Darknet's init), exact Darknet BN, full augmentation;
   mAP@0.5 on the held-out split before and after (d2c.metrics, inference BN);
3. export the result to Darknet .weights and run it in the real Darknet (ctypes) on every
   held-out image: its detections must equal `d2c detect` on the Caffe model converted from them;
4. train the same short schedule (--no-augment, b=4, the same start weights and batches) in
   Darknet (train_network via DarknetProcess.train_step) and in Caffe (d2c train), and plot both
   loss curves in one PNG.
Every number is printed and written to out/train_demo/summary.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("GLOG_minloglevel", "2")

import numpy as np  # noqa: E402

from d2c.convert import convert, load_graph  # noqa: E402
from d2c.darknet.runtime import DarknetProcess  # noqa: E402
from d2c.darknet.weights import WeightsHeader, write_weights  # noqa: E402
from d2c.detect import Engine, detections_to_json, load_model_files  # noqa: E402
from d2c.errors import D2CError  # noqa: E402
from d2c.metrics import CaffeDetector, map_on_samples  # noqa: E402
from d2c.shapes import CLASSES, make_shapes_dataset  # noqa: E402
from d2c.plots import plot_panels  # noqa: E402
from d2c.train import TrainOptions, Trainer  # noqa: E402

CFG = ROOT / "cfg" / "yolov3-tiny-shapes.cfg"
COCO_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"
LOAD_UPTO = 15


def compare_detections(cfg: Path, weights: Path, images: list[Path], converted: Path, thresh: float) -> dict:
    """Darknet's own detector on the exported weights vs d2c detect on the converted Caffe model."""
    convert(cfg, weights, converted)
    engine = Engine(load_model_files(converted), "caffe")
    stats = {"images": len(images), "darknet_detections": 0, "caffe_detections": 0, "images_equal_count": 0,
             "class_mismatches": 0, "max_box_abs": 0.0, "max_score_abs": 0.0, "thresh": thresh}
    with DarknetProcess(cfg, weights, batch=1) as dn:
        for image in images:
            theirs = dn.detect(image, thresh=thresh)
            dets, _ = engine.detect(image, thresh=thresh)
            ours = detections_to_json(dets, thresh)
            stats["darknet_detections"] += len(theirs)
            stats["caffe_detections"] += len(ours)
            if len(theirs) != len(ours):
                continue
            stats["images_equal_count"] += 1
            for a, b in zip(theirs, ours):
                stats["class_mismatches"] += int(a["class"] != b["class"])
                stats["max_box_abs"] = max(stats["max_box_abs"], float(np.max(np.abs(np.subtract(a["box"], b["box"])))))
                stats["max_score_abs"] = max(stats["max_score_abs"], abs(a["score"] - b["score"]))
    stats["equal"] = (stats["images_equal_count"] == len(images) and stats["class_mismatches"] == 0
                      and stats["max_box_abs"] < 1e-4 and stats["max_score_abs"] < 1e-4)
    return stats


def _collect(batches: list) -> Callable:
    def keep(tr: Trainer, row: dict) -> None:
        batches.append((np.concatenate([x for x, _ in tr.last_batches]),
                        np.concatenate([t for _, t in tr.last_batches])))
    return keep


def _compare_trainer(data: Path, weights: Path, out: Path, args: argparse.Namespace) -> Trainer:
    shutil.rmtree(out, ignore_errors=True)
    return Trainer(TrainOptions(data=data, cfg=CFG, weights=weights, clear=True, out=out, seed=args.seed,
                                no_augment=True, batch=args.compare_batch, subdivisions=1,
                                max_batches=args.compare_iterations, snapshot_every=10 ** 6, progress=False,
                                verbose=False))


def compare_schedule(data: Path, weights: Path, out: Path, args: argparse.Namespace) -> dict:
    """d2c train and Darknet's train_network, free-running from the same weights on the same batches."""
    from d2c.darknet.weights import read_weights

    batches: list = []
    trainer = _compare_trainer(data, weights, out, args)
    t0 = time.perf_counter()
    result = trainer.run(_collect(batches))
    caffe_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    with DarknetProcess(out / CFG.name, weights, clear=True) as dn:
        darknet = [dn.train_step(x, truth) for x, truth in batches]
        dn.save_weights(out / "darknet_after.weights")
    darknet_seconds = time.perf_counter() - t0
    caffe = [r["loss"] for r in result.rows]
    graph = load_graph(out / CFG.name)
    _, theirs = read_weights(out / "darknet_after.weights", graph)
    _, ours = read_weights(result.final_weights, graph)
    weight_diff = max(float(np.max(np.abs(ours[i][k] - v))) for i, arrays in theirs.items() for k, v in arrays.items())
    return {"iterations": len(caffe), "batch": args.compare_batch, "darknet": darknet, "caffe": caffe,
            "rel_diff": [abs(c - d) / abs(d) for c, d in zip(caffe, darknet)],
            "max_rel_diff": max(abs(c - d) / abs(d) for c, d in zip(caffe, darknet)),
            "max_abs_weight_diff_after": weight_diff, "caffe_seconds": round(caffe_seconds, 1),
            "darknet_seconds": round(darknet_seconds, 1)}


def _sync_from_darknet(trainer: Trainer, dn: DarknetProcess) -> None:
    """Copy Darknet's whole training state (weights, BN statistics, momentum buffers, seen) into Caffe."""
    params, buffers = trainer.net.params, trainer.sgd.U
    for node in trainer.base_graph.nodes:
        if not node.params:
            continue
        p, u, pre = dn.layer_params(node.index), dn.layer_updates(node.index), node.prefix
        params[f"{pre}_conv"][0].data[...] = p["weights"]
        buffers[f"{pre}_conv/0"][...] = u["weight_updates"]
        if "scales" in p:
            params[f"{pre}_scale"][0].data[...] = p["scales"]
            params[f"{pre}_scale"][1].data[...] = p["biases"]
            params[f"{pre}_dbn"][0].data[...] = p["rolling_mean"]
            params[f"{pre}_dbn"][1].data[...] = p["rolling_variance"]
            buffers[f"{pre}_scale/0"][...] = u["scale_updates"]
            buffers[f"{pre}_scale/1"][...] = u["bias_updates"]
        else:
            params[f"{pre}_conv"][1].data[...] = p["biases"]
            buffers[f"{pre}_conv/1"][...] = u["bias_updates"]
    trainer.sgd.seen = dn.seen()


def synced_schedule(data: Path, weights: Path, out: Path, args: argparse.Namespace) -> dict:
    """One step at a time from Darknet's exact state: separates per-step exactness from the
    amplification of float rounding (BLAS summation order) over a free-running schedule."""
    from d2c.parity import caffe_arrays

    trainer = _compare_trainer(data, weights, out, args)
    caffe, darknet, param_abs = [], [], []
    with DarknetProcess(out / CFG.name, weights, clear=True) as dn:
        for _ in range(args.compare_iterations):
            _sync_from_darknet(trainer, dn)
            row = trainer.step()
            x = np.concatenate([a for a, _ in trainer.last_batches])
            truth = np.concatenate([t for _, t in trainer.last_batches])
            darknet.append(dn.train_step(x, truth))
            caffe.append(row["loss"])
            ours = caffe_arrays(trainer.net, trainer.base_graph)
            worst = 0.0
            for node in trainer.base_graph.nodes:
                for name, value in (dn.layer_params(node.index) if node.params else {}).items():
                    worst = max(worst, float(np.max(np.abs(ours[node.index][name] - value))))
            param_abs.append(worst)
    return {"caffe": caffe, "darknet": darknet, "rel_diff": [abs(c - d) / abs(d) for c, d in zip(caffe, darknet)],
            "max_rel_diff": max(abs(c - d) / abs(d) for c, d in zip(caffe, darknet)),
            "param_abs_diff": param_abs, "max_abs_param_diff": max(param_abs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "out"), help="output root (default: out/)")
    parser.add_argument("--count", type=int, default=300, help="dataset images (default 300)")
    parser.add_argument("--max-batches", type=int, help="fine-tune length (default: the cfg's max_batches)")
    parser.add_argument("--compare-iterations", type=int, default=15, help="Darknet-vs-Caffe schedule length")
    parser.add_argument("--compare-batch", type=int, default=4, help="mini-batch of the comparison schedule")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--thresh", type=float, default=0.25, help="detection threshold of the export check")
    parser.add_argument("--reuse-finetune", action="store_true",
                        help="keep a finished out/train_demo/finetune run and redo only the checks (steps 3-4)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    demo = out / "train_demo"
    summary: dict = {"cfg": str(CFG), "weights": str(COCO_WEIGHTS), "load_upto": LOAD_UPTO}
    start_all = time.perf_counter()
    try:
        if not COCO_WEIGHTS.is_file():
            raise D2CError(f"{COCO_WEIGHTS}: the real yolov3-tiny COCO weights are needed (tools/ fetches them)")
        reuse = args.reuse_finetune and (demo / "finetune" / "latest.json").is_file()
        for sub in ("compare_finetuned", "compare_start", "compare_synced", "converted",
                    *(() if reuse else ("finetune",))):
            shutil.rmtree(demo / sub, ignore_errors=True)

        # 1. dataset
        t0 = time.perf_counter()
        ds = make_shapes_dataset(demo / "shapes", count=args.count, size=256, seed=0)
        summary["dataset"] = {"train": len(ds.train), "valid": len(ds.valid), "size": 256,
                              "seconds": round(time.perf_counter() - t0, 1)}
        print(f"[1] dataset: {len(ds.train)} train + {len(ds.valid)} held-out images in {ds.root}", flush=True)

        # 2. fine-tune, mAP before and after
        from d2c.darknet.weights import read_weights
        from d2c.dataset import load_split
        start_weights = demo / "start.weights"
        if reuse:
            trainer = Trainer(TrainOptions(data=ds.data_file, cfg=CFG, out=demo / "finetune", resume=True,
                                           progress=False, verbose=False))
        else:
            trainer = Trainer(TrainOptions(data=ds.data_file, cfg=CFG, weights=COCO_WEIGHTS, load_upto=LOAD_UPTO,
                                           out=demo / "finetune", seed=args.seed, snapshot_every=50,
                                           max_batches=args.max_batches, progress=sys.stderr.isatty(),
                                           verbose=True))
            write_weights(start_weights, WeightsHeader(), trainer.base_graph, trainer.arrays)
        for note in trainer.notes:
            print(f"    note: {note}")
        valid, _ = load_split(trainer.spec, "valid", classes=trainer.classes)
        _, start_arrays = read_weights(start_weights, trainer.base_graph)
        before = map_on_samples(CaffeDetector.from_arrays(trainer.base_graph, start_arrays).detect, valid,
                                trainer.classes, list(CLASSES))
        print(f"[2] before fine-tuning: {before.summary()}", flush=True)
        t0 = time.perf_counter()
        result = trainer.run()
        train_seconds = time.perf_counter() - t0 if not reuse else sum(r["seconds"] for r in result.rows)
        after = trainer.evaluate_map()
        rows = result.rows
        summary["finetune"] = {
            "iterations": result.iteration, "batch": trainer.b, "subdivisions": trainer.S, "bn": trainer.bn,
            "images": result.iteration * trainer.b * trainer.S, "seconds": round(train_seconds, 1),
            "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
            "avg_loss_first": rows[0]["avg_loss"], "avg_loss_last": rows[-1]["avg_loss"],
            "loss_mean_first10": float(np.mean([r["loss"] for r in rows[:10]])),
            "loss_mean_last10": float(np.mean([r["loss"] for r in rows[-10:]])),
            "map_before": before.to_json(), "map_after": after.to_json(),
            "loss_png": str(demo / "finetune" / "loss.png"), "final_weights": str(result.final_weights)}
        print(f"    fine-tune: {result.iteration} iterations in {train_seconds / 60:.1f} min; loss "
              f"{rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}, avg {rows[-1]['avg_loss']:.3f}")
        print(f"    after fine-tuning: {after.summary()}", flush=True)

        # 3. exported weights in the real Darknet vs d2c detect on the Caffe model
        exported_cfg = demo / "finetune" / CFG.name
        det = compare_detections(exported_cfg, result.final_weights, [s.image_path for s in valid],
                                 demo / "converted", args.thresh)
        converted_map = map_on_samples(CaffeDetector.from_model(demo / "converted").detect, valid, trainer.classes,
                                       list(CLASSES))
        det["converted_model_map"] = converted_map.map50
        summary["export_check"] = det
        print(f"[3] exported .weights in Darknet vs d2c detect (thresh {args.thresh}) on {det['images']} images: "
              f"{det['darknet_detections']} vs {det['caffe_detections']} detections, "
              f"max |box diff| {det['max_box_abs']:.2e}, max |score diff| {det['max_score_abs']:.2e}, "
              f"equal: {det['equal']}; mAP of the converted model {converted_map.map50:.4f}", flush=True)

        # 4. the same short schedule in Darknet and in Caffe, --no-augment, same weights and batches:
        #    (a) from the fine-tuned weights; (b) from the fine-tune's start (fresh heads, large
        #    gradients), free-running and with Caffe re-synchronised to Darknet's state every step.
        compare = {}
        panels = []
        for label, weights in (("finetuned", result.final_weights), ("start", start_weights)):
            run = compare_schedule(ds.data_file, weights, demo / f"compare_{label}", args)
            compare[label] = run
            print(f"[4{'a' if label == 'finetuned' else 'b'}] from the {label} weights, {run['iterations']} "
                  f"iterations of {args.compare_batch} images: max relative loss difference "
                  f"{run['max_rel_diff']:.2e}, max |weight diff| after {run['max_abs_weight_diff_after']:.2e} "
                  f"(Caffe {run['caffe_seconds']:.0f} s, Darknet {run['darknet_seconds']:.0f} s)", flush=True)
            for k, (c, d) in enumerate(zip(run["caffe"], run["darknet"]), start=1):
                print(f"    {k:3d}: Darknet {d:12.6f}  Caffe {c:12.6f}  rel {abs(c - d) / abs(d):.1e}")
            iterations = list(range(1, run["iterations"] + 1))
            curves = [("Darknet (libdarknet train_network)", iterations, run["darknet"], "tab:red"),
                      ("Caffe (d2c train)", iterations, run["caffe"], "tab:blue")]
            title = (f"from the {'fine-tuned' if label == 'finetuned' else 'fresh-head start'} weights: max rel "
                     f"diff {run['max_rel_diff']:.1e}")
            if label == "start":
                synced = synced_schedule(ds.data_file, start_weights, demo / "compare_synced", args)
                run["synced"] = synced
                print(f"    re-synchronised every step (Caffe gets Darknet's weights, BN statistics, momentum "
                      f"and seen): max relative loss difference {synced['max_rel_diff']:.2e}, max |parameter "
                      f"difference| after a step {synced['max_abs_param_diff']:.2e}", flush=True)
                curves.append(("Caffe, synced to Darknet each step", iterations, synced["caffe"], "tab:green"))
                title += f"; synced per step {synced['max_rel_diff']:.1e}"
            panels.append((title, curves))
        plot_panels(out / "train_compare.png", panels, log_y=False)
        summary["compare"] = compare
        print(f"    plot: {out / 'train_compare.png'}")
    except D2CError as exc:
        print(f"train_demo: error: {exc.render()}", file=sys.stderr)
        return 2
    summary["seconds"] = round(time.perf_counter() - start_all, 1)
    demo.mkdir(parents=True, exist_ok=True)
    (demo / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"total {summary['seconds'] / 60:.1f} min; summary in {demo / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
