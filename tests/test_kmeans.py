import importlib
import os

import pytest
import torch
from torch.library import opcheck

from tmt_ext import _native
from tmt_ext.ops import KMeansResult, kmeans, kmeans_assign
from tmt_ext.reference import kmeans_assign_reference, kmeans_plusplus_reference, kmeans_reference
from tmt_ext.reference.kmeans import kmeans_assign_bounded_reference, lloyd
from tmt_ext.reference.region_pool import region_pool_reference

from conftest import devices

CPU_VARIANTS = ["avx512", "avx2", "baseline"]


@pytest.fixture
def cpu_variant(request):
    """Caps the CPU kernel's instruction set for one test (TMT_EXT_CPU_ISA is read per call)."""
    old = os.environ.get("TMT_EXT_CPU_ISA")
    os.environ["TMT_EXT_CPU_ISA"] = request.param
    yield request.param
    if old is None:
        os.environ.pop("TMT_EXT_CPU_ISA", None)
    else:
        os.environ["TMT_EXT_CPU_ISA"] = old


def brute_force(x, c):
    """Exact squared distances [B, N, K] in float64."""
    diff = x.double().unsqueeze(2) - c.double().unsqueeze(1)
    return (diff * diff).sum(-1)


def blobs(B, K, per, D, device, spread=0.05, gap=10.0, generator=None):
    """B problems of K well separated Gaussian blobs of `per` points each, shuffled."""
    g = generator or torch.Generator().manual_seed(1)
    centres = torch.randn(B, K, D, generator=g) * gap
    truth = torch.arange(K).repeat_interleave(per).expand(B, -1).clone()
    x = centres.gather(1, truth.unsqueeze(-1).expand(-1, -1, D)) + spread * torch.randn(B, K * per, D, generator=g)
    perm = torch.stack([torch.randperm(K * per, generator=g) for _ in range(B)])
    x = x.gather(1, perm.unsqueeze(-1).expand(-1, -1, D))
    truth = truth.gather(1, perm)
    return x.to(device), truth.to(device)


def same_partition(labels, truth):
    """labels equal truth up to a permutation of the cluster ids (per problem)."""
    for lab, tru in zip(labels.cpu(), truth.cpu()):
        pairs = set(zip(lab.tolist(), tru.tolist()))
        if len(pairs) != len(set(lab.tolist())) or len(pairs) != len(set(tru.tolist())):
            return False
    return True


# ---- kmeans_assign ---------------------------------------------------------------------------

ASSIGN_SHAPES = [(1, 1, 1, 1), (2, 37, 5, 3), (3, 130, 16, 17), (2, 300, 33, 70), (1, 9, 200, 40)]


def check_assign(x, c, labels, sqdist, mask=None):
    exact = brute_force(x, c)  # [B, N, K]
    best = exact.min(-1).values
    chosen = exact.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    scale = (x.double() ** 2).sum(-1) + (c.double() ** 2).sum(-1).max(-1, keepdim=True).values + 1
    tol = (1e-4 if x.dtype == torch.float32 else 1e-10) * scale
    if x.dtype in (torch.float16, torch.bfloat16):
        tol = 1e-4 * scale
    valid = mask if mask is not None else torch.ones_like(labels, dtype=torch.bool)
    # The chosen centroid is a nearest one up to rounding, and sqdist is its distance.
    assert torch.all((chosen - best)[valid] <= tol[valid])
    assert torch.all((sqdist.double() - best).abs()[valid] <= tol[valid])
    assert torch.all(sqdist >= 0)
    # Where the nearest centroid wins clearly, the label is exactly the brute-force argmin.
    gap = exact.sort(-1).values
    clear = valid & ((gap[..., 1] - gap[..., 0]) > 10 * tol) if exact.shape[-1] > 1 else valid
    assert torch.equal(labels[clear], exact.argmin(-1)[clear])
    if mask is not None:
        assert torch.all(labels[~mask] == -1) and torch.all(sqdist[~mask] == 0)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", ASSIGN_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_assign_matches_brute_force(device, shape, dtype):
    B, N, D, K = shape
    x = torch.randn(B, N, D, device=device, dtype=dtype)
    c = torch.randn(B, K, D, device=device, dtype=dtype)
    labels, sqdist = kmeans_assign(x, c)
    assert labels.dtype == torch.int64 and labels.shape == (B, N)
    assert sqdist.dtype == dtype and sqdist.shape == (B, N)
    check_assign(x, c, labels, sqdist)
    ref_labels, ref_sqdist = kmeans_assign_reference(x, c)
    torch.testing.assert_close(sqdist, ref_sqdist, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, indirect=True)
