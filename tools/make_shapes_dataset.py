#!/usr/bin/env python3
"""Generate d2c's demo detection dataset (coloured shapes on textures) in Darknet's layout.

Why: `d2c train` demos and tests need a dataset without downloads; this one is seeded and
deterministic (same seed, same files) and small enough to train on a 2-core machine.
Usage: python tools/make_shapes_dataset.py OUT [--count 300] [--size 416] [--seed 0]
       then: d2c train OUT/shapes.data CFG [WEIGHTS] ...
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from d2c.errors import D2CError  # noqa: E402
from d2c.shapes import CLASSES, FORMATS, make_shapes_dataset  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="directory to write (created if needed)")
    parser.add_argument("--count", type=int, default=300, help="number of images (default 300)")
    parser.add_argument("--size", type=int, default=416, help="square image side in pixels (default 416)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--valid-fraction", type=float, default=0.2, help="held-out share (default 0.2)")
    parser.add_argument("--max-shapes", type=int, default=4, help="at most this many objects per image")
    parser.add_argument("--format", choices=FORMATS, default="jpg", help="image format (default jpg)")
    parser.add_argument("--absolute", action="store_true",
                        help="write absolute paths in the lists and .data (Darknet from any directory)")
    args = parser.parse_args(argv)
    try:
        ds = make_shapes_dataset(args.out, count=args.count, size=args.size, seed=args.seed,
                                 valid_fraction=args.valid_fraction, max_shapes=args.max_shapes,
                                 image_format=args.format, absolute_paths=args.absolute)
    except D2CError as exc:
        print(f"make_shapes_dataset: error: {exc.render()}", file=sys.stderr)
        return 2
    print(f"wrote {len(ds.train)} train + {len(ds.valid)} valid images ({', '.join(CLASSES)}) to {ds.root}")
    print(f"  data file: {ds.data_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
