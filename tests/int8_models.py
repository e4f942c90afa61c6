"""The model both int8 test files start from: real yolov3-tiny converted with split heads."""
from __future__ import annotations

from pathlib import Path

import pytest

from d2c.convert import convert

ROOT = Path(__file__).resolve().parents[1]
CFG = Path("/usr/share/darknet/cfg/yolov3-tiny.cfg")
TINY_WEIGHTS = ROOT / "weights" / "yolov3-tiny.weights"


@pytest.fixture(scope="module")
def tiny_split(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-split")
    convert(CFG, TINY_WEIGHTS, out, split_heads=True)
    return out
