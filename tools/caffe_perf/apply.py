#!/usr/bin/env python3
"""Route Caffe's CPU max pooling, im2col and 4-D crop through tools/caffe_perf/d2c_fast_cpu.hpp.

Why a source edit: `d2c bench` showed Caffe's own loops, not the model, holding the converted
yolov3-tiny back (max pooling 27 of 81 ms, im2col ~10 ms); the issue asks to fix the build rather
than the numbers. The fast loops give bit-identical outputs and argmax indices (see the header and
tests/test_caffe_build.py). Each edit finds one short anchor and fails loudly if the source moved,
so a different Caffe tree is never half-patched. Usage: apply.py CAFFE_SOURCE_TREE
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

HEADER = Path(__file__).with_name("d2c_fast_cpu.hpp")
INCLUDE = '#include "caffe/d2c_fast_cpu.hpp"\n'

POOL_CALL = """    // d2c: branch-free, vectorised max pooling with the same results (tools/caffe_perf).
    d2c_fast::max_pool_forward(bottom_data, top_data,
        use_top_mask ? static_cast<int*>(NULL) : max_idx_.mutable_cpu_data(),
        use_top_mask ? top[1]->mutable_cpu_data() : static_cast<Dtype*>(NULL),
        bottom[0]->num() * channels_, height_, width_, pooled_height_, pooled_width_,
        kernel_h_, kernel_w_, stride_h_, stride_w_, pad_h_, pad_w_);
    break;
"""
CROP_CALL = """  if (top[0]->num_axes() == 4) {  // d2c: one memcpy per row (tools/caffe_perf)
    d2c_fast::crop_4d(bottom_data, &bottom[0]->shape()[0], top_data, &top[0]->shape()[0],
                      offsets.cpu_data());
    return;
  }
"""
IM2COL_CALL = """  // d2c: row-wise im2col with the same layout (tools/caffe_perf).
  d2c_fast::im2col(data_im, channels, height, width, kernel_h, kernel_w, pad_h, pad_w,
                   stride_h, stride_w, dilation_h, dilation_w, data_col);
  return;
"""


def insert_after(text: str, anchor: str, addition: str, what: str) -> str:
    """Insert `addition` after the first `anchor`; the anchor must exist."""
    at = text.find(anchor)
    if at < 0:
        raise SystemExit(f"[caffe_perf] {what}: anchor {anchor!r} not found; is this BVLC Caffe 1.0?")
    at += len(anchor)
    return text[:at] + addition + text[at:]


def patch_file(path: Path, edits: list[tuple[str, str, str]]) -> None:
    text = path.read_text()
    if INCLUDE in text:
        return  # already patched
    text = insert_after(text, "#include <vector>\n", "\n" + INCLUDE, f"{path.name} include")
    for anchor, addition, what in edits:
        text = insert_after(text, anchor, addition, what)
    path.write_text(text)


def main(tree: Path) -> None:
    shutil.copyfile(HEADER, tree / "include" / "caffe" / HEADER.name)
    # The first MAX case in pooling_layer.cpp is Forward_cpu's (Backward_cpu comes later).
    patch_file(tree / "src/caffe/layers/pooling_layer.cpp",
               [("  case PoolingParameter_PoolMethod_MAX:\n", POOL_CALL, "pooling forward")])
    # The first `top_data = ...mutable_cpu_data();` in crop_layer.cpp is Forward_cpu's.
    patch_file(tree / "src/caffe/layers/crop_layer.cpp",
               [("  Dtype* top_data = top[0]->mutable_cpu_data();\n", CROP_CALL, "crop forward")])
    # The first `Dtype* data_col) {` is im2col_cpu's body (col2im_cpu writes data_im).
    patch_file(tree / "src/caffe/util/im2col.cpp",
               [("    Dtype* data_col) {\n", IM2COL_CALL, "im2col_cpu")])


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: apply.py CAFFE_SOURCE_TREE")
    main(Path(sys.argv[1]))
