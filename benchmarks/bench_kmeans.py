"""Batched k-means: tmt_ext's kernels against the batched PyTorch reference, FAISS looped over
the problems (faiss-cpu; FAISS GPU too when installed and running on CUDA), scikit-learn on the
CPU (per problem) and flash-kmeans on the GPU (when installed).

Every peer runs the same fixed number of Lloyd iterations (tol = 0) on the same data with the
same thread count; its objective (sum of squared distances of the points to the nearest of its
final centroids) is evaluated the same way for all and reported next to the times.

    python -m benchmarks.bench_kmeans [--device cpu|cuda] [--quick] [--threads T]
"""

import argparse
import contextlib
import os
import statistics
import time
from typing import Callable, Dict

import torch

import tmt_ext
from benchmarks.common import RESULTS_DIR, append_record, format_table, plot_bars

ITERS = 20
CPU_SHAPES = [(16, 1024, 128, 16), (4, 4096, 64, 64)]  # B, N, D, K; the first is the goal shape
GPU_SHAPES = [(32, 4096, 256, 32), (8, 16384, 128, 256)]


def _faiss():
    try:
        import faiss

        return faiss
    except ImportError:
        return None


def _faiss_loop(faiss, host: torch.Tensor, k: int, gpu: bool) -> Callable[[], torch.Tensor]:
    """faiss.Kmeans once per problem, on host numpy data, every point used."""
    problems = [p.numpy() for p in host]
    B, N, D = host.shape

    def fit():
        centroids = []
        for points in problems:
            km = faiss.Kmeans(D, k, niter=ITERS, seed=0, min_points_per_centroid=1,
                              max_points_per_centroid=N, gpu=gpu, verbose=False)
            km.train(points)
            km.index.search(points, 1)  # the labels, as the other peers return them
            centroids.append(torch.from_numpy(km.centroids.copy()))
        return torch.stack(centroids)

    return fit


def _sklearn_loop(host: torch.Tensor, k: int) -> Callable[[], torch.Tensor]:
    from sklearn.cluster import KMeans

    problems = [p.numpy() for p in host]

    def fit():
        return torch.stack([
            torch.from_numpy(KMeans(k, init="k-means++", n_init=1, max_iter=ITERS, tol=0,
                                    algorithm="lloyd", random_state=0).fit(p).cluster_centers_)
            for p in problems])

    return fit


def _flash_kmeans(x: torch.Tensor, k: int):
    try:
        from flash_kmeans import batch_kmeans_Euclid
    except Exception:  # not installed, or no Triton: the peer is skipped
        return None
    return lambda: batch_kmeans_Euclid(x, k, max_iters=ITERS, tol=0.0)[1]


