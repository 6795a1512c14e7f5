// Depthwise k×k 'same' convolution (stride 1, zero padding (k-1)/2, NHWC, float32) for XLA:CPU,
// called through jax.ffi (vaebm_jax/models/depthwise.py builds and registers it).
//
// XLA:CPU has no fast kernel for depthwise convolutions (jax-ml/jax#23713): its grouped convolution
// runs 20-40x slower than PyTorch's, and the shifted multiply-adds layers.py falls back to reach a
// few GFMA/s. Two handlers for the convolution itself:
//   vaebm_depthwise_fwd:   y[b,h,w,c] = sum_{i,j} x[b, h+i-p, w+j-p, c] * k[i, j, c]
//                          (also the input gradient: the same with the kernel flipped)
//   vaebm_depthwise_wgrad: dk[i,j,c]  = sum_{b,h,w} x[b, h+i-p, w+j-p, c] * g[b, h, w, c]
// and two for an eval-mode NVAE cell's BN-Swish-depthwise-BN-Swish (vaebm_dwcell_fwd/_bwd, below).
// Channels are the vector lanes (GCC vector extensions: the compiler emits AVX-512 or AVX2 for the
// host it builds on). Each pass over a row of pixels handles one kernel row i with its k weights (or
// k accumulators) held in registers, so a multiply-add costs one load of x. Work is split over XLA's
// intra-op thread pool: output rows for the forward, channel blocks for the kernel gradient.
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#else
constexpr int64_t kLanes = 8;
#endif
typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) { Vec v; std::memcpy(&v, p, sizeof(v)); return v; }
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }

struct Shape {
  int64_t batch, height, width, channels;
};