@pytest.mark.parametrize("K", [1, 3, 8, 16, 31, 32, 33, 70])
def test_assign_every_cpu_variant(cpu_variant, K):
    # Covers the few-centroid path and the one- and two-vector panels of each instruction set.
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(2, 45, 19, dtype=dtype)
        c = torch.randn(2, K, 19, dtype=dtype)
        mask = torch.rand(2, 45) > 0.2
        labels, sqdist = kmeans_assign(x, c, mask)
        check_assign(x, c, labels, sqdist, mask)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, indirect=True)
def test_assign_ties_go_to_lowest_index(device, cpu_variant):
    x = torch.randn(2, 50, 6, device=device)
    c = torch.randn(2, 40, 6, device=device) * 10
    near = x[:, :1] + 0.01  # one centroid near point 0 ...
    c[:, 5], c[:, 17], c[:, 38] = near[:, 0], near[:, 0], near[:, 0]  # ... three times over
    labels, _ = kmeans_assign(x, c)
    assert labels[:, 0].tolist() == [5, 5]
    same = torch.zeros(2, 40, 6, device=device)  # all centroids equal: everything goes to 0
    labels, sqdist = kmeans_assign(x, same)
    assert torch.all(labels == 0)
    torch.testing.assert_close(sqdist, (x * x).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", devices())
def test_assign_noncontiguous_unbatched_and_masked(device):
    base = torch.randn(3, 2, 80, 24, device=device)
    x = base[:, 1, :, ::2]  # [3, 80, 12] non-contiguous
    c = torch.randn(12, 3, 9, device=device).permute(1, 2, 0)  # [3, 9, 12] non-contiguous
    mask = (torch.rand(3, 160, device=device) > 0.3)[:, ::2]
    labels, sqdist = kmeans_assign(x, c, mask)
    check_assign(x, c, labels, sqdist, mask)
    labels1, sqdist1 = kmeans_assign(x[1], c[1])  # [N, D] in, [N] out
    assert labels1.shape == (80,)
    assert torch.equal(labels1[mask[1]], labels[1][mask[1]])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_assign_low_precision_cuda(dtype):
    x = torch.randn(3, 500, 64, device="cuda").to(dtype)
    c = torch.randn(3, 40, 64, device="cuda")
    labels, sqdist = kmeans_assign(x, c)
    assert sqdist.dtype == torch.float32
    # Accumulated in fp32 from the fp16/bf16 values: as exact as fp32 on those values.
    check_assign(x.float(), c, labels, sqdist)


@pytest.mark.parametrize("device", devices())
def test_assign_sqdist_gradient(device):
    x = torch.randn(2, 30, 5, device=device, dtype=torch.float64, requires_grad=True)
    c = torch.randn(2, 4, 5, device=device, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 30, device=device) > 0.3
    w = torch.randn(2, 30, device=device, dtype=torch.float64)
    gx, gc = torch.autograd.grad((kmeans_assign(x, c, mask)[1] * w).sum(), (x, c))
    rx, rc = torch.autograd.grad((kmeans_assign_reference(x, c, mask)[1] * w).sum(), (x, c))
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gc, rc)
    if device == "cpu":
        assert torch.autograd.gradcheck(lambda a, b: kmeans_assign(a, b, mask)[1], (x, c))


@pytest.mark.parametrize("device", devices())
def test_assign_opcheck(device):
    x = torch.randn(2, 20, 5, device=device)
    c = torch.randn(2, 3, 5, device=device)
    mask = torch.rand(2, 20, device=device) > 0.5
    op = torch.ops.tmt_ext.kmeans_assign.default
    opcheck(op, (x, c, None))
    opcheck(op, (x, c, mask))
    # opcheck's AOT-autograd check sums all outputs into the first one's dtype (labels: int64),
    # which cannot hold the float sqdist; the other checks run with gradients.
    opcheck(op, (x.double().requires_grad_(True), c.double().requires_grad_(True), mask),
            test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_assign_compiles_fullgraph():
    x, c = torch.randn(2, 20, 5), torch.randn(2, 3, 5)
    compiled = torch.compile(lambda a, b: kmeans_assign(a, b)[1].sum(), fullgraph=True)
    torch.testing.assert_close(compiled(x, c), kmeans_assign_reference(x, c)[1].sum())


def test_assign_bad_inputs():
    x, c = torch.randn(2, 10, 4), torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="x must have 2 or 3 dimensions"):
        kmeans_assign(x[None], c)
    with pytest.raises(ValueError, match="centroids must have 3 dimensions"):
        kmeans_assign(x, c[0])
    with pytest.raises(ValueError, match="centroids must be"):
        kmeans_assign(x, c[..., :3])
    with pytest.raises(ValueError, match="at least one centroid"):
        kmeans_assign(x, c[:, :0])
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        kmeans_assign(x.long(), c)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        kmeans_assign(x, c, torch.ones(2, 10))
    with pytest.raises(ValueError, match="mask must have shape"):
        kmeans_assign(x, c, torch.ones(2, 9, dtype=torch.bool))


