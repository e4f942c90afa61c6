#!/usr/bin/env python3
"""Training in a few minutes: fine-tune yolov3-tiny on the shapes dataset and print mAP before and after.

Why a second demo: tools/train_demo.py is the full proof (256 px, 300 iterations, Darknet
comparisons, ~12 minutes); a newcomer first wants to see learning happen. This one uses the
same pieces at a size a 2-core machine trains quickly (cfg/yolov3-tiny-shapes-quick.cfg: 160 px
input, batch 8, learning rate 0.001 with a short burn-in, 150 batches; the COCO backbone of
`--load-upto 15`) and does what the README's training flow does:
    d2c shapes -> d2c train -> mAP@0.5 on the held-out split before and after.
Usage: .venv/bin/python tools/quick_train_demo.py [--out out/quick_demo] [--iterations N]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from d2c.errors import D2CError  # noqa: E402

CFG = ROOT / "cfg" / "yolov3-tiny-shapes-quick.cfg"
COCO_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "out" / "quick_demo"), help="output directory")
    parser.add_argument("--count", type=int, default=250, help="dataset images (default 250, 20%% held out)")
    parser.add_argument("--iterations", type=int, help="training iterations (default: the cfg's max_batches, 150)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    from d2c.dataset import load_split
    from d2c.metrics import CaffeDetector, map_on_samples
    from d2c.shapes import CLASSES, make_shapes_dataset
    from d2c.train import TrainOptions, Trainer

    out = Path(args.out)
    try:
        if not COCO_WEIGHTS.is_file():
            raise D2CError(f"{COCO_WEIGHTS}: run `make setup` first (it fetches the COCO yolov3-tiny weights)")
        shutil.rmtree(out, ignore_errors=True)
        start_all = time.perf_counter()
        ds = make_shapes_dataset(out / "shapes", count=args.count, size=160, seed=0)
        print(f"[1] dataset: {len(ds.train)} train + {len(ds.valid)} held-out images at 160 px "
              f"({time.perf_counter() - start_all:.0f} s)", flush=True)
        trainer = Trainer(TrainOptions(data=ds.data_file, cfg=CFG, weights=COCO_WEIGHTS, load_upto=15,
                                       out=out / "run", seed=args.seed, snapshot_every=50,
                                       max_batches=args.iterations, progress=sys.stderr.isatty(),
                                       verbose=not sys.stderr.isatty()))
        valid, _ = load_split(trainer.spec, "valid", classes=trainer.classes)
        before = map_on_samples(CaffeDetector.from_arrays(trainer.base_graph, trainer.arrays).detect, valid,
                                trainer.classes, list(CLASSES))
        print(f"[2] before training: {before.summary()}", flush=True)
        t0 = time.perf_counter()
        result = trainer.run()
        seconds = time.perf_counter() - t0
        after = trainer.evaluate_map()
        rows = result.rows
        print(f"[3] trained {result.iteration} iterations x {trainer.b} images in {seconds / 60:.1f} min: loss "
              f"{rows[0]['loss']:.2f} -> {rows[-1]['loss']:.2f} (avg {rows[-1]['avg_loss']:.2f})", flush=True)
        print(f"    after training: {after.summary()}", flush=True)
        print(f"[4] run directory {out / 'run'}: try `d2c detect {out / 'run'} {valid[0].image_path}`, "
              f"`d2c export {result.snapshot} -o trained.weights`, `d2c train --resume {out / 'run'} "
              f"--max-batches {result.iteration + 50}`")
        print(f"total {(time.perf_counter() - start_all) / 60:.1f} min; mAP@0.5 {before.map50:.4f} -> "
              f"{after.map50:.4f}")
    except D2CError as exc:
        print(f"quick_train_demo: error: {exc.render()}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
