"""`tpu-mlir`: Sophgo's tpu-mlir Caffe front end (model_transform.py). Declared, not runnable here.

Its wheels exist for Python 3.10 only and this machine has 3.11, so d2c can lint and rewrite for it
but `d2c verify --target tpu-mlir` says it cannot run.
"""
from __future__ import annotations

from d2c.targets.base import D2C_DEPLOY_TYPES, Rule, Target, output_writer_rule, register
from d2c.targets.rewrites import is_large_same_pool


@register
class TPUMLIR(Target):
    name = "tpu-mlir"
    summary = "Sophgo tpu-mlir 1.30 (model_transform.py, Caffe front end), top-level f32"
    # Its CaffeConverter.py has a handler per type; BNLL, Exp and Log are not among them (it has its own
    # non-stock Mish, which d2c does not emit).
    accepts = D2C_DEPLOY_TYPES - {"BNLL", "ELU"}
    source = ("tpu_mlir/python/transform/CaffeConverter.py: its table of Caffe types (no BNLL, no ELU); a "
              "max pool whose kernel equals the map is taken as global and loses its pad")
    type_rewrites = {"BNLL": "mish-sigmoid"}
    rules = (Rule("large max pool",
                  lambda layer, outputs: ("a max pool this large can equal the map and is then taken as global "
                                          "pooling, its pad dropped") if is_large_same_pool(layer) else None,
                  "pool-cascade"),
             output_writer_rule("its converter stops with 'operand ... not found'"))
    requirements = ("tpu-mlir==1.30.2", "protobuf==3.20.3", "numpy<1.28", "onnx==1.14.1", "onnxruntime==1.16.3",
                    "psutil", "tqdm", "torch")
    not_runnable = ("tpu-mlir publishes wheels for Python 3.10 only and this machine has Python 3.11; d2c lints "
                    "and rewrites for it, but cannot run its converter here")
