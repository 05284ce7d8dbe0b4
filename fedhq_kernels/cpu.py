"""The ``cpu`` backend: the C++/OpenMP kernels of csrc/ (fedhq_kernels._C), built at
install time. When the library does not load, this says so once, at import, and the
dispatcher falls back to the reference backend.
"""

from __future__ import annotations

import warnings

import torch

from fedhq_kernels.optable import define_library, op_table

DEVICES = ("cpu",)
UNAVAILABLE: str | None = None
KERNELS: dict = {}

try:
    from fedhq_kernels import _C  # noqa: F401  (loading it implements torch.ops.fedhq_cpu)

    define_library("fedhq_cpu")
except (ImportError, RuntimeError) as error:
    UNAVAILABLE = (
        f"the C++ extension fedhq_kernels._C did not load ({error}); rebuild with "
        "`pip install --no-build-isolation -e .` and look for 'fedhq:' lines in the build log"
    )
    warnings.warn(f"fedhq_kernels: {UNAVAILABLE}. Falling back to the reference backend.", RuntimeWarning, stacklevel=2)
else:
    KERNELS = op_table(torch.ops.fedhq_cpu)
