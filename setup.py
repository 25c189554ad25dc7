"""Builds kernels._C from csrc/: the C++ sources always, the CUDA sources whenever torch is a
CUDA build and nvcc is found (no GPU needed). DEPSEP_SKIP_CUDA_BUILD=1 builds the CPU part only;
DEPSEP_COVERAGE=1 builds the C++ sources at -O0 with gcov instrumentation.
TORCH_CUDA_ARCH_LIST is honoured (default: sm_80 and sm_90)."""

import glob
import os
import shutil
import sys

from setuptools import setup


def _find_cuda_home():
    """The toolkit nvcc belongs to. torch guesses it from `which nvcc`, which can be a wrapper
    script in /usr/local/bin and then gives /usr/local, where libcudart is not."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))

import torch  # noqa: E402  (CUDA_HOME must be set before cpp_extension reads it)
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402

here = os.path.dirname(os.path.abspath(__file__))
cpp_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cpp"), recursive=True))
cuda_sources = sorted(glob.glob(os.path.join("csrc", "**", "*.cu"), recursive=True))
with_cuda = (
    os.environ.get("DEPSEP_SKIP_CUDA_BUILD", "0") != "1"
    and torch.version.cuda is not None
    and _cuda_home is not None
    and os.path.exists(os.path.join(_cuda_home, "bin", "nvcc"))
)

# fp-contract=fast lets GCC fuse a * b + c into an FMA where the target has one: the AVX2 build of
# the CPU loops (cpu_loops_avx2.cpp). Everything else, the host run of the thread and block
# programs included, is built for the default x86-64 target, which has no FMA: there each product
# rounds before its sum, where nvcc (--fmad=true, its default) fuses, so the host run of a
# program computes the GPU's formulas in the GPU's order but matches its results to rounding,
# not bit for bit.
# no-psabi: the CPU loops' 32-byte vectors never cross a function boundary of the non-AVX
# build (internal, inlined), so GCC's note that their ABI differs there does not apply.
extra_compile_args = {"cxx": ["-O3", "-fvisibility=hidden", "-ffp-contract=fast", "-Wno-psabi"]}
# at::parallel_for runs serially unless the extension itself is built with OpenMP; the libgomp
# this links is torch's own (same soname, already loaded), so one thread pool serves both.
extra_link_args = []
if os.environ.get("DEPSEP_COVERAGE") == "1":
    # gcov instrumentation for `make coverage` (.ci/device_coverage.py builds a copy with it).
    extra_compile_args["cxx"] = ["-O0" if a == "-O3" else a for a in extra_compile_args["cxx"]]
    extra_compile_args["cxx"].append("--coverage")
    extra_link_args.append("--coverage")
if sys.platform.startswith("linux"):
    extra_compile_args["cxx"].append("-fopenmp")
    extra_link_args.append("-fopenmp")
if with_cuda:
    extra_compile_args["nvcc"] = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
    if os.environ.get("DEPSEP_PTXAS_VERBOSE") == "1":
        extra_compile_args["nvcc"].append("-Xptxas=-v")
    extension = CUDAExtension(
        "kernels._C",
        cpp_sources + cuda_sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
        define_macros=[("DEPSEP_WITH_CUDA", "1")],
    )
else:
    extension = CppExtension(
        "kernels._C",
        cpp_sources,
        include_dirs=[os.path.join(here, "csrc")],
        extra_compile_args=extra_compile_args,
        extra_link_args=extra_link_args,
    )

setup(
    ext_modules=[extension],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
