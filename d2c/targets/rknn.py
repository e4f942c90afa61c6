"""`rknn`: Rockchip RKNN-Toolkit2 (`load_caffe`, `build` without quantization, its x86 simulator)."""
from __future__ import annotations

from d2c.targets.base import Target, register


@register
class RKNN(Target):
    name = "rknn"
    summary = "RKNN-Toolkit2 2.5.0, rk3588, fp16 x86 simulator (no quantization)"
    source = ("RKNN-Toolkit2's Caffe loader is closed source; no type is declared missing because the toolkit "
              "loads, builds and simulates every model of the measured matrix (tools/targets_matrix.py)")
    venv = "rknn-2.5.0"
    requirements = ("rknn-toolkit2==2.5.0",)
    precision = "fp16 (simulator)"