// Runs fn(i) for i in [0, n) on the caller and up to pool.num_threads() - 1 pool tasks. Units are
// claimed from a shared counter, so the caller finishes the work alone if no pool thread is free
// (no deadlock when every pool thread is itself inside such a call); a task that starts after all
// units are claimed touches nothing but the shared counters.
template <typename Fn>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, Fn fn) {
  struct State {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
  };
  auto state = std::make_shared<State>();
  auto run = [state, n, fn]() {
    for (int64_t i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule(decltype(run)(run));
  run();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

constexpr int kBlock = 4;  // output pixels per register block

// acc[t] += sum_j x[(t + j) * stride] * kv[j] for the Block neighbouring output pixels t of one kernel
// row: K + Block - 1 loads of x feed K * Block multiply-adds, all in registers.
template <int K, int Block>
__attribute__((always_inline)) inline void AccumulateRow(const float* x, int64_t stride, const Vec (&kv)[K],
                                                      Vec (&acc)[Block]) {
#pragma GCC unroll 16
  for (int u = 0; u < K + Block - 1; ++u) {
    const Vec xv = Load(x + u * stride);
#pragma GCC unroll 8
    for (int t = 0; t < Block; ++t) {
      if (u - t >= 0 && u - t < K) acc[t] += xv * kv[u - t];
    }
  }
}

// y_row[w] (+)= sum_j x_row[w + j - p] * k_row[j] for channels [c0, c0 + kLanes) of one output row
// and one kernel row; `first` starts the sum. Interior pixels go kBlock at a time (AccumulateRow).
template <int K>
inline void ForwardRowVec(const float* x_row, const float* k_row, float* y_row, int64_t width, int64_t channels,
                          int64_t c0, bool first) {
  constexpr int P = K / 2;
  Vec kv[K];
  for (int j = 0; j < K; ++j) kv[j] = Load(k_row + j * channels + c0);
  auto pixel = [&](int64_t w) {
    float* out = y_row + w * channels + c0;
    Vec acc = first ? Vec{} : Load(out);
    const float* xc = x_row + (w - P) * channels + c0;
    const int j_lo = std::max<int64_t>(0, P - w), j_hi = std::min<int64_t>(K, width + P - w);
    for (int j = j_lo; j < j_hi; ++j) acc += Load(xc + j * channels) * kv[j];
    Store(out, acc);
  };
  int64_t w = 0;
  for (; w < std::min<int64_t>(P, width); ++w) pixel(w);
  for (; w + kBlock - 1 + P < width; w += kBlock) {
    float* out = y_row + w * channels + c0;
    Vec acc[kBlock];
#pragma GCC unroll 8
    for (int t = 0; t < kBlock; ++t) acc[t] = first ? Vec{} : Load(out + t * channels);
    AccumulateRow<K, kBlock>(x_row + (w - P) * channels + c0, channels, kv, acc);
#pragma GCC unroll 8
    for (int t = 0; t < kBlock; ++t) Store(out + t * channels, acc[t]);
  }
  for (; w < width; ++w) pixel(w);
}

// Output row r = b * height + h.
template <int K>
void ForwardRow(const float* x, const float* k, float* y, const Shape& s, int64_t r) {
  constexpr int P = K / 2;
  const int64_t b = r / s.height, h = r % s.height, C = s.channels, W = s.width;
  const int64_t c_vec = C - C % kLanes;
  float* y_row = y + r * W * C;
  const int i_lo = std::max<int64_t>(0, P - h), i_hi = std::min<int64_t>(K, s.height + P - h);
  if (i_lo >= i_hi) {
    std::fill(y_row, y_row + W * C, 0.f);
    return;
  }
  for (int64_t c0 = 0; c0 < c_vec; c0 += kLanes) {
    for (int i = i_lo; i < i_hi; ++i) {
      const float* x_row = x + (b * s.height + h + i - P) * W * C;
      ForwardRowVec<K>(x_row, k + i * K * C, y_row, W, C, c0, i == i_lo);
    }
  }
  for (int64_t c = c_vec; c < C; ++c) {  // channels that do not fill a vector
    for (int64_t w = 0; w < W; ++w) {
      float acc = 0.f;
      for (int i = i_lo; i < i_hi; ++i) {
        for (int j = std::max<int64_t>(0, P - w); j < std::min<int64_t>(K, W + P - w); ++j) {
          acc += x[((b * s.height + h + i - P) * W + w + j - P) * C + c] * k[(i * K + j) * C + c];
        }
      }
      y_row[w * C + c] = acc;
    }
  }
}

// Kernel gradient of channels [c0, c0 + kLanes): one sweep over the rows (b, h) of g, each adding
// its products with the K rows of x around it into the K×K accumulators, so that x and g are read
// from memory once (the K rows of x stay in cache between successive h). Interior pixels go kBlock
// at a time, with two sets of accumulators (even and odd pixels) so that the multiply-adds of one
// kernel row do not wait on each other.
template <int K>
void KernelGradBlock(const float* x, const float* g, float* dk, const Shape& s, int64_t c0) {
  constexpr int P = K / 2;
  const int64_t C = s.channels, W = s.width;
  Vec sum[K][K];
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) sum[i][j] = Vec{};
  }
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.height; ++h) {
      const float* g_row = g + (b * s.height + h) * W * C;
      const int i_lo = std::max<int64_t>(0, P - h), i_hi = std::min<int64_t>(K, s.height + P - h);
      for (int i = i_lo; i < i_hi; ++i) {
        const float* x_row = x + (b * s.height + h + i - P) * W * C;
        Vec acc[2][K];
        for (int j = 0; j < K; ++j) {
          acc[0][j] = sum[i][j];
          acc[1][j] = Vec{};
        }
        int64_t w = 0;
        auto pixel = [&](int64_t w) {
          const Vec gv = Load(g_row + w * C + c0);
          const float* xc = x_row + (w - P) * C + c0;
          const int j_lo = std::max<int64_t>(0, P - w), j_hi = std::min<int64_t>(K, W + P - w);
          for (int j = j_lo; j < j_hi; ++j) acc[0][j] += Load(xc + j * C) * gv;
        };
        for (; w < std::min<int64_t>(P, W); ++w) pixel(w);
        for (; w + kBlock - 1 + P < W; w += kBlock) {
          Vec gv[kBlock];
#pragma GCC unroll 8
          for (int t = 0; t < kBlock; ++t) gv[t] = Load(g_row + (w + t) * C + c0);
          const float* xc = x_row + (w - P) * C + c0;
#pragma GCC unroll 16
          for (int u = 0; u < K + kBlock - 1; ++u) {
            const Vec xv = Load(xc + u * C);
#pragma GCC unroll 8
            for (int t = 0; t < kBlock; ++t) {
              if (u - t >= 0 && u - t < K) acc[t % 2][u - t] += xv * gv[t];
            }
          }
        }
        for (; w < W; ++w) pixel(w);
        for (int j = 0; j < K; ++j) sum[i][j] = acc[0][j] + acc[1][j];
      }
    }
  }
  for (int i = 0; i < K; ++i) {
    for (int j = 0; j < K; ++j) Store(dk + (i * K + j) * C + c0, sum[i][j]);
  }
}

