"""fedhq_kernels: fused, exact INT2-INT8 quantization ops for federated learning.

    fake_quant(x, scale=None, zero_point=None, *, bits=8, symmetric=True, axis=None)
    quantize(x, *, bits=8, symmetric=True, axis=None) -> QuantizedTensor
    dequantize(q) -> Tensor
    aggregate(updates, weights, *, method="mean", trim=0.1) -> QuantizedTensor
    aggregate_state_dicts(state_dicts, weights, *, method="mean", trim=0.1) -> dict
        (method: "mean" | "trimmed-mean" | "median"; docs/kernels.md)
    Aggregator(template, *, method="mean", trim=0.1): .add(update, weight), .result()
        the same server step, one update at a time (O(model) memory for the mean)
    check_update(template, update): what Aggregator.add checks, as a one-line error
    output_cache_bytes() / release_output_cache() / set_output_cache_limit(bytes): the cpu
        backend's reuse of freed output buffers (no first-touch page faults in steady state)
    backends() -> list of backends that run here; FEDHQ_BACKEND forces one
    pack_codes(codes, bits) / unpack_codes(packed, bits, shape): the wire format of codes

The ops are torch.library custom ops (torch.ops.fedhq.*) with fake kernels and a
straight-through autograd, so they work under torch.compile; fedhq_kernels.reference
holds their plain-torch twins.
"""

from fedhq_kernels import cpu as _cpu  # noqa: F401  (says once, at import, if the C++ backend is missing)
from fedhq_kernels.aggregator import Aggregator, check_update
from fedhq_kernels.dispatch import backends
from fedhq_kernels.functional import (
    aggregate,
    aggregate_state_dicts,
    dequantize,
    dequantize_state_dict,
    fake_quant,
    quantize,
    quantize_state_dict,
)
from fedhq_kernels.output_cache import output_cache_bytes, release_output_cache, set_output_cache_limit
from fedhq_kernels.packing import pack_codes, unpack_codes
from fedhq_kernels.quantized_tensor import QuantizedTensor, quant_range

__all__ = [
    "Aggregator",
    "check_update",
    "QuantizedTensor",
    "aggregate",
    "aggregate_state_dicts",
    "backends",
    "dequantize",
    "dequantize_state_dict",
    "fake_quant",
    "output_cache_bytes",
    "pack_codes",
    "quant_range",
    "quantize",
    "quantize_state_dict",
    "release_output_cache",
    "set_output_cache_limit",
    "unpack_codes",
]
