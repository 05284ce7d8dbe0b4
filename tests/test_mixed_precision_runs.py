"""The mixed-precision systems in the run driver (fedhq.fl.precision): aqfl, fedhq-budget,
fedlq and fedmpq train, upload and receive at the bits their policies give, the server
checks each update against its plan and keeps the global model at the run's bits."""

import re

import pytest
import torch

import fedhq_kernels as fk
from fedhq.fl import RunConfig, checkpoint, engine
from fedhq.fl.client import train_local
from fedhq.fl.config import ConfigError
from fedhq.fl.server import Server
from fedhq.models import ModelSpec
from fedhq.mpq import average_bits, device_budget, quantizable_layers

# the default devices, one per client in turn: RTX A6000, Jetson Orin Nano, phone
BUDGETS = [8, 6, 4, 8]


def tiny(reference, tmp_path, **changes) -> RunConfig:
    settings = dict(clients=4, rounds=2, local_epochs=1, output_dir=str(tmp_path / "run"), reference_profile=reference)
    return RunConfig(**(settings | changes)).validated()


class Recorder:
    """train_local, keeping what each client was given and what it uploaded."""

    def __init__(self):
        self.calls = []

    def __call__(self, spec, global_state, data, plan, client, state):
        update, new_state = train_local(spec, global_state, data, plan, client, state)
        self.calls.append((plan, client, {k: v.clone() for k, v in global_state.items()}, update))
        return update, new_state

    def round(self, r: int) -> list:
        return [call for call in self.calls if call[0].round == r]


def run(config, recorder=None):
    return engine.run(config, echo=lambda s: None, train_fn=recorder or train_local)


def bits_of(update) -> dict[str, int]:
    return {k: v.bits for k, v in update.state.items() if isinstance(v, fk.QuantizedTensor)}


def saved_state(config) -> dict:
    return checkpoint.load(config.output_dir + "/" + engine.CHECKPOINT_FILE)["server_state"]


def test_device_budgets_are_the_presets_tiers():
    assert [device_budget(d) for d in RunConfig().devices] == BUDGETS[:3]


@pytest.mark.parametrize("strategy", ["aqfl", "fedhq-budget"])
def test_budget_strategies_train_and_upload_at_each_devices_budget(reference, tmp_path, strategy):
    recorder = Recorder()
    config = tiny(reference, tmp_path, strategy=strategy)
    results = run(config, recorder)
    assert all(row["rejected"] == [] and row["participants"] == [0, 1, 2, 3] for row in results["rounds"])
    for plan, client, _, update in recorder.calls:
        assert plan.bits == BUDGETS[client] and plan.act_bits == 8
        assert set(bits_of(update).values()) == {BUDGETS[client]}
    if strategy == "aqfl":
        assert {c["strategy"] for c in results["clients"]} == {"qat"}
    else:  # FedHQ's own allocation, at the budgets
        fedhq = run(tiny(reference, tmp_path / "fedhq", strategy="fedhq"))
        assert [c["strategy"] for c in results["clients"]] == [c["strategy"] for c in fedhq["clients"]]
    assert {q.bits for q in saved_state(config).values() if isinstance(q, fk.QuantizedTensor)} == {8}


def test_fedmpq_clients_get_their_own_bit_maps_and_the_server_weighs_by_budget(reference, tmp_path):
    recorder = Recorder()
    config = tiny(reference, tmp_path, strategy="fedmpq", rounds=3, local_epochs=2)
    results = run(config, recorder)
    spec = ModelSpec.parse(config.model_spec_text)
    counts = quantizable_layers(spec.build())
    assert {c["strategy"] for c in results["clients"]} == {"mpq"}
    assert all(row["rejected"] == [] for row in results["rounds"])
    for plan, client, received, update in recorder.calls:
        # the map the client was planned and sent is within its budget ...
        planned = {name: plan.upload_bits[name] for name in counts}
        assert plan.download_bits == plan.upload_bits and average_bits(counts, planned) <= BUDGETS[client]
        # ... it received the global model at that map ...
        assert all(received[name].shape == update.state[name].shape for name in counts)
        # ... and uploaded at most those widths (pruning), the other entries at the run's bits
        uploaded = bits_of(update)
        assert all(2 <= uploaded[name] <= planned[name] for name in counts)
        assert all(uploaded[name] == 8 for name in uploaded if name not in counts)
    # round 1: every map is the budget, uniform
    assert [dict(call[0].upload_bits) for call in recorder.round(1)] == [dict.fromkeys(counts, b) for b in BUDGETS]


def test_fedmpq_downlink_is_the_global_model_at_the_clients_map(reference, tmp_path):
    recorder = Recorder()
    config = tiny(reference, tmp_path, strategy="fedmpq", rounds=1)
    run(config, recorder)
    spec = ModelSpec.parse(config.model_spec_text)
    initial = engine.initial_model(config, spec)
    server = Server.for_run(config, initial)
    for plan, _, received, _ in recorder.round(1):
        sent = fk.dequantize_state_dict(server.download(plan.download_map(server.quantized)))
        assert all(torch.equal(received[k], sent[k]) for k in sent)


