"""Plain-PyTorch reference of batched k-means: batched ``bmm`` distances + ``argmin`` for the
assign step, ``scatter_add`` for the update step.

``lloyd`` is the algorithm itself (seeding, iterations, empty-cluster re-seeding, convergence)
with the steps passed in (assign, update, and optionally the k-means++ seeding kernel and the
assign step with Hamerly's bounds), so the compiled kernels and this reference run the very same
procedure and differ only in how the steps are computed.
"""

from typing import Callable, NamedTuple, Optional, Tuple, Union

import torch

from tmt_ext.reference.region_pool import region_pool_reference


class KMeansResult(NamedTuple):
    """Result of :func:`tmt_ext.ops.kmeans` (batched; an unbatched call drops the batch dim)."""

    centroids: torch.Tensor  #: ``[B, K, D]`` final centroids (dtype of x; fp16/bf16 x: float32)
    labels: torch.Tensor  #: ``[B, N]`` int64 nearest centroid of every point; -1 where masked
    inertia: torch.Tensor  #: ``[B]`` sum of squared distances of the valid points to their centroid
    n_iter: int  #: Lloyd iterations run: the largest count over the problems


AssignFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], Tuple[torch.Tensor, torch.Tensor]]
UpdateFn = Callable[[torch.Tensor, torch.Tensor, int], Tuple[torch.Tensor, torch.Tensor]]
SeedFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
BoundedFn = Callable[..., Tuple[torch.Tensor, ...]]


