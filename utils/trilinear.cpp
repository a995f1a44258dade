// Trilinear sampling with border padding on the CPU, for utils/trilinear.py (built and loaded by utils/native.py).
//
// Same sampling as torch.nn.functional.grid_sample(mode="bilinear", padding_mode="border",
// align_corners=True), written in voxel coordinates: a coordinate p along an axis of n voxels is clamped
// to [0, n - 1], and its gradient is zero where p <= 0 or p >= n - 1 (as in ATen, borders count as
// outside). Plain C++17 with std::thread and no torch headers, so that it compiles in about a second.
//
// Layouts (all contiguous, element strides):
//   velocity, displacement, gradients at the interface: (B, 3, D, H, W), channel k along array axis k
//   image: (B, C, D, H, W)
//   history of scaling and squaring: (N, B, D, H, W, 3), the three components of a voxel side by side,
//   so that one corner of a trilinear sample is one cache line.
// Work is split over the B * D planes (b, z); the scatter of the backward pass goes to one private buffer
// per thread that spans only the planes that thread can touch, and the buffers are summed afterwards.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <new>
#include <thread>
#include <vector>

namespace {

template <class Body>
void parallel_for(int64_t n, int threads, const Body& body) {
  // body(begin, end, worker) over [0, n) in contiguous chunks; the calling thread takes the first one
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, n));
  if (workers == 1) {
    body(int64_t{0}, n, 0);
    return;
  }
  const int64_t chunk = (n + workers - 1) / workers;
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < workers && t * chunk < n; ++t)
    pool.emplace_back(body, t * chunk, std::min(n, (t + 1) * chunk), static_cast<int>(t));
  body(int64_t{0}, std::min(n, chunk), 0);
  for (auto& thread : pool) thread.join();
}

template <class T>
struct Axis {
  int64_t i0, i1;  // the two neighbouring voxels (i1 = i0 at the far border)
  T w0, w1;        // their weights
  T mask;          // 1 inside (0, n - 1), else 0: the coordinate's gradient factor
  bool nan;  // the coordinate is NaN: the sample becomes NaN
};

// The sample point i + u along an axis of n voxels. The cell and the weight come from u and the integer i
// separately: floor(u) and u - floor(u) are exact (or, for -1 < u < 0, within half an ulp of 1), so a small u
// keeps all its digits; forming i + u first would round it to the spacing of the floats near i.
template <class T>
inline Axis<T> make_axis(int64_t i, T u, int64_t n) {
  Axis<T> a;
  a.nan = std::isnan(u);
  if (!(u > static_cast<T>(-i))) {  // p <= 0 (or NaN): clamped to the first voxel
    a.i0 = 0;
    a.i1 = std::min<int64_t>(1, n - 1);
    a.w0 = T(1);
    a.w1 = T(0);
    a.mask = T(0);
  } else if (u >= static_cast<T>(n - 1 - i)) {  // p >= n - 1: clamped to the last voxel
    a.i0 = a.i1 = n - 1;
    a.w0 = T(1);
    a.w1 = T(0);
    a.mask = T(0);
  } else {  // |u| < n here, so the conversion is safe
    int64_t floor_u = static_cast<int64_t>(u);
    floor_u -= static_cast<T>(floor_u) > u;
    a.i0 = i + floor_u;
    a.i1 = std::min(a.i0 + 1, n - 1);
    a.w1 = u - static_cast<T>(floor_u);
    a.w0 = T(1) - a.w1;
    a.mask = T(1);
  }
  return a;
}

template <class T>
struct Corners {
  // element offsets of the 8 corners, index bits (z, y, x)
  int64_t offset[8];
  T weight[8];
};

template <class T>
inline Corners<T> corners(const Axis<T>& z, const Axis<T>& y, const Axis<T>& x, int64_t sz, int64_t sy,
                          int64_t sx) {
  Corners<T> c;
  const int64_t zs[2] = {z.i0 * sz, z.i1 * sz}, ys[2] = {y.i0 * sy, y.i1 * sy}, xs[2] = {x.i0 * sx, x.i1 * sx};
  const T wz[2] = {z.w0, z.w1}, wy[2] = {y.w0, y.w1}, wx[2] = {x.w0, x.w1};
  for (int k = 0; k < 8; ++k) {
    c.offset[k] = zs[k >> 2] + ys[(k >> 1) & 1] + xs[k & 1];
    c.weight[k] = wz[k >> 2] * wy[(k >> 1) & 1] * wx[k & 1];
  }
  return c;
}

