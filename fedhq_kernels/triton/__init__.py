"""The ``triton`` backend: Triton kernels for every fedhq op (fake_quant.py,
quantize.py, aggregate.py; shared kernels and math in _common.py). Runs on CUDA
tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before
import). Bit-identical to the reference; host synchronization: docs/kernels.md.
"""

from __future__ import annotations

import os

from fedhq_kernels.optable import op_table

DEVICES: tuple[str, ...] = ("cuda",)
UNAVAILABLE: str | None = None
KERNELS: dict = {}

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
if _INTERPRET:
    DEVICES = ("cuda", "cpu")

try:
    import triton  # noqa: F401
except Exception as error:  # noqa: BLE001 - a broken triton install must not break `import fedhq_kernels`
    UNAVAILABLE = f"triton cannot be imported ({type(error).__name__}: {error}); `pip install triton` on Linux"
else:
    # modules, not their functions: `quantize` and `aggregate` would shadow the submodules
    from fedhq_kernels.triton import aggregate as _aggregate
    from fedhq_kernels.triton import fake_quant as _fake_quant
    from fedhq_kernels.triton import quantize as _quantize

    KERNELS = op_table(_fake_quant, _quantize, _aggregate)
    if not _INTERPRET:
        import torch

        if not torch.cuda.is_available():
            UNAVAILABLE = "no CUDA device, and TRITON_INTERPRET=1 (Triton's CPU interpreter) is not set"
