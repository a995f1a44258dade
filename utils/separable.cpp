// Separable filtering with replicate padding on the CPU, for utils/sobolev.py (loaded by utils/native.py).
//
// out[..., i, ...] = sum_t kernel[t] * in[..., clamp(i + t - r, 0, n - 1), ...] along one axis of a contiguous
// array seen as (outer, n, inner); the kernel (odd length 2r + 1) is correlated, not flipped, as
// torch.nn.functional.conv3d does. Plain C++17, no torch headers; the loops over the contiguous inner
// axis are written for the compiler's vectoriser.

#include <algorithm>
#include <cstdint>
#include <thread>
#include <vector>

namespace {

template <class Body>
void parallel_lines(int64_t n, int threads, const Body& body) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  if (workers == 1) {
    body(int64_t{0}, n);
    return;
  }
  const int64_t chunk = (n + workers - 1) / workers;
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < workers && t * chunk < n; ++t)
    pool.emplace_back(body, t * chunk, std::min(n, (t + 1) * chunk));
  body(int64_t{0}, std::min(n, chunk));
  for (auto& thread : pool) thread.join();
}

template <class T>
void filter_axis(const T* in, T* out, int64_t outer, int64_t n, int64_t inner, const T* kernel, int64_t taps,
                 int threads) {
  const int64_t radius = (taps - 1) / 2;
  if (inner > 1) {
    // one output line of `inner` values per (o, i): a weighted sum of whole input lines
    parallel_lines(outer * n, threads, [&](int64_t begin, int64_t end) {
      for (int64_t line = begin; line < end; ++line) {
        const int64_t o = line / n, i = line % n;
        T* target = out + line * inner;
        for (int64_t t = 0; t < taps; ++t) {
          const int64_t source = std::min(std::max(i + t - radius, int64_t{0}), n - 1);
          const T* from = in + (o * n + source) * inner;
          const T weight = kernel[t];
          if (t == 0) {
#pragma omp simd
            for (int64_t j = 0; j < inner; ++j) target[j] = weight * from[j];
          } else {
#pragma omp simd
            for (int64_t j = 0; j < inner; ++j) target[j] += weight * from[j];
          }
        }
      }
    });
    return;
  }
  // the contiguous axis itself: the interior without clamping, the ends with it
  parallel_lines(outer, threads, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const T* from = in + o * n;
      T* target = out + o * n;
      for (int64_t i = 0; i < n; ++i) {
        if (i >= radius && i + radius < n) continue;
        T sum = T(0);
        for (int64_t t = 0; t < taps; ++t) sum += kernel[t] * from[std::min(std::max(i + t - radius, int64_t{0}), n - 1)];
        target[i] = sum;
      }
      const int64_t first = std::min(radius, n), last = std::max(first, n - radius);
      for (int64_t t = 0; t < taps; ++t) {
        const T weight = kernel[t];
        const int64_t shift = t - radius;
        if (t == 0) {
#pragma omp simd
          for (int64_t i = first; i < last; ++i) target[i] = weight * from[i + shift];
        } else {
#pragma omp simd
          for (int64_t i = first; i < last; ++i) target[i] += weight * from[i + shift];
        }
      }
    }
  });
}

}  // namespace

extern "C" {

int separable_filter_axis_f32(const float* in, float* out, int64_t outer, int64_t n, int64_t inner,
                              const float* kernel, int64_t taps, int threads) {
  filter_axis<float>(in, out, outer, n, inner, kernel, taps, threads);
  return 0;
}

int separable_filter_axis_f64(const double* in, double* out, int64_t outer, int64_t n, int64_t inner,
                              const double* kernel, int64_t taps, int threads) {
  filter_axis<double>(in, out, outer, n, inner, kernel, taps, threads);
  return 0;
}

}  // extern "C"