// value of one channel at the sample point, and its derivative along z, y, x (before the border mask)
template <class T>
inline void sample_with_gradient(const T* base, const Corners<T>& c, const Axis<T>& z, const Axis<T>& y,
                                 const Axis<T>& x, T* value, T* dz, T* dy, T* dx) {
  T v[8];
  for (int k = 0; k < 8; ++k) v[k] = base[c.offset[k]];
  // lines along x, then planes along y
  const T l00 = x.w0 * v[0] + x.w1 * v[1], l01 = x.w0 * v[2] + x.w1 * v[3];
  const T l10 = x.w0 * v[4] + x.w1 * v[5], l11 = x.w0 * v[6] + x.w1 * v[7];
  const T p0 = y.w0 * l00 + y.w1 * l01, p1 = y.w0 * l10 + y.w1 * l11;
  *value = z.w0 * p0 + z.w1 * p1;
  *dz = p1 - p0;
  *dy = z.w0 * (l01 - l00) + z.w1 * (l11 - l10);
  *dx = z.w0 * (y.w0 * (v[1] - v[0]) + y.w1 * (v[3] - v[2])) + z.w1 * (y.w0 * (v[5] - v[4]) + y.w1 * (v[7] - v[6]));
}

template <class T>
inline T sample(const T* base, const Corners<T>& c) {
  T value = T(0);
  for (int k = 0; k < 8; ++k) value += c.weight[k] * base[c.offset[k]];
  return value;
}

struct Grid {
  int64_t B, D, H, W;
  int64_t plane() const { return H * W; }
  int64_t volume() const { return D * H * W; }
};

// ------------------------------------------------------------------------------ scaling and squaring

// make_axis without branches, for one lane of a vectorised loop over x: the same cell, weights and mask
template <class T>
inline void axis_lane(int32_t i, T u, int32_t n, int32_t& i0, int32_t& step, T& w1, T& mask) {
  const T low = static_cast<T>(-i), high = static_cast<T>(n - 1 - i);
  mask = (u > low && u < high) ? T(1) : T(0);
  T clamped = u > low ? u : low;  // NaN goes to the first voxel here; the caller makes the result NaN
  clamped = clamped < high ? clamped : high;
  const T floor_u = std::floor(clamped);
  i0 = i + static_cast<int32_t>(floor_u);
  w1 = clamped - floor_u;
  step = i0 + 1 < n ? 1 : 0;
}

// u_{k+1}(x) = u_k(x) + u_k(x + u_k(x)) for the planes [begin, end); CHANNELS_FIRST: the last step, written
// channels-first. The loop over x is written for the compiler's vectoriser (gathers on AVX2 / AVX-512).
template <class T, bool CHANNELS_FIRST>
void squaring_step(const Grid& g, const T* u, T* next, int64_t begin, int64_t end) {
  const int32_t D = static_cast<int32_t>(g.D), H = static_cast<int32_t>(g.H), W = static_cast<int32_t>(g.W);
  const int32_t sy = 3 * W, sz = 3 * W * H;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.D;
    const int32_t z = static_cast<int32_t>(row % g.D);
    const T* field = u + b * g.volume() * 3;
    for (int32_t y = 0; y < H; ++y) {
      const int64_t first = (static_cast<int64_t>(z) * H + y) * W;
      const T* own = field + 3 * first;
      T* target = CHANNELS_FIRST ? next + b * 3 * g.volume() + first : next + (b * g.volume() + first) * 3;
#pragma omp simd
      for (int32_t x = 0; x < W; ++x) {
        const T uz = own[3 * x], uy = own[3 * x + 1], ux = own[3 * x + 2];
        int32_t iz, iy, ix, dz, dy, dx;
        T wz, wy, wx, mz, my, mx;
        axis_lane(z, uz, D, iz, dz, wz, mz);
        axis_lane(y, uy, H, iy, dy, wy, my);
        axis_lane(x, ux, W, ix, dx, wx, mx);
        const T bad = (uz != uz || uy != uy || ux != ux) ? T(NAN) : T(0);
        const int32_t o = iz * sz + iy * sy + 3 * ix, oz = dz * sz, oy = dy * sy, ox = 3 * dx;
        const T az = T(1) - wz, ay = T(1) - wy, ax = T(1) - wx;
        const T vals[3] = {uz, uy, ux};
        for (int k = 0; k < 3; ++k) {
          const T* f = field + k;
          const T l00 = ax * f[o] + wx * f[o + ox], l01 = ax * f[o + oy] + wx * f[o + oy + ox];
          const T l10 = ax * f[o + oz] + wx * f[o + oz + ox], l11 = ax * f[o + oz + oy] + wx * f[o + oz + oy + ox];
          const T value = vals[k] + (az * (ay * l00 + wy * l01) + wz * (ay * l10 + wy * l11)) + bad;
          if (CHANNELS_FIRST)
            target[k * g.volume() + x] = value;
          else
            target[3 * x + k] = value;
        }
      }
    }
  }
}

