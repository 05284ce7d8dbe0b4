"""The hardware profile behind FedHQ's speed model (paper Eq. 1: H_m and B_m "from the
hardware profile"), measured rather than guessed:

    python -m fedhq_kernels.profile [--quick] [--device cuda] [--out PATH]

- ``timing``: warm-up, device-event or synchronized timing, median and spread,
  rotating non-zero inputs, live-heap sampling;
- ``micro``: memory bandwidth, matmul throughput per dtype, tiny-op overhead, the
  quantization ops in GB/s;
- ``steps``: training-step time, peak memory and work per step of a model, float32
  (PTQ clients) and fake-quantized (QAT clients), at several batch sizes;
- ``schema``: the versioned JSON format shared by measured profiles and device presets;
- ``run``: takes a whole profile and formats its table.

The speed model that reads profiles is ``fedhq.analysis.speed``.
"""

from fedhq_kernels.profile.fit import AffineFit, fit_affine, interpolate
from fedhq_kernels.profile.run import DEFAULT_MODELS, format_table, run_profile
from fedhq_kernels.profile.schema import SCHEMA, SCHEMA_VERSION, ProfileError, dump, load, validate
from fedhq_kernels.profile.timing import Timing, measure, rotating_inputs, synchronize

__all__ = [
    "DEFAULT_MODELS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "AffineFit",
    "ProfileError",
    "Timing",
    "dump",
    "fit_affine",
    "format_table",
    "interpolate",
    "load",
    "measure",
    "rotating_inputs",
    "run_profile",
    "synchronize",
    "validate",
]
