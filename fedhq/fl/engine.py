"""The run driver of both engines: setup, the analyses and allocation, the round loop,
checkpoints and results.json, written once. An engine differs only in its transport,
how a round's messages reach the clients and come back: ``InProcess`` here (every
client in this process), ``fedhq.flower.strategy.FedHQStrategy`` on Flower.

    results = run(RunConfig(strategy="fedhq"))     # also writes output_dir/results.json
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

import fedhq_kernels as fk
from fedhq.allocation import global_init, normalize_significance
from fedhq.allocation.round_aware import round_aware, slack_fill
from fedhq.analysis import speed as speed_analysis
from fedhq.analysis.accuracy import client_significance
from fedhq.data import DatasetNotFoundError, load_dataset, partition
from fedhq.data.base import Dataset, Split, stratified_split, stratified_test_indices
from fedhq.fl import checkpoint, precision, seeds
from fedhq.fl.adjustment import adjust_allocation
from fedhq.fl.client import (
    ClientState,
    RoundPlan,
    evaluate,
    has_batchnorm,
    payload_bytes,
    quantize_upload,
    quantized_names,
    train_local,
)
from fedhq.fl.config import ALPHA_RANGE, BETA_RANGE, ConfigError, RunConfig
from fedhq.fl.rounds import (
    Client,
    Replies,
    RoundContext,
    RoundOutcome,
    TrainFn,
    close_round,
    predicted_compute_s,
    round_plan,
    train_clients,
)
from fedhq.fl.sampling import Sampler
from fedhq.fl.server import Server, check_scheme, growth_limits, validate_update
from fedhq.fl.timing import ClientDevice
from fedhq.fl.topology import Topology, TopologyError
from fedhq.models import ModelSpec
from fedhq.mpq import device_budget
from fedhq.quant import calibration_split, evaluate_deployed
from fedhq_kernels.checks import is_real

log = logging.getLogger("fedhq.engine")

RESULTS_SCHEMA = "fedhq.run/2"  # /2: no "best_accuracy" (chosen on the test set; fedhq.fl.summary says why)
REFERENCE_FILE = "profile-reference.json"
CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = "results.json"
# Batch sizes at which the reference profile measures the model's training step
# (two or more: B_m reads peak memory off an affine fit).
REFERENCE_BATCHES = (4, 16, 64)
# Settings a resumed run may change: extending a run is resuming it with more rounds.
RESUMABLE_CHANGES = ("rounds", "output_dir")

# ---- setup ----


def load_data(config: RunConfig) -> Dataset:
    options = {"seed": config.seed}
    if config.max_train is not None:
        options["max_train"] = config.max_train
    try:
        dataset = load_dataset(config.dataset, config.data_root, **options)
    except (DatasetNotFoundError, ValueError) as error:
        raise ConfigError(f"dataset {config.dataset!r}: {error}") from None
    if config.max_test is None or config.max_test >= len(dataset.test):
        return dataset
    # Every round evaluates the global model twice (float and deployed) on the test
    # split: on Fashion-MNIST's 10,000 images that was most of a small run's time.
    keep = stratified_test_indices(dataset.test.y.numpy(), config.max_test, seeds.generator(config.seed, "test_subset"))
    return dataclasses.replace(dataset, test=dataset.test.subset(keep))


def calibration_images(config: RunConfig, dataset: Dataset) -> torch.Tensor:
    """The training images the server calibrates the deployed model's activation ranges
    on: drawn from the seed's "calibration" stream alone, so every strategy of a seed
    (and both engines) calibrate on the same images."""
    return calibration_split(dataset.train, seeds.generator(config.seed, "calibration"))


def model_spec(config: RunConfig, dataset: Dataset) -> ModelSpec:
    try:
        spec = ModelSpec.parse(config.model_spec_text)
    except ValueError as error:
        raise ConfigError(f"model: {error}") from None
    if spec.input_shape != dataset.input_shape or spec.num_classes != dataset.num_classes:
        raise ConfigError(
            f"model {spec.key} takes {spec.input_shape} inputs and {spec.num_classes} classes, but dataset "
            f"{dataset.name} has {dataset.input_shape} images and {dataset.num_classes} classes"
        )
    return spec


def parse_topology(config: RunConfig) -> Topology:
    try:
        return Topology.parse(config.topology, config.clients)
    except TopologyError as error:
        raise ConfigError(str(error)) from None


def client_fractions(config: RunConfig) -> tuple[list[float], list[float]]:
    """alpha_m, beta_m per client: given, or drawn from the seed (each from its own
    stream: giving one leaves the other's draw unchanged)."""
    alphas = config.alphas or draw_fractions(config, "alphas", ALPHA_RANGE)
    betas = config.betas or draw_fractions(config, "betas", BETA_RANGE)
    return list(alphas), list(betas)


def draw_fractions(config: RunConfig, stream: str, bounds: tuple[float, float]) -> list[float]:
    return [round(float(v), 3) for v in seeds.generator(config.seed, stream).uniform(*bounds, config.clients)]


def client_partition(config: RunConfig, labels) -> list[np.ndarray]:
    """Each client's indices into the training split, from the partition's own stream."""
    options = {"iid": {}, "dirichlet": {"alpha": config.dirichlet_alpha}, "quantity": {"sigma": config.quantity_sigma}}
    try:
        return partition(
            config.partition,
            labels,
            config.clients,
            seeds.int_seed(config.seed, "partition"),
            **options[config.partition],
        )
    except ValueError as error:
        raise ConfigError(f"partition: {error}") from None


def initial_model(config: RunConfig, spec: ModelSpec) -> torch.nn.Module:
    """The initial global model (both engines), from its own stream."""
    torch.manual_seed(seeds.int_seed(config.seed, "init"))
    return spec.build()


def reference_profile(
    config: RunConfig, spec: ModelSpec, out: Path, echo: Callable[[str], None], *, reuse_saved: bool = False
) -> tuple[dict, str]:
    """This machine's measured profile of the model: the given file, the one this run
    saved earlier (``reuse_saved``: only when resuming it), or a fresh measurement (a few
    seconds). A leftover file of another run is never picked up by accident."""
    from fedhq.profile import run as profile_run
    from fedhq.profile import schema

    path = Path(config.reference_profile) if config.reference_profile else out / REFERENCE_FILE
    if path.exists() and (config.reference_profile or reuse_saved):
        try:
            doc = schema.load(path)
        except schema.ProfileError as error:
            raise ConfigError(f"reference_profile: {error}") from None
        if spec.key not in doc.get("models", {}):
            raise ConfigError(f"reference_profile {path} has no measurements of model {spec.key}")
        return doc, str(path)
    if config.reference_profile:
        raise ConfigError(f"reference_profile {path} does not exist")
    echo(f"measuring this machine's training step of {spec.key} (reference profile) ...")
    sizes = {"bandwidth_bytes": 1 << 24, "matmul_n": 256, "matmul_low_precision_n": 32, "quant_elements": 1 << 20}
    doc = profile_run.run_profile(models=[spec.key], batches=list(REFERENCE_BATCHES), repeats=5, micro_sizes=sizes)
    warning = profile_run.contention_warning(doc)
    if warning:
        # Measured: at load ~10 on 2 cores the scaled simulated times came out ~4x below an idle machine's.
        echo(
            f"{warning} Simulated times scale with this profile: to compare runs, pass one measured on an idle "
            "machine with --reference-profile (any run's profile-reference.json)."
        )
    out.mkdir(parents=True, exist_ok=True)
    schema.dump(doc, path)
    return doc, str(path)


def needs_validation(strategy: str, adjust: bool = False) -> bool:
    """Whether a run decides from the server's validation split: the adjustment's
    detection and trials, FedLQ's layer significance."""
    return adjust or strategy == "fedlq"


def split_validation(config: RunConfig, dataset: Dataset) -> tuple[Split, Split | None]:
    """(the split clients share, the server's validation split): when the run decides
    from it (``needs_validation``) a stratified validation_fraction of the training set
    is held out, so the test split is never used to make decisions (runs compared with
    such a run hold out the same samples: hold_out_validation)."""
    if not (needs_validation(config.strategy, config.adjust) or config.hold_out_validation):
        return dataset.train, None
    keep, held = stratified_split(dataset.train.y.numpy(), config.validation_fraction, config.seed)
    return dataset.train.subset(keep), dataset.train.subset(held)


def make_clients(
    config: RunConfig, train: Split, spec: ModelSpec, reference: dict, ids: list[int] | None = None
) -> list[Client]:
    """The run's clients (or only those in ``ids``: a Flower node builds its own)."""
    parts = client_partition(config, train.y.numpy())
    alphas, betas = client_fractions(config)
    clients = []
    for cid in range(config.clients) if ids is None else ids:
        source, indices = config.devices[cid % len(config.devices)], parts[cid]
        try:
            device = ClientDevice(source, reference, beta=betas[cid], default_uplink_mbps=config.uplink_mbps)
            limit = min(config.batch_size, len(indices))
            # B_m (Eq. 1): the configured batch, unless the client's memory budget holds less
            batch = min(
                device.speed.max_batch(spec.key, "qat", alphas[cid], limit=limit),
                device.speed.max_batch(spec.key, "ptq", alphas[cid], limit=limit),
            )
        except (ValueError, TypeError) as error:
            raise ConfigError(f"client {cid} on device {source!r}: {error}") from None
        clients.append(Client(cid, train.subset(indices), device, source, alphas[cid], betas[cid], batch))
    return clients


def client_setup(config: RunConfig, reference: dict, cid: int) -> tuple[ModelSpec, Client]:
    """Client ``cid`` alone, exactly as the run builds it (a Flower node's setup)."""
    dataset = load_data(config)
    spec = model_spec(config, dataset)
    train, _ = split_validation(config, dataset)
    return spec, make_clients(config, train, spec, reference, ids=[cid])[0]


def client_analysis(c: Client, spec: ModelSpec, config: RunConfig) -> tuple[float, float]:
    """What one client computes on its own: (T_m, Sig_acc). T_m is Eq. 1 for training
    with QAT (the strategy being decided), in whole batches as trained; Sig_acc is
    Alg. 1 + Eq. 3 on ``config.acc_statistic``. Eq. 2 turns everyone's T_m into
    Sig_speed on the server."""
    time_s = predicted_compute_s(c, spec, "qat", config.local_epochs, model_facts(spec, config.bits)[0])
    acc_sig = client_significance(c.data.x.numpy(), c.data.y.numpy(), statistic=config.acc_statistic)
    return time_s, acc_sig


def client_costs(c: Client, spec: ModelSpec, config: RunConfig) -> tuple[float, float]:
    """(PTQ compute seconds, upload seconds) a client predicts for one round, besides
    T_m: what the round-aware allocators (fedhq-rt, slackfill) read."""
    batchnorm, upload_bytes = model_facts(spec, config.bits)
    ptq_s = predicted_compute_s(c, spec, "ptq", config.local_epochs, batchnorm)
    return ptq_s, c.device.upload_seconds(upload_bytes)


@functools.cache
def model_facts(spec: ModelSpec, bits: int) -> tuple[bool, int]:
    """(whether the model has BatchNorm, the bytes of its upload at ``bits``): the same
    for every client, so worked out once per process rather than from two models built
    per client."""
    model = spec.build()
    return has_batchnorm(model), payload_bytes(quantize_upload(model.state_dict(), quantized_names(model), bits))


def describe(c: Client) -> dict:
    """How a client describes itself in results.json's client rows."""
    return {
        "device": c.device_source,
        "device_name": c.device.name,
        "bit_budget": device_budget(c.device.speed.profile),
        "alpha": c.alpha,
        "beta": c.beta,
        "samples": len(c.data),
        "batch": c.batch,
    }


def normalized_significance(config: RunConfig, speed_sig: list[float], acc_sig: list[float]) -> tuple[list, list]:
    """The (x, y) of Fig. 3 that global_init placed each client at."""
    norm_speed = normalize_significance(speed_sig).tolist()
    norm_acc = normalize_significance(acc_sig).tolist()
    if config.speed_orientation == "speed":
        norm_speed = [1 - x for x in norm_speed]
    return norm_speed, norm_acc


def allocate(
    config: RunConfig,
    speed_sig: list[float],
    acc_sig: list[float],
    costs: RoundCosts | None = None,
    topology: Topology | None = None,
) -> list[str]:
    """One strategy per client. fedhq-rt and slackfill read the clients' predicted
    ``costs``; on a ``topology`` each node's path to the server counts."""
    n = len(speed_sig)
    if config.strategy in ("fedhq", "fedrh-matched", "fedhq-budget"):
        allocation = global_init(
            speed_sig, acc_sig, config.xi, config.area_threshold, speed_orientation=config.speed_orientation
        )
        chosen = [str(s) for s in allocation.strategies]
        if config.strategy != "fedrh-matched":
            return chosen
        # as many QAT clients as fedhq, drawn at random
        matched = ["ptq"] * n
        for i in seeds.generator(config.seed, "fedrh-matched").permutation(n)[: chosen.count("qat")]:
            matched[i] = "qat"
        return matched
    if config.strategy in ("fedhq-rt", "slackfill"):
        if costs is None:
            raise ValueError(f"strategy {config.strategy} needs the clients' predicted round costs")
        parents = None if topology is None or topology.is_flat else list(topology.parents)
        times = {"ptq_s": costs.ptq_s, "qat_s": costs.qat_s, "upload_s": costs.upload_s, "parents": parents}
        if config.strategy == "slackfill":
            mask = slack_fill(**times)
        else:
            mask = round_aware(acc_sig=acc_sig, round_slack=config.round_slack, **times)
        return ["qat" if q else "ptq" for q in mask]
    if config.strategy in ("fedaqt", "aqfl"):
        return ["qat"] * n
    if config.strategy in ("fedfq", "fedlq"):
        return ["ptq"] * n
    if config.strategy == "fedmpq":
        return ["mpq"] * n
    if config.strategy == "fedrh":
        draws = seeds.generator(config.seed, "fedrh").random(n)
        return ["ptq" if d < 0.5 else "qat" for d in draws]
    return ["fp32"] * n


def precision_policy(
    config: RunConfig, spec: ModelSpec, answers: list[Answer], costs: RoundCosts, validation: Split | None
) -> precision.Uniform:
    """The run's bits per client and round (fedhq.fl.precision), from what the clients
    said of themselves in the analysis round (their devices, sizes, upload times)."""
    budgets = {a.client: a.about["bit_budget"] for a in answers}  # on Flower a node's device is its own
    if config.strategy in precision.BUDGET_STRATEGIES:
        return precision.Budgets(config, budgets)
    if config.strategy == "fedmpq":
        return precision.MixedPrecision(config, spec, budgets)
    if config.strategy == "fedlq":
        upload_s = {a.client: s for a, s in zip(answers, costs.upload_s)}
        return precision.LayerBits(config, spec, validation, upload_s, model_facts(spec, config.bits)[1])
    return precision.Uniform(config)


@dataclass(frozen=True)
class RoundCosts:
    """Per client, in client order: predicted PTQ and QAT compute and upload seconds."""

    ptq_s: list[float]
    qat_s: list[float]
    upload_s: list[float]

    @classmethod
    def of(cls, answers: list[Answer], topology: Topology) -> RoundCosts:
        """From the answers; a node that does not train computes nothing."""
        trains = [topology.trains[a.client] for a in answers]
        return cls(
            [a.ptq_s if t else 0.0 for a, t in zip(answers, trains)],
            [a.time_s if t else 0.0 for a, t in zip(answers, trains)],
            [a.upload_s for a in answers],
        )


# ---- evaluation and progress (every round) ----


def evaluate_global(spec: ModelSpec, server: Server, test: Split, calibration_x: torch.Tensor) -> dict:
    """The global model on the test split (both engines): with float activations
    (accuracy, loss) and as deployed, INT``bits`` weights and activations calibrated
    on ``calibration_x`` (deployed_accuracy, deployed_loss). fp32 deploys the float model."""
    accuracy, loss = evaluate(spec, server.global_weights(), test)
    if server.bits is None:
        deployed = accuracy, loss
    else:
        deployed = evaluate_deployed(spec.build(), server.state, calibration_x, test, bits=server.bits)
    return {"accuracy": accuracy, "loss": loss, "deployed_accuracy": deployed[0], "deployed_loss": deployed[1]}


def echo_progress(echo: Callable[[str], None], row: dict, rounds: int) -> None:
    """One progress line per round (both engines)."""
    width = 20
    done = round(width * row["round"] / rounds)
    bar = "#" * done + "." * (width - done)
    rejected = f" | {len(row['rejected'])} rejected" if row["rejected"] else ""
    if row["rejected"] and not row["participants"]:
        rejected = f" | all {len(row['rejected'])} clients rejected: global model unchanged"
    echo(
        f"round {row['round']:>3}/{rounds} [{bar}] acc {100 * row['accuracy']:5.1f}% "
        f"(deployed {100 * row['deployed_accuracy']:5.1f}%) loss {row['loss']:.3f} | "
        f"wall {row['cum_wall_s']:7.1f} s | simulated {row['cum_sim_s']:9.1f} s{rejected}"
    )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# ---- transports: how a round's messages reach the clients and come back ----


@dataclass(frozen=True)
class Setup:
    """What the driver has set up before any client is asked anything."""

    config: RunConfig
    spec: ModelSpec
    dataset: Dataset
    topology: Topology
    reference: dict
    reference_path: str
    train: Split  # the split the clients share
    validation: Split | None  # the server's (--adjust)
    echo: Callable[[str], None]


@dataclass(frozen=True)
class Answer:
    """A client's answer to the analysis: T_m (Eq. 1), Sig_acc (Eq. 3), ``about``,
    its client row's description (``describe``; on Flower also its node_id), and its
    predicted PTQ compute and upload seconds (``client_costs``)."""

    client: int
    time_s: float
    acc_sig: float
    about: dict
    ptq_s: float = 0.0  # PTQ compute seconds (client_costs)
    upload_s: float = 0.0


class Transport(Protocol):
    name: str  # "embedded" or "flower" (results.json's "engine" when not embedded)
    excluded: list[dict]  # who was left out of the whole run (on Flower: nodes), with why

    def analyze(self) -> list[Answer]:
        """Every usable client's answer, in client order."""

    def train(self, server: Server, plans: dict[int, RoundPlan]) -> Replies:
        """Sends each planned client the global model and its plan; their replies."""

    def local_state(self) -> dict:
        """The clients' local state for a checkpoint (what this process holds)."""

    def restore(self, states: dict) -> None:
        """Gives the clients back their checkpointed local state (--resume)."""

    def adjust(self, server: Server, strategies: dict[int, str], outcome: RoundOutcome, next_round: int) -> dict:
        """FedHQ's fine-grained adjustment: updates ``strategies``, returns its report."""


class InProcess:
    """The embedded engine's transport: every client in this process."""

    name = "embedded"

    def __init__(self, setup: Setup, *, train_fn: TrainFn = train_local):
        self.setup = setup
        self.clients = make_clients(setup.config, setup.train, setup.spec, setup.reference)
        self.states = {c.id: ClientState() for c in self.clients}
        self.train_fn = train_fn
        self.excluded: list[dict] = []

    def context(self, server: Server) -> RoundContext:
        s = self.setup
        return RoundContext(s.config, s.spec, server, self.clients, self.states, s.topology, self.train_fn)

    def analyze(self) -> list[Answer]:
        s = self.setup
        return [
            Answer(c.id, *client_analysis(c, s.spec, s.config), describe(c), *client_costs(c, s.spec, s.config))
            for c in self.clients
        ]

    def train(self, server: Server, plans: dict[int, RoundPlan]) -> Replies:
        return train_clients(self.context(server), plans)

    def local_state(self) -> dict:
        return {str(cid): s.observers for cid, s in self.states.items()}

    def restore(self, states: dict) -> None:
        self.states.update({int(k): ClientState(v) for k, v in states.items()})

    def adjust(self, server: Server, strategies: dict[int, str], outcome: RoundOutcome, next_round: int) -> dict:
        for c in self.clients:
            c.strategy = strategies[c.id]
        report = adjust_allocation(
            self.context(server), outcome, self.setup.validation, next_round=next_round, echo=self.setup.echo
        )
        strategies.update({c.id: c.strategy for c in self.clients})
        return report


# ---- the run ----


def run(
    config: RunConfig,
    *,
    resume: bool = False,
    echo: Callable[[str], None] = _stderr,
    train_fn: TrainFn = train_local,
    transport: Callable[[Setup], Transport] | None = None,
) -> dict:
    """Runs ``config`` to its last round and returns the results dict (also written
    to output_dir/results.json). ``resume`` continues from output_dir's checkpoint.
    ``transport`` builds the engine's transport (default ``InProcess``, whose clients
    train with ``train_fn``: tests inject faulty clients)."""
    config = config.validated()
    torch.set_num_threads(config.threads)
    out = Path(config.output_dir)
    topology = parse_topology(config)
    sampler = Sampler.of(config)
    saved = _load_checkpoint(config, out) if resume else None

    # setup
    started = time.perf_counter()
    dataset = load_data(config)
    spec = model_spec(config, dataset)
    reference, reference_path = reference_profile(config, spec, out, echo, reuse_saved=resume)
    train, validation = split_validation(config, dataset)
    setup = Setup(config, spec, dataset, topology, reference, reference_path, train, validation, echo)
    link = transport(setup) if transport else InProcess(setup, train_fn=train_fn)
    calibration_x = calibration_images(config, dataset)
    setup_s = time.perf_counter() - started

    # the clients' analyses (Eq. 1, 3), Sig_speed (Eq. 2) and the allocation
    t0 = time.perf_counter()
    answers = link.analyze()
    analysis_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    times, acc_sig = [a.time_s for a in answers], [a.acc_sig for a in answers]
    speed_sig = speed_analysis.speed_significance(times)
    costs = RoundCosts.of(answers, topology)
    assignment = allocate(config, speed_sig, acc_sig, costs, topology)
    allocation_s = time.perf_counter() - t0
    norm_speed, norm_acc = normalized_significance(config, speed_sig, acc_sig)
    strategies = {a.client: s for a, s in zip(answers, assignment)}
    batches = {a.client: a.about["batch"] for a in answers}

    server = Server.for_run(config, initial_model(config, spec))
    server.declare_samples({a.client: a.about["samples"] for a in answers})  # no update may claim more
    policy = precision_policy(config, spec, answers, costs, validation)
    server.weights = policy.weights()
    history: list[dict] = []
    training_s = 0.0
    adjustment: dict | None = None
    if saved is not None:
        _check_saved_run(saved, server, config, list(strategies), out / CHECKPOINT_FILE)
        server.state = saved["server_state"]
        link.restore(saved["client_states"])
        history = saved["history"]
        training_s = saved["training_s"]
        adjustment = saved["adjustment"]
        strategies = dict(zip(strategies, saved["strategies"]))
        policy.restore(saved.get("precision", {}))
        echo(f"resuming {out / CHECKPOINT_FILE} after round {len(history)}")

    on = "" if link.name == "embedded" else f" on {link.name.capitalize()}"
    left_out = f", {len(link.excluded)} left out" if link.excluded else ""
    echo(
        f"{config.strategy}{on}: {dataset.summary()}; model {spec.key}; {len(answers)} clients "
        f"({assignment.count('ptq')} PTQ, {assignment.count('qat')} QAT){left_out}"
    )
    trainers = [cid for cid in strategies if topology.trains[cid]]
    for r in range(len(history) + 1, config.rounds + 1):
        round_started = time.perf_counter()
        sampled, available = sampler.sample(r, trainers)
        wanted = min(sampler.per_round, len(trainers))
        if len(available) < wanted:
            skipped = "" if available else ": round skipped, the global model unchanged"
            echo(f"round {r}: {len(available)} of {len(trainers)} clients available, fewer than K = {wanted}{skipped}")
        if sampled:
            policy.before_round(r, server)
        plans = {cid: policy.plan(cid, round_plan(config, r, strategies[cid], batches[cid])) for cid in sampled}
        # a round nobody trains in changes nothing: it is recorded and the run goes on
        replies = link.train(server, plans) if plans else Replies(server.open_round(topology), [], [], {})
        outcome = close_round(topology, r, replies, round_started)
        policy.after_round([u for u in outcome.updates if u.client in outcome.accepted], server)
        metrics = evaluate_global(spec, server, dataset.test, calibration_x)
        row = add_round(history, outcome.row(metrics["accuracy"], metrics["loss"], config.local_epochs) | metrics)
        row.update(outcome.extra, sampled=sampled, available=len(available))
        training_s += row["wall_s"]
        if config.adjust and r == config.adjust_after and adjustment is None:
            adjustment = link.adjust(server, strategies, outcome, next_round=r + 1)
        checkpoint.save(
            out / CHECKPOINT_FILE,
            {
                "config": config.to_dict(),
                "server_state": server.state,
                "history": history,
                "training_s": training_s,
                "client_states": link.local_state(),
                "strategies": list(strategies.values()),
                "adjustment": adjustment,
                "precision": policy.state(),
            },
        )
        echo_progress(echo, row, config.rounds)

    client_rows = [
        {
            "id": a.client,
            **a.about,
            "strategy": strategies[a.client],
            "speed_time_s": times[i],
            "predicted_s": {"ptq": costs.ptq_s[i], "qat": costs.qat_s[i], "upload": costs.upload_s[i]},
            "speed_sig": speed_sig[i],
            "acc_sig": acc_sig[i],
            "norm_speed": norm_speed[i],
            "norm_acc": norm_acc[i],
        }
        for i, a in enumerate(answers)
    ]
    timing = {
        "setup_s": setup_s,
        "analysis_s": analysis_s,
        "allocation_s": allocation_s,
        "adjustment_s": adjustment["time_s"] if adjustment else 0.0,
        "training_s": training_s,
    }
    results = results_document(
        config, spec, dataset.name, client_rows, assignment, topology, adjustment, history, timing, reference_path
    )
    if link.name != "embedded":
        results |= {"engine": link.name, "excluded": link.excluded}
    out.mkdir(parents=True, exist_ok=True)
    (out / RESULTS_FILE).write_text(json.dumps(results, indent=1) + "\n")
    return results


def add_round(history: list[dict], row: dict) -> dict:
    """Appends a round's row with the cumulative wall and simulated times."""
    row["cum_wall_s"] = (history[-1]["cum_wall_s"] if history else 0.0) + row["wall_s"]
    row["cum_sim_s"] = (history[-1]["cum_sim_s"] if history else 0.0) + row["sim_s"]
    history.append(row)
    return row


def results_document(
    config: RunConfig,
    spec: ModelSpec,
    dataset_name: str,
    client_rows: list[dict],
    assignment_before: list[str],
    topology: Topology,
    adjustment: dict | None,
    history: list[dict],
    timing: dict,
    reference_path: str,
) -> dict:
    """The results.json document (RESULTS_SCHEMA) of a finished run, from any engine."""
    return {
        "schema": RESULTS_SCHEMA,
        "config": config.to_dict(),
        "strategy": config.strategy,
        "model": spec.key,
        "dataset": dataset_name,
        "clients": client_rows,
        "allocation": {
            "xi": config.xi,
            "area_threshold": config.area_threshold,
            "speed_orientation": config.speed_orientation,
            "ptq": [c["id"] for c in client_rows if c["strategy"] == "ptq"],
            "qat": [c["id"] for c in client_rows if c["strategy"] == "qat"],
        },
        "topology": {
            "spec": config.topology,
            "parents": list(topology.parents),
            "trains": list(topology.trains),
            "levels": [topology.level(n) for n in range(topology.size)],
        },
        "assignment_before": assignment_before,
        "assignment_after": [c["strategy"] for c in client_rows],
        "adjustment": adjustment,
        "rounds": history,
        "final_accuracy": history[-1]["accuracy"] if history else None,
        "final_deployed_accuracy": history[-1].get("deployed_accuracy") if history else None,
        "wall_time_s": history[-1]["cum_wall_s"] if history else 0.0,
        "sim_time_s": history[-1]["cum_sim_s"] if history else 0.0,
        "upload_bytes": sum(h["upload_bytes"] for h in history),
        "weight_bits": mean_weight_bits(history),
        "timing": timing,
        "reference_profile": reference_path,
    }


def mean_weight_bits(history: list[dict]) -> float | None:
    """The run's uploads' mean bits per weight, over the rounds that had any."""
    values = [h["weight_bits"] for h in history if h.get("weight_bits") is not None]
    return sum(values) / len(values) if values else None


# keys of a checkpoint's payload, and the bound on the saved global model: a weight at
# most this many times the initial model's largest of its tensor (or of 1.0)
CHECKPOINT_KEYS = ("config", "server_state", "history", "training_s", "client_states", "strategies", "adjustment")
SAVED_MAX_GROWTH = 1e4
# which strategies a client of each run strategy may hold
CLIENT_STRATEGIES = {
    "fedaqt": {"qat"},
    "aqfl": {"qat"},
    "fedfq": {"ptq"},
    "fedlq": {"ptq"},
    "fp32": {"fp32"},
    "fedmpq": {"mpq"},
}


def _load_checkpoint(config: RunConfig, out: Path) -> dict:
    """The verified checkpoint of ``out`` (checkpoint.load checks its hash), written
    with ``config``'s settings; ConfigError when it is not usable."""
    path = out / CHECKPOINT_FILE
    if not path.exists() and not path.is_symlink():
        raise ConfigError(f"--resume: no checkpoint at {path}")
    try:
        saved = checkpoint.load(path)
    except checkpoint.CheckpointError as error:
        raise ConfigError(f"--resume: {error}") from None
    reason = _payload_problem(saved)
    if reason:
        raise ConfigError(f"--resume: checkpoint {path} is not usable: {reason}")
    before, now = dict(saved["config"]), config.to_dict()
    for key in RESUMABLE_CHANGES:
        before.pop(key, None)
        now.pop(key, None)
    changed = sorted(k for k in now if before.get(k) != now[k])
    if changed:
        raise ConfigError(f"--resume: the checkpoint at {path} was written with different settings: {changed}")
    if len(saved["history"]) > config.rounds:
        raise ConfigError(f"--resume: the checkpoint is at round {len(saved['history'])}, past rounds={config.rounds}")
    return saved


def _payload_problem(saved: dict) -> str | None:
    """What is malformed in a checkpoint's payload, apart from its model and strategies
    (``_check_saved_run``), or None."""
    missing = [k for k in CHECKPOINT_KEYS if k not in saved]
    if missing:
        return f"missing {missing}"
    if not isinstance(saved["config"], dict) or not isinstance(saved["client_states"], dict):
        return "config and client_states must be dicts"
    if not is_real(saved["training_s"]) or saved["training_s"] < 0:
        return f"training_s must be a finite number >= 0, got {saved['training_s']!r}"
    if saved["adjustment"] is not None and not isinstance(saved["adjustment"], dict):
        return "adjustment must be a dict or None"
    for cid, observers in saved["client_states"].items():
        if not isinstance(observers, dict) or not all(isinstance(v, torch.Tensor) for v in observers.values()):
            return f"client {cid}'s state must be a dict of tensors"
    history = saved["history"]
    if not isinstance(history, list):
        return "history must be a list of rounds"
    for i, row in enumerate(history, start=1):
        if not isinstance(row, dict) or row.get("round") != i:
            return f"history row {i} is not round {i}"
        if not (is_real(row.get("accuracy")) and 0 <= row["accuracy"] <= 1):
            return f"round {i}: accuracy must be in [0, 1], got {row.get('accuracy')!r}"
        for key in ("wall_s", "sim_s", "cum_wall_s", "cum_sim_s", "upload_bytes"):
            if not is_real(row.get(key)) or row[key] < 0:
                return f"round {i}: {key} must be a finite number >= 0, got {row.get(key)!r}"
        # "sampled" is absent from the checkpoints of versions without client sampling
        if not all(isinstance(v, list) for v in (row.get("participants"), row.get("rejected"), row.get("sampled", []))):
            return f"round {i}: participants, rejected and sampled must be lists"
    return None


def _scheme_problem(state: dict, initial: dict) -> str | None:
    """Which entry of ``state`` is not quantized as the run quantizes ``initial``'s."""
    for name, q in initial.items():
        if isinstance(q, fk.QuantizedTensor) and check_scheme(state[name], q):
            return f"'{name}': not quantized with the run's scheme (symmetric, axis, scales)"
    return None


def _check_saved_run(saved: dict, server: Server, config: RunConfig, clients: list[int], path: Path) -> None:
    """The saved global model is checked like a client update (the run's names, shapes,
    dtypes, bits and scheme; finite scales, magnitudes within SAVED_MAX_GROWTH of the
    initial model's) and the saved allocation holds one strategy per client that
    ``config.strategy`` allows; ConfigError otherwise."""
    state, s = saved["server_state"], server
    limits = growth_limits(s.state, SAVED_MAX_GROWTH, s.stats)
    reason = validate_update(state, 1, s.template, bits=s.bits, quantized=s.quantized, limits=limits, stats=s.stats)
    if reason is None:
        reason = _scheme_problem(state, s.state)
    if reason:
        raise ConfigError(f"--resume: checkpoint {path} holds an unusable global model: {reason}")
    allowed = CLIENT_STRATEGIES.get(config.strategy, {"ptq", "qat"})
    chosen = saved["strategies"]
    if not isinstance(chosen, list) or len(chosen) != len(clients) or not all(s in allowed for s in chosen):
        raise ConfigError(
            f"--resume: checkpoint {path} holds strategies {chosen!r}: expected one of {sorted(allowed)} "
            f"for each of {len(clients)} clients (strategy {config.strategy})"
        )