template <class T>
int svf_forward(const T* velocity, T* history, T* out, int64_t B, int64_t D, int64_t H, int64_t W,
                int64_t steps, T scale, bool keep_history, int threads) {
  // keep_history: history holds all N fields u_0 .. u_{N-1} for the backward pass; else two, used in turn
  if (steps < 1) return 2;
  const Grid g{B, D, H, W};
  const int64_t volume = g.volume(), field = B * volume * 3, rows = B * D;
  // u_0 = scale * v, channels-last
  parallel_for(rows, threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / D, z = row % D;
      for (int64_t i = z * g.plane(); i < (z + 1) * g.plane(); ++i)
        for (int k = 0; k < 3; ++k) history[(b * volume + i) * 3 + k] = scale * velocity[(b * 3 + k) * volume + i];
    }
  });
  const auto slot = [&](int64_t step) { return history + (keep_history ? step : step % 2) * field; };
  for (int64_t step = 0; step < steps; ++step) {
    const T* u = slot(step);
    if (step + 1 == steps)
      parallel_for(rows, threads, [&](int64_t begin, int64_t end, int) {
        squaring_step<T, true>(g, u, out, begin, end);
      });
    else
      parallel_for(rows, threads, [&](int64_t begin, int64_t end, int) {
        squaring_step<T, false>(g, u, slot(step + 1), begin, end);
      });
  }
  return 0;
}

