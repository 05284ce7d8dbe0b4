"""Builds fedhq_kernels' compiled backends.

The CPU extension (fedhq_kernels._C: csrc/ops.cpp + csrc/cpu/*.cpp) is built with
OpenMP and exact floating point: -ffp-contract=off, because FMA contraction changes
the rounding PyTorch's quantization does; -fno-trapping-math, which changes no result
but lets GCC if-convert the clamps (without it the fake-quant loop stayed scalar and
ran 2.4x slower on one core). A build failure never fails the install unless
FEDHQ_REQUIRE_CPU_EXT=1: the package then runs on its reference backend and says so
once at import.

Environment:
  FEDHQ_BUILD_CPU=0        skip the CPU extension
  FEDHQ_REQUIRE_CPU_EXT=1  fail the install if the CPU extension does not build (CI)
  FEDHQ_CPU_ARCH=native    value of -march (default native; e.g. x86-64-v3 for a
                           portable build, or "" to pass no -march)
"""

import glob
import os
import sys

from setuptools import setup

try:
    import torch  # noqa: F401  (the extension compiles against the installed torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "fedhq: torch must be installed before building (pip install torch first, then "
        "pip install --no-build-isolation .)"
    )


def _flag(name, default):
    return os.environ.get(name, default).strip()


class BuildExtensionOptional(BuildExtension):
    """Builds what it can; reports in one line what it skipped and why."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
            print(f"fedhq: built {ext.name}")
        except Exception as error:  # a compiler error must not fail pip install by default
            if not ext.optional:
                raise
            print(
                f"fedhq: WARNING: could not build {ext.name} ({error}); "
                "fedhq_kernels will use its reference backend"
            )


def cpu_extension():
    arch = _flag("FEDHQ_CPU_ARCH", "native")
    cflags = ["-O3", "-g0", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]
    if arch:
        cflags.append(f"-march={arch}")
    sources = ["csrc/ops.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    extension = CppExtension(
        "fedhq_kernels._C",
        sources,
        extra_compile_args=cflags,
        extra_link_args=["-fopenmp"],
        depends=glob.glob("csrc/**/*.h", recursive=True),
    )
    # optional: setuptools then skips copying a library that failed to build
    extension.optional = _flag("FEDHQ_REQUIRE_CPU_EXT", "0") != "1"
    return extension


ext_modules = []
if _flag("FEDHQ_BUILD_CPU", "1") != "0":
    ext_modules.append(cpu_extension())
else:
    print("fedhq: skipping the CPU extension (FEDHQ_BUILD_CPU=0)")

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExtensionOptional.with_options(use_ninja=True)})
