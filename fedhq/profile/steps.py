"""Training-step measurements of a model (time, peak memory, work per step) for each
strategy (PTQ: float model; QAT: fake-quantized) at several batch sizes. One step is
``zero_grad``, forward, cross-entropy, backward, ``SGD(momentum=0.9).step()``; how time,
memory and work are measured: docs/profile.md.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import flop_registry

import fedhq_kernels as fk
from fedhq.profile import timing
from fedhq_kernels.checks import is_int

# Ops that alias or only relabel their input (no data moved), beyond those whose
# schema says they are views.
_ALIASING = {
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
    torch.ops.aten.lift_fresh.default,
}


def _tensor_bytes(tree) -> int:
    flat, _ = tree_flatten(tree)
    return sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))


class StepCounter(TorchDispatchMode):
    """Counts ops, FLOPs and bytes of every ATen op run under it; with
    ``sample_heap`` it also records the largest live heap seen after any op."""

    def __init__(self, sample_heap: bool = False):
        super().__init__()
        self.sample_heap = sample_heap
        self.ops = 0
        self.flops = 0.0
        self.bytes_compute = 0.0
        self.bytes_other = 0.0
        self.peak_heap = timing.heap_bytes() if sample_heap else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if getattr(func, "is_view", False) or func in _ALIASING:
            return out
        self.ops += 1
        nbytes = _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        count = flop_registry.get(func.overloadpacket)
        flops = count(*args, **kwargs, out_val=out) if count is not None else 0
        if flops:
            self.flops += flops
            self.bytes_compute += nbytes
        else:
            self.bytes_other += nbytes
        if self.sample_heap:
            self.peak_heap = max(self.peak_heap, timing.heap_bytes())
        return out


def make_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> Callable[[tuple], torch.Tensor]:
    """One training step on a batch ``(inputs, labels)``; returns the loss (no
    ``.item()``, so nothing waits for the device)."""

    def step(batch):
        x, y = batch
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return step


def static_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters + buffers + optimizer state, in bytes."""
    total = sum(t.numel() * t.element_size() for t in model.parameters())
    total += sum(t.numel() * t.element_size() for t in model.buffers())
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return total


@dataclass
class BatchResult:
    batch: int
    step: timing.Timing
    peak_memory_bytes: int
    growth_bytes: int
    ops: int
    flops: float
    bytes_compute: float
    bytes_other: float

    def as_dict(self) -> dict:
        return {
            "batch": self.batch,
            "step_s": self.step.figure(),
            "peak_memory_bytes": self.peak_memory_bytes,
            "step_growth_bytes": self.growth_bytes,
            "ops": self.ops,
            "flops": self.flops,
            "bytes_compute": self.bytes_compute,
            "bytes_other": self.bytes_other,
        }


@dataclass
class _Client:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable
    results: list[BatchResult] = field(default_factory=list)


def _batches(batch: int, input_shape, num_classes: int, device, seed: int, copies: int) -> list[tuple]:
    gen = torch.Generator().manual_seed(seed)
    sample_bytes = 4 * batch * int(torch.Size(input_shape).numel())
    return timing.rotating_inputs(
        lambda k: (
            timing.randn_nonzero((batch, *input_shape), generator=gen, device=device),
            torch.randint(0, num_classes, (batch,), generator=gen).to(device),
        ),
        sample_bytes,
        device=device,
        max_copies=copies,
    )


def _peak_growth(client: _Client, batch, device: torch.device) -> tuple[int, StepCounter]:
    """(peak growth in bytes during one step, the counter of that step). The previous
    step's gradients are freed first, so the growth includes the new ones."""
    step = client.step
    if device.type == "cuda":
        counter = StepCounter(sample_heap=False)
        with counter:  # counts, on a step of its own
            step(batch)
        client.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step(batch)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, counter
    client.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    # the kernels' output cache keeps freed buffers: the step would take them rather
    # than grow the heap, hiding what it needs; measured with the cache off and empty
    limit = fk.set_output_cache_limit(0)
    try:
        before = timing.heap_bytes()
        counter = StepCounter(sample_heap=True)
        counter.peak_heap = before
        with counter:
            step(batch)
    finally:
        fk.set_output_cache_limit(limit)
    return max(0, counter.peak_heap - before), counter


def profile_training(
    build: Callable[[], nn.Module],
    input_shape: Sequence[int],
    num_classes: int,
    strategies: Mapping[str, Callable[[nn.Module], nn.Module]],
    batches: Sequence[int],
    *,
    device: torch.device | str = "cpu",
    repeats: int = 5,
    warmup: int = 2,
    seed: int = 0,
    lr: float = 0.01,
    log: Callable[[str], None] = lambda s: None,
) -> dict[str, dict]:
    """Measures every strategy at every batch size. ``build`` makes the float model;
    ``strategies`` maps a name ('ptq', 'qat') to a function preparing it. Returns, per
    strategy, ``{"static_bytes", "batches": [BatchResult.as_dict(), ...]}``."""
    device = torch.device(device)
    if not batches or any(not is_int(b) or b < 1 for b in batches):
        raise ValueError(f"profile_training: batch sizes must be ints >= 1, got {list(batches)}")
    clients: dict[str, _Client] = {}
    for name, prepare in strategies.items():
        torch.manual_seed(seed)
        model = prepare(build()).to(device).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        clients[name] = _Client(model, optimizer, make_step(model, optimizer))
    for b in sorted(set(batches)):
        inputs = _batches(b, input_shape, num_classes, device, seed + b, copies=4)
        sample_bytes = _tensor_bytes(inputs[0])
        timings = timing.measure_interleaved(
            {name: c.step for name, c in clients.items()}, device=device, repeats=repeats, warmup=warmup, inputs=inputs
        )
        for name, client in clients.items():
            step_timing = timings[name]
            growth, counter = _peak_growth(client, inputs[0], device)
            peak = static_bytes(client.model, client.optimizer) + sample_bytes + growth
            client.results.append(
                BatchResult(
                    b, step_timing, peak, growth, counter.ops, counter.flops, counter.bytes_compute, counter.bytes_other
                )
            )
            log(
                f"  {name} batch {b}: {step_timing.median_s * 1e3:.2f} ms/step "
                f"(p10-p90 {step_timing.p10_s * 1e3:.2f}-{step_timing.p90_s * 1e3:.2f}), "
                f"peak {peak / 2**20:.1f} MiB"
            )
    return {
        name: {"static_bytes": static_bytes(c.model, c.optimizer), "batches": [r.as_dict() for r in c.results]}
        for name, c in clients.items()
    }
