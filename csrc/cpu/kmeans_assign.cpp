// kmeans_assign on the CPU: the nearest centroid of every point.
//
// argmin_k ||x - c_k||^2 = argmin_k (||c_k||^2 - 2 x.c_k), computed like a small GEMM: a tile of
// points times a panel of centroids, the D loop innermost and the vector lanes running over
// centroids (centroids are packed transposed, [D][panel width], so no horizontal sums are needed).
// The kernel is compiled for AVX-512, AVX2+FMA and baseline SIMD and picked at run time, since the
// extension itself is built without -march flags.
//
// kmeans_assign_bounded is the same kernel for the k-means iterations: with Hamerly's bounds it
// skips the points whose label cannot change and tracks the second nearest centroid of the others,
// and it fuses the update step: each block of points is added to its clusters' sums right after
// it is assigned, while its rows are still in cache (segment_sum.h, region_pool's exact sums).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/segment_sum.h"
#include "cpu/simd.h"

namespace tmt_ext {
namespace {

using simd::hsum;
using simd::load;
template <typename T, int W>
using SimdOf = simd::Vec<T, W>;

// Hamerly's bounds of one problem (kmeans_assign_bounded): a point is skipped, keeping its
// label, when an upper bound on the distance to its own centroid is below a lower bound on the
// distance to every other one; both bounds move by the centroids' drift since they were set.
template <typename T>
struct Bounds {
  const int64_t* labels_in;  // [N]
  const T* upper_in;         // [N]
  const T* lower_in;         // [N]
  const T* drift;            // [K]
  T max_drift;
  T err_scale;  // rounding bound of a computed squared distance: err_scale (||x||^2 + max ||c||^2)
  T cnorm_max;
  T* upper;  // [N] out
  T* lower;  // [N] out
};

// Relative widening of a bound at each update, for its own rounding.
template <typename T>
constexpr T kSlack = 4 * std::numeric_limits<T>::epsilon();

// One problem's inputs and outputs. x rows are contiguous ([N][D]); panels hold the centroids
// packed by pack_problem below; cnorm their squared norms (+inf on padding lanes).
template <typename T>
struct Problem {
  const T* x;
  const T* panels;
  const T* centroids;  // [K][D], as given
  const T* cnorm;
  const bool* mask;  // [N] or null
  int64_t* labels;
  T* sqdist;
  const Bounds<T>* bounds;  // null: plain assign
  int64_t N, D, K;
};

// New bounds of a point from its computed squared distances to the nearest and second nearest
// centroid, widened by their rounding error.
template <typename T>
TMT_ALWAYS_INLINE void set_bounds(const Bounds<T>& bd, int64_t n, T norm, T sq, T sq2) {
  const T err = bd.err_scale * (norm + bd.cnorm_max);
  bd.upper[n] = std::sqrt(sq + err) * (T(1) + kSlack<T>);
  bd.lower[n] = std::sqrt(std::max(T(0), sq2 - err)) * (T(1) - kSlack<T>);
}

// Centroids are cut into panels of 2 vectors (the last one may be 1 vector wide), each stored
// [D][width] so that a panel row is one or two contiguous vector loads.
int64_t panel_count(int64_t K, int64_t lanes) { return (K + 2 * lanes - 1) / (2 * lanes); }

int64_t panel_width(int64_t panel, int64_t K, int64_t lanes) {
  const int64_t left = K - panel * 2 * lanes;
  return left <= lanes ? lanes : 2 * lanes;
}

template <typename T>
void pack_problem(const T* centroids, int64_t K, int64_t D, int64_t lanes, T* panels, T* cnorm) {
  const int64_t panels_n = panel_count(K, lanes);
  T* out = panels;
  for (int64_t p = 0; p < panels_n; ++p) {
    const int64_t width = panel_width(p, K, lanes);
    const int64_t k0 = p * 2 * lanes;
    for (int64_t d = 0; d < D; ++d) {
      for (int64_t l = 0; l < width; ++l) {
        const int64_t k = k0 + l;
        out[d * width + l] = k < K ? centroids[k * D + d] : T(0);
      }
    }
    for (int64_t l = 0; l < width; ++l) {
      const int64_t k = k0 + l;
      if (k < K) {
        double norm = 0;  // wide accumulation: the norm enters every distance of the cluster
        for (int64_t d = 0; d < D; ++d) norm += double(centroids[k * D + d]) * double(centroids[k * D + d]);
        cnorm[k] = static_cast<T>(norm);
      } else {
        cnorm[k] = std::numeric_limits<T>::infinity();  // a padding lane never wins
      }
    }
    out += D * width;
  }
}

// acc[i][j] = x_i . (lanes j*W .. j*W+W-1 of the panel), for PP points and NV vectors.
template <typename T, int W, int PP, int NV>
TMT_ALWAYS_INLINE void dot_tile(const T* const* rows, const T* panel, int64_t D,
                                typename SimdOf<T, W>::type (&acc)[PP][NV]) {
  using V = typename SimdOf<T, W>::type;
  for (int i = 0; i < PP; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  for (int64_t d = 0; d < D; ++d) {
    V c[NV];
    for (int j = 0; j < NV; ++j) c[j] = load<T, W>(panel + (d * NV + j) * W);
    for (int i = 0; i < PP; ++i) {
      const T xv = rows[i][d];
      for (int j = 0; j < NV; ++j) acc[i][j] += c[j] * xv;
    }
  }
}

// Squared norms of PP rows at once (independent accumulators keep the FMA pipes busy).
template <typename T, int W, int PP>
TMT_ALWAYS_INLINE void squared_norms(const T* const* rows, int64_t D, T (&out)[PP]) {
  using V = typename SimdOf<T, W>::type;
  V acc[PP];
  for (int i = 0; i < PP; ++i) acc[i] = V{};
  int64_t d = 0;
  for (; d + W <= D; d += W) {
    for (int i = 0; i < PP; ++i) {
      const V v = load<T, W>(rows[i] + d);
      acc[i] += v * v;
    }
  }
  for (int i = 0; i < PP; ++i) {
    T total = hsum<T, W>(acc[i]);
    for (int64_t e = d; e < D; ++e) total += rows[i][e] * rows[i][e];
    out[i] = total;
  }
}

// Folds one panel's scores ||c||^2 - 2 x.c into the running (best, best_k) of a point: the
// panel's minimum (lowest lane on ties) replaces the best only when strictly lower, so ties go
// to the lowest index. Selects by masks: the winner is unpredictable, branches would miss.
// With top2, the running second lowest score too (for the bounds).
template <typename T, int W, int NV, bool kTop2>
TMT_ALWAYS_INLINE void fold_panel(const typename SimdOf<T, W>::type (&acc)[NV], const T* cnorm,
                                  int64_t k0, T& best, int64_t& best_k, T& second) {
  typename SimdOf<T, W>::type score[NV];
  for (int j = 0; j < NV; ++j) score[j] = load<T, W>(cnorm + k0 + j * W) - acc[j] * T(2);
  T panel_min, panel_second = T(0);
  int64_t lane;
  if constexpr (kTop2) {
    simd::argmin2<T, W, NV>(score, panel_min, lane, panel_second);
    second = std::min(std::min(second, panel_second), std::max(best, panel_min));
  } else {
    simd::argmin<T, W, NV>(score, panel_min, lane);
  }
  const int64_t lower = -static_cast<int64_t>(panel_min < best);
  best_k ^= (best_k ^ (k0 + lane)) & lower;
  best = std::min(best, panel_min);
}

// The PP points idx[0..PP): scan every panel, keep the lowest score (ties: lowest index, since
// centroids are visited in increasing order and only a strictly lower score replaces the best).
template <typename T, int W, int PP, bool kTop2>
TMT_ALWAYS_INLINE void assign_points(const Problem<T>& p, const int64_t* idx) {
  using V = typename SimdOf<T, W>::type;
  const T* rows[PP];
  T best[PP], second[PP];
  int64_t best_k[PP];
  for (int i = 0; i < PP; ++i) {
    rows[i] = p.x + idx[i] * p.D;
    best[i] = second[i] = std::numeric_limits<T>::infinity();
    best_k[i] = 0;
  }
  const int64_t panels_n = panel_count(p.K, W);
  const T* panel = p.panels;
  for (int64_t q = 0; q < panels_n; ++q) {
    const int64_t width = panel_width(q, p.K, W);
    const int64_t k0 = q * 2 * W;
    if (width == 2 * W) {
      V acc[PP][2];
      dot_tile<T, W, PP, 2>(rows, panel, p.D, acc);
      for (int i = 0; i < PP; ++i) fold_panel<T, W, 2, kTop2>(acc[i], p.cnorm, k0, best[i], best_k[i], second[i]);
    } else {
      V acc[PP][1];
      dot_tile<T, W, PP, 1>(rows, panel, p.D, acc);
      for (int i = 0; i < PP; ++i) fold_panel<T, W, 1, kTop2>(acc[i], p.cnorm, k0, best[i], best_k[i], second[i]);
    }
    panel += p.D * width;
  }
  T norms[PP];
  squared_norms<T, W, PP>(rows, p.D, norms);
  for (int i = 0; i < PP; ++i) {
    // ||x||^2 + ||c||^2 - 2 x.c can round below zero for a point on its centroid.
    p.labels[idx[i]] = best_k[i];
    p.sqdist[idx[i]] = std::max(T(0), norms[i] + best[i]);
    if constexpr (kTop2) set_bounds(*p.bounds, idx[i], norms[i], p.sqdist[idx[i]], std::max(T(0), norms[i] + second[i]));
  }
}

// Few centroids (K <= W / 2, e.g. the single centre of a k-means++ round): lanes over centroids
// would sit mostly idle, so the lanes run over D instead (one dot product per centroid, then a
// horizontal sum). Reads the centroids unpacked, [K][D].
template <typename T, int W>
TMT_ALWAYS_INLINE void assign_point_few(const Problem<T>& p, int64_t n) {
  const int64_t D = p.D;
  const T* row = p.x + n * D;
  T best = std::numeric_limits<T>::infinity(), second = best;
  int64_t best_k = 0;
  for (int64_t k = 0; k < p.K; ++k) {
    const T s = p.cnorm[k] - T(2) * simd::dot<T, W>(row, p.centroids + k * D, D);
    if (s < best) {
      second = best;
      best = s;
      best_k = k;
    } else {
      second = std::min(second, s);
    }
  }
  const T norm = simd::dot<T, W>(row, row, D);
  p.labels[n] = best_k;
  p.sqdist[n] = std::max(T(0), norm + best);
  if (p.bounds != nullptr) set_bounds(*p.bounds, n, norm, p.sqdist[n], std::max(T(0), norm + second));
}

// Points n0..n1 of a problem. Padding (mask False) is skipped outright; the others are
// gathered into tiles of PP.
template <typename T, int W, int PP>
TMT_ALWAYS_INLINE void assign_rows_impl(const Problem<T>& p, int64_t n0, int64_t n1) {
  const bool few = p.K <= W / 2;
  int64_t tile[PP];
  int filled = 0;
  for (int64_t n = n0; n < n1; ++n) {
    if (p.mask != nullptr && !p.mask[n]) {
      p.labels[n] = -1;
      p.sqdist[n] = T(0);
      if (p.bounds != nullptr) p.bounds->upper[n] = p.bounds->lower[n] = T(0);
      continue;
    }
    if (p.bounds != nullptr) {
      const Bounds<T>& bd = *p.bounds;
      const int64_t own = bd.labels_in[n];
      if (own >= 0 && own < p.K) {
        const T upper = (bd.upper_in[n] + bd.drift[own]) * (T(1) + kSlack<T>);
        const T lower = (bd.lower_in[n] - bd.max_drift) * (T(1) - kSlack<T>);
        if (upper < lower) {  // no other centroid can be nearer: the label stands
          p.labels[n] = own;
          p.sqdist[n] = T(-1);  // not computed
          bd.upper[n] = upper;
          bd.lower[n] = lower;
          continue;
        }
      }
    }
    if (few) {
      assign_point_few<T, W>(p, n);
    } else {
      tile[filled++] = n;
      if (filled == PP) {
        if (p.bounds != nullptr) {
          assign_points<T, W, PP, true>(p, tile);
        } else {
          assign_points<T, W, PP, false>(p, tile);
        }
        filled = 0;
      }
    }
  }
  if (filled > 0) {
    // A partial tile: pad it with its last point (computed again, the same result written
    // twice) rather than run the leftovers one by one, which leaves the FMA pipes waiting.
    for (int i = filled; i < PP; ++i) tile[i] = tile[filled - 1];
    if (p.bounds != nullptr) {
      assign_points<T, W, PP, true>(p, tile);
    } else {
      assign_points<T, W, PP, false>(p, tile);
    }
  }
}

// Points n0..n1 of a problem; with `sums` (the partial sums [K][D] and counts [K] of this chunk),
// blocks of kPoolBlock points are assigned and then added to the sums in point order while their
// rows are still in cache (the fused update step).
constexpr int64_t kPoolBlock = 256;

template <typename T, int W, int PP>
TMT_ALWAYS_INLINE void assign_pool_rows_impl(const Problem<T>& p, int64_t n0, int64_t n1, T* sums,
                                             int64_t* count) {
  if (sums == nullptr) {
    assign_rows_impl<T, W, PP>(p, n0, n1);
    return;
  }
  for (int64_t s = n0; s < n1; s += kPoolBlock) {
    const int64_t e = std::min(n1, s + kPoolBlock);
    assign_rows_impl<T, W, PP>(p, s, e);
    segment_sum::accumulate<T, W>(p.x + s * p.D, p.labels + s, sums, count, e - s, p.D);
  }
}

// The same kernel for three instruction sets (points per tile: 8, 4, 4).
using RowsFn = void (*)(const void*, int64_t, int64_t, void*, int64_t*);

#ifdef TMT_HAS_X86_VARIANTS
template <typename T>
TMT_TARGET_AVX512 void assign_rows_avx512(const void* p, int64_t n0, int64_t n1, void* sums, int64_t* count) {
  assign_pool_rows_impl<T, 64 / sizeof(T), 8>(*static_cast<const Problem<T>*>(p), n0, n1,
                                              static_cast<T*>(sums), count);
}

template <typename T>
TMT_TARGET_AVX2 void assign_rows_avx2(const void* p, int64_t n0, int64_t n1, void* sums, int64_t* count) {
  assign_pool_rows_impl<T, 32 / sizeof(T), 4>(*static_cast<const Problem<T>*>(p), n0, n1,
                                              static_cast<T*>(sums), count);
}
#endif

template <typename T>
void assign_rows_baseline(const void* p, int64_t n0, int64_t n1, void* sums, int64_t* count) {
  assign_pool_rows_impl<T, 16 / sizeof(T), 4>(*static_cast<const Problem<T>*>(p), n0, n1,
                                              static_cast<T*>(sums), count);
}

template <typename T>
std::pair<RowsFn, int64_t> pick_variant() {
  const simd::Isa isa = simd::best_isa();
  const int64_t lanes = simd::bytes_of(isa) / int64_t(sizeof(T));
#ifdef TMT_HAS_X86_VARIANTS
  if (isa == simd::Isa::kAvx512) return {&assign_rows_avx512<T>, lanes};
  if (isa == simd::Isa::kAvx2) return {&assign_rows_avx2<T>, lanes};
#endif
  return {&assign_rows_baseline<T>, lanes};
}

// Chunk `c` (of `chunk` points) of a problem with the fused update: zeroes the chunk's partial
// sums [K][D] and counts [K], then assigns its points and adds them in.
template <typename T>
void assign_pool_chunk(RowsFn rows_fn, const Problem<T>& problem, int64_t c, int64_t chunk,
                       T* partial, int64_t* partial_counts) {
  const int64_t K = problem.K, D = problem.D;
  T* sums = partial + c * K * D;
  int64_t* count = partial_counts + c * K;
  std::fill(sums, sums + K * D, T(0));
  std::fill(count, count + K, int64_t(0));
  const int64_t n0 = c * chunk, n1 = std::min(problem.N, n0 + chunk);
  if (n0 < n1) rows_fn(&problem, n0, n1, sums, count);
}

// Bounds tensors of kmeans_assign_bounded (all contiguous, compute dtype).
struct BoundsArgs {
  at::Tensor labels_in, upper_in, lower_in, drift, upper, lower;
  double err_scale;
  at::Tensor means, counts;  // out: the update step, [B, K, D] and [B, K]
};

template <typename T>
void kmeans_assign_kernel(const at::Tensor& x, const at::Tensor& centroids, const bool* mask,
                          at::Tensor& labels, at::Tensor& sqdist, const BoundsArgs* bounds_args) {
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = centroids.size(1);
  const auto [rows_fn, lanes] = pick_variant<T>();
  const int64_t panels_size = panel_count(K, lanes) * 2 * lanes * D;
  const int64_t cnorm_size = panel_count(K, lanes) * 2 * lanes;
  // Scratch left uninitialized (every entry read is written first): this runs every iteration.
  std::unique_ptr<T[]> panels(new T[B * panels_size]), cnorm(new T[B * cnorm_size]);
  const T* x_ptr = x.data_ptr<T>();
  const T* c_ptr = centroids.data_ptr<T>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      pack_problem<T>(c_ptr + b * K * D, K, D, lanes, panels.get() + b * panels_size,
                      cnorm.get() + b * cnorm_size);
  });
  std::vector<Bounds<T>> bounds;
  if (bounds_args != nullptr) {
    const BoundsArgs& a = *bounds_args;
    const T* drift = a.drift.data_ptr<T>();
    for (int64_t b = 0; b < B; ++b) {
      const T* c_norms = cnorm.get() + b * cnorm_size;
      bounds.push_back({a.labels_in.data_ptr<int64_t>() + b * N, a.upper_in.data_ptr<T>() + b * N,
                        a.lower_in.data_ptr<T>() + b * N, drift + b * K,
                        *std::max_element(drift + b * K, drift + (b + 1) * K), static_cast<T>(a.err_scale),
                        *std::max_element(c_norms, c_norms + K), a.upper.data_ptr<T>() + b * N,
                        a.lower.data_ptr<T>() + b * N});
    }
  }
  int64_t* labels_ptr = labels.data_ptr<int64_t>();
  T* sqdist_ptr = sqdist.data_ptr<T>();
  auto problem_of = [&](int64_t b) {
    return Problem<T>{x_ptr + b * N * D, panels.get() + b * panels_size, c_ptr + b * K * D,
                      cnorm.get() + b * cnorm_size, mask != nullptr ? mask + b * N : nullptr,
                      labels_ptr + b * N, sqdist_ptr + b * N, bounds.empty() ? nullptr : &bounds[b],
                      N, D, K};
  };
  if (bounds_args == nullptr) {
    // Work items of a fixed number of points, so every thread count gives the same partition
    // (each point's result depends on nothing else anyway).
    constexpr int64_t kChunk = 128;
    const int64_t chunks = (N + kChunk - 1) / kChunk;
    at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t b = item / chunks;
        const int64_t n0 = (item % chunks) * kChunk;
        const Problem<T> problem = problem_of(b);
        rows_fn(&problem, n0, std::min(N, n0 + kChunk), nullptr, nullptr);
      }
    });
    return;
  }
  // With the fused update: work items are region_pool's chunks, each with its partial sums.
  const int64_t chunks = segment_sum::chunk_count(B, N, D, K, int64_t(sizeof(T)));
  const int64_t chunk = (N + chunks - 1) / chunks;
  std::unique_ptr<T[]> partial(new T[B * chunks * K * D]);  // zeroed per work item
  std::unique_ptr<int64_t[]> partial_counts(new int64_t[B * chunks * K]);
  at::parallel_for(0, B * chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / chunks;
      assign_pool_chunk<T>(rows_fn, problem_of(b), item % chunks, chunk,
                           partial.get() + b * chunks * K * D, partial_counts.get() + b * chunks * K);
    }
  });
  T* means = bounds_args->means.data_ptr<T>();
  int64_t* counts = bounds_args->counts.data_ptr<int64_t>();
  at::parallel_for(0, B * K, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> sum(D);
    for (int64_t row = begin; row < end; ++row) {
      segment_sum::finish_row<T, T>(partial.get(), partial_counts.get(), chunks, K, D, row, sum.data(),
                                    means, counts);
    }
  });
}

