"""Small helpers the loss reference tests share."""
from __future__ import annotations

import numpy as np


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