# ---- assign step with Hamerly's bounds (CPU) ---------------------------------------------------

def bounded_inputs(B, N, D, K, dtype, generator_seed=0):
    g = torch.Generator().manual_seed(generator_seed)
    x = torch.randn(B, N, D, generator=g, dtype=dtype)
    c = torch.randn(B, K, D, generator=g, dtype=dtype)
    mask = torch.rand(B, N, generator=g) > 0.2
    return x, c, mask


@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, indirect=True)
@pytest.mark.parametrize("K", [1, 3, 16, 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("N", [150, 1100])  # one chunk of partial sums; three (segment_sum.h)
def test_bounded_assign_matches_reference(cpu_variant, K, dtype, N):
    B, D = 2, 9
    x, c, mask = bounded_inputs(B, N, D, K, dtype)
    err = 2.0 * (D + 2) * torch.finfo(dtype).eps
    op = torch.ops.tmt_ext.kmeans_assign_bounded
    # First call: lower = -inf, every valid point computed; as kmeans_assign, plus bounds.
    start = (torch.zeros(B, N, dtype=torch.int64), torch.zeros(B, N, dtype=dtype),
             torch.full((B, N), -float("inf"), dtype=dtype), torch.zeros(B, K, dtype=dtype))
    got = op(x, c, mask, *start, err)
    want = kmeans_assign_bounded_reference(x, c, mask, *start, err)
    plain = kmeans_assign(x, c, mask)
    assert torch.equal(got[0], plain[0]) and torch.equal(got[1], plain[1])
    torch.testing.assert_close(got[2], want[2])
    torch.testing.assert_close(got[3], want[3])
    assert torch.all(got[2][mask] ** 2 >= got[1][mask])  # the bounds hold
    if K == 1:
        assert torch.all(got[3][mask] == float("inf"))  # no other centroid
    # Second call after a small move: the skip decisions are the reference's exactly, and every
    # point keeps a label that a full assignment gives too.
    moved = c + 0.01 * torch.randn(B, K, D, dtype=dtype)
    drift = torch.linalg.vector_norm(moved - c, dim=-1)
    got2 = op(x, moved, mask, got[0], got[2], got[3], drift, err)
    want2 = kmeans_assign_bounded_reference(x, moved, mask, got[0], got[2], got[3], drift, err)
    skipped = got2[1] < 0
    assert torch.equal(skipped, want2[1] < 0)
    if K == 1:
        assert torch.equal(skipped, mask)
    assert torch.equal(got2[0], kmeans_assign(x, moved, mask)[0])
    assert torch.equal(got2[0][skipped], got[0][skipped])
    torch.testing.assert_close(got2[2], want2[2])
    torch.testing.assert_close(got2[3], want2[3])
    # The fused update step: region_pool of the new labels, bit for bit (skipped points included).
    for out, ref in ((got, want), (got2, want2)):
        pooled = torch.ops.tmt_ext.region_pool(x, out[0], K)
        assert torch.equal(out[4], pooled[0]) and torch.equal(out[5], pooled[1])
        torch.testing.assert_close(out[4], ref[4])
        assert torch.equal(out[5], ref[5])


def test_bounded_assign_opcheck():
    x, c, mask = bounded_inputs(2, 30, 4, 5, torch.float32)
    args = (torch.zeros(2, 30, dtype=torch.int64), torch.zeros(2, 30), torch.full((2, 30), -float("inf")),
            torch.zeros(2, 5), 1e-5)
    opcheck(torch.ops.tmt_ext.kmeans_assign_bounded.default, (x, c, mask) + args)
    opcheck(torch.ops.tmt_ext.kmeans_assign_bounded.default, (x, c, None) + args)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("tol", [0.0, 1e-5])
def test_bounds_change_nothing(metric, tol):
    # The same Lloyd iterations with and without skipping: identical results, bit for bit.
    ops = torch.ops.tmt_ext
    blob_x, _ = blobs(B=2, K=5, per=60, D=6, device="cpu", spread=1.5, gap=3.0)
    for x in (torch.randn(3, 400, 12), blob_x):
        mask = torch.rand(x.shape[:2]) > 0.1
        runs = [lloyd(x, 5, iters=25, tol=tol, init="kmeans++", seed=0, mask=mask, metric=metric,
                      assign=ops.kmeans_assign, update=ops.region_pool, plusplus=ops.kmeans_plusplus,
                      assign_bounded=bounded) for bounded in (None, ops.kmeans_assign_bounded)]
        assert torch.equal(runs[0].labels, runs[1].labels)
        assert torch.equal(runs[0].centroids, runs[1].centroids)
        assert runs[0].n_iter == runs[1].n_iter


@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("tol", [0.0, 1e-4])
def test_lloyd_kernel_matches_the_python_loop(cpu_variant, dtype, metric, tol):
    # kmeans_lloyd runs the iterations of each problem in one call: the same steps as lloyd()
    # over the native ops, so the same labels and iteration counts, and for l2 the same centroids
    # bit for bit (cosine: the re-normalisation rounds differently from F.normalize).
    ops = torch.ops.tmt_ext
    kmeans_module = importlib.import_module("tmt_ext.ops.kmeans")
    g = torch.Generator().manual_seed(3)
    blob_x, _ = blobs(B=3, K=6, per=40, D=7, device="cpu", spread=1.0, gap=2.0)
    duplicates = torch.randn(3, 300, 5, generator=g)
    duplicates[:, 100:] = duplicates[:, :1]  # many equal points: clusters empty out
    cases = [(torch.randn(4, 1100, 9, generator=g), 12), (blob_x, 6), (duplicates, 9)]
    for x, k in cases:
        x = x.to(dtype)
        mask = torch.rand(x.shape[:2], generator=g) > 0.15
        mask[:, :k] = True
        for m in (None, mask):
            got = kmeans_module._lloyd_cpu(x, k, iters=12, tol=tol, init="kmeans++", seed=1,
                                           mask=m, metric=metric)
            want = lloyd(x, k, iters=12, tol=tol, init="kmeans++", seed=1, mask=m, metric=metric,
                         assign=ops.kmeans_assign, update=ops.region_pool,
                         plusplus=ops.kmeans_plusplus, assign_bounded=ops.kmeans_assign_bounded)
            assert torch.equal(got.labels, want.labels)
            assert got.n_iter == want.n_iter
            if metric == "l2":
                assert torch.equal(got.centroids, want.centroids)
            else:
                torch.testing.assert_close(got.centroids, want.centroids)
            torch.testing.assert_close(got.inertia, want.inertia)


def test_lloyd_kernel_stops_each_problem_on_its_own():
    # tol: a problem that converges early keeps its centroids while another goes on.
    easy, _ = blobs(B=1, K=3, per=50, D=4, device="cpu", spread=0.05, gap=5.0)
    hard = torch.randn(1, 150, 4, generator=torch.Generator().manual_seed(0))
    x = torch.cat([easy, hard])
    init = x[:, :3].clone()
    centroids, n_iter = torch.ops.tmt_ext.kmeans_lloyd(x, init, None, 50, 1e-9, False, 1e-5)
    assert 1 <= n_iter[0] < n_iter[1] <= 50
    for b in range(2):  # each problem's result is that of running it alone
        alone, steps = torch.ops.tmt_ext.kmeans_lloyd(x[b:b + 1], init[b:b + 1], None, 50, 1e-9,
                                                      False, 1e-5)
        assert torch.equal(alone[0], centroids[b]) and steps[0] == n_iter[b]
    untouched, zero = torch.ops.tmt_ext.kmeans_lloyd(x, init, None, 0, 0.0, False, 1e-5)
    assert torch.equal(untouched, init) and zero.tolist() == [0, 0]


def test_lloyd_kernel_opcheck():
    x, c, mask = bounded_inputs(2, 40, 4, 5, torch.float32)
    opcheck(torch.ops.tmt_ext.kmeans_lloyd.default, (x, c, mask, 3, 1e-4, False, 1e-5))
    opcheck(torch.ops.tmt_ext.kmeans_lloyd.default, (x, c, None, 2, 0.0, True, 1e-5))


# ---- k-means++ seeding kernel (CPU) ----------------------------------------------------------


@pytest.mark.parametrize("cpu_variant", CPU_VARIANTS, indirect=True)
def test_plusplus_kernel_matches_reference(cpu_variant):
    x = torch.randn(3, 200, 7, dtype=torch.float64)
    mask = torch.rand(3, 200) > 0.3
    uniforms = torch.rand(3, 9, dtype=torch.float64)
    for m in (None, mask):
        got = torch.ops.tmt_ext.kmeans_plusplus(x, uniforms, m)
        assert torch.equal(got, kmeans_plusplus_reference(x, uniforms, m))
        if m is not None:
            assert m.gather(1, got).all()  # padding is never a centre
        assert all(len(set(row.tolist())) == 9 for row in got)  # distinct points: no repeats


def test_plusplus_kernel_duplicates_fall_back_to_uniform():
    # Integer coordinates keep every distance exact: after the 3 distinct points are taken,
    # all distances are 0 and the draw is uniform over the valid points.
    distinct = torch.tensor([[0.0, 0.0], [1.0, 2.0], [3.0, 1.0]])
    x = distinct[torch.randint(0, 3, (2, 40))]
    x[:, :3] = distinct
    uniforms = torch.rand(2, 8, dtype=torch.float64)
    got = torch.ops.tmt_ext.kmeans_plusplus(x, uniforms)
    assert torch.equal(got, kmeans_plusplus_reference(x, uniforms))
    for b in range(2):
        assert len({tuple(p) for p in x[b, got[b, :3]].tolist()}) == 3


def test_plusplus_kernel_same_alone_and_batched():
    # One problem (split over threads by points) or several (one thread per problem).
    x = torch.randn(4, 3000, 5)
    uniforms = torch.rand(4, 6, dtype=torch.float64)
    batched = torch.ops.tmt_ext.kmeans_plusplus(x, uniforms)
    for b in range(4):
        assert torch.equal(torch.ops.tmt_ext.kmeans_plusplus(x[b:b + 1], uniforms[b:b + 1]), batched[b:b + 1])


def test_plusplus_kernel_opcheck():
    x = torch.randn(2, 30, 4)
    uniforms = torch.rand(2, 5, dtype=torch.float64)
    mask = torch.rand(2, 30) > 0.3
    opcheck(torch.ops.tmt_ext.kmeans_plusplus.default, (x, uniforms, None))
    opcheck(torch.ops.tmt_ext.kmeans_plusplus.default, (x, uniforms, mask))


# ---- update step: region_pool over many points --------------------------------------------------


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_region_pool_many_points(device, dtype):
    # Long problems are summed in chunks of points (CPU: also across threads); the result must
    # not depend on the thread count, and must match the reference.
    from tmt_ext.ops import region_pool
    from tmt_ext.reference import region_pool_reference

    x = torch.randn(2, 9000, 20, device=device).to(dtype)
    labels = torch.randint(-1, 7, (2, 9000), device=device)
    means, counts = region_pool(x, labels, 7)
    ref_means, ref_counts = region_pool_reference(x, labels, 7)
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(means.float(), ref_means.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    if device == "cpu":
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            single = region_pool(x, labels, 7)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(single[0], means) and torch.equal(single[1], counts)


# ---- kmeans ----------------------------------------------------------------------------------


def objective(x, centroids, mask=None):
    d = brute_force(x, centroids).min(-1).values
    if mask is not None:
        d = d * mask
    return d.sum(-1)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_blobs_recovered_exactly(device, backend):
    x, truth = blobs(B=3, K=6, per=40, D=8, device=device)
    result = kmeans(x, 6, iters=30, backend=backend, seed=3)
    assert isinstance(result, KMeansResult)
    assert result.centroids.shape == (3, 6, 8) and result.labels.shape == (3, 240)
    assert same_partition(result.labels, truth)
    assert result.n_iter < 30  # converged (tol 1e-4) well before the limit


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_inertia_and_labels_belong_to_the_returned_centroids(device, metric):
    x = torch.randn(4, 200, 12, device=device)
    r = kmeans(x, 7, iters=10, metric=metric)
    points = torch.nn.functional.normalize(x, dim=-1) if metric == "cosine" else x
    exact = brute_force(points, r.centroids)
    torch.testing.assert_close(r.inertia.double(), exact.min(-1).values.sum(-1), rtol=1e-4, atol=1e-3)
    chosen = exact.gather(-1, r.labels.unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen - exact.min(-1).values <= 1e-4 * (1 + exact.min(-1).values))


@pytest.mark.parametrize("device", devices())
def test_native_matches_torch_reference(device):
    x = torch.randn(3, 150, 10, device=device)
    native = kmeans(x, 9, iters=15, tol=0)
    ref = kmeans(x, 9, iters=15, tol=0, backend="torch")
    assert native.n_iter == ref.n_iter == 15
    torch.testing.assert_close(native.centroids, ref.centroids, rtol=1e-4, atol=1e-4)
    assert (native.labels == ref.labels).float().mean() > 0.99
    torch.testing.assert_close(native.inertia, ref.inertia, rtol=1e-4, atol=1e-3)
    direct = kmeans_reference(x, 9, iters=15, tol=0)
    torch.testing.assert_close(direct.centroids, ref.centroids)


def test_close_to_scikit_learn():
    sklearn = pytest.importorskip("sklearn.cluster")
    torch.manual_seed(5)
    x = torch.randn(6, 400, 8, dtype=torch.float64)
    ours = kmeans(x, 12, iters=20, tol=0, seed=1).inertia
    theirs = torch.tensor([
        sklearn.KMeans(12, init="k-means++", n_init=1, max_iter=20, tol=0, algorithm="lloyd",
                       random_state=i).fit(x[i].numpy()).inertia_ for i in range(6)],
        dtype=torch.float64)
    # Different k-means++ draws land in different local optima: compare on average and per
    # problem with some slack.
    assert abs(ours.sum() / theirs.sum() - 1) < 0.03
    assert torch.all((ours / theirs - 1).abs() < 0.08)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_faiss_backend_agrees_in_objective(device, metric):
    pytest.importorskip("faiss")
    x = torch.randn(3, 300, 16, device=device)
    mask = torch.rand(3, 300, device=device) > 0.2
    ours = kmeans(x, 10, iters=20, tol=0, mask=mask, metric=metric)
    theirs = kmeans(x, 10, iters=20, tol=0, mask=mask, metric=metric, backend="faiss")
    assert theirs.n_iter == 20 and theirs.centroids.shape == (3, 10, 16)
    assert torch.all(theirs.labels[~mask] == -1)
    points = torch.nn.functional.normalize(x, dim=-1) if metric == "cosine" else x
    torch.testing.assert_close(theirs.inertia.double(), objective(points, theirs.centroids, mask),
                               rtol=1e-4, atol=1e-3)
    assert abs(ours.inertia.sum() / theirs.inertia.sum() - 1) < 0.05
    if metric == "cosine":
        torch.testing.assert_close(theirs.centroids.norm(dim=-1), torch.ones(3, 10, device=device),
                                   rtol=1e-4, atol=1e-4)


def test_faiss_backend_uses_given_init():
    pytest.importorskip("faiss")
    x, truth = blobs(B=2, K=4, per=30, D=5, device="cpu")
    init = x[:, :4].clone()
    ours = kmeans(x, 4, iters=0, init=init, backend="faiss")
    torch.testing.assert_close(ours.centroids, init)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_masked_padding_changes_nothing(device, backend):
    x, _ = blobs(B=2, K=5, per=30, D=6, device=device, spread=1.0, gap=4.0)
    B, N, D = x.shape
    # Padding of garbage scattered among the points and appended at the end.
    total = N + 37
    slots = torch.stack([torch.randperm(total)[:N].sort().values for _ in range(B)]).to(device)
    padded = torch.randn(B, total, D, device=device) * 1e3
    padded.scatter_(1, slots.unsqueeze(-1).expand(-1, -1, D), x)
    mask = torch.zeros(B, total, dtype=torch.bool, device=device).scatter_(1, slots, True)
    for init in ("kmeans++", x[:, :5].clone()):
        plain = kmeans(x, 5, iters=12, init=init, backend=backend)
        masked = kmeans(padded, 5, iters=12, init=init, mask=mask, backend=backend)
        assert torch.all(masked.labels[~mask] == -1)
        assert torch.equal(masked.labels.gather(1, slots), plain.labels)
        assert masked.n_iter == plain.n_iter
        if device == "cpu":  # identical arithmetic, point by point
            assert torch.equal(masked.centroids, plain.centroids)
        else:  # the GPU update step sums in chunks that depend on N
            torch.testing.assert_close(masked.centroids, plain.centroids)
        # The final sum over points pairs the zeros of the padding differently.
        torch.testing.assert_close(masked.inertia, plain.inertia)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_k_equals_n(device, init):
    x = torch.randn(2, 13, 4, device=device)
    r = kmeans(x, 13, iters=5, init=init)
    assert torch.all(r.inertia < 1e-5)  # every point on its own centroid, up to rounding
    for labels in r.labels:
        assert sorted(labels.tolist()) == list(range(13))
    assert torch.isfinite(r.centroids).all()


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_duplicate_points_and_empty_clusters(device, backend):
    # 3 distinct points, each repeated: with k = 5 clusters two must stay empty every iteration.
    distinct = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-3.0, 4.0]], device=device)
    x = distinct[torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0])].expand(2, -1, -1).contiguous()
    for init in ("kmeans++", "random"):
        r = kmeans(x, 5, iters=8, init=init, backend=backend)
        assert torch.isfinite(r.centroids).all() and torch.isfinite(r.inertia).all()
        assert torch.all(r.inertia == 0)  # re-seeding puts a centroid on every distinct point
        assert torch.all((r.labels >= 0) & (r.labels < 5))
    # All points equal: every centroid is that point.
    same = torch.ones(1, 6, 3, device=device)
    r = kmeans(same, 4, iters=3, backend=backend)
    assert torch.equal(r.centroids, torch.ones(1, 4, 3, device=device))
    assert torch.all(r.labels == 0) and r.inertia.item() == 0


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_empty_cluster_moves_to_the_farthest_point(device, backend):
    x = torch.tensor([[[0.0], [1.0], [2.0], [10.0], [11.0], [30.0]]], device=device)
    init = torch.tensor([[[0.5], [10.5], [1000.0], [-1000.0]]], device=device)
    # Iteration 1: clusters 2 and 3 are empty; the farthest points from their centroids are 30
    # (distance 19.5 from 10.5) and then 2 (distance 1.5 from 0.5); cluster 1 is 10, 11 and 30.
    r = kmeans(x, 4, iters=1, init=init, backend=backend)
    assert r.centroids[0, :, 0].tolist() == [1.0, 17.0, 30.0, 2.0]


