"""Peak memory of the server side of one round: N synthetic INT8 updates of ResNet-18
(CIFAR) size, made one at a time, each offered to the server as it arrives (validated
and aggregated at once: fedhq.fl.server.RoundIntake), then the round closed.

    python bench/bench_server_memory.py [--clients 1000] [--width 64] [--bits 8] [--out FILE.json]

Each measurement runs in a fresh subprocess. The baseline is the process's resident
size once the server holds its global model (the float initial model it bounds updates
by and the quantized global one); the peak resets to it (/proc/self/clear_refs) and
VmHWM after the round is the round's peak. The bound: the peak above the baseline
within 3x the float32 model's size. Without streaming the round held every update:
N x the INT8 update size, printed beside it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

BOUND = 3.0  # the round's peak above the baseline, in float32 model sizes


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(clients: int, width: int, bits: int) -> dict:
    """The round in this process (call it in a fresh one: ``main`` does)."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from resnet18_shapes import resnet18_cifar_shapes

    import fedhq_kernels as fk
    from fedhq.fl.client import Update
    from fedhq.fl.server import Server

    torch.manual_seed(0)
    shapes = resnet18_cifar_shapes(width=width)
    initial = {name: torch.randn(shape) * 0.1 for name, shape in shapes.items()}
    server = Server(initial, bits=bits, quantized=set(shapes))
    params = sum(t.numel() for t in initial.values())
    qmin, qmax = fk.quant_range(bits)

    def synthetic_update(client: int) -> Update:
        """Fresh random codes with the global model's scales: an INT8 upload."""
        state = {}
        for name, g in server.state.items():
            codes = torch.randint(qmin, qmax + 1, g.shape, dtype=torch.int8)
            state[name] = fk.QuantizedTensor(
                codes, g.scale.clone(), g.zero_point.clone(), g.bits, g.axis, g.symmetric, g.dtype, g.shape
            )
        return Update(client, state, 100 + client % 7, 0.0, 1, 0.0)

    update_bytes = synthetic_update(0).nbytes
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    baseline = _status_kib("VmRSS") * 1024
    intake, offer_s = server.open_round(), 0.0
    for client in range(clients):
        update = synthetic_update(client)
        started = time.perf_counter()
        intake.offer(update)
        offer_s += time.perf_counter() - started
        del update
    started = time.perf_counter()
    accepted, rejected = intake.close()
    close_s = time.perf_counter() - started
    peak = _status_kib("VmHWM") * 1024
    if len(accepted) != clients or rejected:
        raise RuntimeError(f"the round refused synthetic updates: {[r.reason for r in rejected][:3]}")
    model_bytes = 4 * params
    return {
        "clients": clients,
        "width": width,
        "bits": bits,
        "params": params,
        "float32_model_bytes": model_bytes,
        "update_bytes": update_bytes,
        "baseline_rss_bytes": baseline,
        "peak_rss_bytes": peak,
        "peak_above_baseline_bytes": peak - baseline,
        "peak_above_baseline_models": (peak - baseline) / model_bytes,
        "bound_models": BOUND,
        "within_bound": peak - baseline <= BOUND * model_bytes,
        "buffered_updates_bytes": clients * update_bytes,
        "offer_ms_per_update": 1000 * offer_s / clients,  # validate + aggregate, the server's work
        "close_s": close_s,
    }


def run_fresh(clients: int, width: int, bits: int) -> dict:
    """``measure`` in a fresh interpreter, so nothing earlier sets its peak."""
    code = (
        f"import json, sys; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r}); "
        f"import bench_server_memory as b; print(json.dumps(b.measure({clients}, {width}, {bits})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--width", type=int, default=64, help="ResNet-18 width (64: the real model)")
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = run_fresh(args.clients, args.width, args.bits)
    mib = 2**20
    print(
        f"{result['clients']} clients, ResNet-18 width {result['width']} ({result['params']:,} params, "
        f"float32 {result['float32_model_bytes'] / mib:.1f} MiB, INT{result['bits']} update "
        f"{result['update_bytes'] / mib:.1f} MiB): baseline {result['baseline_rss_bytes'] / mib:.0f} MiB, "
        f"round peak +{result['peak_above_baseline_bytes'] / mib:.1f} MiB = "
        f"{result['peak_above_baseline_models']:.2f}x the float32 model (bound {BOUND:g}x: "
        f"{'met' if result['within_bound'] else 'NOT met'}); holding every update would take "
        f"{result['buffered_updates_bytes'] / mib:,.0f} MiB; server time {result['offer_ms_per_update']:.1f} ms per "
        f"update (validate + aggregate), close {result['close_s']:.2f} s"
    )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