def test_fedmpq_aggregates_by_samples_times_budget_at_the_runs_bits(reference, tmp_path):
    recorder = Recorder()
    config = tiny(reference, tmp_path, strategy="fedmpq", rounds=1)
    run(config, recorder)
    updates = [call[3] for call in sorted(recorder.round(1), key=lambda call: call[1])]
    weights = [u.num_samples * BUDGETS[u.client] for u in updates]
    expected = fk.aggregate_state_dicts([u.state for u in updates], weights, bits=8)
    state = saved_state(config)
    for name, value in expected.items():
        if isinstance(value, fk.QuantizedTensor):
            assert state[name].bits == 8 and torch.equal(state[name].data, value.data), name
            assert torch.equal(state[name].scale, value.scale), name
        else:
            assert torch.equal(state[name], value), name


def test_fedmpq_resume_equals_an_uninterrupted_run(reference, tmp_path):
    straight = run(tiny(reference, tmp_path / "straight", strategy="fedmpq", rounds=3))
    split = tiny(reference, tmp_path / "split", strategy="fedmpq", rounds=2)
    run(split)
    resumed = engine.run(split.replace(rounds=3), resume=True, echo=lambda s: None)
    keys = ("accuracy", "loss", "upload_bytes", "sim_s")
    assert [[r[k] for k in keys] for r in resumed["rounds"]] == [[r[k] for k in keys] for r in straight["rounds"]]


def test_fedlq_uploads_each_layer_at_its_greedy_width_within_the_uplink(reference, tmp_path):
    recorder = Recorder()
    config = tiny(reference, tmp_path, strategy="fedlq", clients=6)
    results = run(config, recorder)
    assert {c["strategy"] for c in results["clients"]} == {"ptq"}
    assert all(row["rejected"] == [] for row in results["rounds"])
    widths = {}
    for plan, client, _, update in recorder.calls:
        assert bits_of(update) == dict(plan.upload_bits)
        widths[client] = sorted(set(plan.upload_bits.values()))
    # the slowest uplinks (the phones: clients 2 and 5) upload below 8 bits somewhere
    assert min(widths[2]) < 8 and min(widths[5]) < 8, widths
    rows = {c["id"]: c for c in results["clients"]}
    uploads = {call[1]: call[3].nbytes for call in recorder.round(1)}
    slow, fast = max(rows, key=lambda c: rows[c]["predicted_s"]["upload"]), 0
    assert uploads[slow] < uploads[fast]


def test_mixed_precision_strategies_refuse_topologies_and_adjust(reference, tmp_path):
    for strategy in ("aqfl", "fedmpq", "fedlq", "fedhq-budget"):
        with pytest.raises(ConfigError, match=f"strategy {strategy} runs flat systems without --adjust"):
            tiny(reference, tmp_path, strategy=strategy, topology="hierarchical:2x1")


def test_fedlq_and_budgets_stay_within_the_runs_bits(reference, tmp_path):
    recorder = Recorder()
    run(tiny(reference, tmp_path / "fedlq", strategy="fedlq", clients=3, rounds=1, bits=5), recorder)
    widths = {client: set(bits_of(update).values()) for _, client, _, update in recorder.calls}
    assert widths[0] == {5} and max(widths[2]) <= 5  # the A6000's fast uplink keeps the run's width
    recorder = Recorder()
    run(tiny(reference, tmp_path / "aqfl", strategy="aqfl", clients=3, rounds=1, bits=5), recorder)
    assert [plan.bits for plan, *_ in recorder.calls] == [5, 5, 4]  # budgets 8, 6, 4, capped at 5


@pytest.mark.parametrize("strategy", ["fedlq", "fedmpq"])
def test_a_checkpoints_malformed_precision_maps_refuse_the_resume(reference, tmp_path, strategy):
    """They used to pass the checkpoint's checks and end the resumed run in its first
    round (ValueError, KeyError), or on a non-int client id at once."""
    config = tiny(reference, tmp_path, strategy=strategy, rounds=1)
    run(config)
    path = config.output_dir + "/" + engine.CHECKPOINT_FILE
    saved = checkpoint.load(path)
    maps = saved["precision"]["maps"]
    first = maps[0]
    malformed = {
        "must map client ids": {str(c): m for c, m in maps.items()},
        "are for clients [0]": {0: first},
        "entries the run plans": {c: m | {"no.such.weight": 4} for c, m in maps.items()},
        "to a width in": {c: m | {next(iter(m)): 9} for c, m in maps.items()},
    }
    for words, bad in malformed.items():
        checkpoint.save(path, saved | {"precision": {"maps": bad}})
        with pytest.raises(ConfigError, match="--resume: the checkpoint's precision maps .*" + re.escape(words)):
            engine.run(config.replace(rounds=2), resume=True, echo=lambda s: None)
    checkpoint.save(path, saved)  # as written, it resumes
    assert len(engine.run(config.replace(rounds=2), resume=True, echo=lambda s: None)["rounds"]) == 2


def test_fedlq_clients_with_the_fastest_uplinks_keep_the_runs_bits_off_the_candidate_widths(reference, tmp_path):
    """At --bits 5 (not one of FedLQ's candidate widths 8, 6, 4, 3, 2) every client
    used to upload at 4 bits or fewer, the fastest uplinks included."""
    recorder = Recorder()
    results = run(tiny(reference, tmp_path, strategy="fedlq", rounds=1, bits=5), recorder)
    upload_s = {c["id"]: c["predicted_s"]["upload"] for c in results["clients"]}
    fastest = [c for c, s in upload_s.items() if s == min(upload_s.values())]
    for plan, client, _, update in recorder.calls:
        assert bits_of(update) == dict(plan.upload_bits) and max(plan.upload_bits.values()) <= 5
        if client in fastest:
            assert set(plan.upload_bits.values()) == {5}, (client, plan.upload_bits)
