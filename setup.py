"""Builds fedhq_kernels' compiled backends: the CPU extension (fedhq_kernels._C, OpenMP,
exact floating point; a failed build falls back to the reference backend unless
FEDHQ_REQUIRE_CPU_EXT=1) and, with a CUDA torch and a matching toolkit, the CUDA one
(fedhq_kernels._C_cuda). The build ends with one line: what was built and what was
skipped, and why. Why each compiler flag: the comments at cflags and NVCC_FLAGS.

Environment:
  FEDHQ_BUILD_CPU=0        skip the CPU extension
  FEDHQ_REQUIRE_CPU_EXT=1  fail the install if the CPU extension does not build (CI)
  FEDHQ_CPU_ARCH=native    -march value (e.g. x86-64-v3 for a portable build; "" for none)
  FEDHQ_BUILD_CUDA=0|1     skip / require the CUDA extension; unset: build it when possible
  FEDHQ_CUDA_ARCHS         GPU architectures, e.g. "8.6;9.0" (else TORCH_CUDA_ARCH_LIST,
                           else 7.5;8.0;8.6;9.0); "+PTX" embeds an entry's PTX (the newest
                           one's always is); entries nvcc cannot compile are dropped, warned
  CUDA_HOME                the CUDA toolkit (else the one of the nvcc on PATH)
  NVCC_THREADS=4           nvcc --threads; torch's MAX_JOBS bounds parallel compile jobs
"""

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

try:
    import torch
    from torch.utils import cpp_extension
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit(
        "fedhq: torch must be installed before building (pip install torch first, then "
        "pip install --no-build-isolation .)"
    )

# nvcc flags of the CUDA kernels, chosen for results identical to the CPU backend:
#   - no --use_fast_math: it flushes subnormals to zero and approximates division
#     (1 / scale and the observer's scale formula must be IEEE-rounded);
#   - -ftz=false -prec-div=true -prec-sqrt=true: nvcc's defaults, stated so that a
#     fast-math habit in the environment cannot silently change them;
#   - --fmad=false: csrc/quant_math.h already multiplies with __fmul_rn wherever FMA
#     contraction would change the rounding (x * inv_scale before rounding; the
#     aggregate's acc + w * value), and tests/test_cuda.py checks that the PTX built
#     *with* contraction allowed holds no fma.rn.f32. The flag is a second guard for
#     code added later; the kernels are memory-bound, so refusing FMAs should cost
#     nothing (not yet measured on a GPU).
# tests/test_cuda.py reads this list (with ast) to compile the kernels as the build does.
NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "--fmad=false",
    "-ftz=false",
    "-prec-div=true",
    "-prec-sqrt=true",
    "--expt-relaxed-constexpr",
    "-lineinfo",
]
DEFAULT_CUDA_ARCHS = "7.5;8.0;8.6;9.0"  # Turing (T4) to Hopper; newer GPUs JIT the 9.0 PTX

BUILT, SKIPPED = [], []  # extension names; "name (why)" lines, for the summary line


def _flag(name, default):
    return os.environ.get(name, default).strip()


class BuildExtensionOptional(BuildExtension):
    """Builds what it can; ends with one line saying what it built and skipped."""

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
            BUILT.append(ext.name)
        except Exception as error:  # a compiler error must not fail pip install by default
            if not ext.optional:
                raise
            SKIPPED.append(f"{ext.name} (build failed: {error}; {ext.fallback})")
            print(f"fedhq: WARNING: could not build {ext.name} ({error}); {ext.fallback}")

    def run(self):
        super().run()
        print(f"fedhq: built {', '.join(BUILT) or 'nothing'}; skipped {'; '.join(SKIPPED) or 'nothing'}")


def cpu_extension():
    arch = _flag("FEDHQ_CPU_ARCH", "native")
    # -ffp-contract=off: FMA contraction changes the rounding PyTorch's quantization does.
    # -fno-trapping-math changes no result but lets GCC if-convert the clamps (without it
    # the fake-quant loop stayed scalar and ran 2.4x slower on one core).
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
    extension.fallback = "fedhq_kernels will use its reference backend on CPU tensors"
    return extension


# torch's names for architecture families (TORCH_CUDA_ARCH_LIST accepts them too)
NAMED_CUDA_ARCHS = {"turing": "7.5", "ampere": "8.0;8.6", "ada": "8.9", "hopper": "9.0", "blackwell": "10.0;12.0"}


