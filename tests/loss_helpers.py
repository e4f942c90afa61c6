"""Small helpers the loss reference tests share."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest


def sigmoid64(z) -> np.ndarray:
    """Logistic in float64: how Debian's -Ofast Darknet evaluates it before rounding to float."""
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def make_truth(batch: int, boxes_per_image: list[list[tuple]], k: int) -> np.ndarray:
    """Darknet truth records: k boxes of (x, y, w, h, class) per image, zero-terminated."""
    t = np.zeros((batch, k * 5), np.float32)
    for b, boxes in enumerate(boxes_per_image):
        for n, box in enumerate(boxes):
            t[b, 5 * n:5 * n + 5] = box
    return t


LOSS_CFG_DIR = Path(__file__).resolve().parents[1] / "cfg"


@pytest.fixture(scope="module")
def darknet():
    """One Darknet child process per loss test cfg (cfg/<name>.cfg), shared by the module."""
    from d2c.darknet.runtime import DarknetProcess

    engines: dict = {}

    def get(name: str):
        if name not in engines:
            engines[name] = DarknetProcess(LOSS_CFG_DIR / f"{name}.cfg")
        return engines[name]

    yield get
    for engine in engines.values():
        engine.close()


def assert_printed_stats(printed_lines: list[tuple[str, ...]], refs: list[dict], keys: tuple[str, ...]) -> None:
    """Darknet's printed per-head statistics (parsed %f fields) equal the reference's, NaN for NaN."""
    for printed, stats in zip(printed_lines, refs):
        for key, value in zip(keys, printed):
            number = float(value)
            if math.isnan(number):
                assert math.isnan(stats[key]), key
            else:
                assert abs(stats[key] - number) <= 5e-7 + 1e-12, (key, stats[key], number)