@pytest.mark.parametrize("device", devices())
def test_given_init(device):
    x = torch.randn(2, 60, 5, device=device)
    init = torch.randn(2, 4, 5, device=device)
    r0 = kmeans(x, 4, iters=0, init=init)
    assert torch.equal(r0.centroids, init) and r0.n_iter == 0
    assert torch.equal(r0.labels, kmeans_assign(x, init)[0])
    native = kmeans(x, 4, iters=6, tol=0, init=init)
    ref = kmeans(x, 4, iters=6, tol=0, init=init, backend="torch")
    torch.testing.assert_close(native.centroids, ref.centroids, rtol=1e-4, atol=1e-4)
    shared = kmeans(x, 4, iters=0, init=init[0])  # [K, D]: the same start for every problem
    assert torch.equal(shared.centroids, init[0].expand(2, -1, -1))


@pytest.mark.parametrize("device", devices())
def test_cosine_metric(device):
    x, truth = blobs(B=2, K=4, per=25, D=6, device=device, gap=1.0, spread=0.02)
    x = torch.nn.functional.normalize(x, dim=-1)
    # Scaling points changes nothing for the cosine metric.
    scaled = x * (0.1 + 10 * torch.rand(2, 100, 1, device=device))
    r = kmeans(scaled, 4, iters=20, metric="cosine")
    torch.testing.assert_close(r.centroids.norm(dim=-1), torch.ones(2, 4, device=device))
    unscaled = kmeans(x, 4, iters=20, metric="cosine")
    assert torch.equal(r.labels, unscaled.labels)
    assert same_partition(r.labels, truth)
    ref = kmeans(scaled, 4, iters=20, metric="cosine", backend="torch")
    torch.testing.assert_close(r.centroids, ref.centroids, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("device", devices())
def test_deterministic_for_a_seed(device):
    x = torch.randn(3, 256, 16, device=device)
    for init in ("kmeans++", "random"):
        a = kmeans(x, 8, iters=10, seed=7, init=init)
        b = kmeans(x, 8, iters=10, seed=7, init=init)
        assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.inertia, b.inertia)
        c = kmeans(x, 8, iters=0, seed=8, init=init)
        assert not torch.equal(kmeans(x, 8, iters=0, seed=7, init=init).centroids, c.centroids)