template <int K>
void KernelGradTail(const float* x, const float* g, float* dk, const Shape& s, int64_t c_begin) {
  constexpr int P = K / 2;
  const int64_t C = s.channels, W = s.width;
  for (int64_t c = c_begin; c < C; ++c) {
    for (int i = 0; i < K; ++i) {
      for (int j = 0; j < K; ++j) {
        float acc = 0.f;
        for (int64_t b = 0; b < s.batch; ++b) {
          for (int64_t h = std::max<int64_t>(0, P - i); h < std::min<int64_t>(s.height, s.height + P - i); ++h) {
            for (int64_t w = std::max<int64_t>(0, P - j); w < std::min<int64_t>(W, W + P - j); ++w) {
              acc += x[((b * s.height + h + i - P) * W + w + j - P) * C + c] * g[((b * s.height + h) * W + w) * C + c];
            }
          }
        }
        dk[(i * K + j) * C + c] = acc;
      }
    }
  }
}

template <int K>
void Forward(ffi::ThreadPool& pool, const float* x, const float* k, float* y, const Shape& s) {
  ParallelFor(pool, s.batch * s.height, [=](int64_t r) { ForwardRow<K>(x, k, y, s, r); });
}

template <int K>
void KernelGrad(ffi::ThreadPool& pool, const float* x, const float* g, float* dk, const Shape& s) {
  const int64_t blocks = s.channels / kLanes, c_vec = blocks * kLanes;
  const bool tail = c_vec < s.channels;
  ParallelFor(pool, blocks + (tail ? 1 : 0), [=](int64_t blk) {
    if (blk < blocks) {
      KernelGradBlock<K>(x, g, dk, s, blk * kLanes);
    } else {
      KernelGradTail<K>(x, g, dk, s, c_vec);
    }
  });
}

// x (B, H, W, C) and k (K, K, C) with K odd and at most 7.
ffi::Error CheckShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k, Shape* s) {
  if (x.size() != 4 || k.size() != 3 || k[0] != k[1] || k[2] != x[3] || k[0] % 2 != 1 || k[0] > 7) {
    return ffi::Error::InvalidArgument("vaebm depthwise: expected x (B, H, W, C) and k (K, K, C), K odd, K <= 7");
  }
  *s = Shape{x[0], x[1], x[2], x[3]};
  return ffi::Error::Success();
}

template <typename F>
void WithKernelSize(int64_t k, F f) {
  switch (k) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    default: f(std::integral_constant<int, 7>{}); break;
  }
}

ffi::Error DepthwiseFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                        ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  if (auto e = CheckShapes(x.dimensions(), k.dimensions(), &s); e.failure()) return e;
  const float* xp = x.typed_data();
  const float* kp = k.typed_data();
  float* yp = y->typed_data();
  WithKernelSize(k.dimensions()[0], [&](auto kk) { Forward<decltype(kk)::value>(pool, xp, kp, yp, s); });
  return ffi::Error::Success();
}

