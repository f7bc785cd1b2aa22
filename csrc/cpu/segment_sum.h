// Per-segment sums of points (region_pool, and the update step fused into k-means' assign).
//
// Both ops cut a problem's points into the same chunks (by the shapes alone, never by the thread
// count), sum each chunk's points in point order into partial sums of their own, and add the
// partials in chunk order. So k-means' fused update gives region_pool's means bit for bit, and
// any thread count gives the same result.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cpu/simd.h"

namespace tmt_ext {
namespace segment_sum {

// Points per chunk, and the most memory the per-chunk partial sums of all problems may take.
constexpr int64_t kChunk = 512;
constexpr int64_t kPartialBytes = int64_t(64) << 20;

// Number of chunks of each problem's N points (at least 1).
inline int64_t chunk_count(int64_t B, int64_t N, int64_t D, int64_t K, int64_t acc_bytes) {
  const int64_t per_chunk = std::max<int64_t>(1, K * D) * acc_bytes * std::max<int64_t>(B, 1);
  return std::max<int64_t>(1, std::min((N + kChunk - 1) / kChunk, kPartialBytes / per_chunk));
}

// sums[label] += x_n and count[label] += 1 for points n = 0..N-1 in order (negative labels are
// skipped), vectorized over D. Per element the additions run in point order, as a scalar loop.
template <typename T, int W>
TMT_ALWAYS_INLINE void accumulate(const T* x, const int64_t* labels, T* sums, int64_t* count,
                                  int64_t N, int64_t D) {
  for (int64_t n = 0; n < N; ++n) {
    const int64_t label = labels[n];
    if (label < 0) continue;  // ignored point (padding)
    const T* point = x + n * D;
    T* sum = sums + label * D;
    int64_t d = 0;
    for (; d + W <= D; d += W) {
      simd::store<T, W>(sum + d, simd::load<T, W>(sum + d) + simd::load<T, W>(point + d));
    }
    for (; d < D; ++d) sum[d] += point[d];
    count[label] += 1;
  }
}

// Row `row` = (problem b, segment c) of the result: the partials of b's chunks added in chunk
// order, then divided by the count (an empty segment has mean zero, not NaN). `sum` is
// scratch of D accumulators.
template <typename scalar_t, typename acc_t>
inline void finish_row(const acc_t* partial, const int64_t* partial_counts, int64_t chunks,
                       int64_t K, int64_t D, int64_t row, acc_t* sum, scalar_t* means,
                       int64_t* counts) {
  const int64_t b = row / K, c = row % K;
  std::fill(sum, sum + D, acc_t(0));
  int64_t count = 0;
  for (int64_t part = 0; part < chunks; ++part) {
    const int64_t item = b * chunks + part;
    const acc_t* partial_sum = partial + (item * K + c) * D;
    for (int64_t d = 0; d < D; ++d) sum[d] += partial_sum[d];
    count += partial_counts[item * K + c];
  }
  counts[row] = count;
  const acc_t inv = count > 0 ? acc_t(1) / static_cast<acc_t>(count) : acc_t(0);
  scalar_t* mean = means + row * D;
  for (int64_t d = 0; d < D; ++d) mean[d] = static_cast<scalar_t>(sum[d] * inv);
}

}  // namespace segment_sum
}  // namespace tmt_ext
