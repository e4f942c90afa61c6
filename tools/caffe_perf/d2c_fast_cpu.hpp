// d2c: faster CPU loops for BVLC Caffe's max pooling, im2col and 4-D crop, included into the Caffe that
// tools/build_caffe.sh builds (see tools/caffe_perf/apply.py). Written for d2c; results are
// bit-identical to Caffe's own loops (same outputs, same argmax indices, same tie and NaN rules),
// which tests/test_caffe_build.py checks against numpy references and the real Darknet.
//
// Why: Caffe's max pooling visits one output at a time with a data-dependent branch per input
// element, which mispredicts on real activations (27 ms of an 81 ms yolov3-tiny forward here).
// Visiting the window offsets in the outer loop and a whole output row in the inner loop keeps
// each output's candidates in Caffe's raster order, so the first strict maximum still wins, and
// the inner loop becomes branch-free selects the compiler vectorises. Pooling and im2col split
// large work over OpenBLAS's thread count (Caffe runs them on one thread while GEMM uses all).
#ifndef D2C_FAST_CPU_HPP_
#define D2C_FAST_CPU_HPP_

#include <cfloat>
#include <cstring>
#include <thread>
#include <vector>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

// OpenBLAS's thread count (OPENBLAS_NUM_THREADS), so Caffe's loops use as many threads as its
// GEMM does; weak, so a Caffe linked to another BLAS runs them on one thread.
extern "C" int openblas_get_num_threads(void) __attribute__((weak));

namespace d2c_fast {

// Run body(begin, end) over [0, n) split into contiguous parts on up to OpenBLAS's thread count,
// when there is enough work (`work` elements in all) to pay for starting threads.
template <typename Body>
void parallel_ranges(int n, long work, const Body& body) {
  int threads = openblas_get_num_threads ? openblas_get_num_threads() : 1;
  if (work < (1L << 17) || n < 2) threads = 1;
  if (threads > n) threads = n;
  if (threads <= 1) { body(0, n); return; }
  std::vector<std::thread> helpers;
  for (int t = 1; t < threads; ++t)
    helpers.emplace_back([&body, n, threads, t]() { body(n * t / threads, n * (t + 1) / threads); });
  body(0, n / threads);
  for (std::thread& helper : helpers) helper.join();
}

// First output index o in [0, n) with o * stride + offset >= 0.
inline int first_valid(int offset, int stride) {
  if (offset >= 0) return 0;
  return (-offset + stride - 1) / stride;
}

// One past the last output index o with o * stride + offset < limit (clamped to n).
inline int end_valid(int offset, int stride, int limit, int n) {
  if (offset >= limit) return 0;
  const int end = (limit - 1 - offset) / stride + 1;
  return end < n ? end : n;
}

// One output of max pooling in Caffe's order: rows top to bottom, columns left to right, a
// candidate replaces the current maximum only when strictly greater (so ties keep the first one
// and NaN never wins), starting from -FLT_MAX and index -1.
template <typename Dtype>
inline void max_pool_one(const Dtype* in, int width, int hstart, int hend, int wstart, int wend,
                         Dtype* out, int* idx) {
  Dtype best = -FLT_MAX;
  int best_index = -1;
  for (int h = hstart; h < hend; ++h) {
    for (int w = wstart; w < wend; ++w) {
      const Dtype v = in[h * width + w];
      const bool greater = v > best;
      best = greater ? v : best;
      best_index = greater ? h * width + w : best_index;
    }
  }
  *out = best;
  *idx = best_index;
}

// Interior outputs pw in [first, first + 8 * chunks) of one pooled row, 8 at a time, with the same
// candidate order as max_pool_one. Returns how many outputs it did (0 without AVX2 or for Dtype
// other than float, or for strides other than 1 and 2).
template <typename Dtype>
inline int max_pool_row_vector(const Dtype*, int, int, int, int, int, int, int, int, Dtype*, int*) {
  return 0;
}

#if defined(__AVX2__)
template <>
inline int max_pool_row_vector<float>(const float* in, int width, int hstart, int hend, int kernel_w,
                                      int stride_w, int pad_w, int first, int chunks, float* out_row,
                                      int* idx_row) {
  if (stride_w != 1 && stride_w != 2) return 0;
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i lane_offsets = _mm256_mullo_epi32(lane, _mm256_set1_epi32(stride_w));
  for (int chunk = 0; chunk < chunks; ++chunk) {
    const int pw = first + 8 * chunk;
    __m256 best = _mm256_set1_ps(-FLT_MAX);
    __m256i best_index = _mm256_set1_epi32(-1);
    for (int h = hstart; h < hend; ++h) {
      for (int kw = 0; kw < kernel_w; ++kw) {
        const int column = pw * stride_w + kw - pad_w;  // input column of output pw
        const float* p = in + h * width + column;
        __m256 v;
        if (stride_w == 1) {
          v = _mm256_loadu_ps(p);
        } else {  // even elements of 16: [p0 p2 p4 .. p14]
          const __m256 lo = _mm256_loadu_ps(p), hi = _mm256_loadu_ps(p + 8);
          const __m256 evens = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
          v = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(evens), _MM_SHUFFLE(3, 1, 2, 0)));
        }
        const __m256i candidate = _mm256_add_epi32(_mm256_set1_epi32(h * width + column), lane_offsets);
        const __m256 greater = _mm256_cmp_ps(v, best, _CMP_GT_OQ);
        best = _mm256_blendv_ps(best, v, greater);
        best_index = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(best_index),
                                                          _mm256_castsi256_ps(candidate), greater));
      }
    }
    _mm256_storeu_ps(out_row + pw, best);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx_row + pw), best_index);
  }
  return 8 * chunks;
}
#endif