def peers(x: torch.Tensor, k: int, device: str) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> a function that clusters all of x and returns the centroids [B, k, D]."""
    host = x.detach().to("cpu", torch.float32).contiguous()
    fns = {
        "tmt_ext": lambda: tmt_ext.ops.kmeans(x, k, iters=ITERS, tol=0).centroids,
        # FAISS seeds with random points: the same start, for a like-for-like time.
        "tmt_ext_random_init": lambda: tmt_ext.ops.kmeans(x, k, iters=ITERS, tol=0, init="random").centroids,
        "reference": lambda: tmt_ext.ops.kmeans(x, k, iters=ITERS, tol=0, backend="torch").centroids,
    }
    faiss = _faiss()
    if faiss is not None:
        fns["faiss_cpu"] = _faiss_loop(faiss, host, k, gpu=False)
        if device.startswith("cuda") and hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:
            fns["faiss_gpu"] = _faiss_loop(faiss, host, k, gpu=True)
    if device == "cpu":
        try:
            fns["sklearn"] = _sklearn_loop(host, k)
        except ImportError:
            pass
    if device.startswith("cuda"):
        flash = _flash_kmeans(x, k)
        if flash is not None:
            fns["flash_kmeans"] = flash
    return fns


def objective(x: torch.Tensor, centroids: torch.Tensor) -> float:
    """Sum over all problems of the squared distance of every point to its nearest centroid."""
    centroids = centroids.to(x.device, torch.float32)
    return float(tmt_ext.ops.kmeans_assign(x.float(), centroids)[1].double().sum())


def interleaved_medians(fns: Dict[str, Callable[[], object]], device: str, rounds: int,
                        budget_s: float, settle_s: float = 0.0):
    """Median seconds per call of every function, timed in interleaved rounds (one call of each
    per round), so that a change of machine load hits all peers alike. A peer stops being timed
    once its calls have taken budget_s (slow peers get fewer, but at least 3, samples).
    ``settle_s``: a pause before every timed call. With several threads, the OpenMP pools of the
    other libraries (scikit-learn's, FAISS's) keep spinning for a while after their call returns
    and take the cores from whichever peer is timed next; the pause lets them go idle.
    Returns (wall medians, process CPU-time medians, the output of each function's first call).
    """
    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    samples: Dict[str, list] = {name: [] for name in fns}
    cpu_samples: Dict[str, list] = {name: [] for name in fns}
    outputs = {name: fn() for name, fn in fns.items()}  # warm-up: lazy init, first-call costs
    sync()
    for _ in range(rounds):
        for name, fn in fns.items():
            if len(samples[name]) >= 3 and sum(samples[name]) > budget_s:
                continue
            sync()
            if settle_s:
                time.sleep(settle_s)
            start, cpu_start = time.perf_counter(), time.process_time()
            fn()
            sync()
            samples[name].append(time.perf_counter() - start)
            cpu_samples[name].append(time.process_time() - cpu_start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    cpu_medians = {name: statistics.median(values) for name, values in cpu_samples.items()}
    return medians, cpu_medians, outputs


def _thread_limit(threads: int):
    """Caps the OpenMP/BLAS pools that scikit-learn uses (torch and FAISS are set directly)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(threads)


def run(device: str, quick: bool = False, threads: int = 0):
    if threads > 0:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    faiss = _faiss()
    if faiss is not None:
        faiss.omp_set_num_threads(threads)  # the same thread count for every peer
    shapes = GPU_SHAPES if device.startswith("cuda") else CPU_SHAPES
    if quick:
        shapes = shapes[:1]
    rows, names = [], []
    generator = torch.Generator().manual_seed(0)
    for B, N, D, K in shapes:
        x = torch.randn(B, N, D, generator=generator).to(device)
        fns = peers(x, K, device)
        row = {"B": B, "N": N, "D": D, "K": K, "iters": ITERS, "threads": threads}
        with _thread_limit(threads):
            medians, cpu_medians, outputs = interleaved_medians(
                fns, device, rounds=5 if quick else 15, budget_s=2.0 if quick else 10.0,
                settle_s=0.3 if threads > 1 and device == "cpu" else 0.0)
            for name in fns:
                row[f"{name}_ms"] = medians[name] * 1e3
                # Process CPU time (all threads; spin-waiting included): on a shared machine it
                # tells the work done from the time spent waiting for a core.
                row[f"{name}_cpu_ms"] = cpu_medians[name] * 1e3
                row[f"{name}_objective"] = objective(x, outputs[name])
                if name not in names:
                    names.append(name)
        ours = row["tmt_ext_ms"]
        for name in fns:
            if name.startswith("tmt_ext"):
                continue
            row[f"speedup_vs_{name}"] = row[f"{name}_ms"] / ours
            if name.startswith("faiss"):  # both seeded with random points
                row[f"random_init_speedup_vs_{name}"] = row[f"{name}_ms"] / row["tmt_ext_random_init_ms"]
            row[f"objective_vs_{name}_%"] = 100 * (row["tmt_ext_objective"] / row[f"{name}_objective"] - 1)
        row["tmt_ext_GB/s"] = ITERS * x.numel() * x.element_size() / 1e9 / (ours / 1e3)
        rows.append(row)
    print(f"kmeans on {device} ({threads} threads, {ITERS} iterations, tol=0)")
    shape_cols = ["B", "N", "D", "K"]
    print(format_table(rows, shape_cols + [f"{n}_ms" for n in names] + ["tmt_ext_GB/s"]))
    print(format_table(rows, shape_cols + [f"{n}_cpu_ms" for n in names]))
    print(format_table(rows, shape_cols + [c for c in rows[0] if "speedup_vs_" in c]))
    print(format_table(rows, shape_cols + [f"{n}_objective" for n in names]
                       + [c for c in rows[0] if c.startswith("objective_vs_")]))
    path = append_record("kmeans", device, rows, threads=threads, iters=ITERS)
    plot_bars(os.path.join(RESULTS_DIR, f"kmeans_{device.split(':')[0]}_{threads}threads.png"),
              f"k-means, {ITERS} iterations ({device}, {threads} threads)",
              [f"B{r['B']} N{r['N']} D{r['D']} K{r['K']}" for r in rows],
              {n: [r.get(f"{n}_ms", float("nan")) for r in rows] for n in names}, "median ms (log)")
    print(f"appended to {path}")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="the first shape only, shorter timing")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for every peer (default: torch's default)")
    args = parser.parse_args(argv)
    run(args.device, args.quick, args.threads)


if __name__ == "__main__":
    main()