ffi::Error DepthwiseWgrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                          ffi::ResultBuffer<ffi::F32> dk) {
  Shape s;
  if (auto e = CheckShapes(x.dimensions(), dk->dimensions(), &s); e.failure()) return e;
  const float* xp = x.typed_data();
  const float* gp = g.typed_data();
  float* kp = dk->typed_data();
  WithKernelSize(dk->dimensions()[0], [&](auto kk) { KernelGrad<decltype(kk)::value>(pool, xp, gp, kp, s); });
  return ffi::Error::Success();
}


// ------------------------------------------------------------------------------------------------
// The middle of an eval-mode NVAE inverted-residual cell, fused around the depthwise convolution.
// In eval mode each BatchNorm is an affine map a*x + b per channel, so the cell's
//   BN -> Swish -> depthwise KxK -> BN -> Swish
// on the expanded tensor x (the 1x1 expand conv's output) is one pass each way:
//   vaebm_dwcell_fwd: (x, k, a1, b1, a2, b2) -> y
//       t = swish(a1 x + b1);  d = depthwise(t, k);  y = swish(a2 d + b2)
//   vaebm_dwcell_bwd: (x, gy, k, kf, a1, b1, a2, b2) -> gx
//       d as above (recomputed, not stored);  gd = gy a2 swish'(a2 d + b2);
//       gt = depthwise(gd, kf);  gx = gt a1 swish'(a1 x + b1)
//       (kf: k flipped in both spatial axes, the adjoint of a 'same' correlation)
// Unfused, XLA makes separate passes over these (B, H, W, C) tensors and keeps d for the backward
// pass: 14 reads and writes of a whole tensor per cell, forward and backward. Here: 5 (forward x in,
// y out; backward x and gy in, gx out), and only x is kept between the passes. On this project's CPUs a
// core streams a few GB/s from memory, and the Langevin chain's batch-16 tensors are 12.6 MB each,
// so those passes, not the arithmetic, bound the cells (experiments/RESULTS.md).
// Each work unit is one image, one block of channels and a band of rows. It keeps the K rows it
// convolves in a ring (padded by K/2 zero pixels on both sides, so every output pixel sees all K*K
// taps), transforms each input row once, and applies the output transform on the way out. The
// backward pass runs two rings: t rows give d rows, which with gy give gd rows, which give gx rows,
// 2*(K/2) rows behind.
// Outputs are written with streaming stores. Channels must be a multiple of kLanes (the Python side
// falls back to XLA code otherwise).
// ------------------------------------------------------------------------------------------------

typedef int32_t IVec __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Vec Splat(float v) { return Vec{} + v; }

