// Depthwise k×k 'same' convolution (stride 1, zero padding (k-1)/2, NHWC, float32) for XLA:CPU,
// called through jax.ffi (vaebm_jax/models/native.py builds and registers it).
//
// XLA:CPU has no fast kernel for depthwise convolutions (jax-ml/jax#23713): its grouped convolution
// runs 20-40x slower than PyTorch's, and the shifted multiply-adds layers.py falls back to reach a
// few GFMA/s. Two handlers:
//   vaebm_depthwise_fwd:   y[b,h,w,c] = sum_{i,j} x[b, h+i-p, w+j-p, c] * k[i, j, c]
//                          (also the input gradient: the same with the kernel flipped)
//   vaebm_depthwise_wgrad: dk[i,j,c]  = sum_{b,h,w} x[b, h+i-p, w+j-p, c] * g[b, h, w, c]
// Channels are the vector lanes (GCC vector extensions: the compiler emits AVX-512 or AVX2 for the
// host it builds on). Each pass over a row of pixels handles one kernel row i with its k weights (or
// k accumulators) held in registers, so a multiply-add costs one load of x. Work is split over XLA's
// intra-op thread pool: output rows for the forward, channel blocks for the kernel gradient.
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

// y_row[w] (+)= sum_j x_row[w + j - p] * k_row[j] for channels [c0, c0 + kLanes) of one output row
// and one kernel row; `first` starts the sum. Interior pixels go kBlock at a time: K + kBlock - 1
// loads of x feed K * kBlock multiply-adds.
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
    const float* xc = x_row + (w - P) * channels + c0;
#pragma GCC unroll 16
    for (int u = 0; u < K + kBlock - 1; ++u) {
      const Vec xv = Load(xc + u * channels);
#pragma GCC unroll 8
      for (int t = 0; t < kBlock; ++t) {
        if (u - t >= 0 && u - t < K) acc[t] += xv * kv[u - t];
      }
    }
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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VaebmDepthwiseFwd, DepthwiseFwd,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(VaebmDepthwiseWgrad, DepthwiseWgrad,
                              ffi::Ffi::Bind().Ctx<ffi::ThreadPool>().Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>().Ret<ffi::Buffer<ffi::F32>>());