def kmeans_assign_reference(x: torch.Tensor, centroids: torch.Tensor,
                            mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [B, N, D], centroids [B, K, D], mask [B, N] bool or None -> (labels [B, N] int64,
    sqdist [B, N]): argmin over k of ||c_k||^2 - 2 x.c_k (first index on ties), and
    ||x||^2 + that minimum clamped at 0. Masked points: label -1, sqdist 0."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(compute)
    centroids = centroids.to(compute)
    scores = torch.baddbmm((centroids * centroids).sum(-1).unsqueeze(1), x, centroids.transpose(1, 2),
                           alpha=-2.0)  # [B, N, K]
    best, labels = scores.min(dim=-1)
    sqdist = (torch.linalg.vector_norm(x, dim=-1).square() + best).clamp_min(0)
    if mask is not None:
        labels = labels.masked_fill(~mask, -1)
        sqdist = sqdist.masked_fill(~mask, 0)
    return labels, sqdist


def kmeans_assign_bounded_reference(x: torch.Tensor, centroids: torch.Tensor, mask: Optional[torch.Tensor],
                                    labels: torch.Tensor, upper: torch.Tensor, lower: torch.Tensor,
                                    drift: torch.Tensor, err_scale: float):
    """The assign step with Hamerly's bounds (see the kmeans_assign_bounded schema): a valid
    point whose moved upper bound ``(upper + drift[label]) (1 + s)`` is below its moved lower
    bound ``(lower - max drift) (1 - s)`` keeps its label (sqdist -1, not computed); every other
    point is assigned and gets ``upper = sqrt(d1 + err) (1 + s)``, ``lower = sqrt(max(d2 - err,
    0)) (1 - s)`` from its squared distances d1, d2 to the nearest and second nearest centroid,
    ``err = err_scale (||x||^2 + max_k ||c_k||^2)``, ``s = 4 eps``. Fused with the update step:
    -> (labels, sqdist, upper, lower, means, counts), the last two ``region_pool`` of the new
    labels; padding: -1, 0, 0, 0."""
    B, N, _ = x.shape
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, centroids = x.to(compute), centroids.to(compute)
    slack = 4 * torch.finfo(compute).eps
    valid = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
    own = labels.clamp(0, centroids.shape[1] - 1)
    moved_upper = (upper.to(compute) + drift.to(compute).gather(1, own)) * (1 + slack)
    moved_lower = (lower.to(compute) - drift.to(compute).amax(1, keepdim=True)) * (1 - slack)
    keep = valid & (labels >= 0) & (labels < centroids.shape[1]) & (moved_upper < moved_lower)
    scores = torch.baddbmm((centroids * centroids).sum(-1).unsqueeze(1), x, centroids.transpose(1, 2),
                           alpha=-2.0)  # [B, N, K]
    best, new_labels = scores.min(dim=-1)
    second = scores.scatter(-1, new_labels.unsqueeze(-1), float("inf")).min(dim=-1).values
    x_sq = torch.linalg.vector_norm(x, dim=-1).square()
    d1 = (x_sq + best).clamp_min(0)
    d2 = (x_sq + second).clamp_min(0)
    err = err_scale * (x_sq + (centroids * centroids).sum(-1).amax(-1, keepdim=True))
    new_upper = torch.sqrt(d1 + err) * (1 + slack)
    new_lower = torch.sqrt((d2 - err).clamp_min(0)) * (1 - slack)
    out_labels = torch.where(keep, labels, new_labels).masked_fill(~valid, -1)
    sqdist = torch.where(keep, torch.full_like(d1, -1.0), d1).masked_fill(~valid, 0)
    out_upper = torch.where(keep, moved_upper, new_upper).masked_fill(~valid, 0)
    out_lower = torch.where(keep, moved_lower, new_lower).masked_fill(~valid, 0)
    means, counts = region_pool_reference(x, out_labels, centroids.shape[1])
    return out_labels, sqdist, out_upper, out_lower, means, counts


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, N, D], index [B, M] -> x[b, index[b, m]] as [B, M, D]."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def sample_proportional(weights: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One index per row of weights [B, N] (>= 0, every row with a positive sum), drawn with
    probability proportional to the weight by inverse-CDF sampling with uniform [B, 1] in
    [0, 1): the first index whose running sum (in float64) exceeds uniform * total, as [B, 1].
    An index of weight zero is never returned."""
    cdf = torch.cumsum(weights.to(torch.float64), dim=1)
    total = cdf[:, -1:]
    # u < total strictly, so the first cdf entry above u exists and belongs to a positive weight.
    u = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u, right=True)


def kmeans_plusplus_reference(x: torch.Tensor, uniforms: torch.Tensor, mask: Optional[torch.Tensor] = None,
                              assign: Optional[AssignFn] = None) -> torch.Tensor:
    """Batched k-means++ seeding -> indices [B, K] of the chosen points.

    Round r picks one point per problem (all B at once) with probability proportional to its
    squared distance to the nearest centre chosen so far, using the draw uniforms[:, r] (float64
    [B, K] in [0, 1)); round 0, and any round where every valid point already sits on a centre,
    picks uniformly among the valid points. Padding (mask False) is never chosen. ``assign``
    computes the distances (default: :func:`kmeans_assign_reference`).
    """
    assign = assign or kmeans_assign_reference
    B, N, _ = x.shape
    valid = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
    weights = valid.to(x.dtype)
    chosen = [sample_proportional(weights, uniforms[:, :1])]
    nearest = None
    for r in range(1, uniforms.shape[1]):
        dist = assign(x, _gather_rows(x, chosen[-1]), mask)[1].to(x.dtype)
        nearest = dist if nearest is None else torch.minimum(nearest, dist)
        covered = (nearest > 0).sum(1, keepdim=True) == 0
        probs = torch.where(covered, weights, nearest)
        chosen.append(sample_proportional(probs, uniforms[:, r:r + 1]))
    return torch.cat(chosen, dim=1)


def random_init(x: torch.Tensor, k: int, generator: torch.Generator, valid: torch.Tensor) -> torch.Tensor:
    """k distinct valid points per problem, uniformly at random."""
    return _gather_rows(x, torch.multinomial(valid.to(x.dtype), k, replacement=False, generator=generator))


def reseed_empty(x: torch.Tensor, centroids: torch.Tensor, empty: torch.Tensor, sqdist: torch.Tensor,
                 valid: torch.Tensor) -> torch.Tensor:
    """The e-th empty cluster of a problem (in index order) moves onto the e-th farthest valid
    point from its centroid (ties: the lowest point index), so re-seeding is deterministic."""
    B, N, _ = x.shape
    K = empty.shape[1]
    # One int64 key per point orders by (distance desc, index asc) with no ties, so top-k's own
    # tie handling never matters: the bits of a non-negative float32 sort like its value.
    dist_bits = sqdist.to(torch.float32).clamp_min(0).view(torch.int32).to(torch.int64)
    index = torch.arange(N, device=x.device, dtype=torch.int64)
    key = torch.where(valid, (dist_bits + 1) * 2 ** 32 + (N - 1 - index), torch.zeros_like(dist_bits))
    farthest = torch.topk(key, min(K, N), dim=1).indices  # [B, min(K, N)], farthest first
    rank = (torch.cumsum(empty.long(), dim=1) - 1).clamp(0, farthest.shape[1] - 1)  # [B, K]
    points = _gather_rows(x, torch.gather(farthest, 1, rank))
    return torch.where(empty.unsqueeze(-1), points, centroids)


def _normalize(t: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(t, dim=-1)


def initial_centroids(x: torch.Tensor, k: int, *, init: Union[str, torch.Tensor], seed: int,
                      mask: Optional[torch.Tensor], metric: str, assign: AssignFn,
                      plusplus: Optional[SeedFn] = None) -> torch.Tensor:
    """The starting centroids ``[B, k, D]`` of :func:`lloyd` (x already normalised for
    ``metric="cosine"``): the given tensor, k-means++ (``plusplus`` kernel, else the batched
    reference) or k distinct random points, drawn from a generator seeded with ``seed``."""
    B, N, _ = x.shape
    generator = torch.Generator(device=x.device)
    generator.manual_seed(seed)
    if isinstance(init, torch.Tensor):
        centroids = init.to(x.dtype)
    elif init == "kmeans++":
        uniforms = torch.rand(B, k, generator=generator, dtype=torch.float64, device=x.device)
        if plusplus is None:
            index = kmeans_plusplus_reference(x, uniforms, mask, assign)
        else:
            index = plusplus(x, uniforms, mask)
        centroids = _gather_rows(x, index)
    else:
        valid = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
        centroids = random_init(x, k, generator, valid)
    if metric == "cosine":
        centroids = _normalize(centroids)
    return centroids


def bounds_err_scale(x: torch.Tensor) -> float:
    """Rounding bound of a computed squared distance, relative to ``||x||^2 + ||c||^2``:
    |computed - exact| of ``||x||^2 - 2 x.c + ||c||^2`` stays below about D eps (||x||^2 +
    ||c||^2) (sums of D products); twice that, plus the final additions, to be safe."""
    return 2.0 * (x.shape[-1] + 2) * torch.finfo(x.dtype).eps


def lloyd(x: torch.Tensor, k: int, *, iters: int, tol: float, init: Union[str, torch.Tensor],
          seed: int, mask: Optional[torch.Tensor], metric: str, assign: AssignFn,
          update: UpdateFn, plusplus: Optional[SeedFn] = None, sync_every: int = 1,
          host_checks: Optional[bool] = None, assign_bounded: Optional[BoundedFn] = None) -> KMeansResult:
    """Batched Lloyd iterations on checked inputs (x [B, N, D] float32/float64, mask [B, N] bool or
    None, init "kmeans++" / "random" / [B, k, D]).

    Every problem stops on its own when the relative centroid shift
    ``sum ||c_new - c||^2 / sum ||c||^2`` falls to ``tol`` or below (``tol = 0``: never); a
    stopped problem's centroids no longer change. The stop flags live on the tensors' device and
    are read on the host only every ``sync_every`` iterations (to leave the loop early), so a GPU
    run does not wait for the host each iteration. ``host_checks`` (default: x on the CPU) asks
    the host whether any cluster is empty before re-seeding; without it re-seeding always runs
    (a no-op when nothing is empty).

    With ``assign_bounded`` (kmeans_assign_bounded, which also does the update step), the assign
    step skips the points whose label provably cannot change (Hamerly's bounds): an upper bound
    on the distance to the own centroid and a lower bound on the distance to any other, both
    widened by the rounding error of the computed distances and moved by the centroids' drift
    every iteration. Skipped points
    keep their label, so the iterations are the same Lloyd iterations with fewer distances
    computed (in late iterations, most points are skipped).
    """
    B, N, _ = x.shape
    valid = mask if mask is not None else torch.ones(B, N, dtype=torch.bool, device=x.device)
    if metric == "cosine":
        x = _normalize(x)
    centroids = initial_centroids(x, k, init=init, seed=seed, mask=mask, metric=metric,
                                  assign=assign, plusplus=plusplus)
    active = torch.ones(B, dtype=torch.bool, device=x.device)
    n_iter = torch.zeros(B, dtype=torch.int64, device=x.device)
    on_host = x.device.type == "cpu" if host_checks is None else host_checks
    bounds = _Bounds(x, k) if assign_bounded is not None else None
    steps = 0
    for step in range(iters):
        if bounds is None:
            labels, sqdist = assign(x, centroids, mask)
            means, counts = update(x, labels, k)
        else:  # the update step is fused into the bounded assign step
            labels, sqdist, means, counts = bounds.assign(assign_bounded, centroids, mask)
        # On the CPU the check is cheap; a GPU would have to wait for the answer.
        if not on_host or int(counts.min()) == 0:
            if bounds is not None and bool((sqdist < 0).any()):
                sqdist = assign(x, centroids, mask)[1]  # skipped points carry no distance
            means = reseed_empty(x, means, counts == 0, sqdist, valid)
        if metric == "cosine":
            means = _normalize(means)
        steps += 1
        if tol > 0:
            n_iter += active
            shift = (means - centroids).square().sum(dim=(1, 2))
            scale = centroids.square().sum(dim=(1, 2))
            means = torch.where(active[:, None, None], means, centroids)
            active = active & (shift > tol * scale)
        if bounds is not None:
            bounds.drift(centroids, means)
        centroids = means
        if tol > 0 and (step + 1) % sync_every == 0 and not bool(active.any()):
            break
    labels, sqdist = assign(x, centroids, mask)
    ran = int(n_iter.max()) if tol > 0 and B else steps
    return KMeansResult(centroids, labels, sqdist.sum(dim=1), ran)


class _Bounds:
    """State of Hamerly's bounds between assign steps (see :func:`lloyd`)."""

    def __init__(self, x: torch.Tensor, k: int):
        B, N, D = x.shape
        self.x = x
        self.err_scale = bounds_err_scale(x)
        self.labels = torch.zeros(B, N, dtype=torch.int64, device=x.device)
        self.upper = torch.zeros(B, N, dtype=x.dtype, device=x.device)
        self.lower = torch.full((B, N), -float("inf"), dtype=x.dtype, device=x.device)  # compute all
        self.moved = torch.zeros(B, k, dtype=x.dtype, device=x.device)

    def assign(self, assign_bounded: BoundedFn, centroids: torch.Tensor, mask: Optional[torch.Tensor]):
        """-> (labels, sqdist: -1 where a point was skipped, means, counts)."""
        self.labels, sqdist, self.upper, self.lower, means, counts = assign_bounded(
            self.x, centroids, mask, self.labels, self.upper, self.lower, self.moved, self.err_scale)
        return self.labels, sqdist, means, counts

    def drift(self, old: torch.Tensor, new: torch.Tensor) -> None:
        """The centroids move from old to new before the next assign step."""
        self.moved = torch.linalg.vector_norm(new - old, dim=-1)


def kmeans_reference(x: torch.Tensor, k: int, *, iters: int = 25, tol: float = 1e-4,
                     init: Union[str, torch.Tensor] = "kmeans++", seed: int = 0,
                     mask: Optional[torch.Tensor] = None, metric: str = "l2") -> KMeansResult:
    """Batched k-means in plain PyTorch on x [B, N, D] (float32 or float64; see
    :func:`tmt_ext.ops.kmeans` for the arguments)."""
    return lloyd(x, k, iters=iters, tol=tol, init=init, seed=seed, mask=mask, metric=metric,
                 assign=kmeans_assign_reference, update=region_pool_reference)
