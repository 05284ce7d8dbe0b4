"""The ``cuda`` backend: the CUDA kernels of csrc/cuda/ (fedhq_kernels._C_cuda, built
when torch is a CUDA build and a toolkit is present), as torch.ops.fedhq_cuda.*.
Availability and host synchronization: docs/kernels.md.
"""

from __future__ import annotations

import warnings

import torch

from fedhq_kernels.optable import define_library, op_table

DEVICES = ("cuda",)
UNAVAILABLE: str | None = None
KERNELS: dict = {}

if torch.version.cuda is None:
    UNAVAILABLE = f"torch {torch.__version__} is a CPU build (torch.version.cuda is None)"
else:
    try:
        from fedhq_kernels import _C_cuda  # noqa: F401  (loading it implements torch.ops.fedhq_cuda)

        define_library("fedhq_cuda")
    except (ImportError, RuntimeError) as error:
        UNAVAILABLE = (
            f"the CUDA extension fedhq_kernels._C_cuda did not load ({error}); rebuild with a CUDA toolkit "
            "matching torch's CUDA version (`pip install --no-build-isolation -e .`, FEDHQ_BUILD_CUDA=1 to make a "
            "failed build an error) and look for 'fedhq:' lines in the build log"
        )
        warnings.warn(
            f"fedhq_kernels: {UNAVAILABLE}. CUDA tensors will use the triton or reference backend.",
            RuntimeWarning,
            stacklevel=2,
        )
    else:
        KERNELS = op_table(torch.ops.fedhq_cuda)
        if not torch.cuda.is_available():
            UNAVAILABLE = "no CUDA device is visible (torch.cuda.is_available() is False)"
