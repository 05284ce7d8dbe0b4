"""RunConfig: every setting of a federated run, validated in one place.

A config comes from CLI flags, a JSON file, or both (flags override the file); every
bad value is a ``ConfigError`` naming the setting, so the CLI can print one line.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhq.analysis.accuracy import DEFAULT_STATISTIC, STATISTICS
from fedhq_kernels.checks import MAX_BITS, MIN_BITS, is_int, is_real, valid_bits
from fedhq_kernels.functional import DEFAULT_TRIM, METHODS

# the paper's five (fedhq compare's default), then this project's round-aware ones (docs/method.md §8)
# and the mixed-precision systems (docs/mixed-precision.md, fedhq.fl.precision)
PAPER_STRATEGIES = ("fedhq", "fedaqt", "fedfq", "fedrh", "fp32")
MIXED_PRECISION_STRATEGIES = ("aqfl", "fedmpq", "fedlq", "fedhq-budget")
STRATEGIES = (*PAPER_STRATEGIES, "fedhq-rt", "slackfill", "fedrh-matched", *MIXED_PRECISION_STRATEGIES)
PARTITIONS = ("iid", "dirichlet", "quantity")
SPEED_ORIENTATIONS = ("time", "speed")
# Seeds are below numpy's legacy bound, which every seeded library here accepts.
MAX_SEED = 2**32 - 1
BOOL_SETTINGS = ("adjust", "hold_out_validation")
# text settings: (name, may be None)
TEXT_SETTINGS = (
    ("dataset", False),
    ("output_dir", False),
    ("data_root", True),
    ("model", True),
    ("reference_profile", True),
    ("topology", True),
    ("availability", True),
)
# A heterogeneous mix: a workstation GPU, an edge GPU module and a phone (fedhq/devices).
DEFAULT_DEVICES = ("rtx-a6000", "jetson-orin-nano-8gb", "phone-snapdragon-8-gen-2")
# Defaults of the per-client memory / compute fractions when none are given: drawn per
# client from the seed, so clients differ in how much of their device FL may use.
ALPHA_RANGE = (0.3, 1.0)
BETA_RANGE = (0.3, 1.0)
# Default dataset -> model: the small CNN sized to the dataset's images.
DEFAULT_MODELS = {
    "digits": "small_cnn@8x8x1:10",
    "cifar10": "small_cnn@32x32x3:10",
    "cifar100": "small_cnn@32x32x3:100",
    "svhn": "small_cnn@32x32x3:10",
    "mnist": "small_cnn@28x28x1:10",
    "fashion-mnist": "small_cnn@28x28x1:10",
    "synthetic": "small_cnn@32x32x3:10",
}


class ConfigError(ValueError):
    """A setting that cannot be used; the message names it."""


@dataclass
class RunConfig:
    strategy: str = "fedhq"
    dataset: str = "digits"
    data_root: str | None = None
    max_train: int | None = None  # keep a seeded stratified subset of the training set (CIFAR/SVHN on a CPU)
    max_test: int | None = None  # evaluate on a seeded stratified subset of the test set (shared by a seed's runs)
    model: str | None = None  # None: DEFAULT_MODELS[dataset]
    clients: int = 10
    rounds: int = 25
    local_epochs: int = 2
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    quantity_sigma: float = 1.0  # spread of log client sizes for partition = quantity
    devices: list[str] = field(default_factory=lambda: list(DEFAULT_DEVICES))
    alphas: list[float] | None = None  # per client; None: drawn from ALPHA_RANGE
    betas: list[float] | None = None
    xi: float = 0.2
    area_threshold: float = 0.0625
    round_slack: float = 0.0  # fedhq-rt: the round may last (1 + round_slack) x the all-PTQ round
    speed_orientation: str = "speed"  # measured default: see README, "Reading Sig_speed"
    acc_statistic: str = DEFAULT_STATISTIC  # per-sample statistic of Sig_acc (fedhq.analysis.accuracy.STATISTICS)
    bits: int = 8
    seed: int = 0
    output_dir: str = "results/run"
    reference_profile: str | None = None  # measured profile of this machine; None: measure one
    uplink_mbps: float = 20.0  # for a device whose profile has no network figure
    client_timeout_s: float | None = None
    max_weight_growth: float | None = 100.0  # fedhq.fl.server: updates beyond it are rejected; None: no bound
    # the server's aggregation (fedhq_kernels.aggregate_state_dicts): "mean" (FedAvg),
    # "trimmed-mean:<trim>" (trim in [0, 0.5): the fraction cut at each end) or "median"
    aggregation: str = "mean"
    threads: int = 2
    # client sampling (fedhq.fl.sampling): K clients train per round, drawn among those
    # available; K an int, or a fraction of clients (K = max(1, round(fraction x clients)))
    clients_per_round: int | float | None = None  # None: every client, every round
    availability: str | None = None  # None: every client, every round; or a CSV trace (client x round, 1 = there)
    # hierarchical systems and the fine-grained adjustment (fedhq.fl.topology, fedhq.allocation.adjust)
    topology: str | None = None  # None: flat; "hierarchical:AxL"; or a JSON file of parents
    adjust: bool = False
    adjust_after: int = 2  # rounds observed before detection
    adjust_time_tolerance: float = 0.5  # straggler: round time > (1 + tol) x the median client's
    adjust_acc_tolerance: float = 0.01  # validation accuracy a client's update may cost, and a candidate may lose
    adjust_budget: int = 8  # few-round trainings the cost model may run in all; 0: Situation 1 only
    adjust_trial_rounds: int = 1  # rounds of training per candidate trial
    validation_fraction: float = 0.1  # of the training set, held out for detection and trials when adjusting
    hold_out_validation: bool = False  # hold it out without adjusting (comparisons against an adjusted run)

    # ---- construction ----

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, where: str = "config") -> RunConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
        return cls(**values).validated()

    @classmethod
    def from_file(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
        path = Path(path)
        try:
            values = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, json.JSONDecodeError) as error:
            raise ConfigError(f"config file {path} is not readable JSON: {error}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a JSON object of settings")
        values.update(overrides or {})
        return cls.from_dict(values, where=f"config file {path}")

    def replace(self, **changes) -> RunConfig:
        return dataclasses.replace(self, **changes).validated()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def model_spec_text(self) -> str:
        from fedhq.data.registry import dataset_key  # the data loaders are heavy to import

        return self.model or DEFAULT_MODELS.get(dataset_key(self.dataset), "small_cnn")

    @property
    def quantized(self) -> bool:
        return self.strategy != "fp32"

    @property
    def per_round(self) -> int:
        """K, the clients that train in a round when that many are available."""
        k = self.clients_per_round
        if k is None:
            return self.clients
        return k if is_int(k) else max(1, round(k * self.clients))

    @property
    def samples_clients(self) -> bool:
        """Whether some round may train fewer than all clients."""
        return self.per_round < self.clients or self.availability is not None

    @property
    def aggregation_method(self) -> tuple[str, float]:
        """(method, trim) of ``aggregation``: "trimmed-mean:0.2" -> ("trimmed-mean", 0.2)."""
        return parse_aggregation(self.aggregation)

    # ---- validation ----

    def validated(self) -> RunConfig:
        if isinstance(self.devices, tuple):
            self.devices = list(self.devices)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("partition", self.partition, PARTITIONS)
        _choice("speed_orientation", self.speed_orientation, SPEED_ORIENTATIONS)
        _choice("acc_statistic", self.acc_statistic, tuple(STATISTICS))
        for name in ("clients", "rounds", "local_epochs", "batch_size", "threads"):
            _int_at_least(name, getattr(self, name), 1)
        _int_at_least("seed", self.seed, 0)
        if self.seed > MAX_SEED:
            raise ConfigError(f"seed must be an int in [0, {MAX_SEED}] (2**32 - 1), got {self.seed!r}")
        for name in BOOL_SETTINGS:
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false (a JSON boolean), got {getattr(self, name)!r}")
        for name, optional in TEXT_SETTINGS:
            value = getattr(self, name)
            if not ((optional and value is None) or (isinstance(value, str) and value.strip())):
                allowed = "a non-empty string" + (" or null" if optional else "")
                raise ConfigError(f"{name} must be {allowed}, got {value!r}")
        if not valid_bits(self.bits):
            raise ConfigError(f"bits must be an int in [{MIN_BITS}, {MAX_BITS}], got {self.bits!r}")
        for name in ("lr", "dirichlet_alpha", "quantity_sigma", "uplink_mbps"):
            _positive(name, getattr(self, name))
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not (isinstance(self.xi, (int, float)) and 0 < self.xi < 1):
            raise ConfigError(f"xi must be in (0, 1), got {self.xi!r}")
        _positive("area_threshold", self.area_threshold)
        _int_at_least("adjust_after", self.adjust_after, 1)
        _int_at_least("adjust_budget", self.adjust_budget, 0)
        _int_at_least("adjust_trial_rounds", self.adjust_trial_rounds, 1)
        for name in ("adjust_time_tolerance", "adjust_acc_tolerance", "round_slack"):
            value = getattr(self, name)
            if not is_real(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if not (isinstance(self.validation_fraction, float) and 0 < self.validation_fraction < 0.5):
            raise ConfigError(f"validation_fraction must be in (0, 0.5), got {self.validation_fraction!r}")
        if self.strategy in MIXED_PRECISION_STRATEGIES and (self.topology is not None or self.adjust):
            raise ConfigError(f"strategy {self.strategy} runs flat systems without --adjust")
        if self.adjust and self.strategy != "fedhq":
            raise ConfigError(f"adjust refines FedHQ's allocation: it needs strategy fedhq, not {self.strategy!r}")
        if self.adjust and self.adjust_after >= self.rounds:
            raise ConfigError(f"adjust_after ({self.adjust_after}) must be below rounds ({self.rounds})")
        for name in ("max_train", "max_test"):
            if getattr(self, name) is not None:
                _int_at_least(name, getattr(self, name), 1)
        if self.client_timeout_s is not None:
            _positive("client_timeout_s", self.client_timeout_s)
        if self.max_weight_growth is not None:
            value = self.max_weight_growth
            if not is_real(value) or value < 1:
                raise ConfigError(f"max_weight_growth must be a finite number >= 1 (or null: no bound), got {value!r}")
        self.aggregation = _aggregation_text(self.aggregation)
        self._validate_sampling()
        if (
            not isinstance(self.devices, list)
            or not self.devices
            or not all(isinstance(d, str) and d for d in self.devices)
        ):
            raise ConfigError(
                f"devices must be a non-empty list of preset names or profile paths, got {self.devices!r}"
            )
        for name in ("alphas", "betas"):
            values = getattr(self, name)
            if values is None:
                continue
            if not isinstance(values, (list, tuple)):
                raise ConfigError(f"{name} must be a list of numbers (one per client) or null, got {values!r}")
            values = list(values)
            if len(values) != self.clients:
                raise ConfigError(f"{name} has {len(values)} values for {self.clients} clients")
            for v in values:
                if not is_real(v) or not 0 < v <= 1:
                    raise ConfigError(f"{name}: every value must be in (0, 1], got {v!r}")
            setattr(self, name, [float(v) for v in values])
        for f in dataclasses.fields(self):  # numpy scalars as plain numbers: the config stays JSON
            value = getattr(self, f.name)
            if is_int(value):
                setattr(self, f.name, int(value))
            elif is_real(value):
                setattr(self, f.name, float(value))
        return self

    def _validate_sampling(self) -> None:
        k = self.clients_per_round
        if not (k is None or (is_int(k) and 1 <= k <= self.clients) or (is_real(k) and not is_int(k) and 0 < k <= 1)):
            raise ConfigError(
                f"clients_per_round must be an int in [1, clients = {self.clients}], a fraction in (0, 1] "
                f"or null (every client), got {k!r}"
            )
        if self.samples_clients and self.topology is not None:
            raise ConfigError("clients_per_round and availability sample a flat system's clients: unset topology")
        if self.samples_clients and self.adjust:
            raise ConfigError("adjust observes every client in every round: unset clients_per_round and availability")


def parse_aggregation(text: object) -> tuple[str, float]:
    """(method, trim) of an aggregation setting; ConfigError naming the setting if bad."""
    if not isinstance(text, str):
        raise ConfigError(f"aggregation must be text ({', '.join(METHODS)}), got {text!r}")
    method, sep, arg = text.partition(":")
    _choice("aggregation", method, METHODS)
    if method != "trimmed-mean":
        if sep:
            raise ConfigError(f"aggregation {method!r} takes no argument, got {text!r}")
        return method, 0.0
    if not sep:
        return method, DEFAULT_TRIM
    try:
        trim = float(arg)
    except ValueError:
        trim = math.nan
    if not 0 <= trim < 0.5:  # NaN fails too
        raise ConfigError(f"aggregation: the trim of {text!r} must be a number in [0, 0.5)")
    return method, trim


def _aggregation_text(text: object) -> str:
    """The setting as results record it: "trimmed-mean" gains its default trim."""
    method, trim = parse_aggregation(text)
    return f"{method}:{trim:g}" if method == "trimmed-mean" else method


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _int_at_least(name: str, value: Any, low: int) -> None:
    if not is_int(value) or value < low:
        raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")


def _positive(name: str, value: Any) -> None:
    if not is_real(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")