// exp(x) for x in [-87, 88] (clamped outside): Cody-Waite reduction by ln 2, Cephes' degree-6
// polynomial, 2^n through the exponent bits. Relative error ~2 ulp.
inline Vec Exp(Vec x) {
  const Vec hi = Splat(88.0f), lo = Splat(-87.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const Vec magic = Splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const Vec n = (x * Splat(1.44269504088896341f) + magic) - magic;
  Vec r = x - n * Splat(0.693359375f);
  r = r - n * Splat(-2.12194440e-4f);
  Vec p = Splat(1.9875691500e-4f);
  p = p * r + Splat(1.3981999507e-3f);
  p = p * r + Splat(8.3334519073e-3f);
  p = p * r + Splat(4.1665795894e-2f);
  p = p * r + Splat(1.6666665459e-1f);
  p = p * r + Splat(5.0000001201e-1f);
  p = p * r * r + r + Splat(1.0f);
  const IVec bits = (__builtin_convertvector(n, IVec) + 127) << 23;
  Vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// 1 / v for v >= 1: the hardware estimate refined by one Newton step (AVX-512: 14 bits, then ~1 ulp;
// AVX: 12 bits, then ~2e-7 relative; a division costs several times more), else a division.
inline Vec Reciprocal(Vec v) {
#if defined(__AVX512F__)
  __m512 e;
  std::memcpy(&e, &v, sizeof(e));
  e = _mm512_rcp14_ps(e);
#elif defined(__AVX__)
  __m256 e;
  std::memcpy(&e, &v, sizeof(e));
  e = _mm256_rcp_ps(e);
#endif
#if defined(__AVX__)
  Vec r;
  std::memcpy(&r, &e, sizeof(r));
  return r * (Splat(2.0f) - v * r);
#else
  return Splat(1.0f) / v;
#endif
}

inline Vec Sigmoid(Vec z) { return Reciprocal(Splat(1.0f) + Exp(-z)); }
inline Vec Swish(Vec z) { return z * Sigmoid(z); }
inline Vec SwishGrad(Vec z) {
  const Vec s = Sigmoid(z);
  return s * (Splat(1.0f) + z * (Splat(1.0f) - s));
}

constexpr int64_t kChunk = 128;  // channels per work unit, at most

// A store that bypasses the caches (no read of the line before it is written: a third less memory
// traffic for an output nobody reads soon). p must be aligned to the vector size; a unit that used it
// ends with StreamFence() so that its results are visible before the unit reports itself done.
inline void StoreStream(float* p, Vec v) {
#if defined(__AVX512F__)
  __m512 m;
  std::memcpy(&m, &v, sizeof(m));
  _mm512_stream_ps(p, m);
#elif defined(__AVX__)
  __m256 m;
  std::memcpy(&m, &v, sizeof(m));
  _mm256_stream_ps(p, m);
#else
  Store(p, v);
#endif
}

inline bool Aligned(const float* p) { return reinterpret_cast<uintptr_t>(p) % sizeof(Vec) == 0; }

// StoreStream where the whole tensor is aligned (XLA's buffers are), else a plain store.
inline void StoreOut(float* p, Vec v, bool stream) {
  if (stream) {
    StoreStream(p, v);
  } else {
    Store(p, v);
  }
}

inline void StreamFence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

// Asks for cc channels of the W pixels of one row (pixel stride C) ahead of their use: the rows are
// read at a 4-6 KB stride, which the hardware prefetchers do not follow, so a core would otherwise
// wait for memory between its arithmetic.
inline void PrefetchRow(const float* row, int64_t W, int64_t C, int64_t cc) {
  for (int64_t w = 0; w < W; ++w) {
    for (int64_t c = 0; c < cc; c += 64 / sizeof(float)) __builtin_prefetch(row + w * C + c);
  }
}
constexpr int kCellBlock = 8;    // output pixels per register block

// K rows of cc channels, each padded by K/2 zero pixels at both ends, that hold rows r of some
// transformed tensor at slot r % K; plus one unpadded row for a convolution's output.
class Ring {
 public:
  Ring(int K, int64_t W, int64_t cc) : k_(K), pad_(K / 2), rw_(W + 2 * (K / 2)), cc_(cc),
                                       data_(new float[K * (W + 2 * (K / 2)) * cc]()) {}
  float* Slot(int64_t r) const { return data_.get() + (r % k_) * rw_ * cc_; }
  float* Row(int64_t r) const { return Slot(r) + pad_ * cc_; }  // where row r's pixel 0 goes

 private:
  int k_;
  int64_t pad_, rw_, cc_;
  std::unique_ptr<float[]> data_;
};

// out[w, c] = sum_{i,j} ring row (h + i - P)[w + j - P, c] * k[i, j, c_begin + c] over the rows inside
// [0, H), for channels c in [0, cc) of one output row h (pixel stride cc).
template <int K>
void ConvRow(const float* k, const Ring& ring, int64_t h, int64_t H, int64_t W, int64_t C, int64_t c_begin,
             int64_t cc, float* out) {
  constexpr int P = K / 2;
  const int i_lo = std::max<int64_t>(0, P - h), i_hi = std::min<int64_t>(K, H + P - h);
  for (int64_t c0 = 0; c0 < cc; c0 += kLanes) {
    const float* kc = k + c_begin + c0;
    int64_t w = 0;
    for (; w + kCellBlock <= W; w += kCellBlock) {
      Vec acc[kCellBlock];
#pragma GCC unroll 8
      for (int t = 0; t < kCellBlock; ++t) acc[t] = Vec{};
      for (int i = i_lo; i < i_hi; ++i) {
        Vec kv[K];
#pragma GCC unroll 8
        for (int j = 0; j < K; ++j) kv[j] = Load(kc + (i * K + j) * C);
        // Padded: pixel w + j - P of row h + i - P is pixel w + j of its slot.
        AccumulateRow<K, kCellBlock>(ring.Slot(h + i - P) + w * cc + c0, cc, kv, acc);
      }
#pragma GCC unroll 8
      for (int t = 0; t < kCellBlock; ++t) Store(out + (w + t) * cc + c0, acc[t]);
    }
    for (; w < W; ++w) {
      Vec acc = Vec{};
      for (int i = i_lo; i < i_hi; ++i) {
        const float* row = ring.Slot(h + i - P) + w * cc + c0;
        for (int j = 0; j < K; ++j) acc += Load(row + j * cc) * Load(kc + (i * K + j) * C);
      }
      Store(out + w * cc + c0, acc);
    }
  }
}

// Row h of swish(a1 x + b1) for the unit's channels into dst (pixel stride cc).
inline void InputRow(const float* x, const float* a1c, const float* b1c, const Shape& s, int64_t b, int64_t h,
                     int64_t c_begin, int64_t cc, float* dst) {
  const int64_t W = s.width, C = s.channels;
  const float* src = x + (b * s.height + h) * W * C + c_begin;
  for (int64_t w = 0; w < W; ++w) {
    for (int64_t c0 = 0; c0 < cc; c0 += kLanes) {
      Store(dst + w * cc + c0, Swish(Load(a1c + c0) * Load(src + w * C + c0) + Load(b1c + c0)));
    }
  }
}

// A work unit: image b, channels [c_begin, c_begin + cc), output rows [h0, h1).
struct Unit {
  int64_t b, c_begin, cc, h0, h1;
};

template <int K>
void CellForwardUnit(const float* x, const float* k, const float* a1, const float* b1, const float* a2,
                     const float* b2, float* y, const Shape& s, const Unit& u) {
  constexpr int P = K / 2;
  const int64_t H = s.height, W = s.width, C = s.channels, b = u.b, c_begin = u.c_begin, cc = u.cc;
  const float *a1c = a1 + c_begin, *b1c = b1 + c_begin, *a2c = a2 + c_begin, *b2c = b2 + c_begin;
  const bool stream = Aligned(y);
  Ring t(K, W, cc);
  std::unique_ptr<float[]> d(new float[W * cc]);
  // Step r transforms input row r and finishes output row r - P (which needs input rows up to r).
  for (int64_t r = std::max<int64_t>(0, u.h0 - P); r < u.h1 + P; ++r) {
    if (r < H) InputRow(x, a1c, b1c, s, b, r, c_begin, cc, t.Row(r));
    if (r + 1 < H) PrefetchRow(x + (b * H + r + 1) * W * C + c_begin, W, C, cc);
    const int64_t h = r - P;
    if (h < u.h0) continue;
    ConvRow<K>(k, t, h, H, W, C, c_begin, cc, d.get());
    float* out = y + (b * H + h) * W * C + c_begin;
    for (int64_t w = 0; w < W; ++w) {
      for (int64_t c0 = 0; c0 < cc; c0 += kLanes) {
        StoreOut(out + w * C + c0, Swish(Load(a2c + c0) * Load(d.get() + w * cc + c0) + Load(b2c + c0)), stream);
      }
    }
  }
  StreamFence();
}

template <int K>
void CellBackwardUnit(const float* x, const float* gy, const float* k, const float* kf, const float* a1,
                      const float* b1, const float* a2, const float* b2, float* gx, const Shape& s, const Unit& u) {
  constexpr int P = K / 2;
  const int64_t H = s.height, W = s.width, C = s.channels, b = u.b, c_begin = u.c_begin, cc = u.cc;
  const float *a1c = a1 + c_begin, *b1c = b1 + c_begin, *a2c = a2 + c_begin, *b2c = b2 + c_begin;
  const bool stream = Aligned(gx);
  Ring t(K, W, cc), gd(K, W, cc);
  std::unique_ptr<float[]> acc(new float[W * cc]);
  auto at = [&](int64_t h) { return (b * H + h) * W * C + c_begin; };
  // Step r transforms input row r, makes gd row r - P (which needs t rows up to r) and finishes gx row
  // r - 2P (which needs gd rows up to r - P). The gd rows of [h0 - P, h1 + P) are those gx rows need.
  const int64_t q_lo = std::max<int64_t>(0, u.h0 - P), q_hi = std::min<int64_t>(H, u.h1 + P);
  for (int64_t r = std::max<int64_t>(0, u.h0 - 2 * P); r < u.h1 + 2 * P; ++r) {
    if (r < H) InputRow(x, a1c, b1c, s, b, r, c_begin, cc, t.Row(r));
    if (r + 1 < H) {
      PrefetchRow(x + at(r + 1), W, C, cc);
      if (r + 1 - P >= 0) PrefetchRow(gy + at(r + 1 - P), W, C, cc);
    }
    const int64_t q = r - P;
    if (q >= q_lo && q < q_hi) {
      ConvRow<K>(k, t, q, H, W, C, c_begin, cc, acc.get());
      const float* g = gy + at(q);
      float* dst = gd.Row(q);
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t c0 = 0; c0 < cc; c0 += kLanes) {
          const Vec av = Load(a2c + c0);
          const Vec z = av * Load(acc.get() + w * cc + c0) + Load(b2c + c0);
          Store(dst + w * cc + c0, Load(g + w * C + c0) * av * SwishGrad(z));
        }
      }
    }
    const int64_t h = r - 2 * P;
    if (h >= u.h0 && h < u.h1) {
      ConvRow<K>(kf, gd, h, H, W, C, c_begin, cc, acc.get());
      const float* xr = x + at(h);
      float* out = gx + at(h);
      for (int64_t w = 0; w < W; ++w) {
        for (int64_t c0 = 0; c0 < cc; c0 += kLanes) {
          const Vec av = Load(a1c + c0);
          const Vec z = av * Load(xr + w * C + c0) + Load(b1c + c0);
          StoreOut(out + w * C + c0, Load(acc.get() + w * cc + c0) * av * SwishGrad(z), stream);
        }
      }
    }
  }
  StreamFence();
}

