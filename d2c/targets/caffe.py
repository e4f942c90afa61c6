"""`caffe` (the default): BVLC Caffe itself, d2c's plain output with no rewrite."""
from __future__ import annotations

from d2c.targets.base import Target, register


@register
class Caffe(Target):
    name = "caffe"
    summary = "BVLC Caffe (pycaffe, the `caffe` tool): d2c's plain stock output"
    source = "BVLC Caffe's layer factory: every type d2c emits is a stock layer registered there"
