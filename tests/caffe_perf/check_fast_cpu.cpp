// Exhaustive-ish check of tools/caffe_perf/d2c_fast_cpu.hpp against straightforward per-element
// loops with Caffe's semantics (written here for the test): max pooling values and argmax indices
// (ties, NaN, -inf, clipped windows, int and real index outputs), 4-D crop, and im2col (pad,
// stride, dilation), on one thread and, for the large cases, split over three. Built and run by
// tests/test_caffe_build.py with the flags Caffe is built with, linked to OpenBLAS.
#include "d2c_fast_cpu.hpp"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

// The loops split work over OpenBLAS's thread count; 3 makes the splits uneven.
extern "C" void openblas_set_num_threads(int);

namespace {

void reference_pool(const float* in, float* out, int* idx, int planes, int height, int width,
                    int pooled_h, int pooled_w, int kernel_h, int kernel_w, int stride_h, int stride_w,
                    int pad_h, int pad_w) {
  for (int p = 0; p < planes; ++p) {
    for (int y = 0; y < pooled_h; ++y) {
      for (int x = 0; x < pooled_w; ++x) {
        int hs = y * stride_h - pad_h, ws = x * stride_w - pad_w;
        const int he = std::min(hs + kernel_h, height), we = std::min(ws + kernel_w, width);
        hs = std::max(hs, 0);
        ws = std::max(ws, 0);
        float best = -FLT_MAX;
        int best_index = -1;
        for (int h = hs; h < he; ++h) {
          for (int w = ws; w < we; ++w) {
            const float v = in[(long)p * height * width + h * width + w];
            if (v > best) { best = v; best_index = h * width + w; }
          }
        }
        out[((long)p * pooled_h + y) * pooled_w + x] = best;
        idx[((long)p * pooled_h + y) * pooled_w + x] = best_index;
      }
    }
  }
}

void reference_im2col(const float* im, int channels, int height, int width, int kernel_h, int kernel_w,
                      int pad_h, int pad_w, int stride_h, int stride_w, int dil_h, int dil_w, float* col) {
  const int out_h = (height + 2 * pad_h - (dil_h * (kernel_h - 1) + 1)) / stride_h + 1;
  const int out_w = (width + 2 * pad_w - (dil_w * (kernel_w - 1) + 1)) / stride_w + 1;
  for (int c = 0; c < channels; ++c)
    for (int kh = 0; kh < kernel_h; ++kh)
      for (int kw = 0; kw < kernel_w; ++kw)
        for (int y = 0; y < out_h; ++y)
          for (int x = 0; x < out_w; ++x) {
            const int r = y * stride_h - pad_h + kh * dil_h, q = x * stride_w - pad_w + kw * dil_w;
            *col++ = (r >= 0 && r < height && q >= 0 && q < width) ? im[((long)c * height + r) * width + q] : 0.f;
          }
}

}  // namespace