// dL/du_k from dL/du_{k+1} (both channels-last): the identity, the gradient through the sample point, and
// the scatter of the sampled values' gradient to the 8 corners. Per line of x: a vectorised loop does the
// gathers and the gradient at the voxel itself and keeps each sample's cell and weights; a scalar loop then
// scatters (neighbouring samples can share corners).
template <class T, bool ACCUMULATE_OWN>
void squaring_step_backward(const Grid& g, const T* u, const T* grad_next, T* grad, T* scatter, int64_t scatter_row0,
                            int64_t begin, int64_t end) {
  const int32_t D = static_cast<int32_t>(g.D), H = static_cast<int32_t>(g.H), W = static_cast<int32_t>(g.W);
  const int32_t sy = 3 * W, sz = 3 * W * H;
  std::vector<int32_t> base(W), offset_z(W), offset_y(W), offset_x(W);
  std::vector<T> weight_z(W), weight_y(W), weight_x(W);
  int32_t* o_ = base.data();
  int32_t* oz_ = offset_z.data();
  int32_t* oy_ = offset_y.data();
  int32_t* ox_ = offset_x.data();
  T* wz_ = weight_z.data();
  T* wy_ = weight_y.data();
  T* wx_ = weight_x.data();
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.D;
    const int32_t z = static_cast<int32_t>(row % g.D);
    const T* field = u + b * g.volume() * 3;
    // scatter targets of this pair: plane (b, z') lives at (b * D + z' - scatter_row0) * plane * 3
    T* target = scatter + (b * g.D - scatter_row0) * g.plane() * 3;
    for (int32_t y = 0; y < H; ++y) {
      const int64_t first = (b * g.volume() + (static_cast<int64_t>(z) * H + y) * W) * 3;
      const T* own = u + first;
      const T* go = grad_next + first;
      T* own_grad = grad + first;
#pragma omp simd
      for (int32_t x = 0; x < W; ++x) {
        int32_t iz, iy, ix, dz, dy, dx;
        T wz, wy, wx, mz, my, mx;
        axis_lane(z, own[3 * x], D, iz, dz, wz, mz);
        axis_lane(y, own[3 * x + 1], H, iy, dy, wy, my);
        axis_lane(x, own[3 * x + 2], W, ix, dx, wx, mx);
        const int32_t o = iz * sz + iy * sy + 3 * ix, oz = dz * sz, oy = dy * sy, ox = 3 * dx;
        const T az = T(1) - wz, ay = T(1) - wy, ax = T(1) - wx;
        T gz = T(0), gy = T(0), gx = T(0);
        for (int k = 0; k < 3; ++k) {
          const T* f = field + k;
          const T v0 = f[o], v1 = f[o + ox], v2 = f[o + oy], v3 = f[o + oy + ox];
          const T v4 = f[o + oz], v5 = f[o + oz + ox], v6 = f[o + oz + oy], v7 = f[o + oz + oy + ox];
          const T l00 = ax * v0 + wx * v1, l01 = ax * v2 + wx * v3, l10 = ax * v4 + wx * v5, l11 = ax * v6 + wx * v7;
          const T g_k = go[3 * x + k];
          gz += g_k * ((ay * l10 + wy * l11) - (ay * l00 + wy * l01));
          gy += g_k * (az * (l01 - l00) + wz * (l11 - l10));
          gx += g_k * (az * (ay * (v1 - v0) + wy * (v3 - v2)) + wz * (ay * (v5 - v4) + wy * (v7 - v6)));
        }
        const T own_z = go[3 * x] + mz * gz, own_y = go[3 * x + 1] + my * gy, own_x = go[3 * x + 2] + mx * gx;
        if (ACCUMULATE_OWN) {
          own_grad[3 * x] += own_z;
          own_grad[3 * x + 1] += own_y;
          own_grad[3 * x + 2] += own_x;
        } else {
          own_grad[3 * x] = own_z;
          own_grad[3 * x + 1] = own_y;
          own_grad[3 * x + 2] = own_x;
        }
        o_[x] = o;
        oz_[x] = oz;
        oy_[x] = oy;
        ox_[x] = ox;
        wz_[x] = wz;
        wy_[x] = wy;
        wx_[x] = wx;
      }
      for (int32_t x = 0; x < W; ++x) {
        const T az = T(1) - wz_[x], ay = T(1) - wy_[x], ax = T(1) - wx_[x];
        const int32_t o = o_[x], oz = oz_[x], oy = oy_[x], ox = ox_[x];
        const int32_t offsets[8] = {o, o + ox, o + oy, o + oy + ox, o + oz, o + oz + ox, o + oz + oy, o + oz + oy + ox};
        const T weights[8] = {az * ay * ax, az * ay * wx_[x], az * wy_[x] * ax, az * wy_[x] * wx_[x],
                              wz_[x] * ay * ax, wz_[x] * ay * wx_[x], wz_[x] * wy_[x] * ax, wz_[x] * wy_[x] * wx_[x]};
        const T g0 = go[3 * x], g1 = go[3 * x + 1], g2 = go[3 * x + 2];
        for (int corner = 0; corner < 8; ++corner) {
          T* t = target + offsets[corner];
          t[0] += weights[corner] * g0;
          t[1] += weights[corner] * g1;
          t[2] += weights[corner] * g2;
        }
      }
    }
  }
}

