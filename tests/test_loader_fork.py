"""The prefetch loader's forked workers must start after the parent has used OpenCV's thread pool.

A worker that calls cv2.setNumThreads(n>0) right after fork rebuilds a pool whose locks were copied
mid-use, and hangs. The check runs in a child process with a timeout so a hang fails instead of
stalling the suite.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import sys
    import cv2
    import numpy as np
    from d2c.dataset import load_samples
    from d2c.loader import LoaderSettings, PrefetchLoader
    from d2c.shapes import make_shapes_dataset

    ds = make_shapes_dataset(sys.argv[1], count=8, size=64, seed=0)
    # Keep the parent's OpenCV pool busy, as the training process is before it starts a loader.
    big = np.random.default_rng(0).random((1024, 1024, 3), dtype=np.float32)
    for _ in range(20):
        cv2.resize(big, (1500, 1500), interpolation=cv2.INTER_LINEAR)
    samples, _ = load_samples(ds.root / "train.txt", 3)
    settings = LoaderSettings(batch=2, subdivisions=1, width=64, height=64, record_boxes=10, loader_boxes=10)
    for _ in range(3):
        with PrefetchLoader(samples, settings, np.random.default_rng(1), workers=2) as loader:
            x, truth = loader.next_minibatch()
            assert x.shape == (2, 3, 64, 64), x.shape
    print("ok")
""")


def test_loader_workers_start_after_the_parent_ran_threaded_opencv(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ds")], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")
