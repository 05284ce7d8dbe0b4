"""Parameter shapes of ResNet-18 with the CIFAR stem, computed from the architecture
(torchvision is not a dependency): a 3x3 stride-1 first convolution, no max-pool,
four stages of two BasicBlocks (64, 128, 256, 512 channels; a 1x1 convolution + BN
shortcut where a block changes width or stride), global average pooling, a linear
classifier. Convolutions have no bias (BatchNorm follows each); BN buffers
(running_mean / running_var / num_batches_tracked) are not parameters and not listed.

Names follow torchvision's resnet18 (`layer2.0.downsample.0.weight`, ...), so the
list matches `dict(model.named_parameters())` of the usual CIFAR port.
"""

from __future__ import annotations

from collections import OrderedDict

# The standard model (width 64, 10 classes): what bench_kernels.py checks it builds.
RESNET18_CIFAR_TENSORS = 62
RESNET18_CIFAR_PARAMS = 11_173_962  # "11.17M"


def resnet18_cifar_shapes(num_classes: int = 10, width: int = 64) -> OrderedDict[str, tuple[int, ...]]:
    """Ordered name -> shape of every parameter. ``width`` scales all stages (64 is the
    real model; a smaller width keeps the same 62 tensors with fewer elements)."""
    shapes: OrderedDict[str, tuple[int, ...]] = OrderedDict()

    def conv(name: str, c_out: int, c_in: int, k: int) -> None:
        shapes[f"{name}.weight"] = (c_out, c_in, k, k)

    def bn(name: str, c: int) -> None:
        shapes[f"{name}.weight"] = (c,)
        shapes[f"{name}.bias"] = (c,)

    conv("conv1", width, 3, 3)  # CIFAR stem: 3x3, stride 1 (ImageNet's is 7x7 stride 2 + max-pool)
    bn("bn1", width)
    c_in = width
    for stage, multiplier in enumerate((1, 2, 4, 8), start=1):
        c_out = width * multiplier
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            conv(f"{prefix}.conv1", c_out, c_in, 3)
            bn(f"{prefix}.bn1", c_out)
            conv(f"{prefix}.conv2", c_out, c_out, 3)
            bn(f"{prefix}.bn2", c_out)
            if c_in != c_out:  # first block of stages 2-4: stride 2 and a wider output
                conv(f"{prefix}.downsample.0", c_out, c_in, 1)
                bn(f"{prefix}.downsample.1", c_out)
            c_in = c_out
    shapes["fc.weight"] = (num_classes, c_in)
    shapes["fc.bias"] = (num_classes,)
    return shapes


def count_params(shapes: OrderedDict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for s in shape:
            n *= s
        total += n
    return total


if __name__ == "__main__":
    shapes = resnet18_cifar_shapes()
    print(f"{len(shapes)} tensors, {count_params(shapes):,} parameters")
    assert len(shapes) == RESNET18_CIFAR_TENSORS and count_params(shapes) == RESNET18_CIFAR_PARAMS