// Splits the work into units: channel blocks narrow enough that a ring stays within ~128 KB (wide
// images), then bands of rows where images x channel blocks are too few to keep every thread busy
// (each band recomputes a margin of K/2 rows forward and 2*(K/2) backward).
template <int K, class UnitFn>
void ForEachUnit(ffi::ThreadPool& pool, const Shape& s, UnitFn unit) {
  constexpr int64_t kRingBytes = 128 * 1024;
  const int64_t fit = kRingBytes / (K * (s.width + K - 1) * int64_t{sizeof(float)}) / kLanes * kLanes;
  const int64_t chunk = std::max<int64_t>(kLanes, std::min<int64_t>(kChunk, fit));
  const int64_t chunks = (s.channels + chunk - 1) / chunk;
  const int64_t wanted = 2 * std::max<int64_t>(1, pool.num_threads());
  const int64_t max_bands = std::max<int64_t>(1, s.height / (4 * K));
  const int64_t bands = std::min<int64_t>(max_bands, (wanted + s.batch * chunks - 1) / (s.batch * chunks));
  const int64_t rows = (s.height + bands - 1) / bands;
  ParallelFor(pool, s.batch * chunks * bands, [=](int64_t n) {
    const int64_t band = n % bands, c = (n / bands) % chunks, b = n / (bands * chunks);
    const int64_t h0 = band * rows, c_begin = c * chunk;
    unit(Unit{b, c_begin, std::min<int64_t>(chunk, s.channels - c_begin), h0, std::min<int64_t>(s.height, h0 + rows)});
  });
}

