"""Speed analysis (paper §3.1): a client's local training time T_m (Eq. 1) from its
hardware profile, and the speed significance Sig^speed (Eq. 2).

    T_m = (V_m / B_m) * E_m * P / H_m(alpha_m * M_m, beta_m * C_m)            (Eq. 1)
    Sig_m^speed = T_m / (T_max - T_min)                                       (Eq. 2)

B_m comes from the profile's measured memory, H_m from its measured step time of the
strategy, presets from a roofline ratio to the reference machine; Eq. 2 gives 0.5 to
every client when all times are equal. The reasoning and measurements:
docs/method.md §2 and docs/profile.md, "The speed model".
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedhq.profile import fit, schema
from fedhq.profile.timing import randn_nonzero, synchronize
from fedhq_kernels.checks import is_int, is_real

STRATEGIES = schema.STRATEGIES
EQUAL_TIMES_RTOL = 1e-9  # Eq. 2 guard: T_max - T_min at or below this fraction of T_max counts as 0


def check_fraction(name: str, value: Any) -> float:
    """alpha / beta must be numbers in (0, 1]."""
    if not is_real(value) or not (0 < value <= 1):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_count(name: str, value: Any, *, allow_float: bool = False) -> float:
    ok = is_real(value) if allow_float else is_int(value)
    if not ok or value <= 0:
        kind = "a number" if allow_float else "an int"
        raise ValueError(f"{name} must be {kind} > 0, got {value!r}")
    return value


def load_profile(source: Any) -> dict:
    """A validated profile from a dict, a JSON file path, or a preset name
    (fedhq.devices.preset_names())."""
    if isinstance(source, Mapping):
        device = source.get("device")
        name = device.get("name") if isinstance(device, Mapping) else None
        return schema.validate(source, f"profile {name!r}" if name else "profile")
    if isinstance(source, Path) or (isinstance(source, str) and (source.endswith(".json") or "/" in source)):
        return schema.load(source)
    if isinstance(source, str):
        from fedhq.devices import load_preset

        return load_preset(source)
    raise TypeError(f"a profile must be a dict, a path to a JSON file or a preset name, got {type(source).__name__}")


def model_key(model: Any) -> str:
    """The profile key of a model: a ModelSpec, or its text (``small_cnn@8x8x1``)."""
    from fedhq.models import ModelSpec

    if isinstance(model, ModelSpec):
        return model.key
    if isinstance(model, str):
        return ModelSpec.parse(model).key
    raise TypeError(f"model must be a ModelSpec or a spec string such as 'small_cnn@32x32x3', got {model!r}")


def _device_costs(doc: dict) -> tuple[float, float, float]:
    """(bandwidth B/s, fp32 FLOP/s, launch s) of a profile."""
    figures = doc["figures"]
    return (
        figures["copy_bandwidth_gbps"]["median"] * 1e9,
        figures["matmul_tflops"]["float32"]["median"] * 1e12,
        figures["launch_overhead_us"]["median"] * 1e-6,
    )


def roofline_seconds(doc: dict, ops: float, flops: float, bytes_compute: float, bytes_other: float) -> float:
    """The modeled cost of one step on the device of ``doc`` (docs/method.md §2.3)."""
    bandwidth, rate, launch = _device_costs(doc)
    return ops * launch + max(bytes_compute / bandwidth, flops / rate) + bytes_other / bandwidth


@dataclass(frozen=True)
class SpeedEstimate:
    """Eq. 1 for one client: T_m and what it was computed from."""

    time_s: float  # T_m
    batch: int  # B_m
    hardware_performance: float  # H_m, parameters per second
    step_s: float  # step time at B_m (before beta)
    memory_bytes: float  # modeled memory at B_m, runtime overhead included
    budget_bytes: float  # alpha * M
    params: int  # P
    strategy: str
    device: str
    scaled_from: str | None  # the reference device for presets, else None


class SpeedModel:
    """Step time, memory and Eq. 1 for one device. ``profile``: a measured profile or
    a preset (dict, path or preset name); ``reference``: a measured profile with the
    model's step measurements, needed when ``profile`` has none (presets)."""

    def __init__(self, profile: Any, *, reference: Any = None):
        self.profile = load_profile(profile)
        self.reference = load_profile(reference) if reference is not None else None
        if self.reference is not None and self.reference["kind"] != "measured":
            raise ValueError(
                f"reference profile {self.reference['device']['name']!r} must be a measured profile, not a preset"
            )

    @property
    def device(self) -> str:
        return self.profile["device"]["name"]

    def _entry(self, model: Any) -> tuple[dict, dict | None]:
        """(model entry, reference profile if the entry must be scaled)."""
        key = model_key(model)
        if key in self.profile.get("models", {}):
            return self.profile["models"][key], None
        if self.reference is not None and key in self.reference.get("models", {}):
            return self.reference["models"][key], self.reference
        have = sorted(self.profile.get("models", {}))
        hint = (
            f"the reference profile has {sorted(self.reference.get('models', {}))}"
            if self.reference is not None
            else "give a measured reference profile that has it (presets have no step measurements)"
        )
        raise ValueError(
            f"profile {self.device!r} has no measurements of model {key} (it has {have or 'none'}); {hint}; "
            f"measure it with `fedhq profile --models {key}`"
        )

    def _rows(self, model: Any, strategy: str) -> tuple[list[dict], dict, dict | None]:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        entry, reference = self._entry(model)
        if strategy not in entry["strategies"]:
            raise ValueError(f"profile of model {model_key(model)} has no '{strategy}' measurements")
        rows = sorted(entry["strategies"][strategy]["batches"], key=lambda r: r["batch"])
        return rows, entry, reference

    def params(self, model: Any) -> int:
        return int(self._entry(model)[0]["params"])

    def step_time(self, model: Any, strategy: str, batch: float) -> float:
        """Seconds per training step at ``batch`` (interpolated; scaled for presets)."""
        _check_count("batch", batch, allow_float=True)
        rows, _, reference = self._rows(model, strategy)
        xs = [r["batch"] for r in rows]
        t = fit.interpolate_monotone(xs, [r["step_s"]["median"] for r in rows], batch)
        if reference is not None:
            counts = [
                max(0.0, fit.interpolate(xs, [float(r[k]) for r in rows], batch))
                for k in ("ops", "flops", "bytes_compute", "bytes_other")
            ]
            t *= roofline_seconds(self.profile, *counts) / roofline_seconds(reference, *counts)
        return t

    def memory_fit(self, model: Any, strategy: str) -> fit.AffineFit:
        """memory(B) = a + b*B of the model's training step (tensor bytes, without the
        runtime overhead), least squares over the measured batch sizes."""
        rows, _, _ = self._rows(model, strategy)
        if len(rows) < 2:
            raise ValueError(
                f"B_m needs peak memory at two or more batch sizes; profile of {model_key(model)} ({strategy}) has "
                f"{len(rows)}"
            )
        m = fit.fit_affine([r["batch"] for r in rows], [float(r["peak_memory_bytes"]) for r in rows])
        if m.slope <= 0:
            raise ValueError(
                f"profile of {model_key(model)} ({strategy}): peak memory does not grow with the batch size "
                f"(fitted {m.slope:.0f} bytes/sample); the memory measurement is unusable"
            )
        return m

    def memory(self, model: Any, strategy: str, batch: float) -> float:
        """Bytes a client needs to train at ``batch``: runtime overhead + a + b*B."""
        overhead = float(self.profile["device"].get("memory_overhead_bytes") or 0)
        return overhead + self.memory_fit(model, strategy)(batch)

    def max_batch(self, model: Any, strategy: str, alpha: float, *, limit: int | None = None) -> int:
        """B_m: the largest batch whose memory fits in alpha * M (capped at ``limit``)."""
        alpha = check_fraction("alpha", alpha)
        budget = alpha * self.profile["device"]["memory_bytes"]
        overhead = float(self.profile["device"].get("memory_overhead_bytes") or 0)
        m = self.memory_fit(model, strategy)
        batch = math.floor((budget - overhead - m.intercept) / m.slope)
        if batch < 1:
            raise ValueError(
                f"alpha = {alpha}: the memory budget alpha * M = {budget / 2**20:.0f} MiB of {self.device!r} is too "
                f"small for batch 1 of {model_key(model)} ({strategy}), which needs "
                f"{(overhead + m(1)) / 2**20:.0f} MiB (runtime {overhead / 2**20:.0f} MiB included); raise alpha"
            )
        if limit is not None:
            batch = min(batch, int(_check_count("limit", limit)))
        return batch

    def estimate(
        self,
        model: Any,
        strategy: str,
        *,
        alpha: float,
        beta: float,
        samples: int,
        epochs: int | float,
        max_batch: int | None = None,
        batch: int | None = None,
        drop_single: bool = False,
    ) -> SpeedEstimate:
        """Eq. 1 for a client with ``samples`` (V_m) local samples and ``epochs`` (E_m).
        ``batch`` fixes B_m instead of deriving it (it must still fit alpha * M). V/B
        counts whole batches, as training runs them (``batches_per_epoch``)."""
        alpha = check_fraction("alpha", alpha)
        beta = check_fraction("beta", beta)
        samples = int(_check_count("samples", samples))
        epochs = _check_count("epochs", epochs, allow_float=True)
        if batch is None:
            limit = samples if max_batch is None else min(samples, int(_check_count("max_batch", max_batch)))
            batch = self.max_batch(model, strategy, alpha, limit=limit)
        else:
            batch = int(_check_count("batch", batch))
            budget = alpha * self.profile["device"]["memory_bytes"]
            if self.memory(model, strategy, batch) > budget:
                raise ValueError(
                    f"batch = {batch} needs {self.memory(model, strategy, batch) / 2**20:.0f} MiB, more than "
                    f"alpha * M = {budget / 2**20:.0f} MiB on {self.device!r}"
                )
        step = self.step_time(model, strategy, batch)
        params = self.params(model)
        performance = beta * params / step  # H_m: parameters processed per second at B_m
        steps = batches_per_epoch(samples, batch, drop_single=drop_single)
        time_s = steps * epochs * params / performance  # Eq. 1, V/B in whole batches
        _, reference = self._entry(model)
        return SpeedEstimate(
            time_s=time_s,
            batch=batch,
            hardware_performance=performance,
            step_s=step,
            memory_bytes=self.memory(model, strategy, batch),
            budget_bytes=alpha * self.profile["device"]["memory_bytes"],
            params=params,
            strategy=strategy,
            device=self.device,
            scaled_from=reference["device"]["name"] if reference is not None else None,
        )