@pytest.mark.parametrize("device", devices())
def test_each_problem_stops_on_its_own(device):
    easy, _ = blobs(B=1, K=3, per=30, D=4, device=device)
    hard = torch.randn(1, 90, 4, device=device)
    x = torch.cat([easy, hard])
    init = x[:, :3].clone()
    both = kmeans(x, 3, iters=50, tol=1e-6, init=init)
    alone = [kmeans(x[i], 3, iters=50, tol=1e-6, init=init[i]) for i in range(2)]
    assert both.n_iter == max(a.n_iter for a in alone)
    assert alone[0].n_iter < alone[1].n_iter
    for i in range(2):  # a stopped problem keeps its centroids while the other goes on
        torch.testing.assert_close(both.centroids[i], alone[i].centroids)
    fixed = kmeans(x, 3, iters=5, tol=0, init=init)
    assert fixed.n_iter == 5


@pytest.mark.parametrize("device", devices())
def test_device_side_control_flow_changes_nothing(device):
    # The GPU schedule (re-seed unconditionally, read the stop flags every 8 iterations) gives
    # the results of the host schedule (ask first, read every iteration).
    x = torch.randn(3, 120, 6, device=device)
    x[1, 60:] = x[1, :1]  # many duplicates: clusters run empty
    init = x[:, :7].clone()
    init[0, 3] = 1e3  # a far centroid: empty from the start
    mask = torch.rand(3, 120, device=device) > 0.1
    runs = [lloyd(x, 7, iters=30, tol=1e-5, init=init, seed=0, mask=mask, metric="l2",
                  assign=kmeans_assign_reference, update=region_pool_reference,
                  sync_every=every, host_checks=host) for every, host in ((1, True), (8, False))]
    assert torch.equal(runs[0].centroids, runs[1].centroids)
    assert torch.equal(runs[0].labels, runs[1].labels)
    assert runs[0].n_iter == runs[1].n_iter < 30


