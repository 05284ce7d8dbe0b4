"""The op table: every fedhq op's name and schema, in one place. It drives the
registration of torch.ops.fedhq (ops.py), the schemas of the C++ libraries'
namespaces (torch.ops.fedhq_cpu / fedhq_cuda, declared here before the libraries load
and implement them), each backend's ``KERNELS`` and the dispatch."""

from __future__ import annotations

import torch

SCHEMAS = {
    "fake_quant": "(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, int axis) -> Tensor",
    "fake_quant_backward": "(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
    "int axis) -> Tensor",
    "fake_quant_observed": "(Tensor x, int quant_min, int quant_max, bool symmetric, int axis) -> (Tensor, Tensor, "
    "Tensor)",
    "quantize": "(Tensor x, int quant_min, int quant_max, bool symmetric, int axis) -> (Tensor, Tensor, Tensor)",
    "dequantize": "(Tensor codes, Tensor scale, Tensor zero_point, int axis, ScalarType dtype) -> Tensor",
    "aggregate": "(Tensor[] codes, Tensor[] scales, Tensor[] zero_points, Tensor weights, int[] axes, int quant_min, "
    "int quant_max, bool symmetric, str[] names) -> (Tensor, Tensor, Tensor)",
}
OP_NAMES = tuple(SCHEMAS)
_LIBRARIES: dict[str, torch.library.Library] = {}


def define_library(namespace: str) -> torch.library.Library:
    """Declares every op's schema in ``namespace`` (a compiled backend's), once; the
    Library stays alive here."""
    if namespace not in _LIBRARIES:
        library = torch.library.Library(namespace, "DEF")
        for name, schema in SCHEMAS.items():
            library.define(name + schema)
        _LIBRARIES[namespace] = library
    return _LIBRARIES[namespace]


def op_table(*sources) -> dict:
    """op name -> its implementation, looked up by name in ``sources`` in order
    (modules, or a torch.ops namespace, whose overload packets give ``.default``)."""
    table = {}
    for name in OP_NAMES:
        impl = next((getattr(s, name) for s in sources if hasattr(s, name)), None)
        if impl is None:
            raise AttributeError(f"no implementation of the op {name!r} in {sources}")
        table[name] = getattr(impl, "default", impl)
    return table