// x (B, H, W, C), k (K, K, C) with K odd <= 7, C a multiple of kLanes; a1, b1, a2, b2 (C).
ffi::Error CheckCellShapes(ffi::Span<const int64_t> x, ffi::Span<const int64_t> k,
                           std::initializer_list<ffi::Span<const int64_t>> vectors, Shape* s) {
  if (auto e = CheckShapes(x, k, s); e.failure()) return e;
  for (const auto& v : vectors) {
    if (v.size() != 1 || v[0] != x[3]) return ffi::Error::InvalidArgument("vaebm dwcell: a1, b1, a2, b2 must be (C,)");
  }
  if (x[3] % kLanes != 0) return ffi::Error::InvalidArgument("vaebm dwcell: C must be a multiple of the vector width");
  return ffi::Error::Success();
}

ffi::Error DwCellFwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k, ffi::Buffer<ffi::F32> a1,
                     ffi::Buffer<ffi::F32> b1, ffi::Buffer<ffi::F32> a2, ffi::Buffer<ffi::F32> b2,
                     ffi::ResultBuffer<ffi::F32> y) {
  Shape s;
  if (auto e = CheckCellShapes(x.dimensions(), k.dimensions(),
                               {a1.dimensions(), b1.dimensions(), a2.dimensions(), b2.dimensions()}, &s);
      e.failure()) {
    return e;
  }
  const float *xp = x.typed_data(), *kp = k.typed_data(), *a1p = a1.typed_data(), *b1p = b1.typed_data(),
              *a2p = a2.typed_data(), *b2p = b2.typed_data();
  float* yp = y->typed_data();
  WithKernelSize(k.dimensions()[0], [&](auto kk) {
    constexpr int K = decltype(kk)::value;
    ForEachUnit<K>(pool, s, [=](const Unit& u) { CellForwardUnit<K>(xp, kp, a1p, b1p, a2p, b2p, yp, s, u); });
  });
  return ffi::Error::Success();
}

