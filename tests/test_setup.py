"""setup.py's choice of CUDA toolkit and architectures (no GPU or CUDA torch needed).

setup.py only calls setup() when run as a script, so its helpers can be imported here.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import stat
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NVCC_ARCHS = ["compute_75", "compute_80", "compute_86", "compute_89", "compute_90", "compute_120"]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("fedhq_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def arch_env(monkeypatch):
    monkeypatch.delenv("FEDHQ_CUDA_ARCHS", raising=False)
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    return monkeypatch


def test_importing_setup_builds_nothing(setup_py):
    assert setup_py.BUILT == [] and callable(setup_py.extensions)


def test_default_archs_with_newest_ptx(setup_py, arch_env):
    flags, archs, warnings = setup_py.cuda_arch_flags(NVCC_ARCHS)
    assert archs == ["75", "80", "86", "90"] and warnings == []
    assert flags == [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs] + [
        "-gencode=arch=compute_90,code=compute_90"
    ]


def test_named_archs_ptx_and_precedence(setup_py, arch_env):
    arch_env.setenv("TORCH_CUDA_ARCH_LIST", "7.0")
    arch_env.setenv("FEDHQ_CUDA_ARCHS", "Ampere 8.9+PTX")  # FEDHQ_CUDA_ARCHS wins
    flags, archs, warnings = setup_py.cuda_arch_flags(NVCC_ARCHS)
    assert archs == ["80", "86", "89"] and warnings == []
    assert flags[-1] == "-gencode=arch=compute_89,code=compute_89" and flags.count(flags[-1]) == 1


def test_archs_nvcc_cannot_compile_are_left_out(setup_py, arch_env):
    # a base image's list: nvcc 13 dropped 6.x and 7.0; the build must not fail over them
    arch_env.setenv("TORCH_CUDA_ARCH_LIST", "6.0;7.0;7.5;8.0;8.6;9.0+PTX")
    _, archs, warnings = setup_py.cuda_arch_flags(NVCC_ARCHS)
    assert archs == ["75", "80", "86", "90"]
    assert warnings == ["nvcc cannot compile for sm_60: left out", "nvcc cannot compile for sm_70: left out"]


def test_unparsable_or_no_usable_arch(setup_py, arch_env):
    arch_env.setenv("FEDHQ_CUDA_ARCHS", "sm90;7.0")
    flags, archs, warnings = setup_py.cuda_arch_flags(NVCC_ARCHS)
    assert flags == [] and archs == []
    assert "cannot parse CUDA architecture 'sm90'" in warnings[0] and "sm_70" in warnings[1]


def _fake_toolkit(root: Path) -> Path:
    """A toolkit at root/cuda-13.0 whose nvcc reports its home as the real nvcc does."""
    home = root / "cuda-13.0"
    (home / "include").mkdir(parents=True)
    (home / "include" / "cuda_runtime_api.h").write_text("")
    nvcc = home / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text(f'#!/bin/sh\necho "#\\$ _HERE_={home}/bin"\necho "Cuda compilation tools, release 13.0"\n')
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return home


def test_toolkit_found_through_a_wrapper_nvcc(setup_py, tmp_path, monkeypatch):
    # /usr/local/bin/nvcc exec'ing the toolkit's nvcc: torch would guess /usr/local
    home = _fake_toolkit(tmp_path)
    wrapper = tmp_path / "wrapper" / "bin" / "nvcc"
    wrapper.parent.mkdir(parents=True)
    wrapper.write_text(f'#!/bin/sh\nexec {home}/bin/nvcc "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("nvcc") == str(wrapper)
    assert setup_py.cuda_toolkit_root() == (str(home), None)


def test_cuda_home_is_used_or_refused(setup_py, tmp_path, monkeypatch):
    home = _fake_toolkit(tmp_path)
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert setup_py.cuda_toolkit_root() == (str(home), None)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))  # no include/, no bin/nvcc
    found, reason = setup_py.cuda_toolkit_root()
    assert found is None and f"CUDA_HOME={tmp_path} holds no CUDA toolkit" in reason


def test_cpu_torch_skips_cuda_with_a_reason(setup_py, monkeypatch):
    monkeypatch.setattr(setup_py.torch.version, "cuda", None)
    extension, reason = setup_py.cuda_extension_or_reason()
    assert extension is None and "is a CPU build" in reason
