"""Build and install tmt_ext (the compiled ops) and tmt_train (the training layer).

Install with ``pip install --no-build-isolation .`` (torch must already be importable).

Switches (environment variables):
  TMT_EXT_FORCE_CUDA=1   build the CUDA kernels even when no GPU is visible or torch looks CPU-only
  TMT_EXT_SKIP_CUDA=1    never build the CUDA kernels
  TMT_EXT_NATIVE=1       compile the CPU kernels with -march=native
  TORCH_CUDA_ARCH_LIST   CUDA architectures; defaults to "8.0;9.0" when no GPU is visible
"""

import glob
import os
import re
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # torch is needed at build time: fail with the fix, not a traceback maze
    raise SystemExit(
        "tmt_ext needs PyTorch at build time: install torch first, then run "
        "`pip install --no-build-isolation .`"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def read_version():
    with open(os.path.join(ROOT, "tmt_ext", "version.py")) as handle:
        return re.search(r'__version__ = "([^"]+)"', handle.read()).group(1)


def env_flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def want_cuda():
    if env_flag("TMT_EXT_SKIP_CUDA"):
        return False
    if env_flag("TMT_EXT_FORCE_CUDA"):
        if CUDA_HOME is None:
            raise SystemExit("TMT_EXT_FORCE_CUDA=1 but no CUDA toolkit was found (set CUDA_HOME)")
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def make_extension():
    with_cuda = want_cuda()
    if with_cuda and "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "native") if with_cuda else ""

    cxx_flags = ["-O3", "-std=c++20", "-DTMT_EXT_PYTHON_MODULE"]
    link_flags = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is inlined into our kernels: without OpenMP they would run on one
        # thread. The runtime is torch's own libgomp (same soname, already loaded).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if env_flag("TMT_EXT_NATIVE"):
        cxx_flags.append("-march=native")
    files = sources("csrc/ops.cpp") + sources("csrc/cpu/*.cpp")
    define_macros = [("TMT_EXT_CUDA_ARCHS", f'"{arch_list}"')]
    extra = {"cxx": cxx_flags}
    if with_cuda:
        files += sources("csrc/cuda/*.cu")
        define_macros.append(("TMT_EXT_WITH_CUDA", None))
        extra["nvcc"] = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo",
                         "--expt-relaxed-constexpr", "-DTMT_EXT_WITH_CUDA"]
        extension = CUDAExtension
    else:
        extension = CppExtension
    return extension(
        name="tmt_ext._C",
        sources=files,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=link_flags,
        py_limited_api=True,
    )


setup(
    name="tmt_ext",
    version=read_version(),
    description="Fused region-masked attention and clustering ops for PyTorch, with TMT and MRM "
                "training pipelines for cross-domain semantic segmentation",
    packages=find_packages(include=["tmt_ext", "tmt_ext.*"])
    + find_packages("python", include=["tmt_train", "tmt_train.*"]),
    package_dir={"tmt_train": "python/tmt_train"},
    python_requires=">=3.10",
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    install_requires=["torch>=2.4", "numpy", "tqdm", "safetensors", "pillow", "matplotlib",
                      "faiss-cpu", "scikit-image"],
    extras_require={"test": ["pytest", "expecttest", "scikit-learn"]},
    entry_points={"console_scripts": ["tmt-train=tmt_train.cli:main"]},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
