"""Backend selection: preference by device, the FEDHQ_BACKEND override, clear
errors for unavailable backends, and the loud fallback when the C++ build is missing."""

import subprocess
import sys
import textwrap

import pytest
import torch

import fedhq_kernels as fk
from fedhq_kernels import dispatch, reference


def test_cpu_extension_is_built():
    # CI builds the extension; a silent fallback to the reference would hide a broken build
    assert "cpu" in fk.backends(), dispatch.unavailable_backends().get("cpu")
    assert dispatch.select(torch.device("cpu")) == "cpu"


def test_forced_backend_really_runs(monkeypatch):
    calls = []
    original = reference.KERNELS["fake_quant"]
    monkeypatch.setitem(reference.KERNELS, "fake_quant", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("FEDHQ_BACKEND", "reference")
    fk.fake_quant(torch.randn(5), 0.1)
    assert calls == [1]
    monkeypatch.setenv("FEDHQ_BACKEND", "cpu")
    fk.fake_quant(torch.randn(5), 0.1)
    assert calls == [1]


def test_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("FEDHQ_BACKEND", "tpu")
    with pytest.raises(ValueError, match="FEDHQ_BACKEND='tpu' is not a backend; choose one of cuda, triton, cpu"):
        fk.fake_quant(torch.randn(5), 0.1)


def test_unavailable_backend_is_an_error(monkeypatch):
    # this CPU-only torch has no CUDA backend
    monkeypatch.setenv("FEDHQ_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="FEDHQ_BACKEND=cuda, but that backend is unavailable: "):
        fk.quantize(torch.randn(5))
    assert "cuda" in dispatch.unavailable_backends()


def test_missing_extension_falls_back_loudly_once():
    script = textwrap.dedent(
        """
        import os, sys, warnings
        sys.modules["fedhq_kernels._C"] = None  # as if the C++ build had failed
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, fedhq_kernels as fk
            fk.fake_quant(torch.randn(8), 0.1)
            fk.quantize(torch.randn(8))
        ours = [w for w in caught if "fedhq_kernels" in str(w.message)]
        assert len(ours) == 1, [str(w.message) for w in ours]
        assert issubclass(ours[0].category, RuntimeWarning)
        assert "did not load" in str(ours[0].message) and "reference backend" in str(ours[0].message)
        assert "cpu" not in fk.backends() and "reference" in fk.backends()
        os.environ["FEDHQ_BACKEND"] = "cpu"
        try:
            fk.fake_quant(torch.randn(8), 0.1)
        except RuntimeError as error:
            assert "FEDHQ_BACKEND=cpu, but that backend is unavailable" in str(error), error
        else:
            raise AssertionError("forcing the missing cpu backend did not fail")
        print("ok")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