def cuda_arch_flags(nvcc_archs):
    """(-gencode flags, arch names, warnings) for FEDHQ_CUDA_ARCHS / TORCH_CUDA_ARCH_LIST.

    nvcc_archs: the compute_XX names this nvcc accepts (nvcc --list-gpu-arch). Entries it
    cannot compile (base images often list 7.0, which nvcc 13 dropped) are left out with
    a warning rather than failing the build; flags are empty when nothing is left.
    """
    spec = _flag("FEDHQ_CUDA_ARCHS", "") or _flag("TORCH_CUDA_ARCH_LIST", "") or DEFAULT_CUDA_ARCHS
    flags, archs, warnings = [], [], []
    for entry in (e for e in re.split(r"[;\s,]+", spec) if e):
        base, ptx = (entry[:-4], True) if entry.endswith("+PTX") else (entry, False)
        for version in NAMED_CUDA_ARCHS.get(base.lower(), base).split(";"):
            match = re.fullmatch(r"(\d+)\.(\d+)([af]?)", version)
            if not match:
                warnings.append(f"cannot parse CUDA architecture {entry!r} in {spec!r} (expected e.g. 8.6 or 9.0+PTX)")
                continue
            arch = "".join(match.group(1, 2, 3))
            if f"compute_{arch}" not in nvcc_archs:
                warnings.append(f"nvcc cannot compile for sm_{arch}: left out")
                continue
            archs.append(arch)
            flags.append(f"-gencode=arch=compute_{arch},code=sm_{arch}")
            if ptx:
                flags.append(f"-gencode=arch=compute_{arch},code=compute_{arch}")
    if not archs:
        return [], [], warnings
    newest = max(archs, key=lambda a: int(re.match(r"\d+", a).group()))
    ptx = f"-gencode=arch=compute_{newest},code=compute_{newest}"
    return flags + ([ptx] if ptx not in flags else []), archs, warnings


def _run(command):
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return ""
    return result.stdout + result.stderr


def _is_toolkit(home):
    return (
        bool(home)
        and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))
        and bool(shutil.which("nvcc", path=os.path.join(home, "bin")))
    )


def cuda_toolkit_root():
    """(the CUDA toolkit's root, None) or (None, why none was found).

    CUDA_HOME / CUDA_PATH when set; else the toolkit of the nvcc on PATH, as nvcc itself
    reports it. torch guesses the parent of nvcc's directory, which is wrong when that
    nvcc is a wrapper script (/usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc
    makes torch look for headers in /usr/local/include and fail to compile).
    """
    for name in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(name)
        if home:
            return (
                (home, None)
                if _is_toolkit(home)
                else (None, f"{name}={home} holds no CUDA toolkit (bin/nvcc and include/cuda_runtime_api.h)")
            )
    nvcc = shutil.which("nvcc")
    if nvcc:
        match = re.search(r"^#\$ _HERE_=(.+)$", _run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull]), re.M)
        home = os.path.dirname(match.group(1).strip()) if match else os.path.dirname(os.path.dirname(nvcc))
        if _is_toolkit(home):
            return home, None
    if _is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda", None
    return None, "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"


def cuda_extension_or_reason():
    """(the CUDA extension, None), or (None, why it cannot be built here)."""
    if torch.version.cuda is None:
        return None, f"torch {torch.__version__} is a CPU build"
    home, reason = cuda_toolkit_root()
    if home is None:
        return None, reason
    cpp_extension.CUDA_HOME = home  # torch's build reads its headers, libraries and nvcc from here
    nvcc = os.path.join(home, "bin", "nvcc")
    release = re.search(r"release (\d+)\.(\d+)", _run([nvcc, "--version"]))
    if release is None:
        return None, f"cannot run {nvcc} --version"
    release = release.group(1, 2)
    # torch refuses (raises, failing the whole install) a toolkit of another major version
    if release[0] != torch.version.cuda.split(".")[0]:
        return None, f"nvcc {'.'.join(release)} does not match torch's CUDA {torch.version.cuda}"
    arch_flags, archs, warnings = cuda_arch_flags(_run([nvcc, "--list-gpu-arch"]).split())
    for warning in warnings:
        print(f"fedhq: WARNING: {warning}")
    if not archs:
        return None, "none of the requested CUDA architectures can be compiled by this nvcc"
    extension = cpp_extension.CUDAExtension(
        "fedhq_kernels._C_cuda",
        ["csrc/cuda_ops.cpp"] + sorted(glob.glob("csrc/cuda/*.cu")),
        extra_compile_args={
            "cxx": ["-O3", "-g0"],
            "nvcc": NVCC_FLAGS + arch_flags + ["--threads", _flag("NVCC_THREADS", "4")],
        },
        depends=glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True),
    )
    extension.optional = _flag("FEDHQ_BUILD_CUDA", "") != "1"
    extension.fallback = "CUDA tensors will use the triton or reference backend"
    print(
        f"fedhq: building fedhq_kernels._C_cuda for sm_{', sm_'.join(archs)} with nvcc {'.'.join(release)} from {home}"
    )
    return extension, None


def extensions():
    """The extensions to build here; records what is skipped, and why, in SKIPPED."""
    ext_modules = []
    if _flag("FEDHQ_BUILD_CPU", "1") != "0":
        ext_modules.append(cpu_extension())
    else:
        SKIPPED.append("fedhq_kernels._C (FEDHQ_BUILD_CPU=0)")
    if _flag("FEDHQ_BUILD_CUDA", "") == "0":
        SKIPPED.append("fedhq_kernels._C_cuda (FEDHQ_BUILD_CUDA=0)")
        return ext_modules
    cuda_ext, reason = cuda_extension_or_reason()
    if cuda_ext is not None:
        ext_modules.append(cuda_ext)
    elif _flag("FEDHQ_BUILD_CUDA", "") == "1":
        sys.exit(f"fedhq: FEDHQ_BUILD_CUDA=1, but the CUDA extension cannot be built: {reason}")
    else:
        SKIPPED.append(f"fedhq_kernels._C_cuda ({reason})")
    return ext_modules


# pip and `python setup.py` run this file as __main__; tests import it to check the helpers
if __name__ == "__main__":
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExtensionOptional.with_options(use_ninja=True)})
