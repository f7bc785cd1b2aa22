// region_pool on the CPU: segment sums in a wide accumulator (per problem and chunk of points,
// in parallel), then means.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <vector>

#include "cpu/segment_sum.h"
#include "cpu/simd.h"

namespace tmt_ext {
namespace {

template <typename T>
using AccumulateFn = void (*)(const T*, const int64_t*, T*, int64_t*, int64_t, int64_t);

#ifdef TMT_HAS_X86_VARIANTS
template <typename T>
TMT_TARGET_AVX512 void accumulate_avx512(const T* x, const int64_t* labels, T* sums, int64_t* count,
                                         int64_t N, int64_t D) {
  segment_sum::accumulate<T, 64 / sizeof(T)>(x, labels, sums, count, N, D);
}
template <typename T>
TMT_TARGET_AVX2 void accumulate_avx2(const T* x, const int64_t* labels, T* sums, int64_t* count,
                                     int64_t N, int64_t D) {
  segment_sum::accumulate<T, 32 / sizeof(T)>(x, labels, sums, count, N, D);
}
#endif

template <typename T>
void accumulate_baseline(const T* x, const int64_t* labels, T* sums, int64_t* count, int64_t N, int64_t D) {
  segment_sum::accumulate<T, 16 / sizeof(T)>(x, labels, sums, count, N, D);
}

// The widest variant for float/double; null for the types accumulated in a wider type.
template <typename T, typename acc_t>
AccumulateFn<T> pick_accumulate() {
  if constexpr (std::is_same_v<T, acc_t>) {
#ifdef TMT_HAS_X86_VARIANTS
    switch (simd::best_isa()) {
      case simd::Isa::kAvx512: return &accumulate_avx512<T>;
      case simd::Isa::kAvx2: return &accumulate_avx2<T>;
      default: break;
    }
#endif
    return &accumulate_baseline<T>;
  } else {
    return nullptr;
  }
}

template <typename scalar_t, typename acc_t>
void region_pool_kernel(const scalar_t* x, const int64_t* labels, scalar_t* means, int64_t* counts,
                        int64_t B, int64_t N, int64_t D, int64_t K) {
  // Chunked partial sums (segment_sum.h): no synchronization, the same result for any thread
  // count, and the same as k-means' fused update.
  const AccumulateFn<scalar_t> accumulate = pick_accumulate<scalar_t, acc_t>();
  const int64_t chunks = segment_sum::chunk_count(B, N, D, K, int64_t(sizeof(acc_t)));
  const int64_t chunk = (N + chunks - 1) / chunks;
  std::vector<acc_t> partial(B * chunks * K * D);
  std::vector<int64_t> partial_counts(B * chunks * K);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      const int64_t n0 = (item % chunks) * chunk;
      const int64_t n1 = std::min(N, n0 + chunk);
      acc_t* sums = partial.data() + item * K * D;
      int64_t* count = partial_counts.data() + item * K;
      std::fill(sums, sums + K * D, acc_t(0));
      std::fill(count, count + K, int64_t(0));
      if (n0 >= n1) continue;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        accumulate(x + (b * N + n0) * D, labels + b * N + n0, sums, count, n1 - n0, D);
      } else {
        for (int64_t n = n0; n < n1; ++n) {
          const int64_t label = labels[b * N + n];
          if (label < 0) continue;  // ignored point (padding)
          const scalar_t* point = x + (b * N + n) * D;
          acc_t* sum = sums + label * D;
          for (int64_t d = 0; d < D; ++d) sum[d] += static_cast<acc_t>(point[d]);
          count[label] += 1;
        }
      }
    }
  });
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sum(D);
    for (int64_t row = begin; row < end; ++row) {
      segment_sum::finish_row<scalar_t, acc_t>(partial.data(), partial_counts.data(), chunks, K, D, row,
                                               sum.data(), means, counts);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> region_pool_cpu(const at::Tensor& x, const at::Tensor& labels,
                                                   int64_t k) {
  TORCH_CHECK(x.dim() == 3, "region_pool: x must be [B, N, D], got ", x.sizes());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == x.size(0) && labels.size(1) == x.size(1),
              "region_pool: labels must be [B, N] matching x, got ", labels.sizes());
  TORCH_CHECK(k >= 1, "region_pool: k must be >= 1, got ", k);
  const auto x_c = x.contiguous();
  const auto labels_c = labels.to(at::kLong).contiguous();
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(labels_c.numel() == 0 || labels_c.max().item<int64_t>() < k,
              "region_pool: labels must be < k = ", k);
  auto means = at::empty({B, k, D}, x.options());
  auto counts = at::empty({B, k}, x.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "region_pool_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    region_pool_kernel<scalar_t, acc_t>(x_c.data_ptr<scalar_t>(), labels_c.data_ptr<int64_t>(),
                                        means.data_ptr<scalar_t>(), counts.data_ptr<int64_t>(),
                                        B, N, D, k);
  });
  return {means, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(tmt_ext, CPU, m) { m.impl("region_pool", &region_pool_cpu); }

}  // namespace tmt_ext
