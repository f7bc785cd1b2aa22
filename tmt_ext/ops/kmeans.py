"""Batched k-means (``kmeans``) and its fused assign step (``kmeans_assign``).

The update step is ``region_pool`` (per-cluster means and counts, negative labels ignored); on
the CPU it runs inside the bounded assign kernel (``kmeans_assign_bounded``).
"""

from typing import Optional, Tuple, Union

import torch

from tmt_ext import _native
from tmt_ext.ops._checks import FLOAT_DTYPES, check_finite, check_int, check_same_device, check_tensor
from tmt_ext.reference.kmeans import (KMeansResult, bounds_err_scale, initial_centroids,
                                      kmeans_assign_reference, lloyd)
from tmt_ext.reference.region_pool import region_pool_reference

__all__ = ["KMeansResult", "kmeans", "kmeans_assign"]

_INITS = ("kmeans++", "random")
_METRICS = ("l2", "cosine")
_BACKENDS = ("auto", "torch", "faiss")
# On a GPU, how many iterations run between host reads of the per-problem stop flags.
_CUDA_SYNC_EVERY = 8


def _check_mask(mask, x: torch.Tensor) -> None:
    if mask is None:
        return
    check_tensor("mask", mask, dtypes=(torch.bool,), kind="bool")
    if tuple(mask.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"mask must have shape {tuple(x.shape[:-1])} (the leading dims of x), "
                         f"got {tuple(mask.shape)}")
    check_same_device(x=x, mask=mask)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor,
                  mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of every point, without a ``[B, N, K]`` distance tensor.

    Args:
        x: ``[B, N, D]`` (or ``[N, D]``) points. CPU: float32/float64 (fp16/bf16 are computed in
            float32); CUDA: float32/float16/bfloat16/float64, accumulated in float32 (float64 in
            float64).
        centroids: ``[B, K, D]`` (or ``[K, D]``) float centroids, used in float32 (float64 for
            float64 x).
        mask: optional ``[B, N]`` bool, False marks padding.

    Returns:
        ``(labels [B, N] int64, sqdist [B, N])``: the index of the nearest centroid (ties: the
        lowest index; -1 for padding) and the squared distance to it, computed as
        ``||x||^2 - 2 x.c + ||c||^2`` and clamped at 0 (0 for padding); sqdist is float64 for
        float64 x, else float32. ``sqdist`` is differentiable in ``x`` and ``centroids``.
    """
    check_tensor("x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES, kind="floating-point")
    check_tensor("centroids", centroids, ndim=x.dim(), dtypes=FLOAT_DTYPES, kind="floating-point")
    if centroids.shape[-1] != x.shape[-1] or centroids.shape[:-2] != x.shape[:-2]:
        expected = "[B, K, D]" if x.dim() == 3 else "[K, D]"
        raise ValueError(f"centroids must be {expected} with B and D of x {tuple(x.shape)}, "
                         f"got {tuple(centroids.shape)}")
    if centroids.shape[-2] < 1:
        raise ValueError("centroids must hold at least one centroid (K >= 1)")
    check_same_device(x=x, centroids=centroids)
    _check_mask(mask, x)
    unbatched = x.dim() == 2
    if unbatched:
        x, centroids = x.unsqueeze(0), centroids.unsqueeze(0)
        mask = mask.unsqueeze(0) if mask is not None else None
    if _native.use_native("kmeans_assign", x.device):
        labels, sqdist = torch.ops.tmt_ext.kmeans_assign(x, centroids, mask)
    else:
        labels, sqdist = kmeans_assign_reference(x, centroids, mask)
    if unbatched:
        labels, sqdist = labels.squeeze(0), sqdist.squeeze(0)
    return labels, sqdist


def _all_finite(x: torch.Tensor, mask: Optional[torch.Tensor]) -> bool:
    # min/max propagate NaN and expose +-inf: one fused reduction instead of isfinite's
    # several full-size passes.
    if mask is None:
        low, high = torch.aminmax(x)
        return bool(torch.isfinite(low) & torch.isfinite(high))
    low, high = torch.aminmax(x, dim=-1)
    return bool(((torch.isfinite(low) & torch.isfinite(high)) | ~mask).all())


def _check_init(init, x: torch.Tensor, k: int) -> Union[str, torch.Tensor]:
    if isinstance(init, str):
        if init not in _INITS:
            raise ValueError(f"init must be one of {_INITS} or a tensor, got {init!r}")
        return init
    if not isinstance(init, torch.Tensor):
        raise TypeError(f"init must be a string or a torch.Tensor, got {type(init).__name__}")
    check_tensor("init", init, dtypes=FLOAT_DTYPES, kind="floating-point")
    B, _, D = x.shape
    if init.dim() == 2:
        init = init.unsqueeze(0).expand(B, -1, -1)
    if tuple(init.shape) != (B, k, D):
        raise ValueError(f"init must have shape {(B, k, D)} (or {(k, D)}), got {tuple(init.shape)}")
    check_same_device(x=x, init=init)
    check_finite("init", init)
    return init


def kmeans(x: torch.Tensor, k: int, *, iters: int = 25, tol: float = 1e-4,
           init: Union[str, torch.Tensor] = "kmeans++", seed: int = 0,
           mask: Optional[torch.Tensor] = None, metric: str = "l2",
           backend: str = "auto") -> KMeansResult:
    """Batched k-means (Lloyd) on B independent problems at once.

    Args:
        x: ``[B, N, D]`` or ``[N, D]`` float points (fp16/bf16 are clustered in float32).
        k: clusters per problem, ``1 <= k <=`` the number of valid points of every problem.
        iters: at most this many Lloyd iterations (assign, then update).
        tol: a problem stops once the relative centroid shift of an iteration,
            ``sum_k ||c_k' - c_k||^2 / sum_k ||c_k||^2``, is ``<= tol``; its centroids then stay
            fixed. ``tol = 0`` runs exactly ``iters`` iterations. (FAISS runs ``iters``
            iterations whatever ``tol``.)
        init: ``"kmeans++"`` (batched k-means++ seeding), ``"random"`` (k distinct points), or
            initial centroids ``[B, k, D]`` (``[k, D]`` is used for every problem).
        seed: seeds a ``torch.Generator`` on x's device: same seed, same result.
        mask: optional ``[B, N]`` bool; False marks padding, left out of everything (label -1).
        metric: ``"l2"``, or ``"cosine"``: spherical k-means on L2-normalised points, centroids
            re-normalised after every update; labels and inertia then use the squared L2
            distance between unit vectors (``2 - 2 cos``).
        backend: ``"auto"`` (compiled kernels: fused assign + ``region_pool`` update; the
            PyTorch reference where none is built), ``"torch"`` (the reference) or ``"faiss"``
            (``faiss.Kmeans`` per problem, every point used; GPU FAISS for CUDA tensors when it
            is installed; FAISS seeds with random points for both init strings).

    Every step runs once for the whole batch: one fused assign kernel, one ``region_pool``
    update, a few batched tensor ops (no per-problem launches). Empty clusters move onto the
    points farthest from their centroids (the e-th empty cluster onto the e-th farthest point).
    On the CPU the assign step also keeps Hamerly's bounds and skips the points whose label
    cannot change (the same iterations, fewer distances; most points in late iterations), and
    does the update in the same pass (each block of points is added to its clusters' sums while
    still in cache; the sums are ``region_pool``'s, bit for bit). With at least as many
    problems as threads, the CPU runs all iterations of a problem in one kernel call
    (``kmeans_lloyd``): its points stay in cache from one iteration to the next, problems run
    in parallel, and the result is that of the step-by-step loop (bit for bit for ``l2``).
    k-means++ runs in a CPU kernel that seeds each problem with its points kept in cache; on
    CUDA as batched tensor ops over the fused assign kernel, one round for all problems at a
    time. On CUDA the per-problem stop flags stay on the device and the host reads them every 8
    iterations to leave the loop early (with ``tol = 0``, only once at the end).

    Returns:
        :class:`KMeansResult` ``(centroids [B, k, D], labels [B, N] int64, inertia [B], n_iter)``:
        labels and inertia (sum of squared distances of valid points to their nearest centroid)
        belong to the returned centroids; ``n_iter`` (int) is the most iterations any problem
        ran. Without a batch dimension in, none out (inertia is then a 0-dim tensor).
    """
    check_tensor("x", x, ndim=(2, 3), dtypes=FLOAT_DTYPES, kind="floating-point")
    check_int("k", k, minimum=1)
    check_int("iters", iters, minimum=0)
    check_int("seed", seed)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)):
        raise TypeError(f"tol must be a float, got {type(tol).__name__}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if metric not in _METRICS:
        raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    _check_mask(mask, x)
    unbatched = x.dim() == 2
    if unbatched:
        x = x.unsqueeze(0)
        mask = mask.unsqueeze(0) if mask is not None else None
        if isinstance(init, torch.Tensor) and init.dim() == 2:
            init = init.unsqueeze(0)
    B, N, D = x.shape
    if N == 0 or D == 0:
        raise ValueError(f"x must hold at least one point of at least one feature, got shape "
                         f"{tuple(x.shape)}")
    init = _check_init(init, x, k)
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if B == 0:
        return KMeansResult(x.new_zeros(0, k, D), torch.zeros(0, N, dtype=torch.int64, device=x.device),
                            x.new_zeros(0), 0)
    valid_counts = mask.sum(1) if mask is not None else None
    fewest = int(valid_counts.min()) if mask is not None else N
    if k > fewest:
        problem = int(valid_counts.argmin()) if mask is not None else 0
        raise ValueError(f"k = {k} exceeds the number of valid points ({fewest}) of problem "
                         f"{problem}: need 1 <= k <= valid points")
    if not _all_finite(x, mask):
        raise ValueError("x contains NaN or infinite values (in valid points)")

    with torch.no_grad():
        result = _run(x, k, iters=iters, tol=float(tol), init=init, seed=seed, mask=mask,
                      metric=metric, backend=backend)
    if unbatched:
        result = KMeansResult(result.centroids[0], result.labels[0], result.inertia[0], result.n_iter)
    return result


def _run(x, k, *, iters, tol, init, seed, mask, metric, backend) -> KMeansResult:
    if backend == "faiss":
        return _kmeans_faiss(x, k, iters=iters, init=init, seed=seed, mask=mask, metric=metric)
    native = backend == "auto" and _native.use_native("kmeans", x.device)
    if native and x.device.type == "cpu" and x.shape[0] >= torch.get_num_threads():
        return _lloyd_cpu(x, k, iters=iters, tol=tol, init=init, seed=seed, mask=mask,
                          metric=metric)
    plusplus = assign_bounded = None  # without: the batched reference seeding, no bounds
    if native:
        assign, update = torch.ops.tmt_ext.kmeans_assign, torch.ops.tmt_ext.region_pool
        if x.device.type == "cpu":
            plusplus = torch.ops.tmt_ext.kmeans_plusplus
            assign_bounded = torch.ops.tmt_ext.kmeans_assign_bounded
    else:
        assign, update = kmeans_assign_reference, region_pool_reference
    sync_every = _CUDA_SYNC_EVERY if x.device.type == "cuda" else 1
    return lloyd(x, k, iters=iters, tol=tol, init=init, seed=seed, mask=mask, metric=metric,
                 assign=assign, update=update, plusplus=plusplus, sync_every=sync_every,
                 assign_bounded=assign_bounded)


def _lloyd_cpu(x, k, *, iters, tol, init, seed, mask, metric) -> KMeansResult:
    """:func:`lloyd` with the iterations of each problem run back to back in one kernel call
    (``kmeans_lloyd``: a problem's points stay in cache across iterations, no per-step host
    work); problems in parallel, so used when there are at least as many problems as threads."""
    ops = torch.ops.tmt_ext
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=-1)
    centroids = initial_centroids(x, k, init=init, seed=seed, mask=mask, metric=metric,
                                  assign=ops.kmeans_assign, plusplus=ops.kmeans_plusplus)
    centroids, n_iter = ops.kmeans_lloyd(x, centroids, mask, iters, tol, metric == "cosine",
                                         bounds_err_scale(x))
    labels, sqdist = ops.kmeans_assign(x, centroids, mask)
    return KMeansResult(centroids, labels, sqdist.sum(dim=1), int(n_iter.max()))


def _kmeans_faiss(x, k, *, iters, init, seed, mask, metric) -> KMeansResult:
    """``faiss.Kmeans`` once per problem on the valid points; labels and inertia of the final
    centroids come from the assign step, as for the other backends."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("backend='faiss' needs the faiss package: pip install faiss-cpu") from exc
    B, N, D = x.shape
    use_gpu = x.device.type == "cuda" and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    points_all = torch.nn.functional.normalize(x, dim=-1) if metric == "cosine" else x
    host = points_all.detach().to("cpu", torch.float32)
    host_mask = mask.cpu() if mask is not None else None
    centroids = []
    for b in range(B):
        points = host[b] if host_mask is None else host[b][host_mask[b]]
        points = points.contiguous().numpy()
        # min/max points per centroid: FAISS otherwise warns below 39 points per centroid and
        # silently subsamples above 256 per centroid.
        km = faiss.Kmeans(D, k, niter=iters, seed=seed % (2 ** 31), spherical=metric == "cosine",
                          min_points_per_centroid=1, max_points_per_centroid=max(N, 1),
                          gpu=use_gpu, verbose=False)
        start = None
        if isinstance(init, torch.Tensor):
            start = init[b].detach().to("cpu", torch.float32)
            if metric == "cosine":
                start = torch.nn.functional.normalize(start, dim=-1)
            start = start.contiguous().numpy()
        km.train(points, init_centroids=start)
        centroids.append(torch.from_numpy(km.centroids.copy()))
    c = torch.stack(centroids).to(x.device, x.dtype) if B else x.new_zeros(0, k, D)
    labels, sqdist = kmeans_assign(points_all, c, mask)
    return KMeansResult(c, labels, sqdist.to(x.dtype).sum(dim=1), iters)


# ---- torch.library registrations of the compiled op ------------------------------------------

def _sqdist_backward(ctx, grad_labels, grad_sqdist):
    x, centroids, labels = ctx.saved_tensors
    if grad_sqdist is None:
        return None, None, None
    valid = labels >= 0
    index = labels.clamp(min=0)
    nearest = torch.gather(centroids, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    diff = x.to(grad_sqdist.dtype) - nearest.to(grad_sqdist.dtype)
    # d sqdist / d x = 2 (x - c); the clamp at zero is only active where x sits on c (diff = 0).
    weight = (2 * grad_sqdist * valid.to(grad_sqdist.dtype)).unsqueeze(-1)
    grad_x = grad_c = None
    if ctx.needs_input_grad[0]:
        grad_x = (weight * diff).to(x.dtype)
    if ctx.needs_input_grad[1]:
        grad_c = torch.zeros(centroids.shape, dtype=diff.dtype, device=diff.device)
        grad_c = grad_c.scatter_add(1, index.unsqueeze(-1).expand_as(diff), -weight * diff)
        grad_c = grad_c.to(centroids.dtype)
    return grad_x, grad_c, None


def _sqdist_setup_context(ctx, inputs, output):
    x, centroids, _ = inputs
    labels, _ = output
    ctx.save_for_backward(x, centroids, labels)
    ctx.mark_non_differentiable(labels)


if _native._C is not None:

    @torch.library.register_fake("tmt_ext::kmeans_assign")
    def _kmeans_assign_fake(x, centroids, mask=None):
        torch._check(x.dim() == 3)
        torch._check(centroids.dim() == 3)
        sq_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (x.new_empty(x.shape[0], x.shape[1], dtype=torch.int64),
                x.new_empty(x.shape[0], x.shape[1], dtype=sq_dtype))

    torch.library.register_autograd("tmt_ext::kmeans_assign", _sqdist_backward,
                                    setup_context=_sqdist_setup_context)

    @torch.library.register_fake("tmt_ext::kmeans_assign_bounded")
    def _kmeans_assign_bounded_fake(x, centroids, mask, labels, upper, lower, drift, err_scale):
        labels_out, sqdist = _kmeans_assign_fake(x, centroids, mask)
        means = x.new_empty(centroids.shape, dtype=sqdist.dtype)
        counts = x.new_empty(centroids.shape[:2], dtype=torch.int64)
        return labels_out, sqdist, torch.empty_like(sqdist), torch.empty_like(sqdist), means, counts

    @torch.library.register_fake("tmt_ext::kmeans_lloyd")
    def _kmeans_lloyd_fake(x, centroids, mask, iters, tol, spherical, err_scale):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return (centroids.new_empty(centroids.shape, dtype=dtype),
                x.new_empty(x.shape[0], dtype=torch.int64))

    @torch.library.register_fake("tmt_ext::kmeans_plusplus")
    def _kmeans_plusplus_fake(x, uniforms, mask=None):
        torch._check(x.dim() == 3)
        torch._check(uniforms.dim() == 2)
        return x.new_empty(uniforms.shape[0], uniforms.shape[1], dtype=torch.int64)
