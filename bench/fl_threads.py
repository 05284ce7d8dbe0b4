"""Does the torch thread count change a federated run, and why? Two runs of the same
config advance in lockstep in one process, each round under its own thread count (or
one of them started from a model nudged by one float32 ulp), and every round prints
how far apart their global models are. Findings: docs/fl.md, "Thread count".

    python bench/fl_threads.py --bits 4 --strategy fedfq --threads 1,2
    python bench/fl_threads.py --bits 4 --strategy fedfq --threads 2,2 --nudge   # chaos, same threads
    python bench/fl_threads.py --bits 4 --strategy fedfq --threads 1,2 --no-mkldnn
"""

from __future__ import annotations

import argparse
import time

import torch

from fedhq.analysis.speed import speed_significance
from fedhq.fl import engine
from fedhq.fl.client import ClientState, evaluate, train_local
from fedhq.fl.config import RunConfig
from fedhq.fl.rounds import RoundContext, play_round
from fedhq.fl.server import Server
from fedhq.fl.topology import Topology


def trajectory(config: RunConfig, nudge: bool):
    """A RoundContext set up as engine.run sets one up (same data, clients, allocation;
    the reference profile is the given one, so ``out`` is never written)."""
    dataset = engine.load_data(config)
    spec = engine.model_spec(config, dataset)
    reference, _ = engine.reference_profile(config, spec, None, print)
    train, _ = engine.split_validation(config, dataset)
    clients = engine.make_clients(config, train, spec, reference)
    times, acc_sig = zip(*(engine.client_analysis(c, spec, config) for c in clients))
    speed_sig = speed_significance(list(times))
    for c, s in zip(clients, engine.allocate(config, speed_sig, acc_sig)):
        c.strategy = s
    torch.manual_seed(config.seed)
    model = spec.build()
    if nudge:  # one ulp up on every weight of the first conv
        with torch.no_grad():
            w = next(model.parameters())
            w.copy_(torch.nextafter(w, torch.full_like(w, float("inf"))))
    server = Server.for_run(config, model)
    states = {c.id: ClientState() for c in clients}
    topology = Topology.parse(config.topology, config.clients)
    return RoundContext(config, spec, server, clients, states, topology, train_local), dataset


def distance(a: dict, b: dict) -> tuple[float, float]:
    """(relative L2 distance of two float state dicts, largest elementwise |difference|)."""
    num = sum(float((a[k] - b[k]).double().square().sum()) for k in a)
    den = sum(float(a[k].double().square().sum()) for k in a)
    return (num / den) ** 0.5, max(float((a[k] - b[k]).abs().max()) for k in a)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", default="fedfq")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=25)
    p.add_argument("--threads", default="1,2", help="thread counts of the two runs, e.g. 1,2")
    p.add_argument("--nudge", action="store_true", help="start the second run one ulp away")
    p.add_argument("--no-mkldnn", action="store_true", help="train without oneDNN (torch.backends.mkldnn)")
    p.add_argument("--reference-profile", default="docs/results/default-comparison/profile-reference.json")
    args = p.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    base = RunConfig(
        strategy=args.strategy,
        bits=args.bits,
        seed=args.seed,
        rounds=args.rounds,
        reference_profile=args.reference_profile,
    ).validated()
    runs = [trajectory(base, nudge=False), trajectory(base, nudge=args.nudge)]
    torch.backends.mkldnn.enabled = not args.no_mkldnn
    print(
        f"{args.strategy}, {args.bits} bits, seed {args.seed}, threads {threads}, nudge {args.nudge}, "
        f"mkldnn {torch.backends.mkldnn.enabled}"
    )
    print("round  acc A %  acc B %  rel L2 dist  max |diff|  wall A s  wall B s")
    for r in range(1, args.rounds + 1):
        accs, walls = [], []
        for (ctx, dataset), t in zip(runs, threads):
            torch.set_num_threads(t)
            started = time.perf_counter()
            play_round(ctx, r)
            walls.append(time.perf_counter() - started)
            accs.append(evaluate(ctx.spec, ctx.server.global_weights(), dataset.test)[0])
        rel, top = distance(runs[0][0].server.global_weights(), runs[1][0].server.global_weights())
        print(
            f"{r:5d}  {100 * accs[0]:7.2f}  {100 * accs[1]:7.2f}  {rel:11.3g}  {top:10.3g}  "
            f"{walls[0]:8.2f}  {walls[1]:8.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
