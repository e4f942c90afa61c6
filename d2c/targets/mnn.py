"""`mnn`: Alibaba MNN's converter (`mnnconvert -f CAFFE`) and its interpreter at precision high."""
from __future__ import annotations

from d2c.targets.base import Rule, Target, register
from d2c.targets.rewrites import is_inplace_output_writer


@register
class MNN(Target):
    name = "mnn"
    summary = "MNN 3.6.1 (`mnnconvert -f CAFFE`, Python interpreter, precision high, no Winograd)"
    source = ("MNN tools/converter/source/caffe/: one OpConverter per Caffe type (Convolution/Deconvolution, "
              "Pool, Eltwise, BNLL, Crop, Slice, Reshape/Flatten, BatchNorm+Scale, ...)")
    rules = (Rule("in-place output writer",
                  lambda layer, outputs: ("an in-place layer writes a net output; the converted graph loses "
                                          "the output name") if is_inplace_output_writer(layer, outputs) else None,
                  "outputs-out-of-place"),)
    venv = "mnn-3.6.1"
    requirements = ("mnn==3.6.1",)
    precision = "f32 (interpreter precision high, Winograd off)"