struct Prepared {
  at::Tensor x, centroids, mask, labels, sqdist;
  at::ScalarType compute;
};

Prepared prepare(const char* op, const at::Tensor& x, const at::Tensor& centroids,
                 const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be [B, N, D], got ", x.sizes());
  TORCH_CHECK(centroids.dim() == 3 && centroids.size(0) == x.size(0) && centroids.size(2) == x.size(2),
              op, ": centroids must be [B, K, D] matching x ", x.sizes(), ", got ", centroids.sizes());
  TORCH_CHECK(centroids.size(1) >= 1, op, ": need at least one centroid");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()) && at::isFloatingType(centroids.scalar_type()),
              op, ": x and centroids must be floating point");
  if (mask.has_value()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == x.size(0) && mask->size(1) == x.size(1),
                op, ": mask must be [B, N] matching x, got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == at::kBool, op, ": mask must be bool");
  }
  Prepared r;
  // fp64 stays fp64; every other float type is computed in fp32.
  r.compute = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  r.x = x.to(r.compute).contiguous();
  r.centroids = centroids.to(r.compute).contiguous();
  if (mask.has_value()) r.mask = mask->contiguous();
  r.labels = at::empty({x.size(0), x.size(1)}, x.options().dtype(at::kLong));
  r.sqdist = at::empty({x.size(0), x.size(1)}, x.options().dtype(r.compute));
  return r;
}

