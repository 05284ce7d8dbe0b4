"""ResNet-18 (BatchNorm) in federated runs: a last batch of one sample never reaches
BatchNorm, a client that cannot make a batch of two is refused with its reason, and a
short run trains with every update accepted."""

import pytest
import torch

from fedhq.data import Split
from fedhq.fl import RunConfig, engine
from fedhq.fl.client import RoundPlan, has_batchnorm, train_local, training_batches
from fedhq.models import ModelSpec

RESNET = ModelSpec.parse("resnet18@8x8x1:10")


def digits_like(n: int) -> Split:
    g = torch.Generator().manual_seed(n)
    return Split(torch.randn(n, 1, 8, 8, generator=g), torch.arange(n) % 10)


def plan(batch_size: int, strategy: str = "ptq") -> RoundPlan:
    return RoundPlan(round=1, strategy=strategy, epochs=1, batch_size=batch_size, lr=0.01, momentum=0.9, bits=8, seed=0)


def test_a_last_batch_of_one_is_left_out_only_for_batchnorm():
    sizes = lambda n, b, bn: [len(x) for x in training_batches(torch.arange(n), b, bn)]  # noqa: E731
    assert sizes(17, 16, True) == [16] and sizes(17, 16, False) == [16, 1]
    assert sizes(18, 16, True) == [16, 2] and sizes(32, 16, True) == [16, 16]
    assert has_batchnorm(RESNET.build()) and not has_batchnorm(ModelSpec.parse("small_cnn@8x8x1").build())


@pytest.mark.parametrize("strategy", ["ptq", "qat"])
def test_batchnorm_trains_on_a_client_whose_last_batch_has_one_sample(strategy):
    weights = RESNET.build().state_dict()
    update, _ = train_local(RESNET, weights, digits_like(17), plan(16, strategy), client=0)
    assert update.steps == 1 and update.num_samples == 17  # the timing model is charged the step it took
    small = ModelSpec.parse("small_cnn@8x8x1")
    assert train_local(small, small.build().state_dict(), digits_like(17), plan(16), client=0)[0].steps == 2


@pytest.mark.parametrize("samples, batch", [(1, 16), (40, 1)])
def test_a_client_that_cannot_make_a_batch_of_two_says_why(samples, batch):
    with pytest.raises(
        ValueError,
        match=f"BatchNorm cannot train on batches of one sample, and this client's "
        f"{samples} sample\\(s\\) at batch size {batch} make no other",
    ):
        train_local(RESNET, RESNET.build().state_dict(), digits_like(samples), plan(batch), client=0)


def test_resnet18_trains_federated_with_every_update_accepted(tmp_path):
    # 386 samples: two IID clients of 193 = 12 x 16 + 1, so every epoch ends on a batch of one
    config = RunConfig(
        dataset="digits",
        max_train=386,
        model="resnet18@8x8x1",
        clients=2,
        rounds=2,
        local_epochs=1,
        partition="iid",
        lr=0.01,
        output_dir=str(tmp_path / "run"),
    )
    results = engine.run(config, echo=lambda line: None)
    assert all(c["samples"] % c["batch"] == 1 for c in results["clients"])
    for row in results["rounds"]:
        assert row["participants"] == [0, 1] and row["rejected"] == [], row["rejected"]
    assert results["final_accuracy"] > 0.3  # 10 classes: chance is 0.1
