"""`mnn`: Alibaba MNN's converter (`mnnconvert -f CAFFE`) and its interpreter at precision high."""
from __future__ import annotations

from d2c.targets.base import Target, output_writer_rule, register


@register
class MNN(Target):
    name = "mnn"
    summary = "MNN 3.6.1 (`mnnconvert -f CAFFE`, Python interpreter, precision high, no Winograd)"
    source = ("MNN tools/converter/source/caffe/: one OpConverter per Caffe type (Convolution/Deconvolution, "
              "Pool, Eltwise, BNLL, Crop, Slice, Reshape/Flatten, BatchNorm+Scale, ...)")
    rules = (output_writer_rule("the converted model names that output after the layer, so the blob name the "
                                "sidecar gives is not among its outputs"),)
    venv = "mnn-3.6.1"
    requirements = ("mnn==3.6.1",)
    precision = "f32 (interpreter precision high, Winograd off)"