void run(Prepared& r, const BoundsArgs* bounds) {
  if (r.x.size(0) == 0 || r.x.size(1) == 0) return;
  const bool* mask_ptr = r.mask.defined() ? r.mask.data_ptr<bool>() : nullptr;
  if (r.compute == at::kDouble) {
    kmeans_assign_kernel<double>(r.x, r.centroids, mask_ptr, r.labels, r.sqdist, bounds);
  } else {
    kmeans_assign_kernel<float>(r.x, r.centroids, mask_ptr, r.labels, r.sqdist, bounds);
  }
}

std::tuple<at::Tensor, at::Tensor> kmeans_assign_cpu(const at::Tensor& x, const at::Tensor& centroids,
                                                     const std::optional<at::Tensor>& mask) {
  Prepared r = prepare("kmeans_assign", x, centroids, mask);
  run(r, nullptr);
  return {r.labels, r.sqdist};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> kmeans_assign_bounded_cpu(
    const at::Tensor& x, const at::Tensor& centroids, const std::optional<at::Tensor>& mask,
    const at::Tensor& labels, const at::Tensor& upper, const at::Tensor& lower, const at::Tensor& drift,
    double err_scale) {
  Prepared r = prepare("kmeans_assign_bounded", x, centroids, mask);
  const int64_t B = x.size(0), N = x.size(1), K = centroids.size(1), D = x.size(2);
  for (const auto* t : {&labels, &upper, &lower}) {
    TORCH_CHECK(t->dim() == 2 && t->size(0) == B && t->size(1) == N,
                "kmeans_assign_bounded: labels, upper and lower must be [B, N], got ", t->sizes());
  }
  TORCH_CHECK(drift.dim() == 2 && drift.size(0) == B && drift.size(1) == K,
              "kmeans_assign_bounded: drift must be [B, K], got ", drift.sizes());
  BoundsArgs a{labels.to(at::kLong).contiguous(), upper.to(r.compute).contiguous(),
               lower.to(r.compute).contiguous(), drift.to(r.compute).contiguous(),
               at::empty({B, N}, r.x.options()), at::empty({B, N}, r.x.options()), err_scale,
               at::empty({B, K, D}, r.x.options()), at::empty({B, K}, r.labels.options())};
  if (B * N == 0) {  // no kernel runs: every cluster is empty
    a.means.zero_();
    a.counts.zero_();
  }
  run(r, &a);
  return {r.labels, r.sqdist, a.upper, a.lower, a.means, a.counts};
}


// ---- whole Lloyd iterations per problem (kmeans_lloyd) -------------------------------------------
//
// The iterations of one problem back to back, so its points stay in cache from one iteration to
// the next (a batch-wide step streams every problem through memory each iteration) and no host
// round trip separates the steps. The same steps as tmt_ext.reference.kmeans.lloyd with the
// bounded assign kernel: assign + fused update, empty clusters moved onto the farthest points,
// cosine re-normalisation, the per-problem tol stop, Hamerly's bounds.

// The e-th empty cluster (in index order) moves onto the e-th farthest valid point from its
// centroid; ties: the lowest point index. Distances are compared as float32, as the reference.
template <typename T>
void reseed_empty(const T* x, const bool* mask, const T* sqdist, const int64_t* counts, T* means,
                  int64_t N, int64_t D, int64_t K) {
  std::vector<int64_t> empty;
  for (int64_t k = 0; k < K; ++k) {
    if (counts[k] == 0) empty.push_back(k);
  }
  if (empty.empty()) return;
  // One key per point orders by (distance desc, index asc): the bits of a non-negative float
  // sort like its value.
  std::vector<std::pair<int64_t, int64_t>> keys;  // (-(bits + 1), index): ascending = farthest first
  keys.reserve(N);
  for (int64_t n = 0; n < N; ++n) {
    if (mask != nullptr && !mask[n]) continue;
    const float dist = std::max(0.0f, static_cast<float>(sqdist[n]));
    int32_t bits;
    std::memcpy(&bits, &dist, sizeof(bits));
    keys.emplace_back(-(int64_t(bits) + 1), n);
  }
  const int64_t take = std::min<int64_t>(int64_t(empty.size()), int64_t(keys.size()));
  std::partial_sort(keys.begin(), keys.begin() + take, keys.end());
  for (size_t e = 0; e < empty.size(); ++e) {
    const int64_t point = keys[std::min<int64_t>(int64_t(e), take - 1)].second;
    std::memcpy(means + empty[e] * D, x + point * D, sizeof(T) * D);
  }
}

template <typename T>
void lloyd_problem(RowsFn rows_fn, int64_t lanes, const T* x, const bool* mask, T* centroids,
                   int64_t N, int64_t D, int64_t K, int64_t chunks, int64_t iters, double tol,
                   bool spherical, T err_scale, int64_t* n_iter) {
  const int64_t panels_size = panel_count(K, lanes) * 2 * lanes * D;
  const int64_t cnorm_size = panel_count(K, lanes) * 2 * lanes;
  const int64_t chunk = (N + chunks - 1) / chunks;
  std::vector<T> panels(panels_size), cnorm(cnorm_size), means(K * D), sum(D);
  std::vector<T> partial(chunks * K * D), sqdist(N), upper(N, T(0)), drift(K, T(0));
  std::vector<T> lower(N, -std::numeric_limits<T>::infinity());  // first pass: compute all
  std::vector<int64_t> labels(N, 0), scratch_labels(N), partial_counts(chunks * K), counts(K);
  int64_t ran = 0;
  for (int64_t it = 0; it < iters; ++it) {
    pack_problem<T>(centroids, K, D, lanes, panels.data(), cnorm.data());
    // Inputs and outputs of the bounds may alias: each point's are read before they are written.
    const Bounds<T> bounds{labels.data(), upper.data(), lower.data(), drift.data(),
                           *std::max_element(drift.begin(), drift.end()), err_scale,
                           *std::max_element(cnorm.begin(), cnorm.begin() + K), upper.data(),
                           lower.data()};
    const Problem<T> problem{x, panels.data(), centroids, cnorm.data(), mask, labels.data(),
                             sqdist.data(), &bounds, N, D, K};
    for (int64_t c = 0; c < chunks; ++c) {
      assign_pool_chunk<T>(rows_fn, problem, c, chunk, partial.data(), partial_counts.data());
    }
    for (int64_t k = 0; k < K; ++k) {
      segment_sum::finish_row<T, T>(partial.data(), partial_counts.data(), chunks, K, D, k, sum.data(),
                                    means.data(), counts.data());
    }
    if (std::find(counts.begin(), counts.end(), int64_t(0)) != counts.end()) {
      if (std::any_of(sqdist.begin(), sqdist.end(), [](T d) { return d < T(0); })) {
        // Skipped points carry no distance: assign every point again, without bounds.
        const Problem<T> plain{x, panels.data(), centroids, cnorm.data(), mask, scratch_labels.data(),
                               sqdist.data(), nullptr, N, D, K};
        rows_fn(&plain, 0, N, nullptr, nullptr);
      }
      reseed_empty<T>(x, mask, sqdist.data(), counts.data(), means.data(), N, D, K);
    }
    if (spherical) {  // as torch.nn.functional.normalize (eps 1e-12)
      for (int64_t k = 0; k < K; ++k) {
        T* m = means.data() + k * D;
        T norm = 0;
        for (int64_t d = 0; d < D; ++d) norm += m[d] * m[d];
        const T scale = T(1) / std::max(std::sqrt(norm), T(1e-12));
        for (int64_t d = 0; d < D; ++d) m[d] *= scale;
      }
    }
    T shift = 0, scale = 0;
    for (int64_t k = 0; k < K; ++k) {
      T moved = 0;
      for (int64_t d = 0; d < D; ++d) {
        const T diff = means[k * D + d] - centroids[k * D + d];
        moved += diff * diff;
        scale += centroids[k * D + d] * centroids[k * D + d];
      }
      drift[k] = std::sqrt(moved);
      shift += moved;
    }
    std::copy(means.begin(), means.end(), centroids);
    ++ran;
    if (tol > 0 && !(shift > T(tol) * scale)) break;  // converged: these centroids stay
  }
  *n_iter = ran;
}

std::tuple<at::Tensor, at::Tensor> kmeans_lloyd_cpu(const at::Tensor& x, const at::Tensor& centroids,
                                                    const std::optional<at::Tensor>& mask, int64_t iters,
                                                    double tol, bool spherical, double err_scale) {
  Prepared r = prepare("kmeans_lloyd", x, centroids, mask);
  TORCH_CHECK(iters >= 0, "kmeans_lloyd: iters must be >= 0, got ", iters);
  TORCH_CHECK(tol >= 0, "kmeans_lloyd: tol must be >= 0, got ", tol);
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), K = centroids.size(1);
  at::Tensor out = r.centroids.clone();
  at::Tensor n_iter = at::zeros({B}, x.options().dtype(at::kLong));
  if (B == 0 || N == 0 || iters == 0) return {out, n_iter};
  const bool* mask_ptr = r.mask.defined() ? r.mask.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES(r.compute, "kmeans_lloyd_cpu", [&] {
    using T = scalar_t;
    const auto [rows_fn, lanes] = pick_variant<T>();
    // region_pool's chunks of a problem, so the means are region_pool's bit for bit.
    const int64_t chunks = segment_sum::chunk_count(B, N, D, K, int64_t(sizeof(T)));
    const T* x_ptr = r.x.data_ptr<T>();
    T* c_ptr = out.data_ptr<T>();
    int64_t* n_ptr = n_iter.data_ptr<int64_t>();
    at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        lloyd_problem<T>(rows_fn, lanes, x_ptr + b * N * D, mask_ptr != nullptr ? mask_ptr + b * N : nullptr,
                         c_ptr + b * K * D, N, D, K, chunks, iters, tol, spherical, static_cast<T>(err_scale),
                         n_ptr + b);
      }
    });
  });
  return {out, n_iter};
}

}  // namespace

TORCH_LIBRARY_IMPL(tmt_ext, CPU, m) {
  m.impl("kmeans_assign", &kmeans_assign_cpu);
  m.impl("kmeans_assign_bounded", &kmeans_assign_bounded_cpu);
  m.impl("kmeans_lloyd", &kmeans_lloyd_cpu);
}

}  // namespace tmt_ext