// the planes (b * D + z') that the corners of samples from planes [begin, end) can touch
template <class T>
void touched_rows(const Grid& g, const T* u, int64_t begin, int64_t end, int64_t* lo, int64_t* hi) {
  int64_t low = INT64_MAX, high = -1;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t b = row / g.D, z = row % g.D;
    const T* field = u + (b * g.volume() + z * g.plane()) * 3;
    int64_t zmin = g.D, zmax = -1;
    for (int64_t i = 0; i < g.plane(); ++i) {
      const Axis<T> az = make_axis<T>(z, field[3 * i], g.D);
      zmin = std::min(zmin, az.i0);
      zmax = std::max(zmax, az.i1);
    }
    low = std::min(low, b * g.D + zmin);
    high = std::max(high, b * g.D + zmax);
  }
  *lo = low;
  *hi = high;
}

template <class T>
int svf_backward(const T* history, const T* grad_out, T* grad_velocity, int64_t B, int64_t D, int64_t H, int64_t W,
                 int64_t steps, T scale, int threads) {
  if (steps < 1) return 2;
  const Grid g{B, D, H, W};
  const int64_t volume = g.volume(), field = B * volume * 3, rows = B * D, plane3 = g.plane() * 3;
  const int workers = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, rows)));
  std::vector<T> grad_a, grad_b;
  std::vector<std::vector<T>> buffers(workers > 1 ? workers : 0);
  std::vector<int64_t> lo(workers), hi(workers);
  try {
    grad_a.resize(field);
    grad_b.resize(field);
  } catch (const std::bad_alloc&) {
    return 1;
  }
  // dL/du_N, channels-last
  parallel_for(rows, threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / D, z = row % D;
      for (int64_t i = z * g.plane(); i < (z + 1) * g.plane(); ++i)
        for (int k = 0; k < 3; ++k) grad_a[(b * volume + i) * 3 + k] = grad_out[(b * 3 + k) * volume + i];
    }
  });
  T* grad_next = grad_a.data();
  T* grad = grad_b.data();
  for (int64_t step = steps - 1; step >= 0; --step) {
    const T* u = history + step * field;
    if (workers == 1) {
      std::fill(grad, grad + field, T(0));
      squaring_step_backward<T, true>(g, u, grad_next, grad, grad, 0, 0, rows);
    } else {
      const int64_t chunk = (rows + workers - 1) / workers;
      parallel_for(rows, workers, [&](int64_t begin, int64_t end, int worker) {
        touched_rows(g, u, begin, end, &lo[worker], &hi[worker]);
      });
      try {
        for (int t = 0; t < workers; ++t) {
          const int64_t size = t * chunk < rows && hi[t] >= lo[t] ? (hi[t] - lo[t] + 1) * plane3 : 0;
          buffers[t].assign(size, T(0));
        }
      } catch (const std::bad_alloc&) {
        return 1;
      }
      parallel_for(rows, workers, [&](int64_t begin, int64_t end, int worker) {
        squaring_step_backward<T, false>(g, u, grad_next, grad, buffers[worker].data(), lo[worker], begin, end);
      });
      parallel_for(rows, workers, [&](int64_t begin, int64_t end, int) {
        for (int64_t row = begin; row < end; ++row)
          for (int t = 0; t < workers; ++t) {
            if (buffers[t].empty() || row < lo[t] || row > hi[t]) continue;
            const T* source = buffers[t].data() + (row - lo[t]) * plane3;
            T* destination = grad + row * plane3;
            for (int64_t i = 0; i < plane3; ++i) destination[i] += source[i];
          }
      });
    }
    std::swap(grad, grad_next);
  }
  // dL/dv = scale * dL/du_0, channels-first
  parallel_for(rows, threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / D, z = row % D;
      for (int64_t i = z * g.plane(); i < (z + 1) * g.plane(); ++i)
        for (int k = 0; k < 3; ++k) grad_velocity[(b * 3 + k) * volume + i] = scale * grad_next[(b * volume + i) * 3 + k];
    }
  });
  return 0;
}

// --------------------------------------------------------------------------------------------- warping