def batches_per_epoch(samples: int, batch: int, *, drop_single: bool = False) -> int:
    """Batches one epoch of ``samples`` runs at ``batch``: the last one shorter, and left
    out when it holds one sample and ``drop_single`` (BatchNorm; fedhq.fl.client)."""
    count = -(-samples // batch)
    if drop_single and count > 1 and samples % batch == 1:
        count -= 1
    return count


def training_time(profile: Any, model: Any, strategy: str, *, reference: Any = None, **client) -> SpeedEstimate:
    """Eq. 1 in one call: ``training_time("rtx-a6000", "resnet18", "qat", reference=here,
    alpha=0.5, beta=1.0, samples=5000, epochs=5)``."""
    return SpeedModel(profile, reference=reference).estimate(model, strategy, **client)


def speed_significance(times: Sequence[float]) -> list[float]:
    """Eq. 2: Sig_m = T_m / (T_max - T_min); 0.5 for every client when all T_m are equal
    (within EQUAL_TIMES_RTOL of T_max), including a single client."""
    times = [float(t) for t in times]
    if not times:
        raise ValueError("speed_significance: no client times")
    bad = [(i, t) for i, t in enumerate(times) if not (math.isfinite(t) and t > 0)]
    if bad:
        raise ValueError(f"speed_significance: times must be finite and > 0; client {bad[0][0]} has {bad[0][1]!r}")
    t_max, t_min = max(times), min(times)
    spread = t_max - t_min
    if spread <= EQUAL_TIMES_RTOL * t_max:
        return [0.5] * len(times)
    return [t / spread for t in times]


# ---- validation: predicted vs measured time of a real training run ----


def measure_training_runs(
    model: Any, strategies: Sequence[str], *, batch: int, samples: int, epochs: int, runs: int = 3, seed: int = 0
) -> dict[str, float]:
    """Median wall time of ``runs`` real local-training runs per strategy on this
    machine (CPU): ``epochs`` epochs over ``samples`` synthetic samples (shuffled every
    epoch, batches gathered by index, SGD(momentum=0.9) on cross-entropy), as a client
    of the FL layer trains. Runs of the strategies alternate; each model runs one
    untimed epoch first (a client's later rounds start warm)."""
    from fedhq.fl.client import has_batchnorm, training_batches
    from fedhq.models import ModelSpec
    from fedhq.profile.steps import make_step
    from fedhq.quant import prepare

    spec = model if isinstance(model, ModelSpec) else ModelSpec.parse(model)
    gen = torch.Generator().manual_seed(seed)
    inputs = randn_nonzero((samples, *spec.input_shape), generator=gen)
    labels = torch.randint(0, spec.num_classes, (samples,), generator=gen)
    trainers, batchnorm = {}, False
    for strategy in strategies:
        torch.manual_seed(seed)
        net = prepare(spec.build(), strategy).train()
        batchnorm = has_batchnorm(net)
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        trainers[strategy] = make_step(net, optimizer)

    def run(step, n_epochs) -> float:
        start = time.perf_counter()
        for _ in range(n_epochs):
            order = torch.randperm(samples, generator=gen)
            for idx in training_batches(order, batch, batchnorm):
                step((inputs[idx], labels[idx]))
        synchronize("cpu")
        return time.perf_counter() - start

    for step in trainers.values():
        run(step, 1)
    times: dict[str, list[float]] = {s: [] for s in strategies}
    for _ in range(runs):
        for strategy, step in trainers.items():
            times[strategy].append(run(step, epochs))
    return {s: statistics.median(t) for s, t in times.items()}


def validate_against_training(
    profile: Any, model: Any, *, batch: int, samples: int, epochs: int = 1, runs: int = 3
) -> list[dict]:
    """Predicted (Eq. 1 from ``profile``, at the given batch, alpha = beta = 1) vs
    measured time of real training runs on this machine, per strategy:
    ``[{strategy, predicted_s, measured_s, error}]`` with error = predicted / measured - 1."""
    speed = SpeedModel(profile)
    strategies = [s for s in STRATEGIES if s in speed._entry(model)[0]["strategies"]]
    measured = measure_training_runs(model, strategies, batch=batch, samples=samples, epochs=epochs, runs=runs)
    rows = []
    for strategy in strategies:
        predicted = speed.estimate(model, strategy, alpha=1.0, beta=1.0, samples=samples, epochs=epochs, batch=batch)
        rows.append(
            {
                "strategy": strategy,
                "batch": batch,
                "samples": samples,
                "epochs": epochs,
                "predicted_s": predicted.time_s,
                "measured_s": measured[strategy],
                "error": predicted.time_s / measured[strategy] - 1,
            }
        )
    return rows
