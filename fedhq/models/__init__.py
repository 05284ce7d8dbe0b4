"""The project's models, defined here (no torchvision): ResNet-18 with the CIFAR stem
and a small CNN.

    build_model("resnet18", num_classes=10, in_channels=3, image_size=32)
    ModelSpec.parse("small_cnn@8x8x1").build()      # name@HxWxC[:classes]

A ``ModelSpec`` names a model together with its input shape and class count: the
hardware profile keys its measured step times by ``spec.key`` (e.g.
``small_cnn@32x32x3:10``), because a step's cost depends on all four.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fedhq.models.resnet import BasicBlock, ResNet18, resnet18
from fedhq.models.small_cnn import SmallCNN, small_cnn

MODELS: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18, "small_cnn": small_cnn}


def build_model(name: str, *, num_classes: int = 10, in_channels: int = 3, image_size: int = 32) -> nn.Module:
    """A freshly initialized model by name (see ``MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}")
    return MODELS[name](num_classes=num_classes, in_channels=in_channels, image_size=image_size)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (the P of Eq. 1)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


_SPEC = re.compile(r"^(?P<name>[a-z0-9_]+)(?:@(?P<h>\d+)x(?P<w>\d+)x(?P<c>\d+))?(?::(?P<classes>\d+))?$")


@dataclass(frozen=True)
class ModelSpec:
    """A model and the input it is trained on: square ``image_size`` images with
    ``in_channels`` channels and ``num_classes`` classes."""

    name: str
    image_size: int = 32
    in_channels: int = 3
    num_classes: int = 10

    def __post_init__(self):
        if self.name not in MODELS:
            raise ValueError(f"unknown model {self.name!r}; known: {', '.join(sorted(MODELS))}")
        if self.image_size < 4 or self.in_channels < 1 or self.num_classes < 2:
            raise ValueError(
                f"model spec {self.name}: need image_size >= 4, in_channels >= 1, num_classes >= 2, got "
                f"{self.image_size}, {self.in_channels}, {self.num_classes}"
            )

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``name[@HxWxC][:classes]``, e.g. ``resnet18``, ``small_cnn@8x8x1``,
        ``resnet18@32x32x3:100``; defaults 32x32x3 and 10 classes."""
        match = _SPEC.match(text.strip())
        if not match:
            raise ValueError(f"model spec {text!r}: expected name[@HxWxC][:classes], e.g. small_cnn@8x8x1:10")
        if match["h"] is not None and match["h"] != match["w"]:
            raise ValueError(f"model spec {text!r}: only square images are supported, got {match['h']}x{match['w']}")
        return cls(
            name=match["name"],
            image_size=int(match["h"]) if match["h"] else 32,
            in_channels=int(match["c"]) if match["c"] else 3,
            num_classes=int(match["classes"]) if match["classes"] else 10,
        )

    @property
    def key(self) -> str:
        return f"{self.name}@{self.image_size}x{self.image_size}x{self.in_channels}:{self.num_classes}"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One sample's shape, channels first."""
        return (self.in_channels, self.image_size, self.image_size)

    def build(self) -> nn.Module:
        return build_model(
            self.name, num_classes=self.num_classes, in_channels=self.in_channels, image_size=self.image_size
        )


__all__ = [
    "MODELS",
    "BasicBlock",
    "ModelSpec",
    "ResNet18",
    "SmallCNN",
    "build_model",
    "count_parameters",
    "resnet18",
    "small_cnn",
]
