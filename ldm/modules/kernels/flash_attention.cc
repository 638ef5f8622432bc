// Attention for long sequences on CPU, flash-attention style: the [L, M] scores are made and dropped
// in row chunks that fit the cache, the forward keeps only the rows' log-sum-exp, and the backward
// recomputes each chunk's probabilities from it, so no score-sized buffer outlives a call. Products go
// to oneDNN's sgemm (MindSpore's own copy, already loaded), single-threaded; the kernel runs one thread
// per CPU the process may use: the forward deals out row chunks, the backward whole (batch x head)
// slices (a slice's dk and dv sum over its chunks, so one thread owns them).
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

extern "C" int dnnl_sgemm(char transa, char transb, int64_t m, int64_t n, int64_t k, float alpha, const float *a,
                          int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc);

namespace {

constexpr int64_t kChunkScores = 1 << 18;  // 1 MB of float32 scores per chunk and thread

int64_t ChunkRows(int64_t m) { return std::max<int64_t>(1, kChunkScores / m); }

int NumThreads(int64_t items) {
  cpu_set_t set;
  int cpus = sched_getaffinity(0, sizeof(set), &set) == 0 ? CPU_COUNT(&set) : 1;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(cpus, items)));
}

// Runs fn(item) for item in [0, items) on NumThreads threads, items dealt round robin.
template <typename Fn>
void ParallelItems(int64_t items, Fn fn) {
  int threads = NumThreads(items);
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) {
    pool.emplace_back([=] { for (int64_t i = t; i < items; i += threads) fn(i); });
  }
  for (int64_t i = 0; i < items; i += threads) fn(i);
  for (auto &th : pool) th.join();
}

