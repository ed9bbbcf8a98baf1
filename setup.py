"""Build script: the optional native extension resfast._C.

- The C++ CPU kernels are built whenever torch and a C++ compiler are available at build time
  (install with ``--no-build-isolation`` so the build sees the installed torch).
- The CUDA kernels are added when torch is a CUDA build and nvcc is found (``CUDA_HOME``), for the
  archs in ``TORCH_CUDA_ARCH_LIST``.
- ``RESFAST_FAIL_ON_SPILLS=1`` (set by ``make test``) makes a register spill in a CUDA kernel a build
  error, with ptxas's register and spill report in the build log.
- ``RESFAST_BUILD_EXT=0`` skips the extension; without a compiler, or if its build fails, the install
  still succeeds as pure Python + Triton (``resfast.backends.info()`` says what is missing), unless
  ``RESFAST_REQUIRE_EXT=1`` (as in ``make test``) asks for a failure instead.
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import setup

REQUIRE = os.environ.get("RESFAST_REQUIRE_EXT") == "1"


def _note(message: str) -> None:
    print(f"resfast setup: {message}", file=sys.stderr)


def _skip(reason: str) -> dict:
    if REQUIRE:
        raise SystemExit(f"resfast setup: RESFAST_REQUIRE_EXT=1 but the extension cannot be built: {reason}")
    _note(f"building without the native extension: {reason}")
    return {}


def _openmp_flags(torch) -> list[str]:
    """-fopenmp where torch's threads are OpenMP's: there at::parallel_for is an inline `omp parallel`
    region that, compiled without the flag, runs on one thread. The runtime it links (libgomp.so.1) is
    the one torch has already loaded."""
    uses_openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return ["-fopenmp"] if uses_openmp and sys.platform.startswith("linux") else []


def _extension_kwargs() -> dict:
    if os.environ.get("RESFAST_BUILD_EXT", "1") == "0":
        return _skip("RESFAST_BUILD_EXT=0")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return _skip(f"torch is not importable at build time ({e}); install with --no-build-isolation")
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return _skip("no C++ compiler found (set CXX)")

    # The per-ISA files (#pragma GCC target) must not emit a header function that a baseline file also
    # emits: the linker keeps one copy, in object order (sorted by path, not this list's order), and an
    # AVX-512 copy called from baseline code would fault on older CPUs. `nm` found none in common
    # (2026-12-04: every ISA file's kernels sit in their own namespace and use ATen's vector types).
    sources = [
        "csrc/ops.cpp",
        "csrc/cpu/optim.cpp",
        "csrc/cpu/cuda_kernel_on_host.cpp",
        "csrc/cpu/optim_avx2.cpp",
        "csrc/cpu/optim_avx512.cpp",
        "csrc/bn_ops.cpp",
        "csrc/bn_autograd.cpp",
        "csrc/cpu/bn.cpp",
        "csrc/cpu/bn_avx2.cpp",
        "csrc/cpu/bn_avx512.cpp",
        "csrc/cpu/bn_cuda_on_host.cpp",
    ]
    # No -std flag: torch's build helper passes the standard the installed torch needs (C++17 or 20).
    # -fno-math-errno: nothing reads errno, and it lets the compiler vectorise sqrt in the baseline build.
    compile_args = {"cxx": ["-O3", "-fno-math-errno", *_openmp_flags(torch)], "nvcc": ["-O3", "-lineinfo"]}
    if os.environ.get("RESFAST_FAIL_ON_SPILLS") == "1":
        # CI (`make test`): ptxas reports every kernel's registers and spills (-v), and a spill fails
        # the build instead of slowing the kernel down unnoticed.
        compile_args["nvcc"] += ["-Xptxas=-v,--warn-on-spills,--warning-as-error"]
    link_args = _openmp_flags(torch)
    nvcc = os.path.join(cpp_extension.CUDA_HOME or "", "bin", "nvcc")
    if torch.version.cuda is not None and cpp_extension.CUDA_HOME and os.path.exists(nvcc):
        sources += ["csrc/cuda/optim.cu", "csrc/cuda/bn.cu"]
        extension = cpp_extension.CUDAExtension(
            "resfast._C",
            sources,
            extra_compile_args=compile_args,
            define_macros=[("RESFAST_WITH_CUDA", None)],
            extra_link_args=link_args,
        )
        _note(f"building CPU and CUDA kernels (nvcc: {nvcc})")
    else:
        why = "torch is a CPU-only build" if torch.version.cuda is None else "nvcc not found (set CUDA_HOME)"
        extension = cpp_extension.CppExtension(
            "resfast._C", sources, extra_compile_args={"cxx": compile_args["cxx"]}, extra_link_args=link_args
        )
        _note(f"building CPU kernels only: {why}")

    class BuildExt(cpp_extension.BuildExtension):
        def run(self) -> None:
            try:
                super().run()
            except Exception as e:  # a failed native build must not fail a pure-Python install
                if REQUIRE:
                    raise
                _note(f"native extension build failed, installing without it: {e}")

    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExt.with_options(use_ninja=True)}}


setup(**_extension_kwargs())
