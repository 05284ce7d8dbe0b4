"""The ``triton`` backend: Triton kernels for every fedhq op, one file per op family
(fake_quant.py, quantize.py, aggregate.py; shared math, tiling and the range observer
in _common.py). Runs on CUDA tensors; also on CPU tensors under Triton's interpreter
(TRITON_INTERPRET=1, set before this package is imported), which is how CI tests the
same kernels without a GPU.

Results are bit-identical to the reference backend (see _common.py for how).

Host synchronization: fake_quant and its backward with given parameters never sync.
That is why, on a GPU, they do not check the values of scale / zero point (finite,
> 0, in range): that check needs a device -> host read, which the QAT hot path cannot
afford on every call; on CPU tensors (the interpreter) it is free and done. The
observed-range ops (fake_quant with scale=None, quantize), dequantize and aggregate
need a value check anyway (NaN / Inf seen by the observer, bad parameters) and read
back one small flag per call, after their kernels are queued.
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