def test_unbatched_and_low_precision_input():
    x = torch.randn(100, 6)
    r = kmeans(x, 5, iters=5)
    assert r.centroids.shape == (5, 6) and r.labels.shape == (100,) and r.inertia.dim() == 0
    batched = kmeans(x[None], 5, iters=5)
    assert torch.equal(r.centroids, batched.centroids[0])
    half = kmeans(x.bfloat16(), 5, iters=5)
    assert half.centroids.dtype == torch.float32 and torch.isfinite(half.inertia)


def test_empty_batch():
    r = kmeans(torch.randn(0, 10, 3), 4)
    assert r.centroids.shape == (0, 4, 3) and r.labels.shape == (0, 10) and r.n_iter == 0


def test_kmeans_without_grad_tracking():
    x = torch.randn(2, 50, 3, requires_grad=True)
    r = kmeans(x, 4, iters=3)
    assert not r.centroids.requires_grad and not r.inertia.requires_grad


def test_kmeans_bad_inputs():
    x = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="exceeds the number of valid points"):
        kmeans(x, 11)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 3:] = False
    with pytest.raises(ValueError, match=r"k = 4 exceeds the number of valid points \(3\) of problem 1"):
        kmeans(x, 4, mask=mask)
    with pytest.raises(ValueError, match="k must be >= 1"):
        kmeans(x, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        kmeans(x, 2.0)
    with pytest.raises(ValueError, match="x must have 2 or 3 dimensions"):
        kmeans(x[None], 2)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        kmeans(x.long(), 2)
    bad = x.clone()
    bad[1, 4, 2] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        kmeans(bad, 2)
    bad[1, 4, 2] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        kmeans(bad, 2)
    padded_mask = torch.ones(2, 10, dtype=torch.bool)
    padded_mask[1, 4] = False  # NaN in padding is fine
    assert torch.isfinite(kmeans(bad, 2, mask=padded_mask).inertia).all()
    with pytest.raises(ValueError, match="mask must have shape"):
        kmeans(x, 2, mask=torch.ones(2, 9, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        kmeans(x, 2, mask=torch.ones(2, 10))
    with pytest.raises(ValueError, match="init must have shape"):
        kmeans(x, 3, init=torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match="init must be one of"):
        kmeans(x, 3, init="k-means++")
    with pytest.raises(ValueError, match="metric must be one of"):
        kmeans(x, 3, metric="l1")
    with pytest.raises(ValueError, match="backend must be one of"):
        kmeans(x, 3, backend="sklearn")
    with pytest.raises(ValueError, match="iters must be >= 0"):
        kmeans(x, 3, iters=-1)
    with pytest.raises(ValueError, match="tol must be >= 0"):
        kmeans(x, 3, tol=-1.0)
    with pytest.raises(ValueError, match="x must hold at least one point"):
        kmeans(x[:, :0], 1)
