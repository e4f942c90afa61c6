"""`openvino`: OpenVINO's Model Optimizer (Caffe front end, openvino-dev 2024.6, its last release with it)."""
from __future__ import annotations

from d2c.targets.base import D2C_DEPLOY_TYPES, Target, output_writer_rule, register


@register
class OpenVINO(Target):
    name = "openvino"
    summary = "OpenVINO 2024.6 Model Optimizer (`mo`, Caffe front end) + CPU plugin, f32"
    # MO maps a Caffe layer only when an extractor for its type exists (openvino/tools/mo/front/caffe/*_ext.py
    # and extractors/native_caffe.py); BNLL has none, so d2c's mish form is refused as an unknown layer.
    accepts = D2C_DEPLOY_TYPES - {"BNLL"}
    source = ("openvino-dev 2024.6.0, openvino/tools/mo/front/caffe/: one extractor per Caffe type "
              "(conv, pooling, eltwise, power, crop, slice, flatten, reshape, ...); none for BNLL")
    type_rewrites = {"BNLL": "mish-sigmoid"}
    rules = (output_writer_rule("the IR names that output after the layer ('layer089_logistic'), so the blob "
                                "name the sidecar gives is not among its outputs"),)
    venv = "openvino-2024.6.0"
    requirements = ("openvino-dev==2024.6.0", "protobuf<4")
    precision = "f32 (CPU plugin, INFERENCE_PRECISION_HINT f32, --compress_to_fp16=False)"
