"""FedMPQ (mixed-precision QAT under per-client bit budgets, CVPR 2024) and its baseline
AQFL, as pure functions the run driver calls (docs/mixed-precision.md).

Client: ``to_bitplane`` turns the float model into bit-plane layers at the client's bit
map; ``train_fedmpq`` trains it with cross-entropy + lambda x group Lasso and integer
updates, prunes sparse top planes and returns the dequantized float state dict and the
new bit map. Server: ``server_step`` (aggregation weights samples x budget, the averaged
bit map) and ``fit_budget`` / ``ServerStep.client_map`` (pruning-growing to each
client's budget). AQFL: ``aqfl_bit_map``, trained with ``fedhq.quant``'s QAT layers.
Budgets per device: ``device_budget``.
"""

from fedhq.mpq.bitplane import (
    MIN_BITS,
    BitPlaneConv2d,
    BitPlaneLayer,
    BitPlaneLinear,
    bit_layers,
    bit_map,
    float_state_dict,
    group_lasso,
    memory_shares,
    prune_top_bits,
    quantizable_layers,
    to_bitplane,
    to_float,
    upload_state,
)
from fedhq.mpq.budget import (
    BUDGET_TIERS,
    ServerStep,
    aggregation_weights,
    aqfl_bit_map,
    average_bit_maps,
    average_bits,
    device_budget,
    fit_budget,
    server_step,
)
from fedhq.mpq.local import EPSILON, LAMBDA, LocalResult, train_fedmpq

__all__ = [
    "BUDGET_TIERS",
    "EPSILON",
    "LAMBDA",
    "MIN_BITS",
    "BitPlaneConv2d",
    "BitPlaneLayer",
    "BitPlaneLinear",
    "LocalResult",
    "ServerStep",
    "aggregation_weights",
    "aqfl_bit_map",
    "average_bit_maps",
    "average_bits",
    "bit_layers",
    "bit_map",
    "device_budget",
    "fit_budget",
    "float_state_dict",
    "group_lasso",
    "memory_shares",
    "prune_top_bits",
    "quantizable_layers",
    "server_step",
    "to_bitplane",
    "to_float",
    "train_fedmpq",
    "upload_state",
]