template <class T>
int warp_forward(const T* image, const T* displacement, T* out, int64_t B, int64_t C, int64_t D, int64_t H,
                 int64_t W, int threads) {
  const Grid g{B, D, H, W};
  const int64_t volume = g.volume();
  parallel_for(B * D, threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / D, z = row % D;
      const T* d = displacement + b * 3 * volume;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) {
          const int64_t voxel = (z * H + y) * W + x;
          const Axis<T> az = make_axis<T>(z, d[voxel], D), ay = make_axis<T>(y, d[volume + voxel], H),
                        ax = make_axis<T>(x, d[2 * volume + voxel], W);
          const Corners<T> c = corners(az, ay, ax, H * W, W, int64_t{1});
          const T bad = (az.nan || ay.nan || ax.nan) ? T(NAN) : T(0);
          for (int64_t k = 0; k < C; ++k)
            out[(b * C + k) * volume + voxel] = sample(image + (b * C + k) * volume, c) + bad;
        }
    }
  });
  return 0;
}

template <class T>
int warp_backward(const T* image, const T* displacement, const T* grad_out, T* grad_displacement, int64_t B,
                  int64_t C, int64_t D, int64_t H, int64_t W, int threads) {
  const Grid g{B, D, H, W};
  const int64_t volume = g.volume();
  parallel_for(B * D, threads, [&](int64_t begin, int64_t end, int) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / D, z = row % D;
      const T* d = displacement + b * 3 * volume;
      T* gd = grad_displacement + b * 3 * volume;
      for (int64_t y = 0; y < H; ++y)
        for (int64_t x = 0; x < W; ++x) {
          const int64_t voxel = (z * H + y) * W + x;
          const Axis<T> az = make_axis<T>(z, d[voxel], D), ay = make_axis<T>(y, d[volume + voxel], H),
                        ax = make_axis<T>(x, d[2 * volume + voxel], W);
          const Corners<T> c = corners(az, ay, ax, H * W, W, int64_t{1});
          T gz = T(0), gy = T(0), gx = T(0);
          for (int64_t k = 0; k < C; ++k) {
            T value, dz, dy, dx;
            const T go = grad_out[(b * C + k) * volume + voxel];
            sample_with_gradient(image + (b * C + k) * volume, c, az, ay, ax, &value, &dz, &dy, &dx);
            gz += go * dz;
            gy += go * dy;
            gx += go * dx;
          }
          gd[voxel] = az.mask * gz;
          gd[volume + voxel] = ay.mask * gy;
          gd[2 * volume + voxel] = ax.mask * gx;
        }
    }
  });
  return 0;
}

}  // namespace

extern "C" {

#define LEARNSIM_EXPORT(T, SUFFIX)                                                                              \
  int svf_forward_##SUFFIX(const T* velocity, T* history, T* out, int64_t B, int64_t D, int64_t H, int64_t W,     \
                           int64_t steps, double scale, int keep_history, int threads) {                         \
    return svf_forward<T>(velocity, history, out, B, D, H, W, steps, static_cast<T>(scale), keep_history != 0,   \
                          threads);                                                                              \
  }                                                                                                              \
  int svf_backward_##SUFFIX(const T* history, const T* grad_out, T* grad_velocity, int64_t B, int64_t D,          \
                            int64_t H, int64_t W, int64_t steps, double scale, int threads) {                    \
    return svf_backward<T>(history, grad_out, grad_velocity, B, D, H, W, steps, static_cast<T>(scale), threads); \
  }                                                                                                              \
  int warp_forward_##SUFFIX(const T* image, const T* displacement, T* out, int64_t B, int64_t C, int64_t D,       \
                            int64_t H, int64_t W, int threads) {                                                 \
    return warp_forward<T>(image, displacement, out, B, C, D, H, W, threads);                                    \
  }                                                                                                              \
  int warp_backward_##SUFFIX(const T* image, const T* displacement, const T* grad_out, T* grad_displacement,      \
                             int64_t B, int64_t C, int64_t D, int64_t H, int64_t W, int threads) {               \
    return warp_backward<T>(image, displacement, grad_out, grad_displacement, B, C, D, H, W, threads);            \
  }

LEARNSIM_EXPORT(float, f32)
LEARNSIM_EXPORT(double, f64)

}  // extern "C"