// Max pooling over `planes` contiguous H x W planes (num * channels), NCHW, with Caffe's window
// clipping. Writes the maximum and its index inside the plane (h * width + w) to `index_out` (int)
// or `index_out_as_real` (Dtype, Caffe's second top); exactly one of them is non-null.
template <typename Dtype>
void max_pool_planes(const Dtype* bottom, Dtype* top, int* index_out, Dtype* index_out_as_real,
                     int plane_begin, int plane_end, int height, int width, int pooled_h, int pooled_w,
                     int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w) {
  const int plane_in = height * width;
  const int plane_out = pooled_h * pooled_w;
  // Outputs [first, last) read only in-row columns for every kernel offset, including the 16-wide
  // loads of the stride-2 path: no clipping, so the vector path sees the same candidates.
  const int first = first_valid(-pad_w, stride_w);
  int last = first;
  while (last + 8 <= pooled_w &&
         (last + 7) * stride_w + (stride_w == 2 ? 1 : 0) + kernel_w - 1 - pad_w <= width - 1)
    last += 8;
  const int chunks = (last - first) / 8;
  // With a Dtype index output the int indices are built in a scratch row and converted per row.
  int* scratch = index_out ? 0 : new int[pooled_w > 0 ? pooled_w : 1];
  for (int p = plane_begin; p < plane_end; ++p) {
    const Dtype* in = bottom + static_cast<long>(p) * plane_in;
    for (int ph = 0; ph < pooled_h; ++ph) {
      const long row_start = static_cast<long>(p) * plane_out + ph * pooled_w;
      Dtype* out_row = top + row_start;
      int* idx_row = index_out ? index_out + row_start : scratch;
      int hstart = ph * stride_h - pad_h;
      const int hend = hstart + kernel_h < height ? hstart + kernel_h : height;
      if (hstart < 0) hstart = 0;
      const int done = max_pool_row_vector<Dtype>(in, width, hstart, hend, kernel_w, stride_w, pad_w,
                                                  first, chunks, out_row, idx_row);
      for (int pw = 0; pw < pooled_w; ++pw) {
        if (pw == first && done > 0) { pw += done - 1; continue; }
        int wstart = pw * stride_w - pad_w;
        const int wend = wstart + kernel_w < width ? wstart + kernel_w : width;
        if (wstart < 0) wstart = 0;
        max_pool_one(in, width, hstart, hend, wstart, wend, out_row + pw, idx_row + pw);
      }
      if (!index_out) {
        Dtype* real_row = index_out_as_real + row_start;
        for (int pw = 0; pw < pooled_w; ++pw) real_row[pw] = static_cast<Dtype>(idx_row[pw]);
      }
    }
  }
  delete[] scratch;
}