int main() {
  openblas_set_num_threads(3);
  std::mt19937 rng(20261122);
  int pool_cases = 0, pool_bad = 0;
  for (int it = 0; it < 20000; ++it) {
    const int kh = 1 + rng() % 5, kw = 1 + rng() % 5, sh = 1 + rng() % 3, sw = 1 + rng() % 3;
    const int ph = rng() % kh, pw = rng() % kw;
    const int height = 1 + rng() % 24, width = 1 + rng() % 70, planes = 1 + rng() % 3;
    // Caffe's pooled size: ceil mode, then drop a last window that starts in the padding.
    int pooled_h = (int)std::ceil((float)(height + 2 * ph - kh) / sh) + 1;
    int pooled_w = (int)std::ceil((float)(width + 2 * pw - kw) / sw) + 1;
    if (ph || pw) {
      if ((pooled_h - 1) * sh >= height + ph) --pooled_h;
      if ((pooled_w - 1) * sw >= width + pw) --pooled_w;
    }
    if (pooled_h <= 0 || pooled_w <= 0) continue;
    std::vector<float> in((size_t)planes * height * width);
    const int mode = rng() % 3;  // 0: many ties, 1: distinct values, 2: with NaN and -inf
    for (float& v : in) {
      v = mode == 0 ? (float)(rng() % 3) : (float)(rng() % 100000) / 7.f - 5000.f;
      if (mode == 2 && rng() % 8 == 0) v = (rng() % 2) ? NAN : -INFINITY;
    }
    const size_t n = (size_t)planes * pooled_h * pooled_w;
    std::vector<float> ref_out(n), out(n), out2(n), idx_real(n);
    std::vector<int> ref_idx(n), idx(n);
    reference_pool(in.data(), ref_out.data(), ref_idx.data(), planes, height, width, pooled_h, pooled_w,
                   kh, kw, sh, sw, ph, pw);
    d2c_fast::max_pool_forward<float>(in.data(), out.data(), idx.data(), nullptr, planes, height, width,
                                      pooled_h, pooled_w, kh, kw, sh, sw, ph, pw);
    d2c_fast::max_pool_forward<float>(in.data(), out2.data(), nullptr, idx_real.data(), planes, height,
                                      width, pooled_h, pooled_w, kh, kw, sh, sw, ph, pw);
    bool same = std::memcmp(ref_out.data(), out.data(), n * 4) == 0 &&
                std::memcmp(ref_out.data(), out2.data(), n * 4) == 0 &&
                std::memcmp(ref_idx.data(), idx.data(), n * 4) == 0;
    for (size_t i = 0; same && i < n; ++i) same = idx_real[i] == (float)ref_idx[i];
    ++pool_cases;
    if (!same && ++pool_bad <= 5)
      std::printf("pool mismatch: kernel %dx%d stride %dx%d pad %dx%d input %dx%d\n", kh, kw, sh, sw, ph, pw,
                  height, width);
  }
  // Large cases: enough work that the loops split across threads (when OpenBLAS has several).
  for (int it = 0; it < 24; ++it) {
    const int k = 2 + it % 3, s = 1 + it % 2, pad = it % k, planes = 3 + it % 14;
    const int height = 60 + rng() % 120, width = 60 + rng() % 150;
    int pooled_h = (int)std::ceil((float)(height + 2 * pad - k) / s) + 1;
    int pooled_w = (int)std::ceil((float)(width + 2 * pad - k) / s) + 1;
    if (pad) {
      if ((pooled_h - 1) * s >= height + pad) --pooled_h;
      if ((pooled_w - 1) * s >= width + pad) --pooled_w;
    }
    std::vector<float> in((size_t)planes * height * width);
    for (float& v : in) v = (float)(rng() % 50);
    const size_t n = (size_t)planes * pooled_h * pooled_w;
    std::vector<float> ref_out(n), out(n);
    std::vector<int> ref_idx(n), idx(n);
    reference_pool(in.data(), ref_out.data(), ref_idx.data(), planes, height, width, pooled_h, pooled_w, k, k, s,
                   s, pad, pad);
    d2c_fast::max_pool_forward<float>(in.data(), out.data(), idx.data(), nullptr, planes, height, width, pooled_h,
                                      pooled_w, k, k, s, s, pad, pad);
    ++pool_cases;
    if ((ref_out != out || ref_idx != idx) && ++pool_bad <= 5)
      std::printf("large pool mismatch: kernel %d stride %d pad %d planes %d input %dx%d\n", k, s, pad, planes,
                  height, width);
  }
  int col_cases = 0, col_bad = 0;
  for (int it = 0; it < 20024; ++it) {
    const int kh = 1 + rng() % 5, kw = 1 + rng() % 5, sh = 1 + rng() % 3, sw = 1 + rng() % 3;
    const int dh = 1 + rng() % 2, dw = 1 + rng() % 2, ph = rng() % 4, pw = rng() % 4;
    const bool large = it >= 20000;  // enough work to be split across threads
    const int height = large ? 40 + rng() % 80 : 1 + rng() % 30, width = large ? 40 + rng() % 80 : 1 + rng() % 30;
    const int channels = large ? 4 + rng() % 13 : 1 + rng() % 3;
    int out_h = height + 2 * ph - (dh * (kh - 1) + 1), out_w = width + 2 * pw - (dw * (kw - 1) + 1);
    if (out_h < 0 || out_w < 0) continue;
    out_h = out_h / sh + 1;
    out_w = out_w / sw + 1;
    std::vector<float> im((size_t)channels * height * width);
    for (float& v : im) v = (float)(rng() % 1000) + 1.f;
    const size_t n = (size_t)channels * kh * kw * out_h * out_w;
    std::vector<float> ref(n, -7.f), col(n, -7.f);
    reference_im2col(im.data(), channels, height, width, kh, kw, ph, pw, sh, sw, dh, dw, ref.data());
    d2c_fast::im2col<float>(im.data(), channels, height, width, kh, kw, ph, pw, sh, sw, dh, dw, col.data());
    ++col_cases;
    if (ref != col && ++col_bad <= 5)
      std::printf("im2col mismatch: kernel %dx%d pad %dx%d stride %dx%d dilation %dx%d input %dx%d\n", kh, kw,
                  ph, pw, sh, sw, dh, dw, height, width);
  }
  int crop_cases = 0, crop_bad = 0;
  for (int it = 0; it < 2000; ++it) {
    int bottom_shape[4], top_shape[4], offsets[4];
    for (int a = 0; a < 4; ++a) {
      bottom_shape[a] = 1 + rng() % 9;
      top_shape[a] = 1 + rng() % bottom_shape[a];
      offsets[a] = rng() % (bottom_shape[a] - top_shape[a] + 1);
    }
    std::vector<float> bottom((size_t)bottom_shape[0] * bottom_shape[1] * bottom_shape[2] * bottom_shape[3]);
    for (size_t i = 0; i < bottom.size(); ++i) bottom[i] = (float)i;
    std::vector<float> top((size_t)top_shape[0] * top_shape[1] * top_shape[2] * top_shape[3], -1.f), ref(top.size());
    size_t i = 0;
    for (int n = 0; n < top_shape[0]; ++n)
      for (int c = 0; c < top_shape[1]; ++c)
        for (int h = 0; h < top_shape[2]; ++h)
          for (int w = 0; w < top_shape[3]; ++w)
            ref[i++] = bottom[(((size_t)(n + offsets[0]) * bottom_shape[1] + c + offsets[1]) * bottom_shape[2] + h +
                              offsets[2]) * bottom_shape[3] + w + offsets[3]];
    d2c_fast::crop_4d<float>(bottom.data(), bottom_shape, top.data(), top_shape, offsets);
    ++crop_cases;
    if (top != ref && ++crop_bad <= 5) std::printf("crop mismatch\n");
  }
  std::printf("pool cases %d mismatches %d; crop cases %d mismatches %d; im2col cases %d mismatches %d\n",
              pool_cases, pool_bad, crop_cases, crop_bad, col_cases, col_bad);
  return pool_bad || col_bad || crop_bad ? 1 : 0;
}
