"""A small Flower app written the way Flower's PyTorch quickstart is (a ClientApp with
``@app.train()`` / ``@app.evaluate()``, the model as ``ArrayRecord`` under "arrays",
``num-examples`` in the reply's MetricRecord), knowing nothing of FedHQ. Data: a fixed
synthetic 10-class task (Gaussian clusters), split by ``partition-id``."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from torch import nn

FEATURES, CLASSES, SAMPLES, TEST_SAMPLES = 32, 10, 200, 1000


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(FEATURES, 256), nn.BatchNorm1d(256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU()
        )
        self.head = nn.Linear(256, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def load_data(partition: int | None, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Partition ``partition``'s samples (None: the held-out test set)."""
    centers = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(1234)) * 0.6
    g = torch.Generator().manual_seed(seed * 1000 + (999 if partition is None else partition))
    n = TEST_SAMPLES if partition is None else SAMPLES
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centers[y] + torch.randn(n, FEATURES, generator=g), y


def test_model(net: Net, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    net.eval()
    with torch.no_grad():
        out = net(x)
    return nn.functional.cross_entropy(out, y).item(), (out.argmax(1) == y).float().mean().item()


def make_app(mods=None) -> ClientApp:
    app = ClientApp(mods=mods or [])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        torch.manual_seed(int(msg.content["config"]["server-round"]) * 100 + context.node_config["partition-id"])
        net = Net()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        x, y = load_data(context.node_config["partition-id"], context.run_config.get("seed", 0))
        optimizer = torch.optim.SGD(net.parameters(), lr=float(msg.content["config"].get("lr", 0.05)))
        net.train()
        for _ in range(2):  # local epochs
            for i in range(0, len(y), 20):
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(net(x[i : i + 20]), y[i : i + 20])
                loss.backward()
                optimizer.step()
        metrics = MetricRecord({"train_loss": loss.item(), "num-examples": len(y)})
        content = RecordDict({"arrays": ArrayRecord(net.state_dict()), "metrics": metrics})
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        net = Net()
        net.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        loss, acc = test_model(net, *load_data(context.node_config["partition-id"], 7))
        metrics = MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": SAMPLES})
        return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """The server's evaluate_fn: accuracy of the global model on the held-out set."""
    net = Net()
    net.load_state_dict(arrays.to_torch_state_dict())
    loss, acc = test_model(net, *load_data(None))
    return MetricRecord({"loss": loss, "accuracy": acc})


def initial_arrays(seed: int = 0) -> ArrayRecord:
    torch.manual_seed(seed)
    return ArrayRecord(Net().state_dict())


plain_app = make_app()