template <typename Dtype>
void max_pool_forward(const Dtype* bottom, Dtype* top, int* index_out, Dtype* index_out_as_real,
                      int planes, int height, int width, int pooled_h, int pooled_w,
                      int kernel_h, int kernel_w, int stride_h, int stride_w, int pad_h, int pad_w) {
  parallel_ranges(planes, static_cast<long>(planes) * height * width, [&](int begin, int end) {
    max_pool_planes(bottom, top, index_out, index_out_as_real, begin, end, height, width, pooled_h,
                    pooled_w, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w);
  });
}

// im2col with Caffe's layout (rows: channel, kernel row, kernel column; columns: output row,
// output column; zero outside the image). Caffe tests every element against the image bounds; here
// the valid column range of each output row is computed once, so stride-1 rows are one memcpy.
// Channels [begin, end) of im2col, written from `col` on.
template <typename Dtype>
void im2col_channels(const Dtype* image, int begin, int end, int height, int width, int kernel_h,
                     int kernel_w, int pad_h, int pad_w, int stride_h, int stride_w, int dilation_h,
                     int dilation_w, int out_h, int out_w, Dtype* col) {
  for (int c = begin; c < end; ++c) {
    const Dtype* plane = image + static_cast<long>(c) * height * width;
    for (int kh = 0; kh < kernel_h; ++kh) {
      for (int kw = 0; kw < kernel_w; ++kw) {
        const int column_offset = kw * dilation_w - pad_w;  // input column of output ow
        const int lo = first_valid(column_offset, stride_w);
        const int hi = end_valid(column_offset, stride_w, width, out_w) > lo
                           ? end_valid(column_offset, stride_w, width, out_w) : lo;
        for (int oh = 0; oh < out_h; ++oh, col += out_w) {
          const int row = oh * stride_h - pad_h + kh * dilation_h;
          if (row < 0 || row >= height) {
            std::memset(col, 0, sizeof(Dtype) * out_w);
            continue;
          }
          const Dtype* in = plane + row * width + column_offset;
          for (int ow = 0; ow < lo; ++ow) col[ow] = 0;
          if (stride_w == 1) {
            std::memcpy(col + lo, in + lo, sizeof(Dtype) * (hi - lo));
          } else {
            for (int ow = lo; ow < hi; ++ow) col[ow] = in[ow * stride_w];
          }
          for (int ow = hi; ow < out_w; ++ow) col[ow] = 0;
        }
      }
    }
  }
}

template <typename Dtype>
void im2col(const Dtype* image, int channels, int height, int width, int kernel_h, int kernel_w,
            int pad_h, int pad_w, int stride_h, int stride_w, int dilation_h, int dilation_w,
            Dtype* col) {
  const int out_h = (height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) / stride_h + 1;
  const int out_w = (width + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) / stride_w + 1;
  const long rows_per_channel = static_cast<long>(kernel_h) * kernel_w * out_h;
  parallel_ranges(channels, rows_per_channel * out_w * channels, [&](int begin, int end) {
    im2col_channels(image, begin, end, height, width, kernel_h, kernel_w, pad_h, pad_w, stride_h,
                    stride_w, dilation_h, dilation_w, out_h, out_w,
                    col + static_cast<long>(begin) * rows_per_channel * out_w);
  });
}

// Crop of a 4-D blob (Caffe's CropLayer forward): top[n][c][h][w] = bottom[n+o0][c+o1][h+o2][w+o3].
// Caffe walks the axes recursively and builds index vectors for every row; here each row is one
// memcpy.
template <typename Dtype>
void crop_4d(const Dtype* bottom, const int* bottom_shape, Dtype* top, const int* top_shape,
             const int* offsets) {
  const int rows = top_shape[0] * top_shape[1] * top_shape[2];
  const int width = top_shape[3];
  for (int r = 0; r < rows; ++r) {
    const int h = r % top_shape[2], c = (r / top_shape[2]) % top_shape[1], n = r / (top_shape[1] * top_shape[2]);
    const long source_row = (static_cast<long>(n + offsets[0]) * bottom_shape[1] + c + offsets[1]) * bottom_shape[2]
                            + h + offsets[2];
    std::memcpy(top + static_cast<long>(r) * width, bottom + source_row * bottom_shape[3] + offsets[3],
                sizeof(Dtype) * width);
  }
}

}  // namespace d2c_fast

#endif  // D2C_FAST_CPU_HPP_
