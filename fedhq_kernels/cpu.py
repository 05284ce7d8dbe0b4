"""The ``cpu`` backend: the C++/OpenMP kernels of csrc/ (fedhq_kernels._C), built at
install time. When the library is missing or fails to load, this says so once, at
import, with the reason, and the dispatcher falls back to the reference backend.
"""

from __future__ import annotations

import warnings

import torch

DEVICES = ("cpu",)
UNAVAILABLE: str | None = None
KERNELS: dict = {}

try:
    from fedhq_kernels import _C  # noqa: F401  (loading it registers torch.ops.fedhq_cpu)
except ImportError as error:
    UNAVAILABLE = (
        f"the C++ extension fedhq_kernels._C did not load ({error}); rebuild with "
        "`pip install --no-build-isolation -e .` and look for 'fedhq:' lines in the build log"
    )
    warnings.warn(f"fedhq_kernels: {UNAVAILABLE}. Falling back to the reference backend.", RuntimeWarning, stacklevel=2)
else:
    KERNELS = {
        name: getattr(torch.ops.fedhq_cpu, name).default
        for name in ("fake_quant", "fake_quant_backward", "fake_quant_observed", "quantize", "dequantize", "aggregate")
    }
