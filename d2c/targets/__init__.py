"""Deploy targets, one module per toolchain; importing this package registers them all."""
from __future__ import annotations

from d2c.targets import caffe, mnn, opencv, openvino, rknn, tpu_mlir  # noqa: F401  (each registers itself)
from d2c.targets.base import REGISTRY, Target, apply_target, get_target, register

__all__ = ["REGISTRY", "Target", "apply_target", "get_target", "register"]
