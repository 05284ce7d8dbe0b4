"""The op table: every fedhq op's name and schema, in one place. It drives the
registration of torch.ops.fedhq (ops.py), the schemas of the C++ libraries'
namespaces (torch.ops.fedhq_cpu / fedhq_cuda: the libraries implement them, these
declare them), each backend's ``KERNELS`` and the dispatch."""

from __future__ import annotations

import torch

SCHEMAS = {
    "fake_quant": "(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, int axis) -> Tensor",
    "fake_quant_out": "(Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, int axis, "
    "Tensor(a!) out) -> ()",
    "fake_quant_backward": "(Tensor grad, Tensor x, Tensor scale, Tensor zero_point, int quant_min, int quant_max, "
    "int axis) -> Tensor",
    "fake_quant_observed": "(Tensor x, int quant_min, int quant_max, bool symmetric, int axis) -> (Tensor, Tensor, "
    "Tensor)",
    "fake_quant_observed_out": "(Tensor x, int quant_min, int quant_max, bool symmetric, int axis, Tensor(a!) out) "
    "-> (Tensor, Tensor)",
    "quantize": "(Tensor x, int quant_min, int quant_max, bool symmetric, int axis) -> (Tensor, Tensor, Tensor)",
    "dequantize": "(Tensor codes, Tensor scale, Tensor zero_point, int axis, ScalarType dtype) -> Tensor",
    "dequantize_out": "(Tensor codes, Tensor scale, Tensor zero_point, int axis, Tensor(a!) out) -> ()",
    "aggregate": "(Tensor[] codes, Tensor[] scales, Tensor[] zero_points, Tensor weights, int[] axes, int[] bits, "
    "int quant_min, int quant_max, bool symmetric, str[] names, int trim) -> (Tensor, Tensor, Tensor)",
    "accumulate": "(Tensor(a!) acc, Tensor[] codes, Tensor[] scales, Tensor[] zero_points, int[] axes, float fraction, "
    "str[] names) -> ()",
}
OP_NAMES = tuple(SCHEMAS)
# The out= forms (``<op>_out``) write the result into their last argument, ``out``
# (rules: docs/kernels.md, "out= forms"); the schema's ``(a!)`` declares the mutation.
MUTATED_ARGS = {name: ("out",) if "Tensor(a!) out" in schema else () for name, schema in SCHEMAS.items()}
_LIBRARIES: dict[str, torch.library.Library] = {}


def define_library(namespace: str) -> torch.library.Library:
    """Declares every op's schema in ``namespace`` (a compiled backend's, after its
    library has loaded), once; the Library stays alive here. An op the library defined
    itself (an older build) must have the table's schema, else RuntimeError."""
    if namespace not in _LIBRARIES:
        library = torch.library.Library(namespace, "FRAGMENT")
        for name, schema in SCHEMAS.items():
            existing = [str(s) for s in torch._C._jit_get_schemas_for_operator(f"{namespace}::{name}")]
            if not existing:
                library.define(name + schema)
            elif existing != [f"{namespace}::{name}{schema}"]:
                raise RuntimeError(
                    f"{namespace}::{name} is {existing}, not the op table's schema: rebuild the extension"
                )
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
