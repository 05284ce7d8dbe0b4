"""Strategy preparation for FedHQ clients (paper §2.1).

PTQ clients train the plain float model (``prepare_ptq``); QAT clients train a copy
whose Conv2d / Linear layers fake-quantize weights (per channel) and input activations
(per tensor, running range) with ``fedhq_kernels.fake_quant`` (``prepare_qat``). Both
keep the float model's parameter names, so their uploads aggregate together; see
``fedhq.quant.qat`` for how the FL layer treats the QAT observer buffers.
``fedhq.quant.deploy`` evaluates a model as deployed (INT weights and calibrated INT
activations).
"""

from fedhq.quant.deploy import (
    CALIBRATION_SAMPLES,
    Calibration,
    calibrate,
    calibration_split,
    deployed_model,
    evaluate_deployed,
)
from fedhq.quant.qat import (
    OBSERVER_BUFFERS,
    QAT_MODULES,
    QATConfig,
    QATConv2d,
    QATLinear,
    float_state_dict,
    load_float_state_dict,
    observer_keys,
    prepare,
    prepare_ptq,
    prepare_qat,
    qat_modules,
    qparams_from_range,
    strip_qat,
)

__all__ = [
    "CALIBRATION_SAMPLES",
    "Calibration",
    "calibrate",
    "calibration_split",
    "deployed_model",
    "evaluate_deployed",
    "OBSERVER_BUFFERS",
    "QAT_MODULES",
    "QATConfig",
    "QATConv2d",
    "QATLinear",
    "float_state_dict",
    "load_float_state_dict",
    "observer_keys",
    "prepare",
    "prepare_ptq",
    "prepare_qat",
    "qat_modules",
    "qparams_from_range",
    "strip_qat",
]
