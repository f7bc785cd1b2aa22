// Operator schemas of the tmt_ext library: every op is declared here, in one place.
// Kernels register themselves per backend with TORCH_LIBRARY_IMPL in csrc/cpu/ and csrc/cuda/.
#include <torch/library.h>

#include <string>

#ifdef TMT_EXT_PYTHON_MODULE
#include <Python.h>
// An importable (empty) module, so that `import tmt_ext._C` loads the library and runs the
// registrations below; the ops themselves are reached through torch.ops.tmt_ext.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif

#ifndef TMT_EXT_CUDA_ARCHS
#define TMT_EXT_CUDA_ARCHS ""
#endif

namespace tmt_ext {

// Which backends this binary carries, as "cpu" or "cpu,cuda:<arch list>".
std::string build_info() {
#ifdef TMT_EXT_WITH_CUDA
  return std::string("cpu,cuda:") + TMT_EXT_CUDA_ARCHS;
#else
  return "cpu";
#endif
}

}  // namespace tmt_ext

TORCH_LIBRARY(tmt_ext, m) {
  m.def("build_info() -> str", &tmt_ext::build_info);

  // ---- clustering: segment mean of points per label ------------------------------------
  // x [B, N, D] float, labels [B, N] int (negative = ignored), k clusters
  //   -> (means [B, K, D] (dtype of x), counts [B, K] int64)
  m.def("region_pool(Tensor x, Tensor labels, int k) -> (Tensor, Tensor)");

  // ---- region attention -----------------------------------------------------------------
  // q [B, H, Nq, D], k/v [B, H, Nk, D]; q_region [B, Nq], k_region [B, Nk] int32/int64;
  // region_bias None (same region only) or float32 [B, H or 1, R, R] (-inf forbids a pair).
  //   -> (out [B, H, Nq, D] (dtype of q), lse [B, H, Nq] float32; dead rows: out 0, lse -inf)
  m.def("region_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor q_region, Tensor k_region, "
        "Tensor? region_bias, float scale) -> (Tensor, Tensor)");
  //   -> (grad_q, grad_k, grad_v, grad_bias float32 [B, H or 1, R, R] or an empty tensor)
  m.def("region_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor q_region, Tensor k_region, Tensor? region_bias, float scale, "
        "bool bias_requires_grad) -> (Tensor, Tensor, Tensor, Tensor)");


  // ---- k-means ----------------------------------------------------------------------------
  // x [B, N, D] float, centroids [B, K, D] float, mask None or bool [B, N] (False = padding)
  //   -> (labels [B, N] int64 (nearest centroid, ties to the lowest index; -1 where masked),
  //       sqdist [B, N] (squared distance to it, >= 0; 0 where masked), float64 for float64 x,
  //       else float32). Distances are ||x||^2 - 2 x.c + ||c||^2, without a [B, N, K] tensor.
  m.def("kmeans_assign(Tensor x, Tensor centroids, Tensor? mask=None) -> (Tensor, Tensor)");
  // kmeans_assign with Hamerly's bounds (k-means iterations on the CPU): labels/upper/lower
  // [B, N] from the previous call, drift [B, K] how far each centroid moved since. A point whose
  // upper bound (own centroid) stays below its lower bound (any other) keeps its label, with
  // sqdist -1 (not computed); the others are assigned as by kmeans_assign and get new bounds:
  // sqrt(sqdist +- err) with err = err_scale (||x||^2 + max ||c||^2) (lower: second nearest).
  // Fused with the update step: means [B, K, D] and counts [B, K] int64 of the new labels,
  // exactly region_pool(x, labels, K) (so the iterations match assign + region_pool bit for bit).
  //   -> (labels, sqdist, upper, lower, means, counts); pass lower = -inf to compute every point.
  m.def("kmeans_assign_bounded(Tensor x, Tensor centroids, Tensor? mask, Tensor labels, Tensor upper, "
        "Tensor lower, Tensor drift, float err_scale) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Whole Lloyd iterations of every problem (CPU): from centroids [B, K, D], at most `iters`
  // steps of kmeans_assign_bounded (fused update), empty clusters moved onto the farthest points,
  // means re-normalised when `spherical`, a problem stopping once sum ||c' - c||^2 <= tol sum ||c||^2
  // (tol > 0) -> (centroids [B, K, D], n_iter [B] int64: the steps each problem ran).
  m.def("kmeans_lloyd(Tensor x, Tensor centroids, Tensor? mask, int iters, float tol, bool spherical, "
        "float err_scale) -> (Tensor, Tensor)");
  // k-means++ seeding: x [B, N, D] float, uniforms [B, K] float64 in [0, 1) (the draw of each
  // round), mask None or bool [B, N] -> indices [B, K] int64 of the points chosen as centres
  // (round r: the first point whose running sum of weights exceeds uniforms[:, r] * total).
  m.def("kmeans_plusplus(Tensor x, Tensor uniforms, Tensor? mask=None) -> Tensor");


  // ---- local soft clustering (ACTE) ----------------------------------------------------
  // feat [B, C, H, W] float32/float64, H and W multiples of cell; iters >= 0; kappa finite
  //   -> (assign [B, 9, H, W] (weights of the 3 x 3 neighbour cells), region_feat [B, R, C])
  m.def("local_soft_cluster(Tensor feat, int cell, int iters, float kappa) -> (Tensor, Tensor)");
  //   -> grad_feat [B, C, H, W] (recomputes the forward, then analytic backward)
  m.def("local_soft_cluster_backward(Tensor grad_assign, Tensor grad_region_feat, Tensor feat, "
        "int cell, int iters, float kappa) -> Tensor");


}
