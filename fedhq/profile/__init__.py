"""FedHQ's hardware profile: the measured input of its speed model (H_m, B_m of Eq. 1).

    python -m fedhq.profile [--quick] [--device cuda] [--out PATH]    (or: fedhq profile)

Modules: ``timing`` (the timing harness), ``micro`` (bandwidth, matmul, op
micro-benchmarks), ``steps`` (training steps, PTQ and QAT), ``fit``, ``schema`` (the
JSON format), ``run``. See docs/profile.md; the reader is ``fedhq.analysis.speed``.
"""

from fedhq.profile.fit import AffineFit, fit_affine, interpolate
from fedhq.profile.run import DEFAULT_MODELS, format_table, run_profile
from fedhq.profile.schema import SCHEMA, SCHEMA_VERSION, ProfileError, dump, load, validate
from fedhq.profile.timing import Timing, measure, rotating_inputs, synchronize

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
