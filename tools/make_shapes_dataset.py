#!/usr/bin/env python3
"""Generate d2c's demo detection dataset (coloured shapes on textures) in Darknet's layout.

Same as `d2c shapes OUT [--count 300] [--size 416] [--seed 0] ...` (kept for scripts that call it).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from d2c.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["shapes", *sys.argv[1:]]))