ffi::Error DwCellBwd(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gy, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> kf, ffi::Buffer<ffi::F32> a1, ffi::Buffer<ffi::F32> b1,
                     ffi::Buffer<ffi::F32> a2, ffi::Buffer<ffi::F32> b2, ffi::ResultBuffer<ffi::F32> gx) {
  Shape s;
  if (auto e = CheckCellShapes(x.dimensions(), k.dimensions(),
                               {a1.dimensions(), b1.dimensions(), a2.dimensions(), b2.dimensions()}, &s);
      e.failure()) {
    return e;
  }
  auto same = [](ffi::Span<const int64_t> a, ffi::Span<const int64_t> b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
  };
  if (!same(gy.dimensions(), x.dimensions()) || !same(kf.dimensions(), k.dimensions())) {
    return ffi::Error::InvalidArgument("vaebm dwcell: gy must have x's shape and kf k's");
  }
  const float *xp = x.typed_data(), *gyp = gy.typed_data(), *kp = k.typed_data(), *kfp = kf.typed_data(),
              *a1p = a1.typed_data(), *b1p = b1.typed_data(), *a2p = a2.typed_data(), *b2p = b2.typed_data();
  float* gxp = gx->typed_data();
  WithKernelSize(k.dimensions()[0], [&](auto kk) {
    constexpr int K = decltype(kk)::value;
    ForEachUnit<K>(pool, s, [=](const Unit& u) {
      CellBackwardUnit<K>(xp, gyp, kp, kfp, a1p, b1p, a2p, b2p, gxp, s, u);
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VaebmDepthwiseFwd, DepthwiseFwd,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VaebmDepthwiseWgrad, DepthwiseWgrad,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VaebmDwCellFwd, DwCellFwd,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VaebmDwCellBwd, DwCellBwd,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