// exp(x) for x <= 0 as 2^i * p(f): vectorizes, unlike libm's expf; relative error ~2e-7.
inline float FastExp(float x) {
  x = std::max(x, -87.0f);
  float t = x * 1.44269504f;
  float i = std::floor(t);
  float f = t - i;
  float p = 1.53534851e-4f;
  p = p * f + 1.33989413e-3f;
  p = p * f + 9.61844302e-3f;
  p = p * f + 5.55033504e-2f;
  p = p * f + 2.40226343e-1f;
  p = p * f + 6.93147182e-1f;
  p = p * f + 1.0f;
  int32_t bits = (static_cast<int32_t>(i) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// max of a row in 16 lanes: a plain max loop stays scalar (std::max's NaN order forbids reordering).
float RowMax(const float *row, int64_t m) {
  float lanes[16];
  std::fill(lanes, lanes + 16, -INFINITY);
  int64_t j = 0;
  for (; j + 16 <= m; j += 16) {
    for (int i = 0; i < 16; ++i) lanes[i] = row[j + i] > lanes[i] ? row[j + i] : lanes[i];
  }
  float mx = *std::max_element(lanes, lanes + 16);
  for (; j < m; ++j) mx = std::max(mx, row[j]);
  return mx;
}

struct Shapes {
  int64_t slices, l, m, d, dv;  // q [slices, l, d], k [slices, m, d], v [slices, m, dv]
};

Shapes ReadShapes(int64_t **shapes) {
  return {shapes[0][0], shapes[0][1], shapes[1][1], shapes[0][2], shapes[2][2]};
}

// Rows [r0, r0 + n) of one slice: out = softmax(q k^T) v, lse = log(sum(exp(q k^T))) per row.
void ForwardChunk(const Shapes &s, const float *q, const float *k, const float *v, float *out, float *lse,
                  int64_t r0, int64_t n, std::vector<float> *buffer) {
  buffer->resize(n * s.m);
  float *p = buffer->data();
  dnnl_sgemm('N', 'T', n, s.m, s.d, 1.0f, q + r0 * s.d, s.d, k, s.d, 0.0f, p, s.m);
  for (int64_t r = 0; r < n; ++r) {
    float *row = p + r * s.m;
    const float mx = RowMax(row, s.m);
    float z = 0.0f;
#pragma omp simd reduction(+ : z)
    for (int64_t j = 0; j < s.m; ++j) {
      row[j] = FastExp(row[j] - mx);
      z += row[j];
    }
    const float inv = 1.0f / z;
#pragma omp simd
    for (int64_t j = 0; j < s.m; ++j) row[j] *= inv;
    lse[r0 + r] = mx + std::log(z);
  }
  dnnl_sgemm('N', 'N', n, s.dv, s.m, 1.0f, p, s.m, v, s.dv, 0.0f, out + r0 * s.dv, s.dv);
}

// Gradients to q, k, v; rowsum(dP * P) = rowsum(dO * O) replaces a pass over the scores.
void BackwardSlice(const Shapes &s, const float *q, const float *k, const float *v, const float *out,
                   const float *lse, const float *dout, float *dq, float *dk, float *dv, std::vector<float> *buffer) {
  const int64_t rows = ChunkRows(s.m);
  buffer->resize(2 * rows * s.m + rows);
  float *p = buffer->data(), *dp = p + rows * s.m, *delta = dp + rows * s.m;
  std::fill(dk, dk + s.m * s.d, 0.0f);
  std::fill(dv, dv + s.m * s.dv, 0.0f);
  for (int64_t r0 = 0; r0 < s.l; r0 += rows) {
    const int64_t n = std::min(rows, s.l - r0);
    const float *q_c = q + r0 * s.d, *do_c = dout + r0 * s.dv, *o_c = out + r0 * s.dv;
    for (int64_t r = 0; r < n; ++r) {
      float acc = 0.0f;
      for (int64_t j = 0; j < s.dv; ++j) acc += do_c[r * s.dv + j] * o_c[r * s.dv + j];
      delta[r] = acc;
    }
    dnnl_sgemm('N', 'T', n, s.m, s.d, 1.0f, q_c, s.d, k, s.d, 0.0f, p, s.m);
    dnnl_sgemm('N', 'T', n, s.m, s.dv, 1.0f, do_c, s.dv, v, s.dv, 0.0f, dp, s.m);
    for (int64_t r = 0; r < n; ++r) {
      float *prow = p + r * s.m, *dprow = dp + r * s.m;
      const float l = lse[r0 + r], dl = delta[r];
#pragma omp simd
      for (int64_t j = 0; j < s.m; ++j) {
        prow[j] = FastExp(prow[j] - l);
        dprow[j] = prow[j] * (dprow[j] - dl);
      }
    }
    dnnl_sgemm('T', 'N', s.m, s.dv, n, 1.0f, p, s.m, do_c, s.dv, 1.0f, dv, s.dv);
    dnnl_sgemm('N', 'N', n, s.d, s.m, 1.0f, dp, s.m, k, s.d, 0.0f, dq + r0 * s.d, s.d);
    dnnl_sgemm('T', 'N', s.m, s.d, n, 1.0f, dp, s.m, q_c, s.d, 1.0f, dk, s.d);
  }
}

}  // namespace

// MindSpore AOT entry points. Forward: q, k, v -> out, lse. Inputs float32, contiguous.
extern "C" int FlashAttentionForward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                     void *stream, void *extra) {
  const Shapes s = ReadShapes(shapes);
  auto *q = static_cast<const float *>(params[0]), *k = static_cast<const float *>(params[1]),
       *v = static_cast<const float *>(params[2]);
  auto *out = static_cast<float *>(params[3]), *lse = static_cast<float *>(params[4]);
  // chunks are independent in the forward: a single slice (the VAE's one head) still uses every thread
  const int64_t rows = ChunkRows(s.m), chunks = (s.l + rows - 1) / rows;
  ParallelItems(s.slices * chunks, [&](int64_t item) {
    thread_local std::vector<float> buffer;
    const int64_t i = item / chunks, r0 = item % chunks * rows;
    ForwardChunk(s, q + i * s.l * s.d, k + i * s.m * s.d, v + i * s.m * s.dv, out + i * s.l * s.dv, lse + i * s.l,
                 r0, std::min(rows, s.l - r0), &buffer);
  });
  return 0;
}

// Backward: q, k, v, out, lse, dout -> dq, dk, dv.
extern "C" int FlashAttentionBackward(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                                      void *stream, void *extra) {
  const Shapes s = ReadShapes(shapes);
  auto in = [&](int i) { return static_cast<const float *>(params[i]); };
  auto res = [&](int i) { return static_cast<float *>(params[i]); };
  ParallelItems(s.slices, [&](int64_t i) {
    thread_local std::vector<float> buffer;
    BackwardSlice(s, in(0) + i * s.l * s.d, in(1) + i * s.m * s.d, in(2) + i * s.m * s.dv, in(3) + i * s.l * s.dv,
                  in(4) + i * s.l, in(5) + i * s.l * s.dv, res(6) + i * s.l * s.d, res(7) + i * s.m * s.d,
                  res(8) + i * s.m * s.dv, &buffer);
  });
  return 0;
}
