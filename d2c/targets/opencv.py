"""`opencv`: OpenCV 4.x's dnn Caffe importer (readNetFromCaffe) on CPU."""
from __future__ import annotations

from d2c.targets.base import Target, register


@register
class OpenCV(Target):
    name = "opencv"
    summary = "OpenCV 4.x dnn, readNetFromCaffe, CPU backend"
    source = ("OpenCV's dnn module registers every stock Caffe type d2c emits (init.cpp layer list); its "
              "Caffe importer reads the prototxt/caffemodel pair as is")
    precision = "f32"
